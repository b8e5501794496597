"""Reductions: sum, mean, max, argmax, with axes and keepdims."""

from __future__ import annotations

import math

from pydantic import Field
from tinygrad import Tensor

from dlgraph.engine.types import TType
from dlgraph.ops.common import axes_of, floats, reduced
from dlgraph.ops.registry import NO_GRAD, attrs, register

F = "reduce"
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


register("sum", doc="sum over axes", family=F, inputs="x",
         attrs_model=attrs("sum", **_fields), infer=_float_infer,
         forward=lambda c, a, x: x.sum(_ax(a, x), keepdim=a.keepdims),
         vjp=lambda b, n, g: [_kept(b, n, g)])
register("mean", doc="mean over axes", family=F, inputs="x",
         attrs_model=attrs("mean", **_fields), infer=_float_infer,
         forward=lambda c, a, x: x.mean(_ax(a, x), keepdim=a.keepdims), vjp=_mean_vjp)
register("max", doc="max over axes (ties share the gradient)", family=F, inputs="x",
         attrs_model=attrs("max", **_fields), infer=_float_infer,
         forward=lambda c, a, x: x.max(_ax(a, x), keepdim=a.keepdims), vjp=_max_vjp)
register("count", doc="number of elements over axes, as a float scalar", family=F,
         inputs="x", attrs_model=attrs("count", axes=_fields["axes"]),
         infer=lambda a, x: TType((), "float32"),
         forward=lambda c, a, x: Tensor(float(math.prod(x.shape[i] for i in _ax(a, x)))),
         vjp=NO_GRAD)


def _argmax_infer(a, x):
    axis = axes_of([a.axis], x.rank)
    return TType(reduced(x.shape, axis, a.keepdims), "int32")


register("argmax", doc="index of the max along an axis (no gradient)", family=F, inputs="x",
         attrs_model=attrs("argmax", axis=(int, Field(-1, description="the axis")),
                           keepdims=_fields["keepdims"]),
         infer=_argmax_infer,
         forward=lambda c, a, x: x.argmax(a.axis, keepdim=a.keepdims).cast("int32"),
         vjp=NO_GRAD)
