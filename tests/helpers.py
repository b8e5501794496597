"""Shared test machinery: one-op specs, numpy float64 references of every op, and oracles.

The references in :data:`REF` are written from each op's documented meaning with numpy, or
use PyTorch in float64 where dlgraph promises PyTorch's behaviour (convolutions, pooling,
recurrent layers, multi-head attention, transformer blocks); none calls tinygrad, so they
are independent of the code under test. ``tests/test_ops.py`` holds the forward pass
against them and ``tests/test_gradients.py`` differentiates them by finite differences.

A test case names an op, its inputs (:class:`F` float, :class:`Int` int ids, :class:`B` bool)
and its attributes; :func:`op_spec` turns it into a spec whose node ``out`` is the op.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as TF
from tinygrad import Context, Tensor

import dlgraph
from dlgraph.engine.compile.lower import Ctx, Evaluator, bind, to_tensor
from dlgraph.engine.graph.autodiff import reverse
from dlgraph.ops import REGISTRY

torch.set_num_threads(1)   # the references are tiny: threads only cost time

# ------------------------------------------------------------------------------ inputs


@dataclass(frozen=True, eq=False)
class F:
    """A float32 input. ``gen``: normal | pos (0.5..2) | away (|x| >= 0.1) | unit (0..1).

    ``values`` fixes the array; ``diff=False`` keeps it out of the gradient (a frozen
    ``param`` in gradient specs).
    """

    shape: tuple
    gen: str = "normal"
    values: Any = None
    diff: bool = True


@dataclass(frozen=True, eq=False)
class Int:
    """An int32 input of ids in [0, high)."""

    shape: tuple
    high: int = 3
    values: Any = None


@dataclass(frozen=True, eq=False)
class B:
    """A bool input, made in the graph as ``greater(raw, 0)`` from a float input ``raw``.

    ``values`` fixes the bool array.
    """

    shape: tuple
    values: Any = None


@dataclass(eq=False)
class Case:
    """One op under test: ``op(*ins, **attrs)``; ``id`` names it in the test report."""

    op: str
    ins: list
    attrs: dict = field(default_factory=dict)
    id: str = ""
    rtol: float = 1e-5
    atol: float = 1e-5
    dims: dict = field(default_factory=dict)   # sizes for named dims in input shapes
    keep_init: bool = False                    # forward: keep the initial params
    extra: dict = field(default_factory=dict)  # more top-level spec fields (modules:)

    def __post_init__(self):
        self.id = self.id or self.op


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def concrete(shape, dims) -> tuple[int, ...]:
    return tuple(dims.get(d, 4) if isinstance(d, str) else d for d in shape)


def draw(inp, rng: np.random.Generator, dims=None):
    """The array of an input: float32, int32, or (for :class:`B`) the raw float32 array."""
    dims = dims or {}
    if isinstance(inp, B) and inp.values is not None:
        return np.where(np.asarray(inp.values, bool), 1.0, -1.0).astype(np.float32)
    if getattr(inp, "values", None) is not None:
        return np.asarray(inp.values, np.int32 if isinstance(inp, Int) else np.float32)
    shape = concrete(inp.shape, dims)
    if isinstance(inp, Int):
        return rng.integers(0, inp.high, shape).astype(np.int32)
    if isinstance(inp, B):
        return rng.standard_normal(shape).astype(np.float32)
    if inp.gen == "pos":
        v = rng.uniform(0.5, 2.0, shape)
    elif inp.gen == "away":
        v = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 2.0, shape)
    elif inp.gen == "unit":
        v = rng.uniform(0.05, 0.95, shape)
    else:
        v = rng.standard_normal(shape)
    return np.asarray(v, np.float32)


def op_spec(case: Case, *, grad: bool = False, out_shape=None) -> dict:
    """A spec whose node ``out`` applies the case's op to its inputs ``x0, x1, ...``.

    Forward specs take every input from the graph inputs. Gradient specs (``grad=True``)
    make each float input a ``param`` node (frozen where ``diff=False``, so it can be fed
    in float64 too) and add the objective ``obj = sum(out * w)`` with ``w`` a frozen random
    ``param`` of ``out_shape``.
    """
    inputs: dict = {}
    nodes: dict = {}
    names = []
    for k, inp in enumerate(case.ins):
        name = f"x{k}"
        names.append(name)
        if isinstance(inp, B):
            inputs[f"r{k}"] = {"shape": list(inp.shape)}
            nodes.setdefault("zero", {"op": "const", "value": 0.0})
            nodes[name] = {"op": "greater", "in": [f"r{k}", "zero"]}
        elif isinstance(inp, Int):
            inputs[name] = {"shape": list(inp.shape), "dtype": "int32"}
        elif grad:
            nodes[name] = {"op": "param", "shape": list(inp.shape),
                           **({} if inp.diff else {"trainable": False})}
        else:
            inputs[name] = {"shape": list(inp.shape)}
    nodes["out"] = {"op": case.op, **({"in": names} if names else {}), **case.attrs}
    outputs = ["out"]
    if grad:
        nodes["w"] = {"op": "param", "shape": list(out_shape), "trainable": False}
        nodes["prod"] = {"op": "mul", "in": ["out", "w"]}
        nodes["obj"] = {"op": "sum", "in": "prod"}
        outputs = ["obj"]
    return {"dlgraph": 1, "name": f"test_{case.op}", "inputs": inputs, "nodes": nodes,
            "outputs": outputs, **case.extra}


def feed_arrays(case: Case, rng, *, grad: bool = False) -> tuple[dict, list]:
    """(graph input arrays by name, the op's input arrays for the reference, in order)."""
    feeds, xs = {}, []
    for k, inp in enumerate(case.ins):
        a = draw(inp, rng, case.dims)
        if isinstance(inp, B):
            feeds[f"r{k}"] = a
            xs.append(a > 0)
        else:
            if not (grad and isinstance(inp, F)):
                feeds[f"x{k}"] = a
            xs.append(a)
    return feeds, xs


def attrs_of(case: Case):
    """The op's validated attribute model, defaults filled in."""
    return REGISTRY[case.op].attrs.model_validate({"op": case.op, **case.attrs})


def local_params(params: dict, node: str = "out") -> dict:
    """Parameters of a layer node by their local names: ``out.weight`` -> ``weight``."""
    pre = node + "."
    return {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}


# -------------------------------------------------------------------------- references

REF: dict[str, Callable] = {}
"""op name -> ``ref(a, xs, ctx)``: ``a`` the attrs model, ``xs`` float64 / int arrays,
``ctx`` a namespace with ``p`` (the layer's params by local name, float64), ``params`` (all),
``training`` and ``dims``."""


def ref(*names):
    def deco(fn):
        for n in names:
            REF[n] = fn
        return fn
    return deco


def _f64(x):
    return np.asarray(x, np.float64) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


def run_ref(case_or_op, a, xs, ctx) -> np.ndarray:
    op = case_or_op.op if isinstance(case_or_op, Case) else case_or_op
    return np.asarray(REF[op](a, [_f64(x) for x in xs], ctx))


def make_ctx(params=None, node="out", training=False, dims=None) -> SimpleNamespace:
    params = {k: _f64(v) for k, v in (params or {}).items()}
    return SimpleNamespace(params=params, p=local_params(params, node), training=training,
                           dims=dims or {})


def _binary(fn):
    return lambda a, xs, c: fn(xs[0], xs[1])


def _unary(fn):
    return lambda a, xs, c: fn(xs[0])


for _n, _f in {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
               "pow": np.power, "maximum": np.maximum, "minimum": np.minimum,
               "greater": np.greater, "less": np.less, "greater_equal": np.greater_equal,
               "less_equal": np.less_equal, "equal": np.equal, "matmul": np.matmul}.items():
    REF[_n] = _binary(_f)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


for _n, _f in {"neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
               "sign": np.sign, "abs": np.abs, "sin": np.sin, "cos": np.cos,
               "relu": lambda x: np.where(x > 0, x, 0.0), "sigmoid": _sigmoid,
               "tanh": np.tanh, "stop_gradient": lambda x: x, "softplus": _softplus,
               "silu": lambda x: x * _sigmoid(x),
               "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi)
                                                        * (x + 0.044715 * x ** 3)))}.items():
    REF[_n] = _unary(_f)

