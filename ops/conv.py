"""More convolutions: conv1d and conv_transpose2d, composites over primitives.

Weights use PyTorch's layouts and names, so ``nn.Conv1d`` / ``nn.ConvTranspose2d`` state
dicts load as they are (``<id>.weight``, ``<id>.bias``):

- ``conv1d``: weight [out, in / groups, k], bias [out], over [batch, channels, length].
- ``conv_transpose2d``: weight [in, out / groups, kh, kw], bias [out], over NCHW images.

conv1d is a 2-D convolution of the [N, C, 1, L] view of its input with the [O, C/G, 1, K]
view of its weight (:func:`conv_core`). conv_transpose2d is the adjoint of a convolution:
each input pixel times the kernel is a [out, kh, kw] patch (one matmul), and the primitive
``windows_grad`` adds the patches into the image at stride steps; the border ``padding``
is then cropped off. So its gradient is a convolution again (``windows``).
"""

from __future__ import annotations

from pydantic import Field

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.spec.base import ParamLayer
from dlgraph.engine.types import fmt
from dlgraph.ops import reference as R
from dlgraph.ops.common import pads4, pair
from dlgraph.ops.examples import E, F
from dlgraph.ops.linalg import swap_last
from dlgraph.ops.nn import (
    ACTIVATION,
    activate,
    activated,
    add_bias,
    check_groups,
    conv_core,
    features,
)
from dlgraph.ops.registry import attrs, register
from dlgraph.ops.shape import padding1_field, pair_field

FAMILY = "nn"


