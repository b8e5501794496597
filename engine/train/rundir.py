"""The run directory: where it is, what it holds when a run starts (the spec, the metric rows
so far, the standardisation statistics) and ends (the curves), and the files a run reads and
writes in it by name while it trains::

    runs/<name>/<timestamp>/  spec.yaml  metrics.jsonl  checkpoint.safetensors
                              weights.safetensors  best.safetensors  curves.png  .dlgraph-run

A run writes only into a new folder or one marked as dlgraph's (``.dlgraph-run``), which
it locks while it writes (:func:`claim_run_dir`); the disk's refusals are located errors.
The loop and the callbacks reach the files through a :class:`Files` (``run.files``), so that
the same loop writes them here (:class:`RunFiles`) or, on a Ray Train worker, through the
driver, which owns the directory (engine/train/parallel.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path
from typing import TextIO

import yaml

from dlgraph.engine.errors import OutputError, Source, TrainingError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import scaling
from dlgraph.engine.io.outputs import disk_error
from dlgraph.engine.train.checkpoint import (
    atomic_write,
    load_tensors,
    read_checkpoint,
    tensors_bytes,
    tensors_from_bytes,
)

METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "weights.safetensors"
BEST = "best.safetensors"
REPLACED = "metrics.replaced.jsonl"   # rows of steps a resumed run took again
MARK = ".dlgraph-run"                 # marks a dlgraph run directory; its lock (RunLock)


def run_dir_path(graph: Graph, out: str | Path | None) -> Path:
    """``out``, or runs/<slug of the graph's name>/<timestamp>: the name is reduced to letters,
    digits, '-', '_' and inner dots, so 'name: ../../x' or '/etc' stays under runs/."""
    if out is not None:
        out = Path(out)
        for parent in (out, *out.parents):
            if (parent.exists() or parent.is_symlink()) and not parent.is_dir():
                raise TrainingError(f"cannot make the run directory {out}: {parent} is a file",
                                    help="pass --out a folder path")
        return out
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(graph.name)).strip(".-")[:64] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = Path("runs") / slug / stamp
    k = 1
    while d.exists():
        d = Path("runs") / slug / f"{stamp}-{k}"
        k += 1
    return d


def new_run_dir(run_dir: Path) -> Path:
    """Make ``run_dir`` (new or empty) and mark it as dlgraph's, for files written before the
    run starts in it (a sweep's trial.json)."""
    claim_run_dir(run_dir, resume=False).release()
    return run_dir


def claim_run_dir(run_dir: Path, resume: bool, fresh: bool = False) -> RunLock:
    """Take ``run_dir`` for a run, by the rule of what dlgraph writes (engine/io/outputs.py):
    a new or empty folder, or one marked as dlgraph's (``--resume`` continues the run it
    holds); never a folder of someone else's files. Returns its lock (``.run_dir``), held
    while the run writes (a second run into it is refused with the first one's pid).
    ``fresh``: ``run_dir`` is a default name (runs/<name>/<time>); a run started in the same
    second elsewhere makes it take the next free one (``<time>-1``, ...)."""
    run_dir = Path(run_dir)
    if fresh:
        return RunLock(_made_new(run_dir))
    has_run = (run_dir / CHECKPOINT).is_file()
    # one listing: a run starting beside this one makes its mark before any other file
    try:
        names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    except OSError as e:
        raise disk_error(run_dir, e, "read the run directory") from None
    marked = MARK in names and not (run_dir / MARK).is_symlink()
    if resume and not has_run and not marked:
        raise TrainingError(f"nothing to resume: {run_dir / CHECKPOINT} does not exist",
                            help="give --out the run directory of an earlier run")
    if has_run and not marked:      # a run of before the mark: its checkpoint must be one
        read_checkpoint(run_dir / CHECKPOINT, {})
    if not marked and not has_run and names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                        else "")
        raise OutputError(f"the run directory holds files dlgraph did not write: {shown}",
                          source=Source(str(run_dir)),
                          help="give --out a new or empty folder (dlgraph never replaces "
                               "files it did not write)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(run_dir, e, "make the run directory") from None
    lock = RunLock(run_dir)
    if (run_dir / CHECKPOINT).is_file() and not resume:   # again: a run may have ended since
        lock.release()
        raise TrainingError("the folder already holds a dlgraph run",
                            source=Source(str(run_dir)),
                            help="pass --resume to continue it, or give --out a new folder")
    return lock


def _made_new(run_dir: Path) -> Path:
    """``run_dir``, or ``<run_dir>-1``, ``-2``, ...: the first that this process made."""
    k, d = 0, run_dir
    while True:
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            k += 1
            d = run_dir.with_name(f"{run_dir.name}-{k}")
        except OSError as e:
            raise disk_error(d, e, "make the run directory") from None


def _holder_pid(fd: int) -> str:
    """The pid the lock's holder wrote, waiting up to 5 s for it (a loaded machine): a run
    that has just taken the lock writes its pid right after (two runs started together meet
    there)."""
    for _ in range(500):
        first = os.pread(fd, 64, 0).decode(errors="replace").split("\n")[0].strip()
        if first.isdigit() and _alive(int(first)):      # not the pid of an ended run
            return first
        time.sleep(0.01)
    return "unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                                    # another user's process: alive
        pass
    return True


class RunLock:
    """The lock of a run directory: its mark file (``.dlgraph-run``, which also says the
    folder is dlgraph's) locked with flock while a run writes there, holding that run's pid.
    The system drops the lock when the process ends, however it ends (SIGKILL too)."""

    def __init__(self, run_dir: Path):
        self.fd: int | None = None
        self.run_dir = run_dir
        path = run_dir / MARK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise disk_error(run_dir, e, "write in the run directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise TrainingError(f"another dlgraph run (pid {pid}) is writing this run "
                                "directory", source=Source(str(run_dir)),
                                help="wait until it ends, or give this run another --out "
                                     "folder") from None
        self.fd = fd
        mine = f"{os.getpid()}\n".encode()
        try:                           # written over the last run's, then cut: a reader
            os.pwrite(fd, mine, 0)     # never meets half a pid, and a full disk still
            os.ftruncate(fd, len(mine))    # has the old one's block
        except OSError as e:
            self.release()
            raise disk_error(run_dir, e, "write in the run directory") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def start_run_dir(run_dir: Path, graph: Graph, history: list[dict], stats=None,
                  n_train: int = 0) -> int:
    """The run directory with the spec, the metric rows so far and the standardisation
    statistics of the ``n_train`` training samples, if any (evaluate and predict apply them
    to raw data). A resumed run (``history``: its checkpoint's epoch rows) keeps every row
    of metrics.jsonl up to its checkpoint; the rows after it, of steps whose weights were
    lost and that the run takes again, move to metrics.replaced.jsonl, so each step is in
    metrics.jsonl once and nothing is lost. Returns how many rows moved."""
    at = (history[-1]["step"], history[-1]["epoch"]) if history else (0, 0)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)       # claim_run_dir made it, as a rule
    except OSError as e:
        raise disk_error(run_dir, e, "make the run directory") from None
    kept, moved = _split_rows(run_dir / METRICS, at)
    if not kept and history:               # metrics.jsonl gone: the checkpoint's epoch rows
        kept = [json.dumps(h) + "\n" for h in history]
    atomic_write(run_dir / "spec.yaml", yaml.safe_dump(
        graph.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        sort_keys=False).encode(), parents=False)
    if moved:
        old = (run_dir / REPLACED).read_bytes() if (run_dir / REPLACED).is_file() else b""
        atomic_write(run_dir / REPLACED, old + "".join(moved).encode(), parents=False)
    atomic_write(run_dir / METRICS, "".join(kept).encode(), parents=False)
    if stats:
        atomic_write(run_dir / scaling.STATS_FILE, scaling.to_json(stats, n_train),
                     parents=False)
    return len(moved)