REF["where"] = lambda a, xs, c: np.where(*xs)
REF["leaky_relu"] = lambda a, xs, c: np.where(xs[0] > 0, xs[0], a.alpha * xs[0])
REF["elu"] = lambda a, xs, c: np.where(xs[0] > 0, xs[0], a.alpha * np.expm1(xs[0]))
REF["const"] = lambda a, xs, c: np.array(a.value).astype(
    {"float32": np.float64, "int32": np.int32, "bool": np.bool_}[a.dtype])
REF["param"] = lambda a, xs, c: c.params["out"]
REF["cast"] = lambda a, xs, c: xs[0].astype(
    {"float32": np.float64, "int32": np.int32, "bool": np.bool_}[a.dtype])


def _axes(axes, ndim):
    if axes is None:
        return tuple(range(ndim))
    return tuple(sorted({ax % ndim for ax in ([axes] if isinstance(axes, int) else axes)}))


REF["sum"] = lambda a, xs, c: np.sum(xs[0], axis=_axes(a.axes, xs[0].ndim),
                                     keepdims=a.keepdims)
REF["mean"] = lambda a, xs, c: np.mean(xs[0], axis=_axes(a.axes, xs[0].ndim),
                                       keepdims=a.keepdims)
REF["max"] = lambda a, xs, c: np.max(xs[0], axis=_axes(a.axes, xs[0].ndim),
                                     keepdims=a.keepdims)
