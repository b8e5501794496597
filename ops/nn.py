"""Layers: linear, convolution, pooling, embedding, dropout, normalisation, softmax.

All are composites over primitives, so their shapes, gradients and drawings follow from
what they expand to. Weights use PyTorch's layout (linear: [out, in]; conv: [out, in, kh,
kw]) so weights can be exchanged with it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BeforeValidator, Field
from tinygrad import Tensor

from dlgraph.engine.errors import ShapeError, SpecError, suggest
from dlgraph.engine.spec.base import ParamLayer
from dlgraph.engine.types import TType, fmt
from dlgraph.ops import reference as R
from dlgraph.ops.common import pads4, pair, same
from dlgraph.ops.elementwise import composite
from dlgraph.ops.examples import E, F, Int
from dlgraph.ops.linalg import swap_last
from dlgraph.ops.registry import ALIASES, NO_GRAD, REGISTRY, attrs, op_suggestion, register
from dlgraph.ops.shape import padding_field, pair_field

FAMILY = "nn"


def features(b, x, axis=-1, what="features"):
    t = b.type(x)
    d = t.shape[axis]
    if isinstance(d, str):
        raise ShapeError(f"the {what} axis of {fmt(t.shape)} is the named dim '{d}'",
                         help="the last axis must be a size, e.g. [batch, 64]")
    return d


def _linear(b, a, x):
    if b.type(x).rank < 2:
        raise ShapeError(f"linear needs [batch, features], got {fmt(b.shape(x))}",
                         help="reshape the input to have a batch axis")
    fin = features(b, x)
    w = b.param("weight", (a.out, fin), "glorot_uniform")
    y = b.emit("matmul", x, swap_last(b, w))
    if a.bias:
        y = b.emit("add", y, b.param("bias", (a.out,), "zeros"))
    return activate(b, a, y)


def activate(b, a, y):
    act = getattr(a, "activation", None)
    if act is None:
        return y
    unary = [n for n, d in REGISTRY.items() if d.family == "activation"]
    if act not in unary:
        same = [u for u in unary if u.lower() == act.lower()]
        alias = ALIASES.get(act.lower().replace("_", ""), (None,))[0] in unary
        raise SpecError(f"unknown activation '{act}'",
                        help=f"did you mean '{same[0]}'? (op names are lower case)" if same
                        else op_suggestion(act) if alias
                        else suggest(act, unary) or f"activations: {', '.join(sorted(unary))}")
    return b.emit(act, y)


ACTIVATION = (str | None, Field(None, description="an activation op applied to the output, "
                                            "e.g. relu"))
def activated(a, y):
    """The reference of a layer's output ``y`` after its ``activation`` (if any)."""
    act = getattr(a, "activation", None)
    return REGISTRY[act].reference(None, [y], None) if act else y


def _bias_of(a, c):
    return c.p["bias"] if a.bias else None


register("linear", doc="fully connected layer: x @ weight.T + bias", family=FAMILY, inputs="x",
         attrs_model=attrs("linear", base=ParamLayer,
                           out=(int, Field(gt=0, description="output features")),
                           bias=(bool, Field(True, description="add a learned bias")),
                           activation=ACTIVATION),
         expand=_linear,
         reference=lambda a, xs, c: activated(a, R.linear(xs[0], c.p["weight"], _bias_of(a, c))),
         examples=[E([F((3, 4))], {"out": 5}),
                   E([F((3, 4))], {"out": 5, "bias": False}, id="linear_nobias"),
                   E([F((3, 4))], {"out": 5, "activation": "tanh"}, id="linear_activation"),
                   E([F((2, 3, 4))], {"out": 5}, id="linear_rank3"),
                   E([F(("batch", 4))], {"out": 1}, id="linear_named", dims={"batch": 3})],
         grad_examples=[E([F((3, 4))], {"out": 2, "activation": "tanh"}, float64=True)])