def _split_rows(path: Path, at: tuple[int, int]) -> tuple[list[str], list[str]]:
    """metrics.jsonl's lines split into those up to (step, epoch) ``at`` and those after; a
    line cut short by a killed process is dropped (its step is taken again)."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return [], []
    kept, moved = [], []
    for line in lines:
        try:
            row = json.loads(line)
            step, epoch = int(row.get("step", 0)), int(row.get("epoch", 0))
        except (ValueError, TypeError, AttributeError):
            continue
        if not line.endswith("\n"):
            continue
        late = step > at[0] or (row.get("kind") == "epoch" and epoch > at[1])
        (moved if late else kept).append(line)
    return kept, moved


def draw_curves(run_dir: Path, echo) -> None:
    """curves.png from metrics.jsonl; a failure is a warning (a picture must never cost a
    finished run)."""
    try:
        from dlgraph.engine.report.plot import plot_run
        plot_run(run_dir)
    except Exception as e:  # a picture must never cost a finished run
        echo(f"warning: could not draw the training curves: {e}")


class Files:
    """A run directory's files by name, as the loop and the callbacks use them: metric rows
    appended (on disk at :meth:`flush`), every other file written whole. Subclasses move the
    bytes; with ``writes`` False (a worker that is not rank 0) writes are dropped. ``local``:
    the directory is on this machine (at ``path``)."""

    writes = True
    local = False

    def write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def read(self, name: str, start: int = 0) -> bytes | None:
        """The file's bytes from ``start``, or None when there is no such file."""
        raise NotImplementedError

    def append(self, name: str, text: str) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Everything appended so far on disk."""

    def close(self) -> None:
        self.flush()

    def size(self, name: str) -> int:
        data = self.read(name)
        return len(data) if data is not None else 0

    def exists(self, name: str) -> bool:
        return self.read(name) is not None

    def save_tensors(self, name: str, tensors: dict, meta: dict | None = None) -> None:
        """Named arrays and JSON-able metadata as a safetensors file, written atomically."""
        if self.writes:
            self.write(name, tensors_bytes(tensors, meta))

    def load_tensors(self, name: str) -> tuple[dict, dict] | None:
        """A safetensors file's arrays and metadata, or None when there is no such file."""
        data = self.read(name)
        return None if data is None else tensors_from_bytes(data, name)