REF["count"] = lambda a, xs, c: np.array(
    float(math.prod(xs[0].shape[i] for i in _axes(a.axes, xs[0].ndim))))
REF["argmax"] = lambda a, xs, c: np.argmax(xs[0], axis=a.axis,
                                           keepdims=a.keepdims).astype(np.int32)


@ref("reshape")
def _reshape(a, xs, c):
    return xs[0].reshape([c.dims[d] if isinstance(d, str) else d for d in a.shape])


REF["reshape_like"] = lambda a, xs, c: xs[0].reshape(xs[1].shape)


@ref("flatten")
def _flatten(a, xs, c):
    x = xs[0]
    s, e = a.start % x.ndim, a.end % x.ndim
    return x.reshape(x.shape[:s] + (-1,) + x.shape[e + 1:])


REF["transpose"] = lambda a, xs, c: np.transpose(xs[0], a.axes)
REF["squeeze"] = lambda a, xs, c: np.squeeze(xs[0], a.axis)
REF["unsqueeze"] = lambda a, xs, c: np.expand_dims(xs[0], a.axis)
REF["concat"] = lambda a, xs, c: np.concatenate(xs, axis=a.axis)
REF["take"] = lambda a, xs, c: np.take(xs[0], a.index, axis=a.axis)
REF["broadcast_like"] = lambda a, xs, c: np.broadcast_to(xs[0], xs[1].shape)


@ref("slice")
def _slice(a, xs, c):
    x = xs[0]
    idx = [slice(None)] * x.ndim
    idx[a.axis % x.ndim] = slice(a.start, a.stop)
    return x[tuple(idx)]


@ref("pad")
def _pad(a, xs, c):
    x = xs[0]
    width = [(0, 0)] * x.ndim
    width[a.axis % x.ndim] = (a.before, a.after)
    return np.pad(x, width, constant_values=a.value)


@ref("reduce_to")
def _reduce_to(a, xs, c):
    x, target = xs[0], xs[1].shape
    x = x.sum(axis=tuple(range(x.ndim - len(target))))
    keep = tuple(i for i, t in enumerate(target) if t == 1 and x.shape[i] != 1)
    return x.sum(axis=keep, keepdims=True)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _win_geometry(a, h, w):
    (kh, kw), (sh, sw), (dh, dw) = _pair(a.kernel), _pair(a.stride), _pair(a.dilation)
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    return kh, kw, sh, sw, dh, dw, oh, ow


