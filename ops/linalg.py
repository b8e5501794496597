"""Matrix products and parameters."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.spec.base import Init
from dlgraph.engine.types import TType, broadcast, fmt
from dlgraph.ops.common import floats
from dlgraph.ops.examples import E, F
from dlgraph.ops.registry import NO_GRAD, attrs, register


def _matmul_infer(a, x, y):
    floats(x, y)
    if x.rank < 2 or y.rank < 2:
        raise ShapeError(f"matmul needs two matrices (rank >= 2), got {fmt(x.shape)} @ "
                         f"{fmt(y.shape)}", help="reshape a vector to [1, n] or [n, 1]")
    if x.shape[-1] != y.shape[-2]:
        raise ShapeError(f"inner dimensions differ: {fmt(x.shape)} @ {fmt(y.shape)}",
                         help=f"the left side has {x.shape[-1]} columns, the right side "
                              f"{y.shape[-2]} rows; they must match")
    batch = broadcast(x.shape[:-2], y.shape[:-2])
    if batch is None:
        raise ShapeError(f"batch dims do not broadcast: {fmt(x.shape)} @ {fmt(y.shape)}")
    return TType(batch + (x.shape[-2], y.shape[-1]))


def swap_last(b, v):
    r = b.type(v).rank
    return b.emit("transpose", v, axes=list(range(r - 2)) + [r - 1, r - 2])


def _matmul_vjp(b, n, g):
    x, y = n.inputs
    dx = b.emit("matmul", g, swap_last(b, y))
    if b.type(y).rank == 2 and b.type(x).rank > 2:
        # a sequence times a weight: dW as one reduction over every leading axis, which
        # tinygrad runs as one contiguous loop (a batched matmul then reduce_to runs two)
        lead = list(range(b.type(x).rank - 1))
        return [dx, b.emit("sum", b.emit("mul", b.emit("unsqueeze", x, axis=-1),
                                          b.emit("unsqueeze", g, axis=-2)), axes=lead)]
    return [dx, b.emit("matmul", swap_last(b, x), g)]


register("matmul", doc="matrix product x @ y (batched, broadcasting)", family="linalg",
         inputs="x, y", infer=_matmul_infer, forward=lambda c, a, x, y: x @ y,
         vjp=_matmul_vjp, reference=lambda a, xs, c: np.matmul(*xs),
         examples=[E([F((3, 4)), F((4, 5))]),
                   E([F((2, 3, 4)), F((4, 5))], id="matmul_batched"),
                   E([F((2, 1, 3, 4)), F((5, 4, 2))], id="matmul_bcast"),
                   E([F((1, 4)), F((4, 1))], id="matmul_size1")],
         grad_examples=[E([F((3, 4)), F((4, 2))]),
                        E([F((2, 1, 3, 4)), F((5, 4, 2))], id="matmul_bcast", float64=True)])


def _param_infer(a):
    for d in a.shape:
        if not isinstance(d, int) or d < 1:
            raise ShapeError(f"parameter dims must be positive sizes, got {a.shape}")
    return TType(tuple(a.shape))


register("param", doc="a learnable tensor, initialised under the seed", family="linalg",
         inputs=(),
         attrs_model=attrs("param", shape=(list[int], Field(description="its shape")),
                           init=(Init | float, Field("normal", description="initialiser")),
                           trainable=(bool, Field(True, description="false: frozen"))),
         infer=_param_infer, forward=lambda c, a: None, vjp=NO_GRAD,
         reference=lambda a, xs, c: c.params["out"],
         examples=[E([], {"shape": [2, 3]}),
                   E([], {"shape": [2, 3], "init": 0.25}, id="param_init", keep_init=True)])
