"""Matrix products on the host's BLAS: a CPU kernel that computes a matrix product of two of
its buffers, plus at most one of :data:`EPILOGUES` after it (a bias, a relu or its mask, a
residual sum), runs as numpy's ``matmul`` on views of those very buffers, and the epilogue
as numpy's in-place elementwise.

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
import functools
import glob
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

MIN_MACS = 4096
"""Products smaller than this keep their kernel: numpy's call (about a microsecond) would
cost more than it saves."""

MIN_OUTPUTS = 64
"""Kernels with fewer output values keep their kernel: a few numbers are weak evidence (a
one-number loss kernel once matched a dot product on one draw of random inputs and was
replaced, wrongly), and a vector product gains little."""


def _close(got: np.ndarray, want: np.ndarray, k: int) -> bool:
    """float32 sums of ``k`` products of standard normals against float64: each of the k
    additions rounds by float32's epsilon times a partial sum of size about sqrt(k), so the
    error walks to about epsilon * k (measured 2.3x that for a sequential sum of 10,816,
    a convolution's weight gradient); anything computed otherwise misses by far more (a
    product off by 0.1% misses by about 1e-3 * sqrt(k))."""
    atol = max(2e-6 * np.sqrt(k), 8 * float(np.finfo(np.float32).eps) * k)
    return bool(np.allclose(got, want, rtol=1e-5, atol=atol))


_PROBE = np.random.default_rng(20261207)


def _bias_rows(o, e):
    np.add(o, e.reshape(-1, 1), out=o)


def _bias_cols(o, e):
    np.add(o, e.reshape(1, -1), out=o)


def _relu(o, e=None):
    np.maximum(o, 0, out=o)


def _add(o, e):
    np.add(o, e.reshape(o.shape), out=o)


EPILOGUES: dict[str, tuple[tuple[str, ...], Callable]] = {
    # name: (its extra buffers, each one value per output "row", per "col", or per element
    # ("all") of the output as laid out in memory; what is done to the product ``o`` in
    # place, given the extra buffers cut to o's rows)
    "none": ((), lambda o: None),
    "relu": ((), _relu),
    "bias rows": (("row",), _bias_rows),
    "bias cols": (("col",), _bias_cols),
    "bias rows, relu": (("row",), lambda o, e: (_bias_rows(o, e), _relu(o))),
    "bias cols, relu": (("col",), lambda o, e: (_bias_cols(o, e), _relu(o))),
    "relu mask": (("all",), lambda o, e: np.multiply(o, e.reshape(o.shape) > 0, out=o)),
    "add": (("all",), _add),
    "bias cols, add": (("col", "all"), lambda o, e, r: (_bias_cols(o, e), _add(o, r))),
}
"""What a kernel may do to its product besides computing it: a linear layer's bias and
relu, the relu's backward mask (its saved output > 0), a residual connection's sum."""


def _extra_size(kind: str, rows: int, cols: int) -> int:
    return {"row": rows, "col": cols, "all": rows * cols}[kind]


def _extra_rows(kind: str, e, rows, cols: int):
    """An extra buffer's part for output rows ``rows`` (an index array)."""
    return e[rows] if kind == "row" else e if kind == "col" else e.reshape(-1, cols)[rows]


@functools.cache
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


def _view(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(addr))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _candidates(sizes: tuple[int, ...]):
    """Every ``(x, y, m, k, n, x_t, y_t, out_t, extras, epilogue)``: buffer 0, read as
    [m, n] (or [n, m] when ``out_t``), is ``epilogue(x @ y, *extras)``, where buffer x is
    [m, k] (stored [k, m] when ``x_t``) and buffer y [k, n] (stored [n, k] when ``y_t``)."""
    n_out, ins = sizes[0], range(1, len(sizes))
    for x, y in itertools.permutations(ins, 2):
        rest = [i for i in ins if i not in (x, y)]
        for k in _divisors(math.gcd(sizes[x], sizes[y])):
            m, n = sizes[x] // k, sizes[y] // k
            if k == 1 or m * n != n_out or m * n < MIN_OUTPUTS or m * n * k < MIN_MACS:
                continue
            for x_t, y_t, out_t in itertools.product((False, True), repeat=3):
                r, c = (n, m) if out_t else (m, n)
                for name, (kinds, _) in EPILOGUES.items():
                    for extras in itertools.permutations(rest):
                        if len(kinds) == len(extras) and all(
                                _extra_size(kd, r, c) == sizes[e]
                                for kd, e in zip(kinds, extras, strict=True)):
                            yield x, y, m, k, n, x_t, y_t, out_t, extras, name


def could_be(sizes: tuple[int, ...], k: int, operands: tuple[int, int]) -> bool:
    """Whether buffers of ``sizes`` (the output's first) have a candidate product of the
    buffers ``operands`` summing ``k`` terms."""
    return any(c[3] == k and {c[0], c[1]} == set(operands) for c in _candidates(sizes))


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
    cands = list(_candidates(sizes)) if 3 <= len(sizes) <= 5 else []
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
        x, y, out = _operands(wide, group[0])
        rows = _PROBE.choice(out.shape[0], min(out.shape[0], 8), replace=False)
        product = x[rows] @ y           # a few rows, once per layout, tried with each epilogue
        seen = got.reshape(out.shape)[rows]
        for c in group:
            want = product.copy()
            _epilogue(want, wide, c, rows)
            if _close(seen, want, c[3]) and \
                    _agrees(got.reshape(out.shape), wide, c):
                return c
    return None


