"""Shared test machinery: one-op specs from the ops' records, their references, and oracles.

Every op's record (``dlgraph.ops.register``) carries its numpy float64 ``reference``, written
from the op's documented meaning without tinygrad, and its ``examples`` (forward) and
``grad_examples``; :func:`cases` turns them into :class:`Case` rows. ``tests/test_ops.py``
holds the forward pass against the references and ``tests/test_gradients.py``
differentiates them by finite differences. Where dlgraph promises PyTorch's behaviour
(convolutions, pooling, recurrent layers, multi-head attention, transformer blocks)
:data:`TORCH_REF` computes the same in PyTorch float64, and the forward tests hold the op
(and so its numpy reference) against that too.

A test case names an op, its inputs (:class:`F` float, :class:`Int` int ids, :class:`B` bool,
from ``dlgraph.ops.examples``) and its attributes; :func:`op_spec` turns it into a spec whose
node ``out`` is the op.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as TF
from tinygrad import Context, Tensor

import dlgraph
from dlgraph.engine.compile.interpret import Ctx, Interpreter, input_dims, to_tensor
from dlgraph.engine.graph.autodiff import reverse
from dlgraph.ops import REGISTRY
from dlgraph.ops.common import pads4
from dlgraph.ops.conv import pads1
from dlgraph.ops.examples import Bool as B
from dlgraph.ops.examples import Example, Int
from dlgraph.ops.examples import Float as F

torch.set_num_threads(1)   # the references are tiny: threads only cost time

# ------------------------------------------------------------------------------ inputs


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
    float64: bool = False                      # gradient: also run in float64
    fd_training: bool = True                   # gradient: finite differences in training

    def __post_init__(self):
        self.id = self.id or self.op

    @classmethod
    def of(cls, op: str, ex: Example) -> Case:
        """The case of one example of an op's record."""
        return cls(op, list(ex.ins), dict(ex.attrs), id=ex.id, rtol=ex.rtol, atol=ex.atol,
                   dims=dict(ex.dims), keep_init=ex.keep_init, extra=dict(ex.extra),
                   float64=ex.float64, fd_training=ex.fd_training)


def cases(kind: str = "examples") -> list[Case]:
    """Every registered op's ``examples`` (forward) or ``grad_examples``, as cases."""
    return [Case.of(name, ex) for name, d in REGISTRY.items() for ex in getattr(d, kind)]


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


def _f64(x):
    return np.asarray(x, np.float64) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


def run_ref(case_or_op, a, xs, ctx) -> np.ndarray:
    """The op's numpy reference (its record's ``reference``) on float64 inputs."""
    op = case_or_op.op if isinstance(case_or_op, Case) else case_or_op
    return np.asarray(REGISTRY[op].reference(a, [_f64(x) for x in xs], ctx))


def make_ctx(params=None, node="out", training=False, dims=None) -> SimpleNamespace:
    params = {k: _f64(v) for k, v in (params or {}).items()}
    return SimpleNamespace(params=params, p=local_params(params, node), training=training,
                           dims=dims or {})


TORCH_REF: dict[str, Callable] = {}
"""op name -> ``ref(a, xs, ctx)`` in PyTorch float64, for the ops that promise PyTorch's
behaviour (the signature of a record's ``reference``)."""


def torch_ref(*names):
    def deco(fn):
        for n in names:
            TORCH_REF[n] = fn
        return fn
    return deco


def run_torch_ref(case: Case, a, xs, ctx) -> np.ndarray | None:
    """PyTorch's output for the case (float64), or None where the op has no counterpart."""
    fn = TORCH_REF.get(case.op)
    y = None if fn is None else fn(a, [_f64(x) for x in xs], ctx)
    return None if y is None else np.asarray(y)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _activate(a, y):
    act = getattr(a, "activation", None)
    return REGISTRY[act].reference(None, [y], None) if act else y


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x, np.float64))


@torch_ref("conv2d")
def _conv2d(a, xs, c):
    top, bottom, left, right = pads4(a.padding, xs[0].shape[2:], a.kernel, a.stride, a.dilation)
    x = TF.pad(_t(xs[0]), (left, right, top, bottom))
    y = TF.conv2d(x, _t(c.p["weight"]), _t(c.p["bias"]) if a.bias else None,
                  stride=_pair(a.stride), dilation=_pair(a.dilation), groups=a.groups).numpy()
    return _activate(a, y)


def _pool_args(a, x):
    """PyTorch's pooling arguments; None where it has no counterpart (uneven padding)."""
    stride = a.stride if a.stride is not None else a.kernel
    top, bottom, left, right = pads4(a.padding, x.shape[2:], a.kernel, stride,
                                     getattr(a, "dilation", 1))
    if (top, left) != (bottom, right):
        return None
    return dict(kernel_size=_pair(a.kernel), stride=_pair(stride), padding=(top, left),
                ceil_mode=a.ceil_mode)


