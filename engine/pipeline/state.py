"""The pipeline directory and what it remembers: a manifest (``pipeline.json``) with each
stage's key, state, timings, metrics and artifacts (with their content hashes), and the
stage folders the artifacts live in::

    runs/pipelines/<name>/  pipeline.json  stages/<stage>/<artifact files>

A stage's key hashes what decides its result, like a build system's: its resolved spec
(the spec's content with `set:` applied, its `include:` files and its data file), the
content of every artifact and data file it reads, its options and dlgraph's version.
A stage whose key and artifacts are as recorded is up to date and is skipped.

The manifest marks the folder as a dlgraph pipeline directory: a non-empty folder without
one (or holding another pipeline) is never written into.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dlgraph.engine.errors import DlgraphError, Source
from dlgraph.engine.train.checkpoint import atomic_write

MANIFEST = "pipeline.json"
MARK = "dlgraph pipeline directory"


def dlgraph_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dlgraph")
    except PackageNotFoundError:
        return "unknown"


def file_hash(path: Path) -> str:
    """The sha256 of a file's content (its mtime never counts)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=False, default=str).encode()).hexdigest()


def default_dir(name: str) -> Path:
    return Path("runs") / "pipelines" / name


@dataclass
class Status:
    """A stage's state as `status` shows it: ``up to date``, ``stale``, ``failed``,
    ``interrupted`` or ``never run``, and why."""

    state: str
    why: str = ""

    def text(self) -> str:
        return f"{self.state} ({self.why})" if self.why else self.state


class PipelineDir:
    """A pipeline directory: its manifest read and written, stage folders, the lock."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = Path(root), name
        self.manifest = {"kind": MARK, "version": 1, "pipeline": name, "stages": {}}
        if (self.root / MANIFEST).exists():
            self.manifest = self._read()

    def _read(self) -> dict:
        where = self.root / MANIFEST
        try:
            m = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DlgraphError(f"cannot read the pipeline manifest: {e}",
                               source=Source(str(where)),
                               help="remove the pipeline directory to start afresh") from None
        if not isinstance(m, dict) or m.get("kind") != MARK or \
                not isinstance(m.get("stages"), dict):
            raise DlgraphError(f"{self.root} is not a dlgraph pipeline directory (its "
                               f"{MANIFEST} is not one of ours)", source=Source(str(where)),
                               help="pass --dir a new folder")
        if m.get("pipeline") != self.name:
            raise DlgraphError(f"{self.root} holds the pipeline '{m.get('pipeline')}', not "
                               f"'{self.name}'", help="pass --dir another folder")
        return m

    def check_writable(self) -> None:
        """Refuse a non-empty folder that is not a pipeline directory (nothing of a
        user's is ever overwritten)."""
        if self.root.exists() and not self.root.is_dir():
            raise DlgraphError(f"{self.root} is a file, not a pipeline directory",
                               help="pass --dir a folder")
        if self.root.is_dir() and any(p.name != ".lock" for p in self.root.iterdir()) and \
                not (self.root / MANIFEST).exists():
            raise DlgraphError(f"{self.root} is not empty and is not a dlgraph pipeline "
                               f"directory (it has no {MANIFEST})",
                               help="pass --dir a new or empty folder")

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def entry(self, stage: str) -> dict | None:
        return self.manifest["stages"].get(stage)

    def record(self, stage: str, entry: dict) -> None:
        self.manifest["stages"][stage] = entry
        self.save()

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n")
                     .encode())

    @contextmanager
    def lock(self):
        """One `pipeline run` at a time per directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DlgraphError(f"another `pipeline run` is using {self.root}",
                                   help="wait for it to finish") from None
            yield
        finally:
            os.close(fd)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


__all__ = ["MANIFEST", "PipelineDir", "Status", "default_dir", "dlgraph_version",
           "file_hash", "now", "text_hash"]
