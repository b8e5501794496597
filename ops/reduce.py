"""Reductions: sum, mean, max, argmax, with axes and keepdims."""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field
from tinygrad import Tensor

from dlgraph.engine.types import TType
from dlgraph.ops.common import axes_of, floats, reduced
from dlgraph.ops.examples import E, F
from dlgraph.ops.reference import norm_axes
from dlgraph.ops.registry import NO_GRAD, attrs, register

FAMILY = "reduce"
_fields = dict(axes=(int | list[int] | None, Field(None, description="axes to reduce; "
                                                   "none: all")),
               keepdims=(bool, Field(False, description="keep reduced axes with size 1")))


def _infer(a, x):
    return TType(reduced(x.shape, axes_of(a.axes, x.rank), a.keepdims), x.dtype)


def _float_infer(a, x):
    floats(x)
    return _infer(a, x)


def _kept(b, n, g):
    """The cotangent of a reduction, reshaped to keepdims and broadcast back to the input."""
    x = n.inputs[0]
    t = b.type(x)
    keep = reduced(t.shape, axes_of(n.attrs.axes, t.rank), True)
    if not n.attrs.keepdims:
        g = b.emit("reshape", g, shape=list(keep))
    return b.emit("broadcast_like", g, x)


def _mean_vjp(b, n, g):
    return [b.emit("div", _kept(b, n, g), b.emit("count", n.inputs[0], axes=n.attrs.axes))]


def _max_vjp(b, n, g):
    x = n.inputs[0]
    hit = b.emit("cast", b.emit("equal", x, _kept(b, n, n.id)), dtype="float32")
    ties = _kept(b, n, b.emit("sum", hit, axes=n.attrs.axes, keepdims=n.attrs.keepdims))
    return [b.emit("mul", _kept(b, n, g), b.emit("div", hit, ties))]


def _ax(a, x):
    return axes_of(a.axes, x.ndim)


def _ref(fn):
    return lambda a, xs, c: fn(xs[0], axis=norm_axes(a.axes, xs[0].ndim), keepdims=a.keepdims)


def _examples(op: str, *more: E) -> list[E]:
    """The forward examples every reduction has (all axes, one, two kept, a negative one)."""
    return [E([F((2, 3, 4))], fields, id=f"{op}_{name}")
            for name, fields in [("all", {}), ("axis", {"axes": 1}),
                                 ("axes_keepdims", {"axes": [0, -1], "keepdims": True}),
                                 ("negative", {"axes": -1})]] + list(more)


register("sum", doc="sum over axes", family=FAMILY, inputs="x",
         attrs_model=attrs("sum", **_fields), infer=_float_infer,
         forward=lambda c, a, x: x.sum(_ax(a, x), keepdim=a.keepdims),
         vjp=lambda b, n, g: [_kept(b, n, g)], reference=_ref(np.sum),
         examples=_examples("sum", E([F((5,))], id="sum_rank1")),
         grad_examples=[E([F((2, 3, 4))], {"axes": [0, -1], "keepdims": True}),
                        E([F((2, 3, 4))], id="sum_all")])
register("mean", doc="mean over axes", family=FAMILY, inputs="x",
         attrs_model=attrs("mean", **_fields), infer=_float_infer,
         forward=lambda c, a, x: x.mean(_ax(a, x), keepdim=a.keepdims), vjp=_mean_vjp,
         reference=_ref(np.mean), examples=_examples("mean"),
         grad_examples=[E([F((2, 3, 4))], {"axes": 1}, float64=True)])
register("max", doc="max over axes (ties share the gradient)", family=FAMILY, inputs="x",
         attrs_model=attrs("max", **_fields), infer=_float_infer,
         forward=lambda c, a, x: x.max(_ax(a, x), keepdim=a.keepdims), vjp=_max_vjp,
         reference=_ref(np.max),
         examples=_examples("max", E([F((1,))], {"keepdims": True}, id="max_size1_keepdims")),
         grad_examples=[E([F((2, 3, 4))], {"axes": -1}),
                        E([F((2, 3, 4))], {"axes": [0, 2], "keepdims": True},
                          id="max_keepdims", float64=True)])
register("count", doc="number of elements over axes, as a float scalar", family=FAMILY,
         inputs="x", attrs_model=attrs("count", axes=_fields["axes"]),
         infer=lambda a, x: TType((), "float32"),
         forward=lambda c, a, x: Tensor(float(math.prod(x.shape[i] for i in _ax(a, x)))),
         vjp=NO_GRAD,
         reference=lambda a, xs, c: np.array(float(math.prod(
             xs[0].shape[i] for i in norm_axes(a.axes, xs[0].ndim)))),
         examples=[E([F((2, 3, 4))]), E([F((2, 3, 4))], {"axes": [0, -1]}, id="count_axes")])


def _argmax_infer(a, x):
    axis = axes_of([a.axis], x.rank)
    return TType(reduced(x.shape, axis, a.keepdims), "int32")


register("argmax", doc="index of the max along an axis (no gradient)", family=FAMILY,
         inputs="x",
         attrs_model=attrs("argmax", axis=(int, Field(-1, description="the axis")),
                           keepdims=_fields["keepdims"]),
         infer=_argmax_infer,
         forward=lambda c, a, x: x.argmax(a.axis, keepdim=a.keepdims).cast("int32"),
         vjp=NO_GRAD,
         reference=lambda a, xs, c: np.argmax(xs[0], axis=a.axis,
                                              keepdims=a.keepdims).astype(np.int32),
         examples=[E([F((3, 5))]),
                   E([F((3, 5))], {"axis": 0, "keepdims": True}, id="argmax_axis0_keepdims")])
