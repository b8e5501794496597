"""ONNX exporters of dlgraph's primitive ops: one row per op.

Each rule is ``rule(w, node, ins, types) -> output name`` and writes the node's value
under the node's own id (``node.id``), so later rules find it by that name. Rules run in
inference mode: dropout masks are ones and batch statistics are the running ones.
"""

from __future__ import annotations

import math

import numpy as np

from dlgraph.engine.io.onnx.writer import INT64_MAX, NP, Writer, onnx_dtype
from dlgraph.engine.types import norm_axis

BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
          "maximum": "Max", "minimum": "Min", "greater": "Greater", "less": "Less",
          "greater_equal": "GreaterOrEqual", "less_equal": "LessOrEqual", "equal": "Equal"}
UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sign": "Sign",
         "abs": "Abs", "sin": "Sin", "cos": "Cos", "relu": "Relu", "sigmoid": "Sigmoid",
         "tanh": "Tanh", "stop_gradient": "Identity", "erf": "Erf"}
REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax"}


def _binary(op_type):
    def rule(w: Writer, n, ins, ts):
        # dlgraph promotes mixed dtypes to float32 (and `div` always); ONNX wants one dtype
        want = "float32" if n.op == "div" or len({t.dtype for t in ts}) > 1 else ts[0].dtype
        xs = [w.cast_to(x, t.dtype, want) for x, t in zip(ins, ts, strict=True)]
        return w.op(op_type, *xs, out=n.id)
    return rule


def _unary(op_type):
    return lambda w, n, ins, ts: w.op(op_type, ins[0], out=n.id)


def _axes(axes, rank):
    if axes is None:
        return None
    axes = [axes] if isinstance(axes, int) else axes
    return sorted({norm_axis(a, rank) for a in axes})


def _reduce(op_type):
    def rule(w, n, ins, ts):
        axes = _axes(n.attrs.axes, ts[0].rank)
        extra = [w.const(axes)] if axes is not None else []
        return w.op(op_type, ins[0], *extra, out=n.id, keepdims=int(n.attrs.keepdims))
    return rule


def _const(w, n, ins, ts):
    from onnx import numpy_helper
    value = numpy_helper.from_array(np.asarray(n.attrs.value, dtype=NP[n.attrs.dtype]))
    return w.op("Constant", out=n.id, value=value)


def _count(w, n, ins, ts):
    t = ts[0]
    axes = _axes(n.attrs.axes, t.rank) or list(range(t.rank))
    dims = [t.shape[a] for a in axes]
    if all(isinstance(d, int) for d in dims):
        return w.op("Identity", w.const(float(math.prod(dims)), "float32"), out=n.id)
    sizes = w.op("Gather", w.op("Shape", ins[0]), w.const(axes), axis=0)
    prod = w.op("ReduceProd", sizes, keepdims=0)
    return w.op("Cast", prod, out=n.id, to=onnx_dtype("float32"))


def _argmax(w, n, ins, ts):
    i = w.op("ArgMax", ins[0], axis=n.attrs.axis, keepdims=int(n.attrs.keepdims))
    return w.op("Cast", i, out=n.id, to=onnx_dtype("int32"))


def _reshape(w, n, ins, ts):
    return w.reshape(ins[0], n.type.shape, out=n.id)


def _transpose(w, n, ins, ts):
    r = ts[0].rank
    perm = list(reversed(range(r))) if n.attrs.axes is None else \
        [norm_axis(a, r) for a in n.attrs.axes]
    return w.op("Transpose", ins[0], out=n.id, perm=perm)


def _squeeze(w, n, ins, ts):
    return w.op("Squeeze", ins[0], w.const([norm_axis(n.attrs.axis, ts[0].rank)]), out=n.id)


def _unsqueeze(w, n, ins, ts):
    return w.op("Unsqueeze", ins[0], w.const([norm_axis(n.attrs.axis, ts[0].rank + 1)]),
                out=n.id)


