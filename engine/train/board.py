"""Where Ray Train workers meet: the all-reduce and broadcast a worker's step uses
(:class:`~.step.ReducedStep`), and the board, a Ray actor on the driver's machine that holds
the run directory's files for the workers and carries their messages to the driver.

The all-reduce (measured on 2 workers of one 2-core machine, docs/scale.md):

- ``gloo``: torch.distributed's gloo ring, set up by Ray Train's ``TorchConfig``; 0.95 ms
  for 10k floats, 30 ms for 1M. Needs PyTorch in every worker and open ports between them.
- ``actor``: a Ray actor gathers every rank's gradients through the object store and hands
  back their mean; 12 ms for 10k floats, 56 ms for 1M. Needs nothing but Ray, but all the
  traffic goes through one process, so it grows with the workers.

``auto`` (the default) takes gloo when PyTorch imports, else the actor. Ray and PyTorch are
imported inside the functions that use them, in the workers.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.train.checkpoint import atomic_write
from dlgraph.engine.train.rundir import Files

REDUCERS = ("auto", "gloo", "actor")


# -------------------------------------------------------------------- the board actor


class Board:
    """The run's meeting point (a Ray actor on the driver's machine): the actor all-reduce
    and broadcast, the run directory's files as rank 0 writes and every rank reads them, and
    what the workers hand to the driver (rank 0's lines and result, every rank's weight
    digest, a worker's error)."""

    def __init__(self, world: int, run_dir: str | None = None):
        self.world = world
        self.dir = Path(run_dir) if run_dir is not None else None
        self.parts: dict[int, dict[int, np.ndarray]] = {}
        self.ready: dict[Any, asyncio.Event] = {}
        self.means: dict[Any, Any] = {}
        self.left: dict[Any, int] = {}
        self.posts: dict[str, list] = {}

    async def allreduce(self, step: int, rank: int, part: np.ndarray) -> np.ndarray:
        """The mean of every rank's ``part`` for ``step``, summed in rank order."""
        parts = self.parts.setdefault(step, {})
        ready = self.ready.setdefault(step, asyncio.Event())
        parts[rank] = part
        if len(parts) == self.world:
            total = parts[0].astype(np.float64)
            for r in range(1, self.world):
                total += parts[r]
            self.means[step] = (total / self.world).astype(np.float32)
            self.left[step] = self.world
            del self.parts[step]
            ready.set()
        return await self._hand_out(step)

    async def broadcast(self, n: int, rank: int, value=None):
        """Rank 0's ``value`` of the ``n``-th broadcast, to every rank."""
        key = ("broadcast", n)
        ready = self.ready.setdefault(key, asyncio.Event())
        if rank == 0:
            self.means[key], self.left[key] = value, self.world
            ready.set()
        return await self._hand_out(key)

    async def _hand_out(self, key):
        """What ``key`` holds once it is set, to each of the ranks; then forgotten."""
        await self.ready[key].wait()
        value = self.means[key]
        self.left[key] -= 1
        if not self.left[key]:
            del self.means[key], self.ready[key], self.left[key]
        return value

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self._path(name), data)

    def read(self, name: str, start: int = 0) -> bytes | None:
        f = self._path(name)
        if not f.is_file():
            return None
        with open(f, "rb") as fh:
            fh.seek(start)
            return fh.read()

    def take_in(self, rows: list[tuple[str, str]], said: list[str]) -> None:
        """Rank 0's appended rows (file name, text) and said lines, in order."""
        for name, text in rows:
            with open(self._path(name), "a") as f:
                f.write(text)
        self.posts.setdefault("said", []).extend(said)

    def _path(self, name: str) -> Path:
        if self.dir is None or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"not a file of the run directory: {name!r}")
        return self.dir / name

    def post(self, key: str, value) -> None:
        self.posts.setdefault(key, []).append(value)

    def taken(self) -> dict[str, list]:
        return self.posts


class BoardFiles(Files):
    """The run directory as a worker reaches it: on the driver's machine, through the board.
    Appended rows and said lines wait here until :meth:`flush`; ``writes`` False (every rank
    but 0): reads only."""

    def __init__(self, board, writes: bool):
        self.board, self.writes = board, writes
        self._rows: list[tuple[str, str]] = []
        self._said: list[str] = []

    def write(self, name: str, data: bytes) -> None:
        if self.writes:
            import ray
            self.flush()
            ray.get(self.board.write.remote(name, data))

    def read(self, name: str, start: int = 0) -> bytes | None:
        import ray
        self.flush()
        return ray.get(self.board.read.remote(name, start))

    def append(self, name: str, text: str) -> None:
        if self.writes:
            self._rows.append((name, text))

    def say(self, line: str) -> None:
        """A line for the driver to print (it prints them when the run ends)."""
        self._said.append(line)

    def flush(self) -> None:
        if self._rows or self._said:
            import ray
            ray.get(self.board.take_in.remote(self._rows, self._said))
            self._rows, self._said = [], []


# ---------------------------------------------------------------------- the all-reduce


class GlooReducer:
    """Mean and broadcast over the workers by torch.distributed's gloo (set up by Ray
    Train's ``TorchConfig``)."""

    def __init__(self, world: int):
        self.world = world

    def mean(self, part: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist
        t = torch.from_numpy(np.array(part, np.float32))
        dist.all_reduce(t)
        return (t / self.world).numpy()

    def broadcast(self, value):
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class ActorReducer:
    """Mean and broadcast over the workers through the board actor."""

    def __init__(self, board, rank: int):
        self.board, self.rank = board, rank
        self._means, self._casts = itertools.count(), itertools.count()

    def mean(self, part: np.ndarray) -> np.ndarray:
        import ray
        return ray.get(self.board.allreduce.remote(next(self._means), self.rank, part))

    def broadcast(self, value):
        import ray
        mine = value if self.rank == 0 else None
        return ray.get(self.board.broadcast.remote(next(self._casts), self.rank, mine))


def pick_reducer(kind: str) -> str:
    """``auto`` -> gloo when PyTorch imports, else the actor; gloo without it is an error."""
    if kind not in REDUCERS:
        raise DlgraphError(f"unknown all-reduce '{kind}'", help=f"one of {', '.join(REDUCERS)}")
    if kind == "actor":
        return kind
    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        if kind == "gloo":
            raise DlgraphError("the gloo all-reduce needs PyTorch: pip install torch",
                               help="or use the actor all-reduce (reduce='actor')") from None
        return "actor"
    return "gloo"