def _conv1d(b, a, x):
    t = b.type(x)
    if t.rank != 3:
        raise ShapeError(f"conv1d needs [batch, channels, length], got {fmt(t.shape)}",
                         help="sequences are NCL; transpose [batch, time, features] with "
                              "axes [0, 2, 1]")
    c = features(b, x, 1, "channel")
    length = features(b, x, 2, "length")
    check_groups(a, c)
    span = a.dilation * (a.kernel - 1) + 1
    left, right = pads1(a, length)
    if length + left + right < span:
        raise ShapeError(f"a kernel spanning {span} steps does not fit in a length of {length} "
                         f"(padding {a.padding})", help="use a smaller kernel, or padding")
    w = b.param("weight", (a.out, c // a.groups, a.kernel), "he_uniform")
    x = b.emit("unsqueeze", x, axis=2)                                  # [N, C, 1, L]
    if left or right:
        x = b.emit("pad", x, axis=3, before=left, after=right)
    w4 = b.emit("reshape", w, shape=[a.out, c // a.groups, 1, a.kernel])
    y = conv_core(b, x, w4, (1, a.stride), (1, a.dilation), a.groups)   # [N, O, 1, OL]
    y = add_bias(b, a, b.emit("squeeze", y, axis=2), 3)
    return activate(b, a, y)


def pads1(a, length) -> tuple[int, int]:
    """conv1d's padding (an int, [left, right] or 'same') as (left, right)."""
    if a.padding == "same":
        return pads4("same", (1, length), (1, a.kernel), (1, a.stride), (1, a.dilation))[2:]
    return (a.padding, a.padding) if isinstance(a.padding, int) else tuple(a.padding)


def _conv1d_ref(a, xs, c):
    """PyTorch's conv1d: the 2-D convolution of the [N, C, 1, L] view."""
    w, bias = c.p["weight"], c.p["bias"] if a.bias else None
    x = R.pad2d(xs[0][:, :, None], (0, 0, *pads1(a, xs[0].shape[2])))
    y = R.conv2d(x, w[:, :, None], bias, (1, a.stride), 0, (1, a.dilation), a.groups)
    return activated(a, y[:, :, 0])


_bias = (bool, Field(True, description="add a learned bias"))
_groups_f = (int, Field(1, gt=0, description="channel groups"))
register("conv1d", doc="1-D convolution over [batch, channels, length]", family=FAMILY, inputs="x",
         attrs_model=attrs("conv1d", base=ParamLayer,
                           out=(int, Field(gt=0, description="output channels")),
                           kernel=(int, Field(gt=0, description="kernel size")),
                           stride=(int, Field(1, gt=0, description="stride")),
                           padding=padding1_field(),
                           dilation=(int, Field(1, gt=0, description="dilation")),
                           groups=_groups_f, bias=_bias, activation=ACTIVATION),
         expand=_conv1d, reference=_conv1d_ref,
         examples=[E([F((2, 3, 9))], {"out": 4, "kernel": 3}),
                   E([F((2, 3, 9))], {"out": 2, "kernel": 4, "stride": 2, "padding": "same"},
                     id="conv1d_same"),
                   E([F((2, 3, 9))], {"out": 2, "kernel": 3, "padding": [2, 0]},
                     id="conv1d_causal"),
                   E([F((2, 3, 9))], {"out": 6, "kernel": 2, "stride": 2, "padding": 1,
                                      "dilation": 2, "groups": 3, "bias": False},
                     id="conv1d_stride_dilation_groups")],
         grad_examples=[E([F((2, 2, 7))], {"out": 4, "kernel": 3, "stride": 2, "padding": 1,
                                           "groups": 2}, float64=True)])


def _conv_transpose2d(b, a, x):
    t = b.type(x)
    if t.rank != 4:
        raise ShapeError(f"conv_transpose2d needs [batch, channels, height, width], got "
                         f"{fmt(t.shape)}", help="images are NCHW; reshape or transpose")
    c = features(b, x, 1, "channel")
    h, wd = features(b, x, 2, "height"), features(b, x, 3, "width")
    check_groups(a, c)
    g, og = a.groups, a.out // a.groups
    (kh, kw), (sh, sw), (ph, pw) = pair(a.kernel), pair(a.stride), pair(a.padding)
    (oph, opw), (dh, dw) = pair(a.output_padding), pair(a.dilation)
    for op_, s, d in ((oph, sh, dh), (opw, sw, dw)):
        if op_ >= s and op_ >= d:
            raise ShapeError(f"output_padding {a.output_padding} must be smaller than the "
                             f"stride {a.stride} or the dilation {a.dilation}")
    full_h, full_w = (h - 1) * sh + dh * (kh - 1) + 1, (wd - 1) * sw + dw * (kw - 1) + 1
    out_h, out_w = full_h + oph - 2 * ph, full_w + opw - 2 * pw
    if out_h < 1 or out_w < 1:
        raise ShapeError(f"padding {a.padding} leaves no output of a {full_h}x{full_w} image",
                         help="use less padding")
    w = b.param("weight", (c, og, kh, kw), "he_uniform")
    n = t.shape[0]
    # each pixel's patch: [N, G, H*W, C/G] @ [G, C/G, O/G*KH*KW]
    xs = swap_last(b, b.emit("reshape", x, shape=[n, g, c // g, h * wd]))
    wm = b.emit("reshape", w, shape=[g, c // g, og * kh * kw])
    p = b.emit("matmul", xs, wm)                                    # [N, G, H*W, O/G*KH*KW]
    p = b.emit("reshape", p, shape=[n, g, h, wd, og, kh, kw])
    p = b.emit("transpose", p, axes=[0, 1, 4, 2, 3, 5, 6])          # [N, G, O/G, H, W, KH, KW]
    p = b.emit("reshape", p, shape=[n, a.out, h, wd, kh, kw], as_="patches")
    # windows_grad reads only the shape of its reference: [N, O, full_h, full_w], made from
    # the patches without computing anything
    ref = b.emit("take", b.emit("take", p, axis=-1, index=0), axis=-1, index=0)
    ref = b.emit("pad", b.emit("pad", ref, axis=2, after=full_h - h), axis=3, after=full_w - wd)
    y = b.emit("windows_grad", p, ref, kernel=[kh, kw], stride=[sh, sw], dilation=[dh, dw])
    for axis, extra, pad, full in ((2, oph, ph, full_h), (3, opw, pw, full_w)):
        if extra:                                   # output_padding: more rows at the end
            y = b.emit("pad", y, axis=axis, after=extra)
        if pad:                                     # padding: crop the border
            y = b.emit("slice", y, axis=axis, start=pad, stop=full + extra - pad)
    return activate(b, a, add_bias(b, a, y, 4))


def _pairf(default, name, least, what):
    return pair_field(default, name, least, what)


register("conv_transpose2d", doc="transposed 2-D convolution (the adjoint of conv2d) over "
         "NCHW images: upsampling for decoders and generators", family=FAMILY, inputs="x",
         attrs_model=attrs("conv_transpose2d", base=ParamLayer,
                           out=(int, Field(gt=0, description="output channels")),
                           kernel=pair_field(..., "kernel", 1, "kernel size (one int or "
                                                                "[h, w])"),
                           stride=_pairf(1, "stride", 1, "stride"),
                           padding=_pairf(0, "padding", 0,
                                          "rows and columns cropped from each border"),
                           output_padding=_pairf(0, "output_padding", 0, "rows and columns "
                                                 "added at the bottom and right"),
                           dilation=_pairf(1, "dilation", 1, "dilation"),
                           groups=_groups_f, bias=_bias, activation=ACTIVATION),
         expand=_conv_transpose2d,
         reference=lambda a, xs, c: activated(a, R.conv_transpose2d(
             xs[0], c.p["weight"], c.p["bias"] if a.bias else None, a.stride, a.padding,
             a.output_padding, a.dilation, a.groups)),
         examples=[E([F((2, 4, 3, 3))], {"out": 2, "kernel": 3, "stride": 2, "padding": 1,
                                         "output_padding": 1}),
                   E([F((1, 4, 3, 4))], {"out": 6, "kernel": [2, 3], "dilation": 2,
                                         "groups": 2, "bias": False},
                     id="conv_transpose2d_groups_dilation")],
         grad_examples=[E([F((1, 2, 3, 3))], {"out": 2, "kernel": 3, "stride": 2,
                                              "padding": 1, "output_padding": 1})])
