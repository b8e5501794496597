"""Elementwise arithmetic, math, comparisons and activations.

Activations that are sums of other ops (gelu, elu, softplus, ...) are composites: their
gradient comes from the primitives they expand to, so they need no rule of their own.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from tinygrad import Tensor, dtypes

from dlgraph.engine.types import TType
from dlgraph.ops.common import bcast, floats, same
from dlgraph.ops.registry import NO_GRAD, attrs, register

TG_DTYPES = {"float32": dtypes.float32, "int32": dtypes.int32, "bool": dtypes.bool}


def _float_same(a, x):
    floats(x)
    return x


def unary(name, fn, vjp, doc, family="elementwise"):
    register(name, doc=doc, family=family, inputs="x", infer=_float_same,
             forward=lambda c, a, x: fn(x), vjp=vjp)


def binary(name, fn, vjp, doc, infer=bcast):
    register(name, doc=doc, family="elementwise", inputs="x, y", infer=infer,
             forward=lambda c, a, x, y: fn(x, y), vjp=vjp)


# -- arithmetic ---------------------------------------------------------------------------
binary("add", Tensor.add, lambda b, n, g: [g, g], "x + y, with numpy broadcasting")
binary("sub", Tensor.sub, lambda b, n, g: [g, b.emit("neg", g)], "x - y")
binary("mul", Tensor.mul,
       lambda b, n, g: [b.emit("mul", g, n.inputs[1]), b.emit("mul", g, n.inputs[0])], "x * y")
def _div_infer(a, x, y):
    return TType(bcast(a, x, y).shape, "float32")     # true division, also of ints


binary("div", Tensor.div,
       lambda b, n, g: [b.emit("div", g, n.inputs[1]),
                        b.emit("neg", b.emit("mul", g, b.emit("div", n.id, n.inputs[1])))],
       "x / y (true division: float32 result)", infer=_div_infer)


def _pow_vjp(b, n, g):
    x, y = n.inputs
    one = b.const(1.0)
    dx = b.emit("mul", g, b.emit("mul", y, b.emit("pow", x, b.emit("sub", y, one))))
    dy = b.emit("mul", g, b.emit("mul", n.id, b.emit("log", x)))
    return [dx, dy]


def _pow(x: Tensor, y: Tensor) -> Tensor:
    """x ** y; integers through float32 (tinygrad 0.14 emits C for an integer pow that
    clang rejects, and fuses the float pow with the cast back wrongly: 2 ** 3 gave 1)."""
    if dtypes.is_float(x.dtype) or dtypes.is_float(y.dtype):
        return x.pow(y)
    out = x.cast(dtypes.float32).pow(y.cast(dtypes.float32)).contiguous()
    return out.round().cast(x.dtype)


binary("pow", _pow, _pow_vjp, "x ** y (the gradient in y needs x > 0)")


def _minmax_vjp(cmp):
    def vjp(b, n, g):
        x, y = n.inputs
        pick = b.emit(cmp, x, y)
        zero = b.const(0.0)
        return [b.emit("where", pick, g, zero), b.emit("where", pick, zero, g)]
    return vjp


binary("maximum", Tensor.maximum, _minmax_vjp("greater_equal"),
       "elementwise max of x and y (ties: the gradient goes to x)")
binary("minimum", Tensor.minimum, _minmax_vjp("less_equal"),
       "elementwise min of x and y (ties: the gradient goes to x)")


def _cmp_infer(a, x, y):
    return TType(bcast(a, x, y).shape, "bool")


for _name, _fn, _doc in [("greater", Tensor.__gt__, "x > y"), ("less", Tensor.__lt__, "x < y"),
                         ("greater_equal", Tensor.__ge__, "x >= y"),
                         ("less_equal", Tensor.__le__, "x <= y"),
                         ("equal", lambda x, y: x == y, "x == y")]:
    binary(_name, _fn, NO_GRAD, _doc + " as a bool tensor (no gradient)", infer=_cmp_infer)


def _where_infer(a, c, x, y):
    if c.dtype != "bool":
        from dlgraph.engine.errors import ShapeError
        raise ShapeError(f"the condition must be bool, got {c.dtype}",
                         help="make it with greater, less or equal")
    t = bcast(a, c, x, y)
    return TType(t.shape, bcast(a, x, y).dtype)


register("where", doc="cond ? x : y, elementwise", family="elementwise", inputs="cond, x, y",
         infer=_where_infer, forward=lambda c, a, cond, x, y: cond.where(x, y),
         vjp=lambda b, n, g: [None, b.emit("where", n.inputs[0], g, b.const(0.0)),
                              b.emit("where", n.inputs[0], b.const(0.0), g)])

# -- math -----------------------------------------------------------------------------------
unary("neg", Tensor.neg, lambda b, n, g: [b.emit("neg", g)], "-x")
unary("exp", Tensor.exp, lambda b, n, g: [b.emit("mul", g, n.id)], "e ** x")
unary("log", Tensor.log, lambda b, n, g: [b.emit("div", g, n.inputs[0])], "natural logarithm")
unary("sqrt", Tensor.sqrt,
      lambda b, n, g: [b.emit("div", g, b.emit("mul", n.id, b.const(2.0)))], "square root")
unary("sign", Tensor.sign, NO_GRAD, "-1, 0 or 1 (no gradient)")
unary("abs", Tensor.abs, lambda b, n, g: [b.emit("mul", g, b.emit("sign", n.inputs[0]))], "|x|")
unary("sin", Tensor.sin, lambda b, n, g: [b.emit("mul", g, b.emit("cos", n.inputs[0]))], "sine")
unary("cos", Tensor.cos,
      lambda b, n, g: [b.emit("neg", b.emit("mul", g, b.emit("sin", n.inputs[0])))], "cosine")
unary("relu", Tensor.relu,
      lambda b, n, g: [b.emit("where", b.emit("greater", n.inputs[0], b.const(0.0)), g,
                              b.const(0.0))], "max(x, 0)", family="activation")
unary("sigmoid", Tensor.sigmoid,
      lambda b, n, g: [b.emit("mul", g, b.emit("mul", n.id,
                                               b.emit("sub", b.const(1.0), n.id)))],
      "1 / (1 + e^-x)", family="activation")
unary("tanh", Tensor.tanh,
      lambda b, n, g: [b.emit("mul", g, b.emit("sub", b.const(1.0),
                                               b.emit("mul", n.id, n.id)))],
      "hyperbolic tangent", family="activation")
register("stop_gradient", doc="x, with no gradient flowing back", family="elementwise",
         inputs="x", infer=same, forward=lambda c, a, x: x.detach(), vjp=NO_GRAD)

# -- constants and casts --------------------------------------------------------------------
register("const", doc="a scalar constant", family="elementwise", inputs=(),
         attrs_model=attrs("const", doc="a scalar constant",
                           value=(float, Field(description="the value")),
                           dtype=(Literal["float32", "int32", "bool"], "float32")),
         infer=lambda a: TType((), a.dtype),
         forward=lambda c, a: Tensor(a.value, dtype=TG_DTYPES[a.dtype]), vjp=NO_GRAD)


def _cast_vjp(b, n, g):
    src = b.type(n.inputs[0]).dtype
    return [b.emit("cast", g, dtype="float32")] if src == "float32" else [None]


register("cast", doc="convert to another dtype", family="elementwise", inputs="x",
         attrs_model=attrs("cast", dtype=(Literal["float32", "int32", "bool"],
                                          Field(description="target dtype"))),
         infer=lambda a, x: TType(x.shape, a.dtype),
         forward=lambda c, a, x: x.cast(TG_DTYPES[a.dtype]), vjp=_cast_vjp)


# -- composite activations ------------------------------------------------------------------
def composite(name, doc, expand, family="activation", inputs="x", **fields):
    register(name, doc=doc, family=family, inputs=inputs,
             attrs_model=attrs(name, doc=doc, **fields) if fields else None, expand=expand)


def _leaky(b, a, x):
    return b.emit("where", b.emit("greater", x, b.const(0.0)), x,
                  b.emit("mul", x, b.const(a.alpha)))


def _elu(b, a, x):
    em1 = b.emit("sub", b.emit("exp", b.emit("minimum", x, b.const(0.0))), b.const(1.0))
    return b.emit("where", b.emit("greater", x, b.const(0.0)), x,
                  b.emit("mul", em1, b.const(a.alpha)))


def _softplus(b, a, x):
    # log(1 + e^x) = pos + log(1 + e^n) with pos, n = (x, -x) for x >= 0 and (0, x) below:
    # stable for large |x|, and the gradient is sigmoid(x) everywhere. Written with relu and
    # abs instead, both pieces have slope 0 at x = 0 and the gradient there came out 0, not 0.5.
    nonneg = b.emit("greater_equal", x, b.const(0.0))
    pos = b.emit("where", nonneg, x, b.const(0.0))
    n = b.emit("where", nonneg, b.emit("neg", x), x)
    return b.emit("add", pos, b.emit("log", b.emit("add", b.const(1.0), b.emit("exp", n))))


def _gelu(b, a, x):
    cube = b.emit("mul", x, b.emit("mul", x, x))
    inner = b.emit("mul", b.const(math.sqrt(2 / math.pi)),
                   b.emit("add", x, b.emit("mul", b.const(0.044715), cube)))
    return b.emit("mul", b.emit("mul", b.const(0.5), x),
                  b.emit("add", b.const(1.0), b.emit("tanh", inner)))


def _silu(b, a, x):
    return b.emit("mul", x, b.emit("sigmoid", x))


composite("leaky_relu", "x if x > 0 else alpha * x", _leaky,
          alpha=(float, Field(0.01, description="slope for x < 0")))
composite("elu", "x if x > 0 else alpha * (e^x - 1)", _elu,
          alpha=(float, Field(1.0, description="scale for x < 0")))
composite("softplus", "log(1 + e^x), computed stably", _softplus)
composite("gelu", "Gaussian error linear unit (tanh approximation)", _gelu)
composite("silu", "x * sigmoid(x) (swish)", _silu)