_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
"""This module's code: a finding made by another version of it is not reused."""


def remembered_layout(sizes: tuple[int, ...], run: Callable[[list[int]], None], code: bytes,
                      store=None):
    """:func:`find_layout`, its finding (a layout or None) kept in ``store`` (signed
    entries: ``load(name) -> bytes | None``, ``store(name, bytes)``; the kernel cache) under
    the kernel's compiled ``code`` and ``sizes``: a later process loading the same kernels
    skips running each on scratch arrays (graphs/cnn.yaml: 0.5 s of every start, measured).
    A stored finding must name a candidate of ``sizes``; anything else is found again."""
    name = "g" + hashlib.sha256(code + repr(sizes).encode() + _DIGEST.encode()).hexdigest()
    blob = store.load(name) if store is not None else None
    if blob is not None:
        try:
            rec = json.loads(blob)
            if rec is None:
                return None
            layout = (*rec[:8], tuple(rec[8]), rec[9])
            if layout in set(_candidates(sizes)):
                return layout
        except (ValueError, TypeError, IndexError):
            pass                            # found again below
    layout = find_layout(sizes, run)
    if store is not None:
        store.store(name, json.dumps(layout).encode())
    return layout


def _epilogue(o: np.ndarray, arrays, c, rows) -> None:
    """Candidate ``c``'s epilogue applied to ``o``, the product's ``rows``."""
    kinds, fn = EPILOGUES[c[9]]
    fn(o, *[_extra_rows(kd, arrays[e], rows, o.shape[1])
            for kd, e in zip(kinds, c[8], strict=True)])


def _agrees(got: np.ndarray, wide: list[np.ndarray], c) -> bool:
    """Whether every row of the kernel's output is the candidate's (a few rows found it: a
    kernel that masks some rows of a product, say, must not pass)."""
    x, y, out = _operands(wide, c)
    want = x @ y
    _epilogue(want, wide, c, np.arange(out.shape[0]))
    return _close(got, want, c[3])


SPLIT_MACS = 1 << 18
"""Products of at least this many multiply-adds may also run as two halves of their rows,
one on the replay's helper thread: engine/compile/chunks.py times both ways on the first
calls and keeps the faster (numpy's BLAS is kept to one thread per caller, see
:func:`_one_thread`)."""


def matmul_call(addrs: list[int], sizes: tuple[int, ...], layout, keep: list,
                code: bytes | None = None, store=None):
    """A function of the bound values running numpy's product (and its epilogue) for a
    kernel found by :func:`find_layout`, on views of its buffers (``keep``: what must
    outlive it); ``code`` and ``store`` as for :func:`remembered_halves`."""
    views = [_view(a, s) for a, s in zip(addrs, sizes, strict=True)]
    x, y, out = _operands(views, layout)
    kinds, fn = EPILOGUES[layout[9]]
    m, half = out.shape[0], out.shape[0] // 2
    extras = {(lo, hi): [_extra_rows(kd, views[e], slice(lo, hi), out.shape[1])
                         for kd, e in zip(kinds, layout[8], strict=True)]
              for lo, hi in ((0, m), (0, half), (half, m))}
    after = None if layout[9] == "none" else fn
    one = _one_thread()

    def rows(lo, hi, _keep=keep):
        one()
        np.matmul(x[lo:hi], y, out=out[lo:hi])
        if after is not None:
            after(out[lo:hi], *extras[(lo, hi)])
    if m * x.shape[1] * out.shape[1] < SPLIT_MACS or \
            not remembered_halves(sizes, layout, code, store):
        return lambda var_vals: rows(0, m)
    from dlgraph.engine.compile.chunks import Chunked
    return Chunked(rows, [(0, half), (half, m)], whole=lambda: rows(0, m))


def remembered_halves(sizes: tuple[int, ...], layout, code: bytes | None, store=None) -> bool:
    """:func:`_halves_exact`, kept in ``store`` as :func:`remembered_layout` keeps its
    finding, under the kernel's compiled ``code``, its sizes and layout and numpy's version
    (its BLAS): the check runs two products on scratch arrays (graphs/cnn.yaml: 0.2 s of
    every start, measured). Without ``code`` it is checked each time."""
    if code is None:
        return _halves_exact(sizes, layout)
    name = "h" + hashlib.sha256(code + repr((sizes, layout, np.__version__)).encode()
                                + _DIGEST.encode()).hexdigest()
    blob = store.load(name) if store is not None else None
    if blob in (b"true", b"false"):
        return blob == b"true"
    exact = _halves_exact(sizes, layout)
    if store is not None:
        store.store(name, json.dumps(exact).encode())
    return exact


def _halves_exact(sizes: tuple[int, ...], layout) -> bool:
    """Whether the product computed as two halves of its rows is bit for bit the whole one,
    on scratch arrays laid out as the kernel's (a BLAS may take another path for another
    shape): only then may the replay choose either way by speed."""
    scratch = [_PROBE.standard_normal(s).astype(np.float32) for s in sizes]
    x, y, out = _operands(scratch, layout)
    half = out.shape[0] // 2
    _one_thread()()
    whole = np.matmul(x, y)
    np.matmul(x[:half], y, out=out[:half])
    np.matmul(x[half:], y, out=out[half:])
    return whole.tobytes() == np.ascontiguousarray(out).tobytes()


__all__ = ["EPILOGUES", "MIN_MACS", "MIN_OUTPUTS", "SPLIT_MACS", "could_be", "find_layout",
           "matmul_call", "remembered_halves", "remembered_layout"]