@torch_ref("max_pool2d", "avg_pool2d")
def _pool(a, xs, c):
    kw = _pool_args(a, xs[0])
    if kw is None:
        return None
    if a.op == "max_pool2d":
        return TF.max_pool2d(_t(xs[0]), dilation=_pair(a.dilation), **kw).numpy()
    return TF.avg_pool2d(_t(xs[0]), count_include_pad=a.count_include_pad, **kw).numpy()


TORCH_REF["erf"] = lambda a, xs, c: torch.erf(_t(xs[0])).numpy()
TORCH_REF["gelu"] = lambda a, xs, c: TF.gelu(_t(xs[0]), approximate=a.approximate).numpy()
TORCH_REF["hard_swish"] = lambda a, xs, c: TF.hardswish(_t(xs[0])).numpy()
TORCH_REF["selu"] = lambda a, xs, c: TF.selu(_t(xs[0])).numpy()
TORCH_REF["hard_sigmoid"] = lambda a, xs, c: TF.hardsigmoid(_t(xs[0])).numpy() \
    if (a.alpha, a.beta) == (1 / 6, 0.5) else None


@torch_ref("conv1d")
def _conv1d(a, xs, c):
    left, right = pads1(a, xs[0].shape[2])
    y = TF.conv1d(TF.pad(_t(xs[0]), (left, right)), _t(c.p["weight"]),
                  _t(c.p["bias"]) if a.bias else None, stride=a.stride, dilation=a.dilation,
                  groups=a.groups).numpy()
    return _activate(a, y)


@torch_ref("conv_transpose2d")
def _conv_transpose2d(a, xs, c):
    y = TF.conv_transpose2d(_t(xs[0]), _t(c.p["weight"]), _t(c.p["bias"]) if a.bias else None,
                            stride=_pair(a.stride), padding=_pair(a.padding),
                            output_padding=_pair(a.output_padding), groups=a.groups,
                            dilation=_pair(a.dilation)).numpy()
    return _activate(a, y)


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


@torch_ref("multi_head_attention")
def _mha(a, xs, c):
    x, *more = xs
    ctx = more[0] if more else x
    mask = more[1] if len(more) > 1 else None
    mod = _load_torch(torch.nn.MultiheadAttention(x.shape[-1], a.heads, bias=a.bias,
                                                  batch_first=True), c.p)
    m = _torch_mask(x.shape[1], ctx.shape[1], a.causal, mask)
    out, _ = mod(_t(x), _t(ctx), _t(ctx), attn_mask=m, need_weights=False)
    return out.detach().numpy()


def _block_act(a):
    return TF.relu if a.activation == "relu" else (lambda t: TF.gelu(t, approximate="tanh"))


@torch_ref("transformer_encoder_block")
def _encoder(a, xs, c):
    x, *mask = xs
    mod = _load_torch(torch.nn.TransformerEncoderLayer(
        x.shape[-1], a.heads, a.ff, dropout=0.0, activation=_block_act(a),
        layer_norm_eps=a.eps, batch_first=True, norm_first=a.norm_first), c.p)
    m = _torch_mask(x.shape[1], x.shape[1], a.causal, mask[0] if mask else None)
    return mod(_t(x), src_mask=m).detach().numpy()


@torch_ref("transformer_decoder_block")
def _decoder(a, xs, c):
    x, memory = xs
    mod = _load_torch(torch.nn.TransformerDecoderLayer(
        x.shape[-1], a.heads, a.ff, dropout=0.0, activation=_block_act(a),
        layer_norm_eps=a.eps, batch_first=True, norm_first=a.norm_first), c.p)
    m = _torch_mask(x.shape[1], x.shape[1], a.causal)
    return mod(_t(x), _t(memory), tgt_mask=m).detach().numpy()


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


for _kind in _RNN:
    TORCH_REF[_kind] = lambda a, xs, c: recurrent_ref(a, xs, c.p)["out"]


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
    ctx = Ctx(training=training, dims=input_dims(graph, feeds))
    tfeeds = {k: to_tensor(v, graph.inputs[k].dtype) for k, v in feeds.items()}
    outs = Interpreter(graph, targets)(ctx, tfeeds, params)
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


# ---------------------------------------------------------------------------- processes


def run_in_new_process(spec, out, cache_dir, *flags, env=None) -> str:
    """``dlgraph run SPEC --out OUT FLAGS`` in a fresh process (nothing of tinygrad's memory
    shared) with dlgraph's caches in ``cache_dir`` and ``env`` over the environment; its
    output. Fails the test where the run fails."""
    r = subprocess.run([sys.executable, "-m", "dlgraph.cli.main", "run", str(spec), "--out",
                        str(out), *flags], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DLGRAPH_CACHE_DIR": str(cache_dir), **(env or {})})
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr
