"""ONNX exporters of spec layers that ONNX has as one operator (LSTM, Conv, Gemm, ...).

A rule reads the spec node (its op, attributes and parameters by their PyTorch names),
not the primitives it expanded to, so it does not depend on how dlgraph lowers the layer.
``rule(lay) -> {output name: ONNX value}``, or None when the layer is better exported as
its primitives (an activation ONNX lacks, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dlgraph.engine.io.onnx.writer import Writer
from dlgraph.engine.types import TType
from dlgraph.ops.common import pads4
from dlgraph.ops.conv import pads1

ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "leaky_relu": "LeakyRelu",
               "elu": "Elu", "softplus": "Softplus", "gelu": "Gelu", "softmax": "Softmax",
               "log_softmax": "LogSoftmax", "hard_swish": "HardSwish",
               "hard_sigmoid": "HardSigmoid", "selu": "Selu"}
"""A layer's `activation` -> its ONNX operator. Any other activation op is exported as its
primitives after the layer (see export.py: ``_Export.layer``)."""
_DEFAULTS = {"leaky_relu": {"alpha": 0.01}, "elu": {"alpha": 1.0},
             "gelu": {"approximate": "tanh"}, "softmax": {"axis": -1},
             "log_softmax": {"axis": -1}, "hard_sigmoid": {"alpha": 1 / 6, "beta": 0.5},
             "selu": {"alpha": 1.6732632423543772, "gamma": 1.0507009873554805}}
"""dlgraph's defaults for an activation op named by a layer (it is emitted without fields)."""


@dataclass
class Layer:
    """What a layer rule sees: the spec node and its values."""

    w: Writer
    sid: str                        # the spec node's scope path (`b/c1/conv` in modules)
    attrs: object                   # the spec node's validated attributes
    ins: list[str]                  # ONNX names of its inputs
    types: list[TType]
    params: dict[str, np.ndarray]   # every parameter of the graph, by checkpoint name
    refs: dict = field(default_factory=dict)  # ONNX names of other values it reads (`mask:`)
    owner: str = ""                 # its parameters' prefix, where not its own (`share:`)

    def p(self, name: str) -> np.ndarray:
        return self.params[self._full(name)]

    def _full(self, name: str) -> str:
        return f"{self.owner or self.sid.replace('/', '.')}.{name}"

    def init(self, name: str, value: np.ndarray | None = None) -> str:
        """An initializer ``<prefix>.<name>`` (the parameter itself unless a value is
        given); the prefix is the owner's where the layer shares its parameters."""
        full = self._full(name)
        return self.w.init(full, self.params[full] if value is None else value)


def _activate(lay: Layer, y: str) -> str:
    """The layer's `activation`, with dlgraph's defaults for its fields."""
    act = getattr(lay.attrs, "activation", None)
    if act is None:
        return y
    return lay.w.op(ACTIVATIONS[act], y, **_DEFAULTS.get(act, {}))


def _act_ok(attrs) -> bool:
    return getattr(attrs, "activation", None) in (None, *ACTIVATIONS)


def linear(lay: Layer):
    if not _act_ok(lay.attrs):
        return None
    x, w = lay.ins[0], lay.w
    bias = [lay.init("bias")] if lay.attrs.bias else []
    if lay.types[0].rank == 2:
        y = w.op("Gemm", x, lay.init("weight"), *bias, transB=1)
    else:
        y = w.op("MatMul", x, w.op("Transpose", lay.init("weight"), perm=[1, 0]))
        y = w.op("Add", y, bias[0]) if bias else y
    return {"out": _activate(lay, y)}


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def conv(lay: Layer):
    if not _act_ok(lay.attrs):
        return None
    a, w = lay.attrs, lay.w
    rank = lay.types[0].rank - 2
    pick = (lambda v: _pair(v)) if rank == 2 else (lambda v: [v])
    if rank == 2:        # 'same' and four sides as ONNX writes them: all begins, then ends
        t, b, l, r = pads4(a.padding, lay.types[0].shape[2:], a.kernel, a.stride, a.dilation)
        pads = [t, l, b, r]
    else:
        pads = list(pads1(a, lay.types[0].shape[2]))
    bias = [lay.init("bias")] if a.bias else []
    y = w.op("Conv", lay.ins[0], lay.init("weight"), *bias, kernel_shape=pick(a.kernel),
             strides=pick(a.stride), dilations=pick(a.dilation), pads=pads, group=a.groups)
    return {"out": _activate(lay, y)}


def conv_transpose(lay: Layer):
    if not _act_ok(lay.attrs):
        return None
    a, w = lay.attrs, lay.w
    pads = _pair(a.padding)
    bias = [lay.init("bias")] if a.bias else []
    y = w.op("ConvTranspose", lay.ins[0], lay.init("weight"), *bias,
             kernel_shape=_pair(a.kernel), strides=_pair(a.stride), dilations=_pair(a.dilation),
             pads=pads + pads, output_padding=_pair(a.output_padding), group=a.groups)
    return {"out": _activate(lay, y)}


def pool(op_type: str, **extra):
    def rule(lay: Layer):
        a = lay.attrs
        stride = a.stride if a.stride is not None else a.kernel
        dilation = getattr(a, "dilation", 1)
        t, b, l, r = pads4(a.padding, lay.types[0].shape[2:], a.kernel, stride, dilation)
        own = {"ceil_mode": 1} if a.ceil_mode else {}
        if hasattr(a, "count_include_pad"):
            own["count_include_pad"] = int(a.count_include_pad)
        if dilation != 1:
            own["dilations"] = _pair(dilation)
        return {"out": lay.w.op(op_type, lay.ins[0], kernel_shape=_pair(a.kernel),
                                strides=_pair(stride), pads=[t, l, b, r], **{**extra, **own})}
    return rule


def softmax(op_type: str):
    return lambda lay: {"out": lay.w.op(op_type, lay.ins[0], axis=lay.attrs.axis)}


def layer_norm(lay: Layer):
    a, t = lay.attrs, lay.types[0]
    shape = t.shape[t.rank - a.dims:]
    scale = lay.init("weight") if a.affine else lay.init("ones", np.ones(shape, np.float32))
    bias = lay.init("bias") if a.affine else lay.init("zeros", np.zeros(shape, np.float32))
    return {"out": lay.w.op("LayerNormalization", lay.ins[0], scale, bias, axis=-a.dims,
                            epsilon=a.eps)}


def batch_norm(lay: Layer):
    a = lay.attrs
    c = lay.types[0].shape[1]
    flat = {k: lay.p(k).reshape(c) for k in ("running_mean", "running_var")}
    scale = lay.init("weight") if a.affine else lay.init("ones", np.ones(c, np.float32))
    bias = lay.init("bias") if a.affine else lay.init("zeros", np.zeros(c, np.float32))
    mean = lay.init("running_mean", flat["running_mean"])
    var = lay.init("running_var", flat["running_var"])
    return {"out": lay.w.op("BatchNormalization", lay.ins[0], scale, bias, mean, var,
                            epsilon=a.eps)}


def embedding(lay: Layer):
    weight = None
    if lay.attrs.padding_idx is not None:       # its row gives zeros, whatever it holds
        weight = lay.p("weight").copy()
        weight[lay.attrs.padding_idx] = 0.0
    return {"out": lay.w.op("Gather", lay.init("weight", weight), lay.ins[0], axis=0)}


def dropout(lay: Layer):
    return {"out": lay.w.op("Identity", lay.ins[0])}