def _slice(w, n, ins, ts):
    a = n.attrs
    stop = INT64_MAX if a.stop is None else a.stop
    return w.op("Slice", ins[0], w.const([a.start]), w.const([stop]),
                w.const([norm_axis(a.axis, ts[0].rank)]), out=n.id)


def _pad(w, n, ins, ts):
    r, a = ts[0].rank, n.attrs
    ax = norm_axis(a.axis, r)
    pads = [0] * (2 * r)
    pads[ax], pads[r + ax] = a.before, a.after
    value = w.const(a.value, ts[0].dtype)
    return w.op("Pad", ins[0], w.const(pads), value, out=n.id, mode="constant")


def _expand_to(w, n, x, shape_of):
    return w.op("Expand", x, w.op("Shape", shape_of), out=n.id)


def _batch_shape(w, ref, dims):
    """The shape [batch of ref, *dims] as an int64 tensor."""
    return w.op("Concat", w.op("Shape", ref, start=0, end=1), w.const(list(dims)), axis=0)


def _filled(w, out, ref, dims, value):
    return w.op("Expand", w.const(value, "float32"), _batch_shape(w, ref, dims), out=out)


def _noise(w, n, ins, ts):
    if getattr(n.attrs, "training_only", False):      # inference runs without it: zeros
        return _filled(w, n.id, ins[0], n.attrs.shape, 0.0)
    like = _filled(w, None, ins[0], n.attrs.shape, 0.0)
    op_type = "RandomNormalLike" if n.attrs.kind == "normal" else "RandomUniformLike"
    return w.op(op_type, like, out=n.id)


def _arange(w, n, ins, ts):
    size = n.attrs.size
    end = w.const(float(size), "float32") if isinstance(size, int) else \
        w.op("Cast", w.op("Squeeze", w.dim(size)), to=onnx_dtype("float32"))
    return w.op("Range", w.const(0.0, "float32"), end, w.const(1.0, "float32"), out=n.id)


def _one_hot(w, n, ins, ts):
    return w.op("OneHot", ins[0], w.const(n.attrs.depth), w.const([0.0, 1.0], "float32"),
                out=n.id, axis=-1)


PRIMITIVES = {
    **{op: _binary(t) for op, t in BINARY.items()},
    **{op: _unary(t) for op, t in UNARY.items()},
    **{op: _reduce(t) for op, t in REDUCE.items()},
    "where": lambda w, n, ins, ts: w.op("Where", *ins, out=n.id),
    "const": _const,
    "cast": lambda w, n, ins, ts: w.op("Cast", ins[0], out=n.id,
                                       to=onnx_dtype(n.attrs.dtype)),
    "matmul": lambda w, n, ins, ts: w.op("MatMul", *ins, out=n.id),
    "count": _count,
    "argmax": _argmax,
    "reshape": _reshape,
    "flatten": _reshape,
    "reshape_like": lambda w, n, ins, ts: w.op("Reshape", ins[0], w.op("Shape", ins[1]),
                                               out=n.id),
    "transpose": _transpose,
    "squeeze": _squeeze,
    "unsqueeze": _unsqueeze,
    "slice": _slice,
    "pad": _pad,
    "concat": lambda w, n, ins, ts: w.op("Concat", *ins, out=n.id,
                                         axis=norm_axis(n.attrs.axis, ts[0].rank)),
    "broadcast_like": lambda w, n, ins, ts: _expand_to(w, n, ins[0], ins[1]),
    "one_hot": _one_hot,
    "dropout_mask": lambda w, n, ins, ts: _expand_to(w, n, w.const(1.0, "float32"), ins[0]),
    "moving_average": lambda w, n, ins, ts: w.op("Identity", ins[1], out=n.id),
    "zeros": lambda w, n, ins, ts: _filled(w, n.id, ins[0], n.attrs.shape, 0.0),
    "noise": _noise,
    "arange": _arange,
}
"""dlgraph primitive -> its ONNX rule. Not here: ``windows``/``windows_grad`` (exported
through the conv and pool layers that use them) and ``reduce_to`` (backward only)."""
