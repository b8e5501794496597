"""Elementwise arithmetic, math, comparisons and activations.

Activations that are sums of other ops (gelu, elu, softplus, ...) are composites: their
gradient comes from the primitives they expand to, so they need no rule of their own.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field
from tinygrad import Tensor, dtypes

from dlgraph.engine.types import TType
from dlgraph.ops import reference as R
from dlgraph.ops.common import bcast, floats, same
from dlgraph.ops.examples import B, E, F, Int
from dlgraph.ops.registry import NO_GRAD, attrs, register

TG_DTYPES = {"float32": dtypes.float32, "int32": dtypes.int32, "bool": dtypes.bool}


def _float_same(a, x):
    floats(x)
    return x


def unary(name, fn, vjp, doc, family="elementwise", **tests):
    """A float op of one input; ``tests``: its reference and examples (see register)."""
    register(name, doc=doc, family=family, inputs="x", infer=_float_same,
             forward=lambda c, a, x: fn(x), vjp=vjp, **tests)


def binary(name, fn, vjp, doc, infer=bcast, **tests):
    register(name, doc=doc, family="elementwise", inputs="x, y", infer=infer,
             forward=lambda c, a, x, y: fn(x, y), vjp=vjp, **tests)


def _unary_tests(fn, *examples: E, grad: list[E] | None = None) -> dict:
    """The reference ``fn(x)``; forward examples (default: one [3, 4] input) and gradient
    examples (default: one [3, 4] input)."""
    return dict(reference=R.unary(fn), examples=examples or (E([F((3, 4))]),),
                grad_examples=[E([F((3, 4))])] if grad is None else grad)


TIES_X = F((2, 3), values=[[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
TIES_Y = F((3,), values=[1.0, 0.0, 2.0])


# -- arithmetic ---------------------------------------------------------------------------
binary("add", Tensor.add, lambda b, n, g: [g, g], "x + y, with numpy broadcasting",
       reference=R.binary(np.add),
       examples=[E([F((3, 4)), F((3, 4))]),
                 E([F((4, 1, 3)), F((2, 3))], id="add_bcast"),
                 E([F((3, 4)), F(())], id="add_scalar"),
                 E([F(()), F(())], id="add_rank0"),
                 E([Int((3, 4), 9), Int((4,), 9)], id="add_int"),
                 E([Int((3, 4), 9), F((3, 4))], id="add_int_float")],
       grad_examples=[E([F((4, 1, 3)), F((2, 3))], float64=True)])
binary("sub", Tensor.sub, lambda b, n, g: [g, b.emit("neg", g)], "x - y",
       reference=R.binary(np.subtract),
       examples=[E([F((2, 3)), F((3,))]),
                 E([Int((2, 3), 9), Int((2, 3), 9)], id="sub_int")],
       grad_examples=[E([F((2, 3)), F((3,))])])
binary("mul", Tensor.mul,
       lambda b, n, g: [b.emit("mul", g, n.inputs[1]), b.emit("mul", g, n.inputs[0])], "x * y",
       reference=R.binary(np.multiply),
       examples=[E([F((2, 1)), F((4, 1, 3))]),
                 E([Int((2, 3), 9), Int((3,), 9)], id="mul_int")],
       grad_examples=[E([F((2, 1)), F((4, 1, 3))])])


def _div_infer(a, x, y):
    return TType(bcast(a, x, y).shape, "float32")     # true division, also of ints


binary("div", Tensor.div,
       lambda b, n, g: [b.emit("div", g, n.inputs[1]),
                        b.emit("neg", b.emit("mul", g, b.emit("div", n.id, n.inputs[1])))],
       "x / y (true division: float32 result)", infer=_div_infer,
       reference=R.binary(np.divide),
       examples=[E([F((3, 4)), F((4,), "away")]),
                 E([F((1,)), F((3, 1), "away")], id="div_size1"),
                 E([Int((2, 3), 9), Int((2, 3), 9, values=[[1, 2, 3], [4, 5, 6]])],
                   id="div_int")],
       grad_examples=[E([F((3, 4)), F((4,), "away")], float64=True)])


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


binary("pow", _pow, _pow_vjp, "x ** y (the gradient in y needs x > 0)",
       reference=R.binary(np.power),
       examples=[E([F((3, 4), "pos"), F((3, 4))]),
                 E([F((3, 4), "pos"), F((), values=2.5)], id="pow_scalar_exponent"),
                 E([F((5,), values=[-2.0, -1.5, -0.5, 0.5, 3.0]),
                    F((5,), values=[2.0, 3.0, 2.0, 3.0, 2.0])],
                   id="pow_negative_base_int_exp")],
       grad_examples=[E([F((3, 4), "pos"), F((3, 4))])])


def _minmax_vjp(cmp):
    def vjp(b, n, g):
        x, y = n.inputs
        pick = b.emit(cmp, x, y)
        zero = b.const(0.0)
        return [b.emit("where", pick, g, zero), b.emit("where", pick, zero, g)]
    return vjp


binary("maximum", Tensor.maximum, _minmax_vjp("greater_equal"),
       "elementwise max of x and y (ties: the gradient goes to x)",
       reference=R.binary(np.maximum),
       examples=[E([F((2, 3)), F((3,))]),
                 E([TIES_X, TIES_Y], id="maximum_ties"),
                 E([Int((2, 3), 9), Int((2, 3), 9)], id="maximum_int")],
       grad_examples=[E([F((2, 3)), F((3,))])])
binary("minimum", Tensor.minimum, _minmax_vjp("less_equal"),
       "elementwise min of x and y (ties: the gradient goes to x)",
       reference=R.binary(np.minimum),
       examples=[E([F((2, 3)), F((3,))]),
                 E([TIES_X, TIES_Y], id="minimum_ties")],
       grad_examples=[E([F((2, 3)), F((3,))])])


def _cmp_infer(a, x, y):
    return TType(bcast(a, x, y).shape, "bool")


_MORE_CMP = {"greater": [E([F((4, 1, 3)), F((2, 3))], id="greater_bcast")],
             "equal": [E([Int((3, 4), 3), Int((3, 4), 3)], id="equal_int")]}
for _name, _fn, _np, _doc in [
        ("greater", Tensor.__gt__, np.greater, "x > y"),
        ("less", Tensor.__lt__, np.less, "x < y"),
        ("greater_equal", Tensor.__ge__, np.greater_equal, "x >= y"),
        ("less_equal", Tensor.__le__, np.less_equal, "x <= y"),
        ("equal", lambda x, y: x == y, np.equal, "x == y")]:
    binary(_name, _fn, NO_GRAD, _doc + " as a bool tensor (no gradient)", infer=_cmp_infer,
           reference=R.binary(_np),
           examples=[E([TIES_X, TIES_Y]), *_MORE_CMP.get(_name, [])])     # ties included


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
                              b.emit("where", n.inputs[0], b.const(0.0), g)],
         reference=lambda a, xs, c: np.where(*xs),
         examples=[E([B((3, 4)), F((3, 4)), F((3, 4))]),
                   E([B((3, 1)), F((4,)), F(())], id="where_bcast")],
         grad_examples=[E([B((3, 4)), F((3, 4)), F((4,))])])

# -- math -----------------------------------------------------------------------------------
POS = F((3, 4), "pos")
unary("neg", Tensor.neg, lambda b, n, g: [b.emit("neg", g)], "-x",
      **_unary_tests(np.negative))
unary("exp", Tensor.exp, lambda b, n, g: [b.emit("mul", g, n.id)], "e ** x",
      **_unary_tests(np.exp, E([F((3, 4))]), E([F(())], id="exp_rank0")))
unary("log", Tensor.log, lambda b, n, g: [b.emit("div", g, n.inputs[0])], "natural logarithm",
      **_unary_tests(np.log, E([POS]), grad=[E([POS])]))
unary("sqrt", Tensor.sqrt,
      lambda b, n, g: [b.emit("div", g, b.emit("mul", n.id, b.const(2.0)))], "square root",
      **_unary_tests(np.sqrt, E([POS]), grad=[E([POS])]))
unary("sign", Tensor.sign, NO_GRAD, "-1, 0 or 1 (no gradient)",
      **_unary_tests(np.sign, E([F((5,), values=[-2.0, -0.0, 0.0, 0.5, 3.0])]), grad=[]))
unary("abs", Tensor.abs, lambda b, n, g: [b.emit("mul", g, b.emit("sign", n.inputs[0]))], "|x|",
      **_unary_tests(np.abs, E([F((5,), values=[-2.0, -0.0, 0.0, 0.5, -3.0])]),
                     grad=[E([F((3, 4), "away")])]))
unary("sin", Tensor.sin, lambda b, n, g: [b.emit("mul", g, b.emit("cos", n.inputs[0]))], "sine",
      **_unary_tests(np.sin))
unary("cos", Tensor.cos,
      lambda b, n, g: [b.emit("neg", b.emit("mul", g, b.emit("sin", n.inputs[0])))], "cosine",
      **_unary_tests(np.cos))
unary("erf", Tensor.erf,
      lambda b, n, g: [b.emit("mul", g, b.emit("mul", b.const(2 / math.sqrt(math.pi)), b.emit(
          "exp", b.emit("neg", b.emit("mul", n.inputs[0], n.inputs[0])))))],
      "the error function, 2 / sqrt(pi) * integral of e^-t^2 from 0 to x (exact GELU uses it)",
      **_unary_tests(np.vectorize(math.erf), E([F((3, 4))]),
                     E([F((5,), values=[-6.0, -0.5, 0.0, 0.5, 6.0])], id="erf_tails")))
unary("relu", Tensor.relu,
      lambda b, n, g: [b.emit("where", b.emit("greater", n.inputs[0], b.const(0.0)), g,
                              b.const(0.0))], "max(x, 0)", family="activation",
      **_unary_tests(lambda x: np.where(x > 0, x, 0.0),
                     E([F((6,), values=[-2.0, -0.1, 0.0, 0.1, 2.0, 5.0])]),
                     E([F((2, 1, 3, 1))], id="relu_rank4_size1"),
                     grad=[E([F((3, 4), "away")])]))
unary("sigmoid", Tensor.sigmoid,
      lambda b, n, g: [b.emit("mul", g, b.emit("mul", n.id,
                                               b.emit("sub", b.const(1.0), n.id)))],
      "1 / (1 + e^-x)", family="activation",
      **_unary_tests(R.sigmoid, E([F((3, 4))]),
                     E([F((4,), values=[-100.0, -20.0, 20.0, 100.0])], id="sigmoid_large")))
unary("tanh", Tensor.tanh,
      lambda b, n, g: [b.emit("mul", g, b.emit("sub", b.const(1.0),
                                               b.emit("mul", n.id, n.id)))],
      "hyperbolic tangent", family="activation", **_unary_tests(np.tanh))
register("stop_gradient", doc="x, with no gradient flowing back", family="elementwise",
         inputs="x", infer=same, forward=lambda c, a, x: x.detach(), vjp=NO_GRAD,
         **_unary_tests(lambda x: x, grad=[]))

# -- constants and casts --------------------------------------------------------------------
register("const", doc="a scalar constant", family="elementwise", inputs=(),
         attrs_model=attrs("const", doc="a scalar constant",
                           value=(float, Field(description="the value")),
                           dtype=(Literal["float32", "int32", "bool"], "float32")),
         infer=lambda a: TType((), a.dtype),
         forward=lambda c, a: Tensor(a.value, dtype=TG_DTYPES[a.dtype]), vjp=NO_GRAD,
         reference=lambda a, xs, c: np.array(a.value).astype(R.DTYPES[a.dtype]),
         examples=[E([], {"value": 2.5}),
                   E([], {"value": 3.0, "dtype": "int32"}, id="const_int"),
                   E([], {"value": 1.0, "dtype": "bool"}, id="const_bool")])


def _cast_vjp(b, n, g):
    src = b.type(n.inputs[0]).dtype
    return [b.emit("cast", g, dtype="float32")] if src == "float32" else [None]


register("cast", doc="convert to another dtype", family="elementwise", inputs="x",
         attrs_model=attrs("cast", dtype=(Literal["float32", "int32", "bool"],
                                          Field(description="target dtype"))),
         infer=lambda a, x: TType(x.shape, a.dtype),
         forward=lambda c, a, x: x.cast(TG_DTYPES[a.dtype]), vjp=_cast_vjp,
         reference=lambda a, xs, c: xs[0].astype(R.DTYPES[a.dtype]),
         examples=[E([F((6,), values=[-1.7, -0.5, 0.0, 0.4, 2.5, 3.9])], {"dtype": "int32"}),
                   E([F((4,), values=[-1.0, 0.0, 0.3, 2.0])], {"dtype": "bool"},
                     id="cast_bool"),
                   E([F((3, 4))], {"dtype": "float32"}, id="cast_float"),
                   E([Int((3, 4), 9)], {"dtype": "float32"}, id="cast_int_float"),
                   E([B((3, 4))], {"dtype": "float32"}, id="cast_bool_float")],
         grad_examples=[E([F((3, 4))], {"dtype": "float32"})])


# -- composite activations ------------------------------------------------------------------
def composite(name, doc, expand, family="activation", inputs="x", tests=None, **fields):
    """A composite op whose attributes are ``fields``; ``tests``: its reference and
    examples (keyword arguments of register)."""
    register(name, doc=doc, family=family, inputs=inputs,
             attrs_model=attrs(name, doc=doc, **fields) if fields else None, expand=expand,
             **(tests or {}))


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
    if a.approximate == "none":          # x * P(X <= x) for a standard normal X, exactly
        cdf = b.emit("add", b.const(1.0), b.emit("erf", b.emit("mul", x, b.const(
            1 / math.sqrt(2)))))
        return b.emit("mul", b.emit("mul", b.const(0.5), x), cdf)
    cube = b.emit("mul", x, b.emit("mul", x, x))
    inner = b.emit("mul", b.const(math.sqrt(2 / math.pi)),
                   b.emit("add", x, b.emit("mul", b.const(0.044715), cube)))
    return b.emit("mul", b.emit("mul", b.const(0.5), x),
                  b.emit("add", b.const(1.0), b.emit("tanh", inner)))


def _silu(b, a, x):
    return b.emit("mul", x, b.emit("sigmoid", x))


def _hard_sigmoid(b, a, x):
    y = b.emit("add", b.emit("mul", x, b.const(a.alpha)), b.const(a.beta))
    return b.emit("minimum", b.emit("maximum", y, b.const(0.0)), b.const(1.0))


def _hard_sigmoid_ref(a, x):
    return np.clip(a.alpha * x + a.beta, 0.0, 1.0)


def _selu(b, a, x):
    return b.emit("mul", b.const(a.gamma), _elu(b, a, x))


SELU_ALPHA, SELU_GAMMA = 1.6732632423543772, 1.0507009873554805   # PyTorch's (and ONNX's)


composite("leaky_relu", "x if x > 0 else alpha * x", _leaky,
          alpha=(float, Field(0.01, description="slope for x < 0")),
          tests=dict(reference=lambda a, xs, c: np.where(xs[0] > 0, xs[0], a.alpha * xs[0]),
                     examples=[E([F((3, 4))]),
                               E([F((3, 4))], {"alpha": 0.2}, id="leaky_relu_alpha")],
                     grad_examples=[E([F((3, 4), "away")], {"alpha": 0.2})]))
composite("elu", "x if x > 0 else alpha * (e^x - 1)", _elu,
          alpha=(float, Field(1.0, description="scale for x < 0")),
          tests=dict(reference=lambda a, xs, c: np.where(xs[0] > 0, xs[0],
                                                         a.alpha * np.expm1(xs[0])),
                     examples=[E([F((3, 4))]), E([F((3, 4))], {"alpha": 0.5}, id="elu_alpha")],
                     grad_examples=[E([F((3, 4), "away")], {"alpha": 0.5})]))
composite("softplus", "log(1 + e^x), computed stably", _softplus,
          tests=_unary_tests(R.softplus, E([F((3, 4))]),
                             E([F((4,), values=[-100.0, -30.0, 30.0, 100.0])],
                               id="softplus_large", atol=1e-12)))
composite("gelu", "Gaussian error linear unit: x * P(X <= x), X standard normal (by "
          "default its tanh approximation)", _gelu,
          approximate=(Literal["tanh", "none"], Field("tanh", description=(
              "tanh: the tanh approximation; none: exact, with erf (PyTorch's default)"))),
          tests=dict(reference=lambda a, xs, c: R.gelu(xs[0]) if a.approximate == "tanh" else
                     0.5 * xs[0] * (1 + np.vectorize(math.erf)(xs[0] / math.sqrt(2))),
                     examples=[E([F((3, 4))]),
                               E([F((3, 4))], {"approximate": "none"}, id="gelu_exact")],
                     grad_examples=[E([F((3, 4))]),
                                    E([F((3, 4))], {"approximate": "none"}, id="gelu_exact")]))
composite("silu", "x * sigmoid(x) (swish)", _silu,
          tests=_unary_tests(lambda x: x * R.sigmoid(x)))
_HARD = F((7,), values=[-4.0, -3.0, -1.0, 0.0, 1.5, 3.0, 5.0])
composite("hard_sigmoid", "clip(alpha * x + beta, 0, 1): a piecewise-linear sigmoid "
          "(PyTorch's Hardsigmoid by default)", _hard_sigmoid,
          alpha=(float, Field(1 / 6, description="slope")),
          beta=(float, Field(0.5, description="value at 0")),
          tests=dict(reference=lambda a, xs, c: _hard_sigmoid_ref(a, xs[0]),
                     examples=[E([_HARD]), E([F((3, 4))], {"alpha": 0.2}, id="hard_sigmoid_onnx")],
                     grad_examples=[E([F((3, 4), "away")])]))
composite("hard_swish", "x * hard_sigmoid(x): MobileNetV3's swish (PyTorch's Hardswish)",
          lambda b, a, x: b.emit("mul", x, b.emit("hard_sigmoid", x)),
          tests=dict(reference=lambda a, xs, c: xs[0] * np.clip(xs[0] / 6 + 0.5, 0, 1),
                     examples=[E([_HARD])], grad_examples=[E([F((3, 4), "away")])]))
composite("selu", "gamma * elu(x, alpha): self-normalising (PyTorch's SELU constants)", _selu,
          alpha=(float, Field(SELU_ALPHA, description="scale for x < 0")),
          gamma=(float, Field(SELU_GAMMA, description="scale of the output")),
          tests=dict(reference=lambda a, xs, c: a.gamma * np.where(
              xs[0] > 0, xs[0], a.alpha * np.expm1(xs[0])),
              examples=[E([F((3, 4))])], grad_examples=[E([F((3, 4), "away")])]))
