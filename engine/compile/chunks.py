"""A CPU kernel's chunks run on two threads: tinygrad cuts its big CPU kernels into one
independent chunk per core (the kernel's ``core_id``) but runs the chunks one after another
on one worker thread. The replay (engine/compile/tinygrad_door.py) hands each such kernel's
compiled function and per-chunk arguments to :class:`Chunked`, which knows nothing of
tinygrad.
"""

from __future__ import annotations

import os
import time


class Chunked:
    """A CPU kernel that tinygrad cut into independent chunks, one per core (its ``core_id``):
    tinygrad runs them one after another on one worker thread. Here the chunks are shared
    between the calling thread and a helper thread where that was measured to be faster for
    this kernel: its first calls are timed both ways, and the faster way is kept."""

    TRIALS = 3
    pool = None

    def __init__(self, fxn, chunks: list[tuple], whole=None):
        """``fxn(*chunk)`` runs one chunk; ``whole()``, where given, runs all of them at once
        on the calling thread (one thread's way; default: each chunk in turn)."""
        self.function, self.chunks, self.whole = fxn, chunks, whole
        self.half = (len(chunks) + 1) // 2
        self.times: dict[bool, list[float]] = {False: [], True: []}
        self.split: bool | None = None if len(chunks) > 1 and (os.cpu_count() or 1) > 1 \
            else False

    def _run(self, chunks) -> None:
        for words in chunks:
            self.function(*words)

    def _alone(self) -> None:
        self.whole() if self.whole is not None else self._run(self.chunks)

    def _both(self) -> None:
        if Chunked.pool is None:
            from concurrent.futures import ThreadPoolExecutor
            Chunked.pool = ThreadPoolExecutor(1, thread_name_prefix="dlgraph-kernel")
        later = Chunked.pool.submit(self._run, self.chunks[self.half:])
        self._run(self.chunks[:self.half])
        later.result()

    def __call__(self, var_vals) -> None:
        if self.split is None:               # still measuring: alternate the two ways
            way = len(self.times[False]) > len(self.times[True])
            t = time.perf_counter()
            self._both() if way else self._alone()
            self.times[way].append(time.perf_counter() - t)
            if len(self.times[True]) >= self.TRIALS:
                self.split = min(self.times[True]) < min(self.times[False])
        elif self.split:
            self._both()
        else:
            self._alone()


# a forked child has none of the parent's threads: it starts its own helper when it needs one
os.register_at_fork(after_in_child=lambda: setattr(Chunked, "pool", None))


__all__ = ["Chunked"]