class RunFiles(Files):
    """The files of a run directory on this machine."""

    local = True

    def __init__(self, path: Path):
        self.path = Path(path)
        self._open: dict[str, TextIO] = {}

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.path / name, data, parents=False)   # a vanished folder is an error

    def read(self, name: str, start: int = 0) -> bytes | None:
        f = self.path / name
        if not f.is_file():
            return None
        with open(f, "rb") as fh:
            fh.seek(start)
            return fh.read()

    def append(self, name: str, text: str) -> None:
        try:
            if name not in self._open:
                self._open[name] = open(self.path / name, "a")  # noqa: SIM115 (see close)
            self._open[name].write(text)
        except OSError as e:
            raise disk_error(self.path / name, e) from None

    def flush(self) -> None:
        for name, f in self._open.items():
            try:
                f.flush()
            except OSError as e:
                raise disk_error(self.path / name, e) from None
        if self._open and not self.path.is_dir():   # appends to a removed folder succeed
            raise OutputError("the run directory vanished while the run wrote it",
                              source=Source(str(self.path)),
                              help="keep the run directory while a run writes it; its "
                                   "files went with it, so start the run again")

    def close(self) -> None:
        open_files, self._open = self._open, {}
        for name, f in open_files.items():
            try:
                f.close()
            except OSError as e:
                raise disk_error(self.path / name, e) from None

    def size(self, name: str) -> int:
        f = self.path / name
        return f.stat().st_size if f.is_file() else 0

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def load_tensors(self, name: str) -> tuple[dict, dict] | None:
        return load_tensors(self.path / name) if self.exists(name) else None
