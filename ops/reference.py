"""numpy float64 building blocks of the ops' references (``OpDef.reference``).

A reference says what an op means, written from its documentation with numpy alone (never
tinygrad), so the tests that hold the ops against the references are independent of the
code under test. Layers that promise PyTorch's behaviour (convolutions, pooling, recurrent
layers, attention and transformer blocks) follow PyTorch's definitions and weight layouts
here; the tests also compare those references with PyTorch itself.

Every reference has the signature ``ref(a, xs, c)``: ``a`` the op's validated attributes,
``xs`` its input arrays (float64, int32 or bool), ``c`` a namespace with ``p`` (the layer's
parameters by local name, float64), ``params`` (all of them by checkpoint name; the tests'
one-op spec calls the op's node ``out``), ``training`` and ``dims`` (sizes of named dims).
A reference that returns None has no value to compare (random ops: only the shape and
dtype are checked).
"""

from __future__ import annotations

import math

import numpy as np

from dlgraph.ops.common import pair

DTYPES = {"float32": np.float64, "int32": np.int32, "bool": np.bool_}
"""A spec dtype -> the numpy dtype its reference computes in."""
NEG = -1e9
"""The score of a masked (query, key) pair, as ops/attention.py's."""


def unary(fn):
    """The reference of an op that applies ``fn`` to its one input."""
    return lambda a, xs, c: fn(xs[0])


def binary(fn):
    """The reference of an op that applies ``fn`` to its two inputs."""
    return lambda a, xs, c: fn(xs[0], xs[1])


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def gelu(x):
    """The tanh approximation."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def norm_axes(axes, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative axes (None: all)."""
    if axes is None:
        return tuple(range(ndim))
    return tuple(sorted({ax % ndim for ax in ([axes] if isinstance(axes, int) else axes)}))


# -- sliding windows, convolution, pooling ------------------------------------------------
def _geometry(kernel, stride, dilation, h: int, w: int):
    (kh, kw), (sh, sw), (dh, dw) = pair(kernel), pair(stride), pair(dilation)
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    return kh, kw, sh, sw, dh, dw, oh, ow


def windows(x, kernel, stride=1, dilation=1):
    """[..., H, W] -> [..., OH, OW, KH, KW]: out[..., i, j, u, v] = x[..., i*sh + u*dh,
    j*sw + v*dw]."""
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(kernel, stride, dilation, *x.shape[-2:])
    out = np.zeros(x.shape[:-2] + (oh, ow, kh, kw), x.dtype)
    for u in range(kh):
        for v in range(kw):
            out[..., u, v] = x[..., u * dh:u * dh + (oh - 1) * sh + 1:sh,
                               v * dw:v * dw + (ow - 1) * sw + 1:sw]
    return out


def windows_grad(g, shape, kernel, stride=1, dilation=1):
    """The adjoint of :func:`windows`: each window value added back into an image of
    ``shape``."""
    kh, kw, sh, sw, dh, dw, oh, ow = _geometry(kernel, stride, dilation, *shape[-2:])
    out = np.zeros(shape, np.float64)
    for u in range(kh):
        for v in range(kw):
            out[..., u * dh:u * dh + (oh - 1) * sh + 1:sh,
                v * dw:v * dw + (ow - 1) * sw + 1:sw] += g[..., u, v]
    return out


def pad2d(x, padding, value=0.0):
    """x padded by an int, (h, w) or (top, bottom, left, right)."""
    p = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    p = (p[0], p[0], p[1], p[1]) if len(p) == 2 else p
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [p[:2], p[2:]], constant_values=value)


