"""The run directory: where it is, what it holds when a run starts (the spec, the metric rows
so far, the standardisation statistics) and ends (the curves), and the files a run reads and
writes in it by name while it trains::

    runs/<name>/<timestamp>/  spec.yaml  metrics.jsonl  checkpoint.safetensors
                              weights.safetensors  best.safetensors  curves.png

The loop and the callbacks reach the files through a :class:`Files` (``run.files``), so that
the same loop writes them here (:class:`RunFiles`) or, on a Ray Train worker, through the
driver, which owns the directory (engine/train/parallel.py).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TextIO

import yaml

from dlgraph.engine.errors import TrainingError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import scaling
from dlgraph.engine.train.checkpoint import (
    atomic_write,
    load_tensors,
    tensors_bytes,
    tensors_from_bytes,
)

METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "weights.safetensors"
BEST = "best.safetensors"


def run_dir_path(graph: Graph, out: str | Path | None) -> Path:
    """``out``, or runs/<slug of the graph's name>/<timestamp>: the name is reduced to letters,
    digits, '-', '_' and inner dots, so 'name: ../../x' or '/etc' stays under runs/."""
    if out is not None:
        out = Path(out)
        for parent in (out, *out.parents):
            if parent.exists() and not parent.is_dir():
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


def start_run_dir(run_dir: Path, graph: Graph, history: list[dict], stats=None,
                  n_train: int = 0) -> None:
    """The run directory with the spec, the metric rows so far (none, or a resumed run's epoch
    rows) and the standardisation statistics of the ``n_train`` training samples, if any
    (evaluate and predict apply them to raw data)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "spec.yaml", yaml.safe_dump(
        graph.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        sort_keys=False).encode())
    atomic_write(run_dir / METRICS, "".join(json.dumps(h) + "\n" for h in history).encode())
    if stats:
        atomic_write(run_dir / scaling.STATS_FILE, scaling.to_json(stats, n_train))


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
        atomic_write(self.path / name, data)

    def read(self, name: str, start: int = 0) -> bytes | None:
        f = self.path / name
        if not f.is_file():
            return None
        with open(f, "rb") as fh:
            fh.seek(start)
            return fh.read()

    def append(self, name: str, text: str) -> None:
        if name not in self._open:
            self._open[name] = open(self.path / name, "a")  # noqa: SIM115 (closed by close)
        self._open[name].write(text)

    def flush(self) -> None:
        for f in self._open.values():
            f.flush()

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def size(self, name: str) -> int:
        f = self.path / name
        return f.stat().st_size if f.is_file() else 0

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def load_tensors(self, name: str) -> tuple[dict, dict] | None:
        return load_tensors(self.path / name) if self.exists(name) else None
