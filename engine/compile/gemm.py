"""Matrix products on the host's BLAS: a CPU kernel that computes a matrix product of two of
its buffers, plus at most a bias and a relu (or a relu's mask) after it, runs as numpy's
``matmul`` on views of those very buffers, and the rest as numpy's in-place elementwise.

tinygrad's generated C reaches 8-17 GMAC/s for the matrix products of the bench workloads on
this kind of CPU; numpy's BLAS (OpenBLAS in numpy's wheels, MKL or Accelerate elsewhere)
45-50 for the same shapes. A kernel is recognised by what it computes, never by its name or
its source: the sizes of its float32 buffers give the candidate shapes ``[m, k] @ [k, n]``,
and the kernel itself, run once on random inputs in scratch arrays, must agree with one
candidate of :data:`EPILOGUES` in one layout. Anything else (a gelu fused in, a slice of a
larger buffer, a batch of products, a kernel reading its own output) keeps its kernel.
This module knows nothing of tinygrad: engine/compile/tinygrad_door.py hands it the
buffers' addresses and a way to run the kernel.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import math
import os
from collections.abc import Callable

import numpy as np

MIN_MACS = 4096
"""Products smaller than this keep their kernel: numpy's call (about a microsecond) would
cost more than it saves."""

_PROBE = np.random.default_rng(20261207)


def _bias_rows(o, e):
    np.add(o, e.reshape(-1, 1), out=o)


def _bias_cols(o, e):
    np.add(o, e.reshape(1, -1), out=o)


def _relu(o, e=None):
    np.maximum(o, 0, out=o)


EPILOGUES: dict[str, tuple[Callable[[int, int], int] | None, Callable]] = {
    # name: (the extra buffer's size for an output of [rows, cols] in memory, or None for
    # none; what is done to the product ``o`` in place, given the extra buffer ``e``)
    "none": (None, lambda o, e: None),
    "relu": (None, _relu),
    "bias rows": (lambda r, c: r, _bias_rows),
    "bias cols": (lambda r, c: c, _bias_cols),
    "bias rows, relu": (lambda r, c: r, lambda o, e: (_bias_rows(o, e), _relu(o))),
    "bias cols, relu": (lambda r, c: c, lambda o, e: (_bias_cols(o, e), _relu(o))),
    "relu mask": (lambda r, c: r * c,
                  lambda o, e: np.multiply(o, e.reshape(o.shape) > 0, out=o)),
}
"""What a kernel may do to its product besides computing it: a linear layer's bias and
relu, the relu's backward mask (its saved output > 0)."""


def _one_thread() -> Callable[[], object]:
    """A function keeping numpy's OpenBLAS on one thread for the calling thread only (its
    ``openblas_set_num_threads_local``): its worker threads, woken for each product, cost
    more than they save at these sizes and compete with the replay's own helper thread; the
    process's other numpy calls keep their setting. A no-op where numpy's BLAS is another."""
    here = os.path.dirname(np.__file__)
    for path in glob.glob(os.path.join(here, os.pardir, "numpy.libs", "*openblas*")) + \
            glob.glob(os.path.join(here, ".dylibs", "*openblas*")):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return lambda: fn(1)
    return lambda: None


_ONE_THREAD: list = []


def _view(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(addr))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _candidates(sizes: tuple[int, ...]):
    """Every ``(x, y, m, k, n, x_t, y_t, out_t, extra, epilogue)``: buffer 0, read as [m, n]
    (or [n, m] when ``out_t``), is ``epilogue(x @ y, extra)``, where buffer x is [m, k]
    (stored [k, m] when ``x_t``) and buffer y [k, n] (stored [n, k] when ``y_t``)."""
    n_out, ins = sizes[0], range(1, len(sizes))
    for x, y in itertools.permutations(ins, 2):
        rest = [i for i in ins if i not in (x, y)]
        if len(rest) > 1:
            continue
        for k in _divisors(math.gcd(sizes[x], sizes[y])):
            m, n = sizes[x] // k, sizes[y] // k
            if k == 1 or m * n != n_out or m * n * k < MIN_MACS:
                continue
            for x_t, y_t, out_t in itertools.product((False, True), repeat=3):
                r, c = (n, m) if out_t else (m, n)
                for name, (extra_size, _) in EPILOGUES.items():
                    if (extra_size is None) == (not rest) and \
                            (not rest or extra_size(r, c) == sizes[rest[0]]):
                        yield x, y, m, k, n, x_t, y_t, out_t, rest[0] if rest else None, name


def _operands(arrays, c) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, OUT) views of ``arrays`` (the flat buffers) with OUT = X @ Y row-major in
    memory: a transposed output is written as its transpose's product, y.T @ x.T."""
    x, y, m, k, n, x_t, y_t, out_t = c[:8]
    xs = arrays[x].reshape(k, m).T if x_t else arrays[x].reshape(m, k)
    ys = arrays[y].reshape(n, k).T if y_t else arrays[y].reshape(k, n)
    if out_t:
        return ys.T, xs.T, arrays[0].reshape(n, m)
    return xs, ys, arrays[0].reshape(m, n)


def find_layout(sizes: tuple[int, ...], run: Callable[[list[int]], None]):
    """What a kernel of float32 buffers of ``sizes`` (its output first) computes, as a
    candidate of :func:`_candidates`, or None when it is no such product: ``run(addresses)``
    runs the kernel on arrays of those sizes (scratch ones here, never the program's)."""
    cands = list(_candidates(sizes)) if 3 <= len(sizes) <= 4 else []
    if not cands:
        return None
    probe = [np.full(sizes[0], np.nan, np.float32)] + \
        [_PROBE.standard_normal(s).astype(np.float32) for s in sizes[1:]]
    run([p.ctypes.data for p in probe])
    got = probe[0].copy()
    if not np.isfinite(got).all():
        return None                     # it left some of its output unwritten: not a product
    wide = [p.astype(np.float64) for p in probe]
    for _, group in itertools.groupby(cands, key=lambda c: c[:8]):
        group = list(group)
        x, y, _ = _operands(wide, group[0])
        product = x @ y                 # once per layout, tried with each epilogue
        for c in group:
            want = product.copy()
            EPILOGUES[c[9]][1](want, None if c[8] is None else wide[c[8]])
            if np.allclose(got.reshape(want.shape), want, rtol=1e-4,
                           atol=1e-4 * np.sqrt(c[3])):
                return c
    return None


def matmul_call(addrs: list[int], sizes: tuple[int, ...], layout, keep: list):
    """A function of the bound values running numpy's product (and its epilogue) for a
    kernel found by :func:`find_layout`, on views of its buffers (``keep``: what must
    outlive it)."""
    views = [_view(a, s) for a, s in zip(addrs, sizes, strict=True)]
    x, y, out = _operands(views, layout)
    extra = None if layout[8] is None else views[layout[8]]
    after = None if layout[9] == "none" else EPILOGUES[layout[9]][1]
    if not _ONE_THREAD:
        _ONE_THREAD.append(_one_thread())
    one = _ONE_THREAD[0]

    def call(var_vals, _keep=keep):
        one()
        np.matmul(x, y, out=out)
        if after is not None:
            after(out, extra)
    return call


__all__ = ["EPILOGUES", "MIN_MACS", "find_layout", "matmul_call"]