def _bias(y, b):
    return y if b is None else y + b.reshape((-1,) + (1,) * (y.ndim - 2))


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """PyTorch's ``conv2d``: x [N, C, H, W], w [O, C/G, KH, KW], b [O] or None."""
    n, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    win = windows(pad2d(x, padding), (kh, kw), stride, dilation)      # [N, C, OH, OW, KH, KW]
    oh, ow = win.shape[2:4]
    win = win.reshape(n, groups, cg, oh, ow, kh, kw)
    y = np.einsum("ngcijuv,gocuv->ngoij", win, w.reshape(groups, o // groups, cg, kh, kw))
    return _bias(y.reshape(n, o, oh, ow), b)


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1,
                     groups=1):
    """PyTorch's ``conv_transpose2d``: x [N, C, H, W], w [C, O/G, KH, KW], b [O] or None."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = pair(stride), pair(padding), \
        pair(output_padding), pair(dilation)
    patches = np.einsum("ngchw,gcouv->ngohwuv", x.reshape(n, groups, c // groups, h, wd),
                        w.reshape(groups, c // groups, og, kh, kw))
    patches = patches.reshape(n, groups * og, h, wd, kh, kw)
    full_h, full_w = (h - 1) * sh + dh * (kh - 1) + 1, (wd - 1) * sw + dw * (kw - 1) + 1
    y = windows_grad(patches, (n, groups * og, full_h, full_w), (kh, kw), (sh, sw), (dh, dw))
    y = np.pad(y, [(0, 0), (0, 0), (0, oph), (0, opw)])
    return _bias(y[:, :, ph:full_h + oph - ph, pw:full_w + opw - pw], b)


def pool(x, kernel, stride, pads, how: str, ceil_mode=False, count_include_pad=True,
         dilation=1):
    """PyTorch's ``max_pool2d`` / ``avg_pool2d`` by their definition, one window at a time:
    window (i, j) covers rows i*s - top .. + k, clipped to the padded image; ``ceil_mode``
    keeps a last window that starts inside the input or its top or left padding; a mean
    divides by the window's padded size, or by the values it holds. A dilated window (max
    only, as PyTorch) takes every d-th row and column of its span."""
    (kh, kw), (sh, sw) = pair(kernel), pair(kernel if stride is None else stride)
    (dh, dw), (top, bottom, left, right) = pair(dilation), pads
    h, w = x.shape[-2:]

    def count(n, k, s, p0, p1):
        span = n + p0 + p1 - k
        out = (-(-span // s) if ceil_mode else span // s) + 1
        return out - 1 if ceil_mode and (out - 1) * s >= n + p0 else out

    oh = count(h, dh * (kh - 1) + 1, sh, top, bottom)
    ow = count(w, dw * (kw - 1) + 1, sw, left, right)
    out = np.zeros(x.shape[:-2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * sh - top, j * sw - left
            if how == "max":
                rows, cols = h0 + dh * np.arange(kh), w0 + dw * np.arange(kw)
                rows, cols = rows[(rows >= 0) & (rows < h)], cols[(cols >= 0) & (cols < w)]
                out[..., i, j] = x[..., rows[:, None], cols[None, :]].max(axis=(-2, -1))
                continue
            h1, w1 = min(h0 + kh, h + bottom), min(w0 + kw, w + right)
            win = x[..., max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)]
            size = (h1 - h0) * (w1 - w0) if count_include_pad else win.shape[-2] * \
                win.shape[-1]
            out[..., i, j] = win.sum(axis=(-2, -1)) / size
    return out


# -- layers -----------------------------------------------------------------------------------
def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def layer_norm(x, w=None, b=None, eps=1e-5, dims=1):
    axes = tuple(range(x.ndim - dims, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y if w is None else y * w + b


def attention(q, k, v, scale=None, causal=False, mask=None):
    """softmax(q k^T * scale + mask) v; masked scores are -1e9 (an all-masked row: uniform)."""
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = (q * scale) @ np.swapaxes(k, -1, -2)
    tq, tk = s.shape[-2:]
    if causal:
        s = np.where(np.arange(tk)[None, :] <= np.arange(tq)[:, None], s, NEG)
    if mask is not None:
        s = np.where(mask, s, NEG) if mask.dtype == np.bool_ else s + mask
    return np.exp(log_softmax(s, -1)) @ v


def multi_head_attention(x, ctx, p: dict, heads: int, causal=False, mask=None, prefix=""):
    """PyTorch's ``nn.MultiheadAttention`` (batch first) with its parameter names under
    ``prefix``; a bool ``mask`` is True where a query may attend."""
    e = x.shape[-1]
    w, bias = p[prefix + "in_proj_weight"], p.get(prefix + "in_proj_bias")

    def heads_of(t, k):                                  # [B, T, E] -> [B, H, T, E/H]
        y = linear(t, w[k * e:(k + 1) * e], None if bias is None else bias[k * e:(k + 1) * e])
        return y.reshape(t.shape[0], t.shape[1], heads, e // heads).transpose(0, 2, 1, 3)

    o = attention(heads_of(x, 0), heads_of(ctx, 1), heads_of(ctx, 2), causal=causal,
                  mask=mask)
    o = o.transpose(0, 2, 1, 3).reshape(x.shape)
    return linear(o, p[prefix + "out_proj.weight"], p.get(prefix + "out_proj.bias"))


# -- recurrent layers ---------------------------------------------------------------------------
def _cell(kind: str, xw, hw, h, c):
    """One step of PyTorch's RNN / LSTM / GRU from the two projections."""
    if kind == "rnn":
        return np.tanh(xw + hw), None
    if kind == "lstm":
        i, f, g, o = np.split(xw + hw, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        return sigmoid(o) * np.tanh(c), c
    (xr, xz, xn), (hr, hz, hn) = np.split(xw, 3, axis=-1), np.split(hw, 3, axis=-1)
    r, z = sigmoid(xr + hr), sigmoid(xz + hz)
    return (1 - z) * np.tanh(xn + r * hn) + z * h, None


def recurrent(kind: str, x, init: list, p: dict, hidden: int, layers: int = 1,
              bidirectional: bool = False) -> dict:
    """PyTorch's ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (batch first) with its parameter
    names: ``{"out": [B, T, dirs * hidden], "h": [B, dirs * hidden]}`` (the last layer's
    final states, directions side by side) and, for lstm, ``"c"``. ``init``: h0 (and c0)
    [layers * dirs, B, hidden], or nothing for zeros."""
    dirs = 2 if bidirectional else 1
    batch, steps = x.shape[:2]
    seq, hs, cs = x, [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k, sfx = layer * dirs + d, f"_l{layer}" + ("_reverse" if d else "")
            h = init[0][k] if init else np.zeros((batch, hidden))
            c = init[1][k] if len(init) > 1 else np.zeros((batch, hidden))
            xw = linear(seq, p["weight_ih" + sfx], p["bias_ih" + sfx])
            out = [None] * steps
            for t in (reversed(range(steps)) if d else range(steps)):
                hw = linear(h, p["weight_hh" + sfx], p["bias_hh" + sfx])
                h, c = _cell(kind, xw[:, t], hw, h, c)
                out[t] = h
            outs.append(np.stack(out, axis=1))
            hs.append(h)
            cs.append(c)
        seq = np.concatenate(outs, axis=-1)
    res = {"out": seq, "h": np.concatenate(hs[-dirs:], axis=-1)}
    if kind == "lstm":
        res["c"] = np.concatenate(cs[-dirs:], axis=-1)
    return res