def _pad2d(b, x, pads, value=0.0):
    """x padded by ``pads`` (top, bottom, left, right; see :func:`pads4`)."""
    r = b.type(x).rank
    for axis, before, after in ((r - 2, *pads[:2]), (r - 1, *pads[2:])):
        if before or after:
            x = b.emit("pad", x, axis=axis, before=before, after=after, value=value)
    return x


def _image(b, x, what):
    """The (height, width) of an NCHW input, which must be sizes."""
    t = b.type(x)
    if t.rank != 4:
        raise ShapeError(f"{what} needs [batch, channels, height, width], got {fmt(t.shape)}",
                         help="images are NCHW; reshape or transpose the input")
    return features(b, x, 2, "height"), features(b, x, 3, "width")


def conv_core(b, x, w, stride, dilation, groups):
    """Grouped cross-correlation of an already padded x [N, C, H, W] with the weight id
    w [O, C/G, KH, KW] (PyTorch's layout): sliding windows, then one batched matmul.

    Returns [N, O, OH, OW]; conv1d, conv2d and conv_transpose2d build on it. Without groups
    the patches [N, OH, OW, C*KH*KW] and the product [N, OH, OW, O] are kept in buffers:
    the forward product, the weight's gradient and the patches' gradient are then plain
    matrix products, which run on the host's BLAS (engine/compile/gemm.py; graphs/cnn.yaml's
    training step 75 -> 40 ms, and 72 -> 80 ms with generated kernels only, measured).
    """
    o, cg, kh, kw = b.shape(w)
    g = groups
    k = cg * kh * kw
    win = b.emit("windows", x, kernel=[kh, kw], stride=list(pair(stride)),
                 dilation=list(pair(dilation)))                       # [N, C, OH, OW, KH, KW]
    n, _, oh, ow, _, _ = b.shape(win)
    if g == 1:
        cols = b.emit("transpose", win, axes=[0, 2, 3, 1, 4, 5])        # [N, OH, OW, C, KH, KW]
        cols = b.emit("reshape", cols, shape=[n, oh, ow, k])
        y = b.emit("matmul", cols, swap_last(b, b.emit("reshape", w, shape=[o, k])))
        b.cut(cols, y)
        return b.emit("transpose", y, axes=[0, 3, 1, 2])               # [N, O, OH, OW]
    cols = b.emit("transpose", win, axes=[0, 2, 3, 1, 4, 5])            # [N, OH, OW, C, KH, KW]
    cols = b.emit("reshape", cols, shape=[n, oh, ow, g, k])
    cols = b.emit("transpose", cols, axes=[0, 3, 1, 2, 4])              # [N, G, OH, OW, K]
    wm = b.emit("reshape", w, shape=[g, o // g, k])                     # [G, O/G, K]
    wm = b.emit("reshape", swap_last(b, wm), shape=[1, g, 1, k, o // g])
    y = b.emit("matmul", cols, wm)                                      # [N, G, OH, OW, O/G]
    y = b.emit("transpose", y, axes=[0, 1, 4, 2, 3])                    # [N, G, O/G, OH, OW]
    return b.emit("reshape", y, shape=[n, o, oh, ow])


def check_groups(a, c):
    if c % a.groups or a.out % a.groups:
        raise ShapeError(f"groups={a.groups} must divide in channels {c} and out {a.out}",
                         help="channels are split into `groups` equal parts")


def add_bias(b, a, y, rank):
    if not a.bias:
        return y
    bias = b.param("bias", (a.out,), "zeros")
    return b.emit("add", y, b.emit("reshape", bias, shape=[a.out] + [1] * (rank - 2)))


def _conv2d(b, a, x):
    hw = _image(b, x, "conv2d")
    c = features(b, x, 1, "channel")
    check_groups(a, c)
    kh, kw = pair(a.kernel)
    w = b.param("weight", (a.out, c // a.groups, kh, kw), "he_uniform")
    pads = pads4(a.padding, hw, a.kernel, a.stride, a.dilation)
    y = conv_core(b, _pad2d(b, x, pads), w, a.stride, a.dilation, a.groups)
    # cut output and pre-activation: their cotangents are then realised once, not
    # recomputed inside the weight-gradient reduction for every weight
    y = add_bias(b, a, y, 4)
    out = activate(b, a, y)
    b.cut(y, out)
    return out


_k = pair_field(..., "kernel", 1, "kernel size (one int or [h, w])")
_s = pair_field(1, "stride", 1, "stride")
_p = padding_field(0, "zero padding: one int, [h, w], [top, bottom, left, right], or "
                      "'same' (output size ceil(input / stride), the odd row or column at "
                      "the bottom and right)")
_d = pair_field(1, "dilation", 1, "dilation")
register("conv2d", doc="2-D convolution over NCHW images", family=FAMILY, inputs="x",
         attrs_model=attrs("conv2d", base=ParamLayer,
                           out=(int, Field(gt=0, description="output channels")),
                           kernel=_k, stride=_s, padding=_p, dilation=_d,
                           groups=(int, Field(1, gt=0, description="channel groups")),
                           bias=(bool, Field(True, description="add a learned bias")),
                           activation=ACTIVATION),
         expand=_conv2d,
         reference=lambda a, xs, c: activated(a, R.conv2d(
             R.pad2d(xs[0], pads4(a.padding, xs[0].shape[2:], a.kernel, a.stride, a.dilation)),
             c.p["weight"], _bias_of(a, c), a.stride, 0, a.dilation, a.groups)),
         examples=[E([F((2, 3, 7, 7))], {"out": 4, "kernel": 3}),
                   E([F((2, 3, 7, 7))], {"out": 4, "kernel": 3, "stride": 2, "padding": 1},
                     id="conv2d_stride_pad"),
                   E([F((2, 3, 7, 7))], {"out": 4, "kernel": 2, "dilation": 2, "padding": 1},
                     id="conv2d_dilation"),
                   E([F((2, 4, 6, 6))], {"out": 6, "kernel": [2, 3], "stride": [1, 2],
                                         "padding": [1, 0], "groups": 2, "bias": False},
                     id="conv2d_groups_rect"),
                   E([F((1, 2, 5, 5))], {"out": 2, "kernel": 1, "groups": 2,
                                         "activation": "relu"}, id="conv2d_depthwise_relu"),
                   E([F((2, 3, 7, 6))], {"out": 4, "kernel": [3, 4], "stride": 2,
                                         "padding": "same"}, id="conv2d_same"),
                   E([F((2, 3, 6, 6))], {"out": 2, "kernel": 3, "padding": [0, 1, 2, 1]},
                     id="conv2d_pad4")],
         grad_examples=[
             E([F((1, 2, 5, 5))], {"out": 3, "kernel": 2, "stride": 2, "padding": 1}),
             E([F((1, 4, 6, 6))], {"out": 2, "kernel": [2, 3], "dilation": 2, "groups": 2,
                                   "bias": False}, id="conv2d_dilation_groups"),
             E([F((1, 2, 5, 4))], {"out": 2, "kernel": 2, "padding": "same"},
               id="conv2d_same")])


def pool_pads(a, hw) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A pooling node's padding (top, bottom, left, right), and the rows and columns
    ``ceil_mode`` adds at the bottom and right (PyTorch's rule: one more window where the
    last would start inside the input or its top or left padding)."""
    stride, dilation = a.stride if a.stride is not None else a.kernel, getattr(a, "dilation", 1)
    pads = pads4(a.padding, hw, a.kernel, stride, dilation)
    extra = []
    for n, k, s, d, (p0, p1) in zip(hw, pair(a.kernel), pair(stride), pair(dilation),
                                    (pads[:2], pads[2:]), strict=True):
        k = d * (k - 1) + 1                     # the span of a dilated window
        span = n + p0 + p1 - k
        out = (-(-span // s) if a.ceil_mode else span // s) + 1
        if a.ceil_mode and (out - 1) * s >= n + p0:
            out -= 1
        extra.append(max((out - 1) * s + k - (n + p0 + p1), 0))
    return pads, tuple(extra)


def _pool(reduce, pad_value):
    def expand(b, a, x):
        hw = _image(b, x, "pooling")
        pads, (eh, ew) = pool_pads(a, hw)
        kh, kw = pair(a.kernel)
        if a.padding != "same" and (max(pads[:2]) * 2 > kh or max(pads[2:]) * 2 > kw):
            raise ShapeError(f"padding {a.padding} is more than half the kernel {a.kernel}: "
                             "some windows would hold only padding",
                             help="use padding <= kernel // 2, as PyTorch requires")
        stride = a.stride if a.stride is not None else a.kernel
        win = lambda v: b.emit("windows", v, kernel=a.kernel, stride=stride,
                               dilation=getattr(a, "dilation", 1))
        full = (pads[0], pads[1] + eh, pads[2], pads[3] + ew)
        if reduce == "max" or (getattr(a, "count_include_pad", True) and not eh and not ew):
            return b.emit(reduce, win(_pad2d(b, x, full, pad_value)), axes=[-2, -1])
        # a mean over the values a window holds (and its padding, if counted): the sum over
        # the window, divided by a count made the same way from ones
        total = b.emit("sum", win(_pad2d(b, x, full)), axes=[-2, -1])
        ones = b.emit("add", b.emit("zeros", x, shape=[1, *hw]), b.const(1.0))
        if a.count_include_pad:
            ones = _pad2d(b, ones, pads, 1.0)
            full = (0, eh, 0, ew)
        count = b.emit("sum", win(_pad2d(b, ones, full)), axes=[-2, -1])
        return b.emit("div", total, count)
    return expand


_ceil = (bool, Field(False, description="one more window at the bottom and right where the "
                                        "last would be partly outside (PyTorch's ceil_mode)"))
_pool_fields = dict(kernel=_k, stride=(pair_field(None, "stride", 1, "")[0] | None, Field(
    None, description="stride (default: the kernel size)")), padding=_p, ceil_mode=_ceil)
IMG = F((2, 3, 6, 6))


def _pool_ref(how):
    return lambda a, xs, c: R.pool(xs[0], a.kernel, a.stride, pool_pads(a, xs[0].shape[2:])[0],
                                   how, a.ceil_mode, getattr(a, "count_include_pad", True),
                                   getattr(a, "dilation", 1))


register("max_pool2d", doc="max over sliding windows of NCHW images", family=FAMILY, inputs="x",
         attrs_model=attrs("max_pool2d", **_pool_fields, dilation=_d),
         expand=_pool("max", -1e30),
         reference=_pool_ref("max"),
         examples=[E([IMG], {"kernel": 2}),
                   E([IMG], {"kernel": 3, "stride": 2, "padding": 1}, id="max_pool2d_pad"),
                   E([IMG], {"kernel": [2, 3], "stride": 1}, id="max_pool2d_rect"),
                   E([F((2, 3, 7, 6))], {"kernel": 3, "stride": 2, "padding": [1, 0, 1, 1],
                                         "ceil_mode": True}, id="max_pool2d_ceil"),
                   E([F((1, 2, 7, 7))], {"kernel": 2, "padding": "same"},
                     id="max_pool2d_same"),
                   E([F((2, 3, 8, 7))], {"kernel": [2, 3], "stride": 2, "dilation": [2, 1],
                                         "padding": 1, "ceil_mode": True},
                     id="max_pool2d_dilation_ceil")],
         grad_examples=[E([IMG], {"kernel": 2, "padding": 1}),
                        E([F((1, 2, 5, 5))], {"kernel": 2, "ceil_mode": True},
                          id="max_pool2d_ceil"),
                        E([F((1, 2, 6, 6))], {"kernel": 2, "dilation": 2, "stride": 1},
                          id="max_pool2d_dilation")])
register("avg_pool2d", doc="mean over sliding windows (zero padding counts, unless "
         "count_include_pad is false)", family=FAMILY,
         inputs="x", attrs_model=attrs("avg_pool2d", **_pool_fields, count_include_pad=(
             bool, Field(True, description="count the zero padding in each mean (false: "
                                           "divide by the values the window holds)"))),
         expand=_pool("mean", 0.0), reference=_pool_ref("mean"),
         examples=[E([IMG], {"kernel": 2}),
                   E([IMG], {"kernel": 3, "stride": 2, "padding": 1}, id="avg_pool2d_pad"),
                   E([F((2, 3, 7, 6))], {"kernel": 3, "stride": 2, "padding": 1,
                                         "ceil_mode": True}, id="avg_pool2d_ceil"),
                   E([F((2, 3, 7, 6))], {"kernel": 3, "stride": 2, "padding": [1, 0, 1, 1],
                                         "ceil_mode": True, "count_include_pad": False},
                     id="avg_pool2d_ceil_exclude_pad")],
         grad_examples=[E([IMG], {"kernel": [2, 3], "stride": [2, 3], "padding": 1}),
                        E([F((1, 2, 5, 5))], {"kernel": 2, "padding": 1, "ceil_mode": True,
                                              "count_include_pad": False},
                          id="avg_pool2d_exclude_pad")])
composite("global_avg_pool", "mean over the spatial axes: [N, C, H, W] -> [N, C]",
          lambda b, a, x: b.emit("mean", x, axes=[2, 3]), family=FAMILY,
          tests=dict(reference=lambda a, xs, c: xs[0].mean(axis=(2, 3)),
                     examples=[E([F((2, 3, 4, 5))])], grad_examples=[E([F((2, 3, 4, 5))])]))


def _embedding(b, a, ids):
    w = b.param("weight", (a.num, a.dim), "normal")
    if a.padding_idx is not None:
        if not -a.num <= a.padding_idx < a.num:
            raise ShapeError(f"padding_idx {a.padding_idx} is not an id of a {a.num}-row table",
                             help=f"use an id from 0 to {a.num - 1} (or from -{a.num})")
        # the padding row is multiplied by 0: its ids give zeros and it never trains
        pad = b.emit("one_hot", b.const(a.padding_idx % a.num, "int32"), depth=a.num)
        keep = b.emit("sub", b.const(1.0), b.emit("reshape", pad, shape=[a.num, 1]))
        w = b.emit("mul", w, keep)
    return b.emit("matmul", b.emit("one_hot", ids, depth=a.num), w)


def _embedding_ref(a, xs, c):
    w = c.p["weight"].copy()
    if a.padding_idx is not None:
        w[a.padding_idx] = 0.0
    return w[xs[0]]


register("embedding", doc="int ids -> learned vectors (a row of weight per id)", family=FAMILY,
         inputs="ids", attrs_model=attrs("embedding", base=ParamLayer,
                                         num=(int, Field(gt=0, description="vocabulary size")),
                                         dim=(int, Field(gt=0, description="vector size")),
                                         padding_idx=(int | None, Field(None, description=(
                                             "an id (padding) that gives zeros and whose row "
                                             "never trains, as PyTorch's padding_idx")))),
         expand=_embedding, reference=_embedding_ref,
         examples=[E([Int((2, 5), 7)], {"num": 7, "dim": 3}),
                   E([Int((2, 5), 3, values=[[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]])],
                     {"num": 3, "dim": 4, "padding_idx": 1}, id="embedding_padding_idx")],
         grad_examples=[E([Int((2, 5), 7)], {"num": 7, "dim": 3}),
                        E([Int((2, 5), 3, values=[[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]])],
                          {"num": 3, "dim": 2, "padding_idx": -1}, id="embedding_padding_idx")])


def _dropout_mask(c, a, x):
    if not c.training or a.p == 0:
        return Tensor.ones(*x.shape).shard_like(x)
    p = c.value("p", a.p)
    return ((Tensor.rand(*x.shape) >= p).float() / (1 - p)).shard_like(x)


_p_field = (float, Field(0.5, ge=0, lt=1, description="probability of dropping a value"))
register("dropout_mask", doc="a random keep-mask scaled by 1/(1-p) in training; ones in eval",
         family=FAMILY, inputs="x", attrs_model=attrs("dropout_mask", p=_p_field),
         infer=same, forward=_dropout_mask, vjp=NO_GRAD, runtime=("p",),
         reference=lambda a, xs, c: np.ones_like(xs[0]) if not c.training or a.p == 0 else None,
         examples=[E([F((3, 4))], {"p": 0.3})])
register("dropout", doc="zero values with probability p while training", family=FAMILY, inputs="x",
         attrs_model=attrs("dropout", p=_p_field),
         expand=lambda b, a, x: b.emit("mul", x, b.emit("dropout_mask", x, p=a.p)),
         reference=lambda a, xs, c: xs[0] if not c.training or a.p == 0 else None,   # random
         examples=[E([F((3, 4))])],
         grad_examples=[E([F((3, 4))], {"p": 0.5}, fd_training=False)])


def _sizes(v):
    if not isinstance(v, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                      for d in v):
        raise ValueError(f"shape is a list of sizes of at least 1; got {v!r}"[:160])
    return v


_trailing = (Annotated[list[int], BeforeValidator(_sizes)],
             Field(description="trailing dims (sizes of at least 1)"))


def _noise_infer(a, ref):
    if ref.rank < 1:
        raise ShapeError("noise needs an input with a batch axis to copy")
    return TType((ref.shape[0], *a.shape))


def _noise(c, a, ref):
    if a.training_only and not c.training:
        return Tensor.zeros(ref.shape[0], *a.shape).shard_like(ref)
    # made whole and split like the batch: data-parallel runs draw the same numbers
    return (Tensor.randn if a.kind == "normal" else Tensor.rand)(ref.shape[0],
                                                                 *a.shape).shard_like(ref)


register("noise", doc="random samples [batch, *shape], batch taken from the input: a GAN's "
         "latent code, or (training_only) input corruption that inference runs without; "
         "no gradient", family=FAMILY, inputs="like",
         attrs_model=attrs("noise", shape=_trailing,
                           kind=(Literal["normal", "uniform"],
                                 Field("normal", description="standard normal, or [0, 1)")),
                           training_only=(bool, Field(False, description=(
                               "zeros outside training: corruption for a denoising model "
                               "(add it to the input), so inference sees clean data")))),
         infer=_noise_infer, forward=_noise, vjp=NO_GRAD,
         reference=lambda a, xs, c: None,        # random: only its shape and dtype are checked
         examples=[E([F((3, 2))], {"shape": [4, 5]}),
                   E([F((3, 2))], {"shape": [2], "kind": "uniform"}, id="noise_uniform")])


register("zeros", doc="zeros [batch, *shape], batch taken from the input (initial states)",
         family=FAMILY, inputs="like",
         attrs_model=attrs("zeros", shape=_trailing),
         infer=_noise_infer,
         forward=lambda c, a, ref: Tensor.zeros(ref.shape[0], *a.shape).shard_like(ref),
         vjp=NO_GRAD, reference=lambda a, xs, c: np.zeros((xs[0].shape[0], *a.shape)),
         examples=[E([F((3, 2))], {"shape": [4, 5]})])


def _moving_average(c, a, stat, running, *update):
    if not c.training:
        return running
    if a.update:
        new = (update[0] if update else stat).detach().reshape(running.shape)
        c.updates.append(running.assign(running * (1 - a.momentum) + new * a.momentum))
    return stat


def _moving_average_vjp(b, n, g):
    # The gradient follows the mode like the value does: the batch statistic's in training,
    # none in eval (the running statistic is a constant there), picked at run time by the
    # same op with update off.
    zero = b.emit("mul", g, b.const(0.0))
    return [b.emit("moving_average", g, zero, momentum=n.attrs.momentum, update=False)] + \
        [None] * (len(n.inputs) - 1)


register("moving_average", doc="training: the batch statistic (and move the running one "
         "towards `update`, by default the statistic itself); eval: the running statistic",
         family=FAMILY, inputs="stat, running, update*",
         attrs_model=attrs("moving_average", momentum=(float, Field(0.1, ge=0, le=1)),
                           update=(bool, Field(True, description="in training, move the "
                                               "running statistic (off: only pick by mode)"))),
         infer=lambda a, s, r, *u: s, forward=_moving_average, vjp=_moving_average_vjp,
         reference=lambda a, xs, c: xs[0] if c.training else xs[1],
         examples=[E([F((1, 3)), F((1, 3))])],
         grad_examples=[E([F((1, 3)), F((1, 3), diff=False)], float64=True)])


def _normalize(b, x, axes, eps, momentum=None):
    mu = b.emit("mean", x, axes=axes, keepdims=True)
    xc = b.emit("sub", x, mu)
    var = b.emit("mean", b.emit("mul", xc, xc), axes=axes, keepdims=True)
    if momentum is not None:                     # batch norm: running statistics in eval
        shape = tuple(b.shape(mu))
        rm = b.param("running_mean", shape, "zeros", trainable=False)
        rv = b.param("running_var", shape, "ones", trainable=False)
        # the running variance is the unbiased one, n / (n - 1) times the batch's, as PyTorch's
        n = b.emit("count", x, axes=axes)
        unbias = b.emit("div", n, b.emit("maximum", b.emit("sub", n, b.const(1.0)),
                                         b.const(1.0)))
        mu = b.emit("moving_average", mu, rm, mu, momentum=momentum)
        var = b.emit("moving_average", var, rv, b.emit("mul", var, unbias), momentum=momentum)
        xc = b.emit("sub", x, mu)
    return b.emit("div", xc, b.emit("sqrt", b.emit("add", var, b.const(eps))))


def _layer_norm(b, a, x):
    t = b.type(x)
    n = a.dims
    if n > t.rank:
        raise ShapeError(f"dims is {n}, but the input {fmt(t.shape)} has {t.rank} axes",
                         help=f"normalise over at most {t.rank} trailing axes")
    shape = t.shape[t.rank - n:]
    y = _normalize(b, x, list(range(t.rank - n, t.rank)), a.eps)
    if a.affine:
        y = b.emit("mul", y, b.param("weight", shape, "ones"))
        y = b.emit("add", y, b.param("bias", shape, "zeros"))
    return y


def _batch_norm(b, a, x):
    t = b.type(x)
    if t.rank < 2:
        raise ShapeError(f"batch_norm needs [batch, channels, ...], got {fmt(t.shape)}")
    c = features(b, x, 1, "channel")
    axes = [0] + list(range(2, t.rank))
    y = _normalize(b, x, axes, a.eps, a.momentum)
    shape = (c,) + (1,) * (t.rank - 2)
    if a.affine:
        y = b.emit("mul", y, b.emit("reshape", b.param("weight", (c,), "ones"),
                                    shape=list(shape)))
        y = b.emit("add", y, b.emit("reshape", b.param("bias", (c,), "zeros"),
                                    shape=list(shape)))
    return y


def _batch_norm_ref(a, xs, c):
    x = xs[0]
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if c.training:
        mu = x.mean(axis=axes, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    else:
        mu = c.p["running_mean"].reshape(shape)
        var = c.p["running_var"].reshape(shape)
    y = (x - mu) / np.sqrt(var + a.eps)
    if a.affine:
        y = y * c.p["weight"].reshape(shape) + c.p["bias"].reshape(shape)
    return y


_eps = (float, Field(1e-5, gt=0, description="added to the variance"))
_affine = (bool, Field(True, description="learn a scale and a shift"))
register("layer_norm", doc="normalise over the last `dims` axes, then scale and shift",
         family=FAMILY, inputs="x",
         attrs_model=attrs("layer_norm", base=ParamLayer, eps=_eps, affine=_affine,
                           dims=(int, Field(1, gt=0, description="how many trailing axes"))),
         expand=_layer_norm,
         reference=lambda a, xs, c: R.layer_norm(xs[0], c.p.get("weight"), c.p.get("bias"),
                                                 a.eps, a.dims),
         examples=[E([F((3, 4))]),
                   E([F((2, 3, 4))], {"dims": 2}, id="layer_norm_dims2"),
                   E([F((3, 4))], {"affine": False}, id="layer_norm_plain")],
         grad_examples=[E([F((2, 3, 4))], {"dims": 2}, float64=True)])
register("batch_norm", doc="normalise over the batch (and space) per channel (axis 1); "
         "running statistics in eval mode", family=FAMILY, inputs="x",
         attrs_model=attrs("batch_norm", base=ParamLayer, eps=_eps, affine=_affine,
                           momentum=(float, Field(0.1, ge=0, le=1, description=
                                                  "weight of the new batch in the "
                                                  "running statistics (0: they stay as "
                                                  "loaded)"))),
         expand=_batch_norm, reference=_batch_norm_ref,
         examples=[E([F((4, 3))], id="batch_norm_initial_stats", keep_init=True),
                   E([F((4, 3))], id="batch_norm_2d"),
                   E([F((2, 3, 4, 4))], {"eps": 0.1}, id="batch_norm_4d"),
                   E([F((2, 3, 4, 4))], {"affine": False}, id="batch_norm_plain")],
         grad_examples=[E([F((4, 3))], float64=True),
                        E([F((2, 3, 3, 3))], id="batch_norm_4d")])


def _softmax(b, a, x):
    z = b.emit("sub", x, b.emit("stop_gradient", b.emit("max", x, axes=a.axis, keepdims=True)))
    e = b.emit("exp", z)
    return b.emit("div", e, b.emit("sum", e, axes=a.axis, keepdims=True))


def _log_softmax(b, a, x):
    z = b.emit("sub", x, b.emit("stop_gradient", b.emit("max", x, axes=a.axis, keepdims=True)))
    return b.emit("sub", z, b.emit("log", b.emit("sum", b.emit("exp", z), axes=a.axis,
                                                 keepdims=True)))


_axis = (int, Field(-1, description="the axis"))
composite("softmax", "exp(x) / sum(exp(x)) along an axis, computed stably", _softmax,
          axis=_axis, tests=dict(
              reference=lambda a, xs, c: np.exp(R.log_softmax(xs[0], a.axis)),
              examples=[E([F((3, 5))]), E([F((3, 5))], {"axis": 0}, id="softmax_axis0"),
                        E([F((1, 3), values=[[1000.0, 1001.0, 999.0]])], id="softmax_large")],
              grad_examples=[E([F((3, 5))], {"axis": 0}, float64=True)]))
composite("log_softmax", "x - log(sum(exp(x))) along an axis, computed stably", _log_softmax,
          axis=_axis, tests=dict(
              reference=lambda a, xs, c: R.log_softmax(xs[0], a.axis),
              examples=[E([F((3, 5))]), E([F((2, 3, 4))], {"axis": 1}, id="log_softmax_axis1"),
                        E([F((1, 3), values=[[1000.0, 1001.0, -1000.0]])],
                          id="log_softmax_large")],
              grad_examples=[E([F((3, 5))])]))
