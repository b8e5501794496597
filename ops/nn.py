"""Layers: linear, convolution, pooling, embedding, dropout, normalisation, softmax.

All are composites over primitives, so their shapes, gradients and drawings follow from
what they expand to. Weights use PyTorch's layout (linear: [out, in]; conv: [out, in, kh,
kw]) so weights can be exchanged with it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field
from tinygrad import Tensor

from dlgraph.engine.errors import ShapeError, SpecError, suggest
from dlgraph.engine.spec.base import ParamLayer
from dlgraph.engine.types import TType, fmt
from dlgraph.ops.common import same
from dlgraph.ops.elementwise import composite
from dlgraph.ops.linalg import swap_last
from dlgraph.ops.registry import NO_GRAD, REGISTRY, attrs, register
from dlgraph.ops.shape import _pair, pair_field

F = "nn"


def _features(b, x, axis=-1, what="features"):
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
    fin = _features(b, x)
    w = b.param("weight", (a.out, fin), "glorot_uniform")
    y = b.emit("matmul", x, swap_last(b, w))
    if a.bias:
        y = b.emit("add", y, b.param("bias", (a.out,), "zeros"))
    return _activate(b, a, y)


def _activate(b, a, y):
    act = getattr(a, "activation", None)
    if act is None:
        return y
    unary = [n for n, d in REGISTRY.items() if d.family == "activation"]
    if act not in unary:
        same = [u for u in unary if u.lower() == act.lower()]
        raise SpecError(f"unknown activation '{act}'",
                        help=f"did you mean '{same[0]}'? (op names are lower case)" if same
                        else suggest(act, unary) or f"activations: {', '.join(sorted(unary))}")
    return b.emit(act, y)


_act = (str | None, Field(None, description="an activation op applied to the output, "
                                            "e.g. relu"))
register("linear", doc="fully connected layer: x @ weight.T + bias", family=F, inputs="x",
         attrs_model=attrs("linear", base=ParamLayer,
                           out=(int, Field(gt=0, description="output features")),
                           bias=(bool, Field(True, description="add a learned bias")),
                           activation=_act),
         expand=_linear)


def _pad2d(b, x, padding, value=0.0):
    ph, pw = _pair(padding)
    r = b.type(x).rank
    if ph:
        x = b.emit("pad", x, axis=r - 2, before=ph, after=ph, value=value)
    if pw:
        x = b.emit("pad", x, axis=r - 1, before=pw, after=pw, value=value)
    return x


def conv_core(b, x, w, stride, dilation, groups):
    """Grouped cross-correlation of an already padded x [N, C, H, W] with the weight id
    w [O, C/G, KH, KW] (PyTorch's layout): sliding windows, then one batched matmul.

    Returns [N, O, OH, OW]; conv1d, conv2d and conv_transpose2d build on it.
    """
    o, cg, kh, kw = b.shape(w)
    g = groups
    k = cg * kh * kw
    win = b.emit("windows", x, kernel=[kh, kw], stride=list(_pair(stride)),
                 dilation=list(_pair(dilation)))                       # [N, C, OH, OW, KH, KW]
    n, _, oh, ow, _, _ = b.shape(win)
    if g == 1:
        # as tinygrad's own conv2d: windows x weight summed over (C, KH, KW); the backward
        # reductions then run over contiguous N, OH, OW (measured 1.5x faster than im2col)
        win = b.emit("reshape", win, shape=[n, 1, cg, oh, ow, kh, kw])
        win = b.emit("transpose", win, axes=[0, 1, 3, 4, 2, 5, 6])      # [N, 1, OH, OW, C, ..]
        wr = b.emit("reshape", w, shape=[1, o, 1, 1, cg, kh, kw])
        return b.emit("sum", b.emit("mul", win, wr), axes=[4, 5, 6])   # [N, O, OH, OW]
    cols = b.emit("transpose", win, axes=[0, 2, 3, 1, 4, 5])            # [N, OH, OW, C, KH, KW]
    cols = b.emit("reshape", cols, shape=[n, oh, ow, g, k])
    cols = b.emit("transpose", cols, axes=[0, 3, 1, 2, 4])              # [N, G, OH, OW, K]
    wm = b.emit("reshape", w, shape=[g, o // g, k])                     # [G, O/G, K]
    wm = b.emit("reshape", swap_last(b, wm), shape=[1, g, 1, k, o // g])
    y = b.emit("matmul", cols, wm)                                      # [N, G, OH, OW, O/G]
    y = b.emit("transpose", y, axes=[0, 1, 4, 2, 3])                    # [N, G, O/G, OH, OW]
    return b.emit("reshape", y, shape=[n, o, oh, ow])


def _groups(a, c):
    if c % a.groups or a.out % a.groups:
        raise ShapeError(f"groups={a.groups} must divide in channels {c} and out {a.out}",
                         help="channels are split into `groups` equal parts")


def _add_bias(b, a, y, rank):
    if not a.bias:
        return y
    bias = b.param("bias", (a.out,), "zeros")
    return b.emit("add", y, b.emit("reshape", bias, shape=[a.out] + [1] * (rank - 2)))


def _conv2d(b, a, x):
    t = b.type(x)
    if t.rank != 4:
        raise ShapeError(f"conv2d needs [batch, channels, height, width], got {fmt(t.shape)}",
                         help="images are NCHW; reshape or transpose the input")
    c = _features(b, x, 1, "channel")
    _groups(a, c)
    kh, kw = _pair(a.kernel)
    w = b.param("weight", (a.out, c // a.groups, kh, kw), "he_uniform")
    y = conv_core(b, _pad2d(b, x, a.padding), w, a.stride, a.dilation, a.groups)
    # cut output and pre-activation: their cotangents are then realised once, not
    # recomputed inside the weight-gradient reduction for every weight
    y = _add_bias(b, a, y, 4)
    out = _activate(b, a, y)
    b.cut(y, out)
    return out


_k = pair_field(..., "kernel", 1, "kernel size (one int or [h, w])")
_s = pair_field(1, "stride", 1, "stride")
_p = pair_field(0, "padding", 0, "zero padding on each side")
_d = pair_field(1, "dilation", 1, "dilation")
register("conv2d", doc="2-D convolution over NCHW images", family=F, inputs="x",
         attrs_model=attrs("conv2d", base=ParamLayer,
                           out=(int, Field(gt=0, description="output channels")),
                           kernel=_k, stride=_s, padding=_p, dilation=_d,
                           groups=(int, Field(1, gt=0, description="channel groups")),
                           bias=(bool, Field(True, description="add a learned bias")),
                           activation=_act),
         expand=_conv2d)


def _pool(reduce, pad_value):
    def expand(b, a, x):
        if b.type(x).rank != 4:
            raise ShapeError(f"pooling needs [batch, channels, height, width], got "
                             f"{fmt(b.shape(x))}")
        (kh, kw), (ph, pw) = _pair(a.kernel), _pair(a.padding)
        if 2 * ph > kh or 2 * pw > kw:
            raise ShapeError(f"padding {a.padding} is more than half the kernel {a.kernel}: "
                             "some windows would hold only padding",
                             help="use padding <= kernel // 2, as PyTorch requires")
        win = b.emit("windows", _pad2d(b, x, a.padding, pad_value), kernel=a.kernel,
                     stride=a.stride if a.stride is not None else a.kernel)
        return b.emit(reduce, win, axes=[-2, -1])
    return expand


_pool_fields = dict(kernel=_k, stride=(pair_field(None, "stride", 1, "")[0] | None, Field(
    None, description="stride (default: the kernel size)")), padding=_p)
register("max_pool2d", doc="max over sliding windows of NCHW images", family=F, inputs="x",
         attrs_model=attrs("max_pool2d", **_pool_fields), expand=_pool("max", -1e30))
register("avg_pool2d", doc="mean over sliding windows (zero padding counts)", family=F,
         inputs="x", attrs_model=attrs("avg_pool2d", **_pool_fields),
         expand=_pool("mean", 0.0))
composite("global_avg_pool", "mean over the spatial axes: [N, C, H, W] -> [N, C]",
          lambda b, a, x: b.emit("mean", x, axes=[2, 3]), family=F)


def _embedding(b, a, ids):
    w = b.param("weight", (a.num, a.dim), "normal")
    return b.emit("matmul", b.emit("one_hot", ids, depth=a.num), w)


register("embedding", doc="int ids -> learned vectors (a row of weight per id)", family=F,
         inputs="ids", attrs_model=attrs("embedding", base=ParamLayer,
                                         num=(int, Field(gt=0, description="vocabulary size")),
                                         dim=(int, Field(gt=0, description="vector size"))),
         expand=_embedding)


def _dropout_mask(c, a, x):
    if not c.training or a.p == 0:
        return Tensor.ones(*x.shape).shard_like(x)
    return ((Tensor.rand(*x.shape) >= a.p).float() / (1 - a.p)).shard_like(x)


_p_field = (float, Field(0.5, ge=0, lt=1, description="probability of dropping a value"))
register("dropout_mask", doc="a random keep-mask scaled by 1/(1-p) in training; ones in eval",
         family=F, inputs="x", attrs_model=attrs("dropout_mask", p=_p_field),
         infer=same, forward=_dropout_mask, vjp=NO_GRAD)
register("dropout", doc="zero values with probability p while training", family=F, inputs="x",
         attrs_model=attrs("dropout", p=_p_field),
         expand=lambda b, a, x: b.emit("mul", x, b.emit("dropout_mask", x, p=a.p)))


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
         "no gradient", family=F, inputs="like",
         attrs_model=attrs("noise", shape=_trailing,
                           kind=(Literal["normal", "uniform"],
                                 Field("normal", description="standard normal, or [0, 1)")),
                           training_only=(bool, Field(False, description=(
                               "zeros outside training: corruption for a denoising model "
                               "(add it to the input), so inference sees clean data")))),
         infer=_noise_infer, forward=_noise, vjp=NO_GRAD)


register("zeros", doc="zeros [batch, *shape], batch taken from the input (initial states)",
         family=F, inputs="like",
         attrs_model=attrs("zeros", shape=_trailing),
         infer=_noise_infer,
         forward=lambda c, a, ref: Tensor.zeros(ref.shape[0], *a.shape).shard_like(ref),
         vjp=NO_GRAD)


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
         family=F, inputs="stat, running, update*",
         attrs_model=attrs("moving_average", momentum=(float, Field(0.1, gt=0, le=1)),
                           update=(bool, Field(True, description="in training, move the "
                                               "running statistic (off: only pick by mode)"))),
         infer=lambda a, s, r, *u: s, forward=_moving_average, vjp=_moving_average_vjp)


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
    c = _features(b, x, 1, "channel")
    axes = [0] + list(range(2, t.rank))
    y = _normalize(b, x, axes, a.eps, a.momentum)
    shape = (c,) + (1,) * (t.rank - 2)
    if a.affine:
        y = b.emit("mul", y, b.emit("reshape", b.param("weight", (c,), "ones"),
                                    shape=list(shape)))
        y = b.emit("add", y, b.emit("reshape", b.param("bias", (c,), "zeros"),
                                    shape=list(shape)))
    return y


_eps = (float, Field(1e-5, gt=0, description="added to the variance"))
_affine = (bool, Field(True, description="learn a scale and a shift"))
register("layer_norm", doc="normalise over the last `dims` axes, then scale and shift",
         family=F, inputs="x",
         attrs_model=attrs("layer_norm", base=ParamLayer, eps=_eps, affine=_affine,
                           dims=(int, Field(1, gt=0, description="how many trailing axes"))),
         expand=_layer_norm)
register("batch_norm", doc="normalise over the batch (and space) per channel (axis 1); "
         "running statistics in eval mode", family=F, inputs="x",
         attrs_model=attrs("batch_norm", base=ParamLayer, eps=_eps, affine=_affine,
                           momentum=(float, Field(0.1, gt=0, le=1, description=
                                                  "weight of the new batch in the "
                                                  "running statistics"))),
         expand=_batch_norm)


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
          axis=_axis)
composite("log_softmax", "x - log(sum(exp(x))) along an axis, computed stably", _log_softmax,
          axis=_axis)