@ref("windows")
def _windows(a, xs, c):
    x = xs[0]
    kh, kw, sh, sw, dh, dw, oh, ow = _win_geometry(a, *x.shape[-2:])
    out = np.zeros(x.shape[:-2] + (oh, ow, kh, kw), x.dtype)
    for i in range(oh):
        for j in range(ow):
            for u in range(kh):
                for v in range(kw):
                    out[..., i, j, u, v] = x[..., i * sh + u * dh, j * sw + v * dw]
    return out


@ref("windows_grad")
def _windows_grad(a, xs, c):
    g, r = xs
    kh, kw, sh, sw, dh, dw, oh, ow = _win_geometry(a, *r.shape[-2:])
    out = np.zeros(r.shape, np.float64)
    for i in range(oh):
        for j in range(ow):
            for u in range(kh):
                for v in range(kw):
                    out[..., i * sh + u * dh, j * sw + v * dw] += g[..., i, j, u, v]
    return out


REF["one_hot"] = lambda a, xs, c: np.eye(a.depth)[xs[0]]


# -- layers ------------------------------------------------------------------------------
def _activate(a, y):
    act = getattr(a, "activation", None)
    return REF[act](None, [y], None) if act else y


@ref("linear")
def _linear(a, xs, c):
    y = xs[0] @ c.p["weight"].T
    if a.bias:
        y = y + c.p["bias"]
    return _activate(a, y)


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x, np.float64))


@ref("conv2d")
def _conv2d(a, xs, c):
    y = TF.conv2d(_t(xs[0]), _t(c.p["weight"]), _t(c.p["bias"]) if a.bias else None,
                  stride=_pair(a.stride), padding=_pair(a.padding), dilation=_pair(a.dilation),
                  groups=a.groups).numpy()
    return _activate(a, y)


def _pool_args(a):
    return dict(kernel_size=_pair(a.kernel),
                stride=_pair(a.stride if a.stride is not None else a.kernel),
                padding=_pair(a.padding))


REF["max_pool2d"] = lambda a, xs, c: TF.max_pool2d(_t(xs[0]), **_pool_args(a)).numpy()
REF["avg_pool2d"] = lambda a, xs, c: TF.avg_pool2d(_t(xs[0]), count_include_pad=True,
                                                   **_pool_args(a)).numpy()
REF["global_avg_pool"] = lambda a, xs, c: xs[0].mean(axis=(2, 3))
REF["embedding"] = lambda a, xs, c: c.p["weight"][xs[0]]
REF["dropout"] = lambda a, xs, c: xs[0] if not c.training or a.p == 0 else None
REF["dropout_mask"] = lambda a, xs, c: np.ones_like(xs[0]) if not c.training or a.p == 0 \
    else None
REF["moving_average"] = lambda a, xs, c: xs[0] if c.training else xs[1]


