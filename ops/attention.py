"""Attention and transformer layers, as composites over primitives.

- ``attention``: scaled dot-product attention ``softmax(q k^T * scale + mask) v``.
- ``multi_head_attention``: PyTorch's ``nn.MultiheadAttention`` (batch first).
- ``positional_encoding``: sinusoidal (a constant) or learned positions added to ``x``.
- ``transformer_encoder_block`` / ``transformer_decoder_block``: PyTorch's
  ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (batch first, no dropout).

The sinusoids and causal masks are made in the graph from ``arange`` (ops/shape.py).

Weights use PyTorch's names and layouts, so a PyTorch ``state_dict`` loads as it is, with
the node id as prefix (``<id>.<torch name>``):

- ``multi_head_attention`` (``nn.MultiheadAttention``): ``in_proj_weight`` [3E, E] (the q,
  k and v projections stacked), ``in_proj_bias`` [3E], ``out_proj.weight`` [E, E],
  ``out_proj.bias`` [E] (``out_proj`` is a ``linear`` node, as in PyTorch).
- ``transformer_encoder_block`` (``nn.TransformerEncoderLayer``): ``self_attn.*`` (as
  above), ``linear1.*``, ``linear2.*``, ``norm1.*``, ``norm2.*``.
- ``transformer_decoder_block`` (``nn.TransformerDecoderLayer``): ``self_attn.*``,
  ``multihead_attn.*``, ``linear1.*``, ``linear2.*``, ``norm1.*``, ``norm2.*``, ``norm3.*``.
- ``positional_encoding`` with ``kind: learned``: ``weight`` [max_len, E], like an
  ``nn.Embedding(max_len, E)`` (and initialised like one: standard normal).

``init`` overrides of a layer are keyed by these dotted names relative to the layer, e.g.
``init: {self_attn.out_proj.weight: glorot_uniform, linear1.bias: 0.1}``.

Masks (``attention``'s optional last input, and ``multi_head_attention``'s): broadcastable
to the scores [..., Tq, Tk] (for multi-head attention: [batch, heads, Tq, Tk], e.g. [Tq, Tk]
or a key-padding mask [batch, 1, 1, Tk]).

- a **bool** mask is True where a query may attend to a key (as in PyTorch's
  ``scaled_dot_product_attention``; the opposite of ``nn.MultiheadAttention``'s bool
  ``attn_mask``). Masked scores are replaced by -1e9 with ``where``.
- a **float** mask is added to the scores (use -1e9, not -inf, for "never").
- ``causal: true`` lets query i see keys 0..i only (top-left aligned, as PyTorch's
  ``is_causal``), and combines with a mask.

A query whose keys are all masked gets equal weights over all keys: its output is the mean
of the values, never NaN (PyTorch's ``scaled_dot_product_attention`` gives zeros there,
``nn.MultiheadAttention`` NaN). Causal masking alone never masks a whole row.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.spec.base import ParamLayer
from dlgraph.engine.types import broadcast, fmt
from dlgraph.ops import reference as R
from dlgraph.ops.examples import B, E, F
from dlgraph.ops.linalg import swap_last
from dlgraph.ops.registry import attrs, register

FAMILY = "attention"
NEG = -1e9
"""The score of a masked (query, key) pair: exp(NEG - max) is 0 in float32."""


# -- scaled dot-product attention -----------------------------------------------------------
def causal_mask(b, tq, tk):
    """A bool [tq, tk] mask, True where key j <= query i (top-left aligned)."""
    rows = b.emit("reshape", b.emit("arange", size=tq), shape=[tq, 1])
    return b.emit("greater_equal", rows, b.emit("arange", size=tk), as_="causal_mask")


def _attention(b, a, q, k, v, *mask):
    tq, tk, tv = b.type(q), b.type(k), b.type(v)
    if min(tq.rank, tk.rank, tv.rank) < 2:
        raise ShapeError(f"attention needs q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv], "
                         f"got {fmt(tq.shape)}, {fmt(tk.shape)}, {fmt(tv.shape)}")
    if tq.shape[-1] != tk.shape[-1]:
        raise ShapeError(f"queries and keys differ in size: q {fmt(tq.shape)}, "
                         f"k {fmt(tk.shape)}", help="q and k must share their last axis")
    if tk.shape[-2] != tv.shape[-2]:
        raise ShapeError(f"keys and values differ in number: k {fmt(tk.shape)}, "
                         f"v {fmt(tv.shape)}", help="k and v must share their second-last axis")
    if len(mask) > 1:
        raise ShapeError(f"attention takes at most one mask, got {len(mask)}")
    d = tq.shape[-1]
    if a.scale is None and isinstance(d, str):
        raise ShapeError(f"the feature axis of q {fmt(tq.shape)} is the named dim '{d}'",
                         help="give `scale`, or make the feature axis a size")
    scale = a.scale if a.scale is not None else 1 / math.sqrt(d)
    s = b.emit("matmul", b.emit("mul", q, b.const(scale)), swap_last(b, k), as_="scores")
    if a.causal:
        s = b.emit("where", causal_mask(b, tq.shape[-2], tk.shape[-2]), s, b.const(NEG))
    if mask:
        m, mt, st = mask[0], b.type(mask[0]), b.type(s)
        if broadcast(mt.shape, st.shape) != st.shape:
            raise ShapeError(f"the mask {fmt(mt.shape)} does not broadcast to the scores "
                             f"{fmt(st.shape)}", help="masks are [..., Tq, Tk]; use 1 for an "
                                                      "axis it does not vary along")
        if mt.dtype == "bool":
            s = b.emit("where", m, s, b.const(NEG))
        elif mt.dtype == "float32":
            s = b.emit("add", s, m)
        else:
            raise ShapeError(f"the mask must be bool (True: attend) or float32 (added to the "
                             f"scores), got {mt.dtype}")
    w = b.emit("softmax", s, axis=-1, as_="weights")
    return b.emit("matmul", w, v)


register("attention", doc="scaled dot-product attention softmax(q k^T * scale + mask) v; "
         "q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv], optional mask (bool: True = "
         "attend; float: added)", family=FAMILY, inputs="q, k, v, mask*",
         attrs_model=attrs("attention",
                           causal=(bool, Field(False, description="query i sees keys 0..i")),
                           scale=(float | None, Field(None, description="score scale "
                                                      "(default 1/sqrt(d))"))),
         expand=_attention,
         reference=lambda a, xs, c: R.attention(*xs[:3], a.scale, a.causal,
                                                xs[3] if len(xs) > 3 else None),
         examples=[E([F((2, 3, 4)), F((2, 5, 4)), F((2, 5, 3))]),
                   E([F((1, 2, 4, 4)), F((1, 2, 4, 4)), F((1, 2, 4, 3))],
                     {"causal": True, "scale": 0.5}, id="attention_causal_scale"),
                   E([F((2, 3, 4)), F((2, 5, 4)), F((2, 5, 3)),
                      B((3, 5), values=[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])],
                     id="attention_bool_mask_all_masked_row"),
                   E([F((2, 3, 4)), F((2, 5, 4)), F((2, 5, 3)), F((2, 1, 5))],
                     id="attention_float_mask")],
         grad_examples=[E([F((2, 3, 4)), F((2, 4, 4)), F((2, 4, 3)), F((3, 4), diff=False)],
                          {"causal": True})])


# -- multi-head attention ---------------------------------------------------------------------
def _seq(b, x, what):
    t = b.type(x)
    if t.rank != 3 or isinstance(t.shape[-1], str):
        raise ShapeError(f"{what} needs [batch, time, features] with a fixed number of "
                         f"features, got {fmt(t.shape)}",
                         help="declare the input like {shape: [batch, 16, 64]}")
    return t.shape[-1]


def _mha(b, a, query, *more):
    if len(more) > 2:
        raise ShapeError(f"multi_head_attention takes query, then optionally context and mask; "
                         f"got {1 + len(more)} inputs")
    ctx, mask = (more[0] if more else query), more[1:]
    e, h = _seq(b, query, "multi_head_attention"), a.heads
    if e % h:
        raise ShapeError(f"heads={h} must divide the model dim {e}",
                         help=f"each head gets dim / heads features; heads can be one of "
                              f"{', '.join(str(i) for i in range(1, e + 1) if e % i == 0)}")
    if _seq(b, ctx, "multi_head_attention") != e:
        raise ShapeError(f"the context has {b.shape(ctx)[-1]} features, the query {e}",
                         help=f"project the context to {e} features with a linear node")
    w = b.param("in_proj_weight", (3 * e, e), "glorot_uniform")
    bias = b.param("in_proj_bias", (3 * e,), "zeros") if a.bias else None

    def project(x, lo, hi, name):                       # x @ w[lo:hi].T + bias[lo:hi]
        whole = hi - lo == 3 * e
        wi = w if whole else b.emit("slice", w, axis=0, start=lo, stop=hi)
        if bias is None:
            return b.emit("matmul", x, swap_last(b, wi), as_=name)
        bi = bias if whole else b.emit("slice", bias, axis=0, start=lo, stop=hi)
        return b.emit("add", b.emit("matmul", x, swap_last(b, wi)), bi, as_=name)

    def part(y, k):
        return b.emit("slice", y, axis=-1, start=k * e, stop=(k + 1) * e)

    if ctx == query:                                    # self-attention: one projection
        qkv = project(query, 0, 3 * e, "qkv")
        q, k, v = part(qkv, 0), part(qkv, 1), part(qkv, 2)
    else:
        q = project(query, 0, e, "q")
        kv = project(ctx, e, 3 * e, "kv")
        k, v = part(kv, 0), part(kv, 1)

    def heads(t):                                       # [B, T, E] -> [B, H, T, E/H]
        bt, tt, _ = b.shape(t)
        return b.emit("transpose", b.emit("reshape", t, shape=[bt, tt, h, e // h]),
                      axes=[0, 2, 1, 3])

    o = b.emit("attention", heads(q), heads(k), heads(v), *mask, causal=a.causal)
    bq, tq, _ = b.shape(query)
    o = b.emit("reshape", b.emit("transpose", o, axes=[0, 2, 1, 3]), shape=[bq, tq, e])
    # torch's out_proj starts uniform(±1/sqrt(E)); the user's `init:` still overrides it
    init = {"weight": "uniform", **({"bias": "zeros"} if a.bias else {})}
    return b.emit("linear", o, as_="out_proj", out=e, bias=a.bias, init=init)


def _mha_ref(a, xs, c):
    x, *more = xs
    return R.multi_head_attention(x, more[0] if more else x, c.p, a.heads, a.causal,
                                  more[1] if len(more) > 1 else None)


_heads = (int, Field(gt=0, description="number of heads; must divide the model dim"))
_causal = (bool, Field(False, description="query i sees keys 0..i only"))
register("multi_head_attention", doc="multi-head attention as PyTorch's nn.MultiheadAttention "
         "(batch first): in = [query] (self-attention), [query, context] or [query, context, "
         "mask]; [batch, time, E] -> [batch, time, E]", family=FAMILY, inputs="query, context*",
         attrs_model=attrs("multi_head_attention", base=ParamLayer, heads=_heads,
                           causal=_causal,
                           bias=(bool, Field(True, description="learn input and output "
                                                               "projection biases"))),
         expand=_mha, reference=_mha_ref,
         examples=[E([F((2, 3, 4))], {"heads": 2}),
                   E([F((2, 3, 4)), F((2, 5, 4)),
                      B((3, 5), values=[[1, 1, 0, 0, 1], [0, 1, 0, 1, 0], [1, 1, 1, 1, 1]])],
                     {"heads": 2}, id="multi_head_attention_cross_mask"),
                   E([F((2, 3, 4))], {"heads": 4, "causal": True, "bias": False},
                     id="multi_head_attention_causal_nobias")],
         grad_examples=[E([F((2, 3, 4)), F((2, 4, 4))], {"heads": 2})])


# -- positional encoding ----------------------------------------------------------------------
def sinusoids(b, length, dim):
    """The [length, dim] table pe[t, 2i] = sin(t w_i), pe[t, 2i+1] = cos(t w_i), with
    w_i = 10000^(-2i/dim) (the PyTorch tutorial's and "Attention is all you need")."""
    pos = b.emit("reshape", b.emit("arange", size=length), shape=[length, 1])
    freq = b.emit("exp", b.emit("mul", b.emit("arange", size=dim // 2),
                                b.const(-2 * math.log(10000.0) / dim)))
    ang = b.emit("mul", pos, freq)                                   # [length, dim / 2]
    pair = b.emit("concat", b.emit("unsqueeze", b.emit("sin", ang), axis=-1),
                  b.emit("unsqueeze", b.emit("cos", ang), axis=-1), axis=-1)
    table = b.emit("reshape", pair, shape=[length, dim], as_="sinusoids")
    b.cut(table)            # computed once a call, not again inside what reads it
    return table


def _posenc(b, a, x):
    t = b.type(x)
    if t.rank < 2 or isinstance(t.shape[-1], str):
        raise ShapeError(f"positional_encoding needs [..., time, features] with a fixed "
                         f"number of features, got {fmt(t.shape)}")
    n, e = t.shape[-2:]
    if isinstance(n, int) and n > a.max_len:
        raise ShapeError(f"{n} positions exceed max_len={a.max_len}", help=f"set max_len >= {n}")
    if a.kind == "learned":
        if isinstance(n, str):
            raise ShapeError(f"learned positions need a fixed number of steps, got the named "
                             f"dim '{n}'", help="use kind: sinusoidal, or a fixed size")
        pe = b.param("weight", (a.max_len, e), "normal")
        if n < a.max_len:
            pe = b.emit("slice", pe, axis=0, start=0, stop=n)
    else:
        if e % 2:
            raise ShapeError(f"sinusoidal positions need an even number of features, got {e}")
        pe = sinusoids(b, n, e)
    return b.emit("add", x, pe)


def _posenc_ref(a, xs, c):
    x = xs[0]
    n, e = x.shape[-2:]
    if a.kind == "learned":
        return x + c.p["weight"][:n]
    t = np.arange(n)[:, None]
    w = 10000.0 ** (-np.arange(0, e, 2) / e)
    pe = np.zeros((n, e))
    pe[:, 0::2], pe[:, 1::2] = np.sin(t * w), np.cos(t * w)
    return x + pe


register("positional_encoding", doc="x + pe[:time] over [..., time, features]: fixed sinusoids "
         "or a learned table [max_len, features]", family=FAMILY, inputs="x",
         attrs_model=attrs("positional_encoding", base=ParamLayer,
                           kind=(Literal["sinusoidal", "learned"], Field(
                               "sinusoidal", description="sinusoidal (constant) or learned")),
                           max_len=(int, Field(5000, gt=0, description="the most positions"))),
         expand=_posenc, reference=_posenc_ref,
         examples=[E([F((2, 5, 6))]),
                   E([F((2, 5, 6))], {"kind": "learned", "max_len": 8},
                     id="positional_encoding_learned")],
         grad_examples=[E([F((2, 3, 4))], {"kind": "learned", "max_len": 5})])


# -- transformer blocks -----------------------------------------------------------------------
def _norm(b, a, x, name):
    return b.emit("layer_norm", x, as_=name, eps=a.eps)


def _feed_forward(b, a, x, e):
    hid = b.emit("linear", x, as_="linear1", out=a.ff, activation=a.activation)
    return b.emit("linear", hid, as_="linear2", out=e)


def _attend(b, a, name, x, *more, causal=False):
    return b.emit("multi_head_attention", x, *more, as_=name, heads=a.heads, causal=causal)


def _residual(b, a, x, name, layer):
    """Pre-norm: x + layer(norm(x)); post-norm: norm(x + layer(x))."""
    if a.norm_first:
        return b.emit("add", x, layer(_norm(b, a, x, name)))
    return _norm(b, a, b.emit("add", x, layer(x)), name)


def _encoder(b, a, x, *mask):
    if len(mask) > 1:
        raise ShapeError(f"transformer_encoder_block takes x and at most one mask, got "
                         f"{1 + len(mask)} inputs")
    e = _seq(b, x, "transformer_encoder_block")
    more = (lambda t: [t, mask[0]]) if mask else (lambda t: [])
    x = _residual(b, a, x, "norm1",
                  lambda t: _attend(b, a, "self_attn", t, *more(t), causal=a.causal))
    return _residual(b, a, x, "norm2", lambda t: _feed_forward(b, a, t, e))


def _decoder(b, a, x, memory):
    e = _seq(b, x, "transformer_decoder_block")
    if _seq(b, memory, "transformer_decoder_block") != e:
        raise ShapeError(f"the memory has {b.shape(memory)[-1]} features, the input {e}",
                         help="encoder and decoder share the model dim")
    x = _residual(b, a, x, "norm1",
                  lambda t: _attend(b, a, "self_attn", t, causal=a.causal))
    x = _residual(b, a, x, "norm2", lambda t: _attend(b, a, "multihead_attn", t, memory))
    return _residual(b, a, x, "norm3", lambda t: _feed_forward(b, a, t, e))


def _block_fields(causal_default: bool):
    return dict(
        heads=_heads,
        ff=(int, Field(gt=0, description="hidden size of the feed-forward layer")),
        norm_first=(bool, Field(True, description="pre-norm (true) or post-norm (false)")),
        activation=(Literal["relu", "gelu"], Field("relu", description="of the feed-forward "
                                                   "layer; gelu is the tanh approximation")),
        causal=(bool, Field(causal_default, description="self-attention: step i sees steps "
                                                        "0..i only")),
        eps=(float, Field(1e-5, gt=0, description="layer norm epsilon")))


def _residual_ref(a, c, x, norm, layer):
    """The reference of :func:`_residual`: pre-norm or post-norm around ``layer``."""
    def ln(t):
        return R.layer_norm(t, c.p[norm + ".weight"], c.p[norm + ".bias"], a.eps)
    return x + layer(ln(x)) if a.norm_first else ln(x + layer(x))


def _feed_forward_ref(a, c, x):
    h = R.linear(x, c.p["linear1.weight"], c.p["linear1.bias"])
    h = np.maximum(h, 0.0) if a.activation == "relu" else R.gelu(h)
    return R.linear(h, c.p["linear2.weight"], c.p["linear2.bias"])


def _encoder_ref(a, xs, c):
    """PyTorch's TransformerEncoderLayer (batch first, no dropout)."""
    x, *mask = xs
    x = _residual_ref(a, c, x, "norm1", lambda t: R.multi_head_attention(
        t, t, c.p, a.heads, a.causal, mask[0] if mask else None, prefix="self_attn."))
    return _residual_ref(a, c, x, "norm2", lambda t: _feed_forward_ref(a, c, t))


def _decoder_ref(a, xs, c):
    """PyTorch's TransformerDecoderLayer (batch first, no dropout)."""
    x, memory = xs
    x = _residual_ref(a, c, x, "norm1", lambda t: R.multi_head_attention(
        t, t, c.p, a.heads, a.causal, prefix="self_attn."))
    x = _residual_ref(a, c, x, "norm2", lambda t: R.multi_head_attention(
        t, memory, c.p, a.heads, prefix="multihead_attn."))
    return _residual_ref(a, c, x, "norm3", lambda t: _feed_forward_ref(a, c, t))


register("transformer_encoder_block", doc="self-attention and feed-forward, each with a "
         "residual and layer norm (PyTorch's TransformerEncoderLayer, batch first, no dropout); "
         "in = [x] or [x, mask]", family=FAMILY, inputs="x, mask*",
         attrs_model=attrs("transformer_encoder_block", base=ParamLayer,
                           **_block_fields(False)),
         expand=_encoder, reference=_encoder_ref,
         examples=[E([F((2, 3, 4))], {"heads": 2, "ff": 8}),
                   E([F((2, 3, 4)), B((3, 3), values=[[1, 0, 1], [1, 1, 0], [0, 1, 1]])],
                     {"heads": 2, "ff": 8, "norm_first": False, "activation": "gelu",
                      "causal": True}, id="transformer_encoder_block_postnorm_mask")],
         grad_examples=[E([F((2, 2, 4))], {"heads": 2, "ff": 6})])
register("transformer_decoder_block", doc="causal self-attention, cross-attention to memory and "
         "feed-forward, each with a residual and layer norm (PyTorch's TransformerDecoderLayer, "
         "batch first, no dropout)", family=FAMILY, inputs="x, memory",
         attrs_model=attrs("transformer_decoder_block", base=ParamLayer,
                           **_block_fields(True)),
         expand=_decoder, reference=_decoder_ref,
         examples=[E([F((2, 3, 4)), F((2, 5, 4))], {"heads": 2, "ff": 8}),
                   E([F((2, 3, 4)), F((2, 5, 4))],
                     {"heads": 1, "ff": 8, "norm_first": False, "causal": False},
                     id="transformer_decoder_block_postnorm")],
         grad_examples=[E([F((2, 2, 4)), F((2, 3, 4))],
                          {"heads": 2, "ff": 6, "norm_first": False, "activation": "gelu"})])
