"""Initial values: the table of parameter initialisers, and seeded random inputs.

Every initialiser is one :class:`InitDef` in :data:`INITIALISERS`: its name (what `init:`
takes), its formula for the docs, and the function that draws it. The spec's ``Init``
names (spec/base.py) and the reference in docs/spec.md are generated from the table,
so a new initialiser is one ``InitDef`` here.

``fan_in``/``fan_out`` follow PyTorch: a weight ``[out, in, *kernel]`` has
``fan_in = in * prod(kernel)``, ``fan_out = out * prod(kernel)`` (see ``build.fans``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dlgraph.engine.graph.ir import Graph, Param
from dlgraph.engine.types import NUMPY_DTYPES

Draw = Callable[[np.random.Generator, tuple[int, ...], int, int], np.ndarray]


@dataclass(frozen=True)
class InitDef:
    name: str              # the `init:` value
    formula: str           # the distribution, for docs/spec.md
    draw: Draw             # (rng, shape, fan_in, fan_out) -> float64 array


def _orthogonal(rng: np.random.Generator, shape, fi: int, fo: int) -> np.ndarray:
    flat = rng.standard_normal((shape[0], int(np.prod(shape[1:])) or 1))
    q, r = np.linalg.qr(flat if flat.shape[0] >= flat.shape[1] else flat.T)
    q = q * np.sign(np.diag(r))
    return (q if flat.shape[0] >= flat.shape[1] else q.T).reshape(shape)


def _u(rng: np.random.Generator, shape, a: float) -> np.ndarray:
    return rng.uniform(-a, a, shape)


INITIALISERS: dict[str, InitDef] = {d.name: d for d in [
    InitDef("glorot_uniform", "U(−a, a), a = √(6 / (fan_in + fan_out)) (Xavier)",
            lambda rng, s, fi, fo: _u(rng, s, np.sqrt(6 / (fi + fo)))),
    InitDef("glorot_normal", "N(0, σ²), σ = √(2 / (fan_in + fan_out))",
            lambda rng, s, fi, fo: rng.standard_normal(s) * np.sqrt(2 / (fi + fo))),
    InitDef("he_uniform", "U(−a, a), a = √(6 / fan_in) (Kaiming)",
            lambda rng, s, fi, fo: _u(rng, s, np.sqrt(6 / fi))),
    InitDef("he_normal", "N(0, σ²), σ = √(2 / fan_in)",
            lambda rng, s, fi, fo: rng.standard_normal(s) * np.sqrt(2 / fi)),
    InitDef("lecun_normal", "N(0, σ²), σ = √(1 / fan_in)",
            lambda rng, s, fi, fo: rng.standard_normal(s) * np.sqrt(1 / fi)),
    InitDef("zeros", "0", lambda rng, s, fi, fo: np.zeros(s)),
    InitDef("ones", "1", lambda rng, s, fi, fo: np.ones(s)),
    InitDef("normal", "N(0, 1)", lambda rng, s, fi, fo: rng.standard_normal(s)),
    InitDef("uniform", "U(−a, a), a = 1 / √fan_in (PyTorch's default for recurrent layers)",
            lambda rng, s, fi, fo: _u(rng, s, 1 / np.sqrt(fi))),
    InitDef("orthogonal", "the [shape[0], rest] matrix has orthonormal rows or columns (QR of "
            "a Gaussian matrix, signs fixed)", _orthogonal),
]}


def init_param(p: Param, seed: int) -> np.ndarray:
    """The initial value of a parameter: depends only on the seed and the parameter's name.

    >>> init_param(Param("fc.bias", "fc/bias", (3,), "zeros", 3, 3), 0)
    array([0., 0., 0.], dtype=float32)
    """
    rng = np.random.default_rng([int(seed) & (2**64 - 1), zlib.crc32(p.name.encode())])
    if isinstance(p.init, int | float):
        v = np.full(p.shape, float(p.init))
    else:  # the spec model only lets names of the table through
        v = INITIALISERS[p.init].draw(rng, p.shape, max(p.fan_in, 1), max(p.fan_out, 1))
    return v.astype(np.float32)


def random_inputs(graph: Graph, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random arrays of the declared input shapes (named dims = ``batch``).

    Integer inputs get ids below the size of the one-hot or embedding that reads them; an
    input that is a recurrent layer's `mask:` gets 1s then 0s, each row of a random length.
    """
    rng = np.random.default_rng(int(seed) & (2**64 - 1))
    nodes = graph.spec.nodes.values() if graph.spec is not None else ()
    masks = {r for nd in nodes for f, r in nd.refs() if f == "mask"}
    out = {}
    for name, t in graph.inputs.items():
        shape = tuple(batch if isinstance(d, str) else d for d in t.shape)
        if name in masks and len(shape) == 2:
            ends = rng.integers(1, shape[1] + 1, shape[0])
            out[name] = (np.arange(shape[1])[None] < ends[:, None]).astype(np.float32)
        elif t.dtype == "int32":
            depth = min([n.attrs.depth for n in graph.nodes.values()
                         if n.op == "one_hot" and name in n.inputs] or [2])
            out[name] = rng.integers(0, depth, shape).astype(NUMPY_DTYPES[t.dtype])
        else:
            out[name] = rng.standard_normal(shape).astype(NUMPY_DTYPES[t.dtype])
    return out


__all__ = ["INITIALISERS", "InitDef", "init_param", "random_inputs"]