@ref("layer_norm")
def _layer_norm(a, xs, c):
    x = xs[0]
    axes = tuple(range(x.ndim - a.dims, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + a.eps)
    return y * c.p["weight"] + c.p["bias"] if a.affine else y


@ref("batch_norm")
def _batch_norm(a, xs, c):
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


def _log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


REF["log_softmax"] = lambda a, xs, c: _log_softmax(xs[0], a.axis)
REF["softmax"] = lambda a, xs, c: np.exp(_log_softmax(xs[0], a.axis))


@ref("conv1d")
def _conv1d(a, xs, c):
    y = TF.conv1d(_t(xs[0]), _t(c.p["weight"]), _t(c.p["bias"]) if a.bias else None,
                  stride=a.stride, padding=a.padding, dilation=a.dilation,
                  groups=a.groups).numpy()
    return _activate(a, y)


@ref("conv_transpose2d")
def _conv_transpose2d(a, xs, c):
    y = TF.conv_transpose2d(_t(xs[0]), _t(c.p["weight"]), _t(c.p["bias"]) if a.bias else None,
                            stride=_pair(a.stride), padding=_pair(a.padding),
                            output_padding=_pair(a.output_padding), groups=a.groups,
                            dilation=_pair(a.dilation)).numpy()
    return _activate(a, y)


# -- attention ---------------------------------------------------------------------------
REF["arange"] = lambda a, xs, c: np.arange(c.dims.get(a.size, a.size), dtype=np.float64)


@ref("attention")
def _attention(a, xs, c):
    """softmax(q k^T * scale + mask) v; masked scores are -1e9 (an all-masked row: uniform)."""
    q, k, v, *mask = xs
    scale = a.scale if a.scale is not None else 1 / np.sqrt(q.shape[-1])
    s = (q * scale) @ np.swapaxes(k, -1, -2)
    tq, tk = s.shape[-2:]
    if a.causal:
        s = np.where(np.arange(tk)[None, :] <= np.arange(tq)[:, None], s, -1e9)
    if mask:
        s = np.where(mask[0], s, -1e9) if mask[0].dtype == np.bool_ else s + mask[0]
    return np.exp(_log_softmax(s, -1)) @ v


def _load_torch(module: torch.nn.Module, p: dict) -> torch.nn.Module:
    module = module.double()
    with torch.no_grad():
        for name, w in module.named_parameters():
            w.copy_(_t(p[name]))
    return module.eval()


def _torch_mask(tq, tk, causal, mask=None):
    """Our 'True: may attend' mask (and causality) as PyTorch's 'True: masked out'."""
    allow = np.ones((tq, tk), bool)
    if causal:
        allow &= np.arange(tk)[None, :] <= np.arange(tq)[:, None]
    if mask is not None:
        allow = allow & mask
    return None if allow.all() else torch.from_numpy(~allow)


@ref("multi_head_attention")
def _mha(a, xs, c):
    x, *more = xs
    ctx = more[0] if more else x
    mask = more[1] if len(more) > 1 else None
    mod = _load_torch(torch.nn.MultiheadAttention(x.shape[-1], a.heads, bias=a.bias,
                                                  batch_first=True), c.p)
    m = _torch_mask(x.shape[1], ctx.shape[1], a.causal, mask)
    out, _ = mod(_t(x), _t(ctx), _t(ctx), attn_mask=m, need_weights=False)
    return out.detach().numpy()


@ref("positional_encoding")
def _posenc(a, xs, c):
    x = xs[0]
    n, e = x.shape[-2:]
    if a.kind == "learned":
        return x + c.p["weight"][:n]
    t = np.arange(n)[:, None]
    w = 10000.0 ** (-np.arange(0, e, 2) / e)
    pe = np.zeros((n, e))
    pe[:, 0::2], pe[:, 1::2] = np.sin(t * w), np.cos(t * w)
    return x + pe


def _block_act(a):
    return TF.relu if a.activation == "relu" else (lambda t: TF.gelu(t, approximate="tanh"))


@ref("transformer_encoder_block")
def _encoder(a, xs, c):
    x, *mask = xs
    mod = _load_torch(torch.nn.TransformerEncoderLayer(
        x.shape[-1], a.heads, a.ff, dropout=0.0, activation=_block_act(a),
        layer_norm_eps=a.eps, batch_first=True, norm_first=a.norm_first), c.p)
    m = _torch_mask(x.shape[1], x.shape[1], a.causal, mask[0] if mask else None)
    return mod(_t(x), src_mask=m).detach().numpy()


@ref("transformer_decoder_block")
def _decoder(a, xs, c):
    x, memory = xs
    mod = _load_torch(torch.nn.TransformerDecoderLayer(
        x.shape[-1], a.heads, a.ff, dropout=0.0, activation=_block_act(a),
        layer_norm_eps=a.eps, batch_first=True, norm_first=a.norm_first), c.p)
    m = _torch_mask(x.shape[1], x.shape[1], a.causal)
    return mod(_t(x), _t(memory), tgt_mask=m).detach().numpy()


ELMAN = {"modules": {"cell": {
    "inputs": ["x", "h"],
    "nodes": {"xw": {"op": "linear", "in": "x", "out": 3},
              "hw": {"op": "linear", "in": "h", "out": 3, "bias": False},
              "s": {"op": "add", "in": ["xw", "hw"]},
              "hn": {"op": "tanh", "in": "s"}},
    "outputs": ["hn"]}}}
"""A spec module for ``scan`` cases: the Elman cell h' = tanh(W x + b + U h), 3 features."""


@ref("scan")
def _scan(a, xs, c):
    """``scan`` of the :data:`ELMAN` cell (the only body the scan cases use)."""
    x, *init = xs
    w, b, u = c.p["cell.xw.weight"], c.p["cell.xw.bias"], c.p["cell.hw.weight"]
    h = init[0] if init else np.zeros((x.shape[0], u.shape[0]))
    out = []
    for t in range(x.shape[1]):
        h = np.tanh(x[:, t] @ w.T + b + h @ u.T)
        out.append(h)
    return np.stack(out, axis=1)


REF["zeros"] = lambda a, xs, c: np.zeros((xs[0].shape[0], *a.shape))
REF["noise"] = lambda a, xs, c: None          # random: only its shape and dtype are checked

_RNN = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def recurrent_ref(a, xs, p) -> dict[str, np.ndarray]:
    """All outputs (out, h and, for lstm, c) of a recurrent layer, by PyTorch in float64.

    ``p`` holds the layer's weights under PyTorch's names (weight_ih_l0, ...).
    """
    x, init = _t(xs[0]), [_t(s) for s in xs[1:]]
    mod = _RNN[a.op](x.shape[-1], a.hidden, num_layers=a.layers, batch_first=True,
                     bidirectional=a.bidirectional).double()
    with torch.no_grad():
        for name, w in mod.named_parameters():
            w.copy_(_t(p[name]))
    if a.op == "lstm":
        states = (init[0], init[1]) if init else None
        out, (h, c) = mod(x, states)
    else:
        out, h = mod(x, init[0] if init else None)
        c = None
    dirs = 2 if a.bidirectional else 1

    def last(s):  # [layers * dirs, batch, hidden] -> the last layer's [batch, dirs * hidden]
        return s[-dirs:].permute(1, 0, 2).reshape(x.shape[0], -1).detach().numpy()

    res = {"out": out.detach().numpy(), "h": last(h)}
    if c is not None:
        res["c"] = last(c)
    return res


REF["rnn"] = REF["lstm"] = REF["gru"] = lambda a, xs, c: recurrent_ref(a, xs, c.p)["out"]


# -- losses ------------------------------------------------------------------------------
REF["mse"] = lambda a, xs, c: np.mean((xs[0] - xs[1]) ** 2)
REF["l1"] = lambda a, xs, c: np.mean(np.abs(xs[0] - xs[1]))


@ref("huber")
def _huber(a, xs, c):
    d = np.abs(xs[0] - xs[1])
    return np.mean(np.where(d <= a.delta, 0.5 * d * d, a.delta * (d - 0.5 * a.delta)))


def _picked(logp, labels):
    return np.take_along_axis(logp, labels[..., None].astype(np.int64), -1)[..., 0]


@ref("cross_entropy")
def _cross_entropy(a, xs, c):
    logp = _log_softmax(xs[0], -1)
    k = xs[0].shape[-1]
    s = a.label_smoothing
    return -np.mean((1 - s) * _picked(logp, xs[1]) + s / k * logp.sum(-1))


REF["nll"] = lambda a, xs, c: -np.mean(_picked(xs[0], xs[1]))
REF["binary_cross_entropy"] = lambda a, xs, c: np.mean(_softplus(xs[0]) - xs[0] * xs[1])


# ------------------------------------------------------------------------------ running


def random_params(graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 values for every parameter of a graph (variances kept positive)."""
    out = {}
    for name, p in graph.params.items():
        v = rng.uniform(0.5, 2.0, p.shape) if name.endswith("var") \
            else 0.5 * rng.standard_normal(p.shape)
        out[name] = np.asarray(v, np.float32)
    return out


def forward(case: Case, seed: int | None = None):
    """Run one case forward through ``dlgraph.compile`` (eval mode).

    Parameters are re-drawn at random (unless ``case.keep_init``) by replacing the
    tensors in ``m.params``. Returns (graph, model, feeds, xs, output array).
    """
    rng = np.random.default_rng(seed_of(case.id) if seed is None else seed)
    g = dlgraph.load(op_spec(case))
    m = dlgraph.compile(g, seed=0)
    if not case.keep_init:
        m.params.update({k: Tensor(v) for k, v in random_params(g, rng).items()})
    feeds, xs = feed_arrays(case, rng)
    with Context(**FAST):
        return g, m, feeds, xs, m(**feeds)["out"]


def rel_err(got, want) -> float:
    """Max-norm error relative to the reference's scale (1e-6 at least)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-6))


FAST = {"NOOPT": 1, "PARALLEL": 0}
"""tinygrad settings for the tests' hundreds of tiny one-off kernels: no optimiser (upcasts
and unrolls only make their code bigger and slower to generate, never change a value) and
no pool of compile workers (spawned processes that restart every 16 kernels, re-importing
tinygrad). Together they cut the run time of these tests by about half."""


def realize(*tensors: Tensor) -> None:
    """Realise tensors together, under :data:`FAST`."""
    with Context(**FAST):
        Tensor.realize(*tensors)


def evaluate(graph, targets: list[str], feeds: dict[str, np.ndarray],
             params: dict[str, Tensor], *, training: bool = True,
             lazy: bool = False) -> list[Tensor]:
    """Evaluate nodes of a graph on numpy feeds and tinygrad params; realised together.

    ``lazy=True`` leaves them unrealised, e.g. to take tinygrad's ``gradient`` of one first.
    """
    ctx = Ctx(training=training, dims=bind(graph, feeds))
    tfeeds = {k: to_tensor(v, graph.inputs[k].dtype) for k, v in feeds.items()}
    outs = Evaluator(graph, targets)(ctx, tfeeds, params)
    if not lazy:
        realize(*outs)
    return outs


def torch_grads_match(spec: dict, torch_module_builder: Callable, inputs: dict[str, np.ndarray],
                      *, objective: str = "loss", seed: int = 0, rtol: float = 1e-4) -> dict:
    """Check dlgraph's gradient of every trainable parameter against PyTorch's.

    ``torch_module_builder(weights)`` gets the graph's initial weights (numpy float32, by
    dlgraph name, PyTorch layout) and returns ``(loss_fn, grads)``: ``loss_fn(**inputs)``
    computes the same scalar objective in torch from torch tensors (float32; int inputs
    become int64), and ``grads`` maps every trainable dlgraph parameter name to the torch
    leaf tensor playing its role (its ``.grad`` is compared) or to a zero-argument callable
    returning the gradient (for a slice of a fused torch weight, e.g. LSTM gates).

    Asserts the objectives agree and every gradient has a max-norm relative error below
    ``rtol``; returns ``{name: relative error}``.
    """
    g = dlgraph.load(spec)
    m = dlgraph.compile(g, seed=seed)
    weights = {k: v.numpy() for k, v in m.params.items()}
    tg = reverse(g, objective)
    names = list(tg.grads)
    outs = evaluate(tg, [tg.objective] + [tg.grads[n] for n in names], inputs,
                    {k: Tensor(v) for k, v in weights.items()}, training=True)
    ours = {n: o.numpy() for n, o in zip(names, outs[1:], strict=True)}

    loss_fn, theirs = torch_module_builder({k: v.copy() for k, v in weights.items()})
    missing = sorted(set(names) - set(theirs))
    assert not missing, f"the torch builder maps no tensor to {missing}"
    tin = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v)
           for k, v in inputs.items()}
    loss = loss_fn(**tin)
    loss.backward()
    assert rel_err(outs[0].numpy(), loss.detach().numpy()) < rtol, \
        f"objective {outs[0].numpy()} vs torch {loss.item()}"
    errs = {}
    for n in names:
        ref_grad = theirs[n]() if callable(theirs[n]) and not isinstance(theirs[n], torch.Tensor) \
            else theirs[n].grad
        errs[n] = rel_err(ours[n], ref_grad.detach().numpy())
    bad = {n: e for n, e in errs.items() if not e < rtol}
    assert not bad, f"gradients differ from torch (relative error): {bad}"
    return errs
