"""The three implementations of each benchmark workload, behind one small interface.

* ``dlgraph``: the spec, loaded and trained through dlgraph's own API (``PhaseStep``: one
  TinyJit step of forward, reversed-graph backward and optimizer update; inference through
  ``dlgraph.compile``).
* ``tinygrad``: the same network written by hand the way tinygrad's documentation and
  examples (``examples/beautiful_mnist.py``) teach: ``tinygrad.nn`` layers, a ``TinyJit``
  step under ``Context(TRAINING=1)``, ``loss.backward()`` and the ``nn.optim`` optimizer,
  with the loss realised together with the optimizer's update
  (``Tensor.realize(loss, *opt.schedule_step())``, which is ``opt.step()`` plus the loss in
  the same schedule); inference through a ``TinyJit`` forward.
* ``torch``: PyTorch eager on the CPU, ``torch.optim``, inference under ``torch.no_grad()``.

Every peer starts from dlgraph's initial weights (PyTorch names and layouts), so the first
training step must give the same loss in all three. Each ``Peer`` has
``train_step(batch) -> float`` (one optimizer step, returns the loss: ``.item()`` syncs) and
``infer(batch) -> np.ndarray`` (the model output for the batch's inputs).

Framework imports happen inside the builders, so a worker process only loads the
framework it measures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- shared


def _opt_args(opt: dict[str, Any]) -> dict[str, Any]:
    if opt["type"] == "sgd":
        return {"lr": opt["lr"], "momentum": opt.get("momentum", 0.0),
                "nesterov": opt.get("nesterov", False),
                "weight_decay": opt.get("weight_decay", 0.0)}
    if opt["type"] == "adam":
        return {"lr": opt["lr"], "b1": opt.get("b1", 0.9), "b2": opt.get("b2", 0.999),
                "eps": opt.get("eps", 1e-8)}
    raise ValueError(f"the bench peers know sgd and adam, not {opt['type']}")


def assign(dl_weights: dict[str, np.ndarray], peer_shapes: dict[str, tuple[int, ...]],
           rename=None) -> dict[str, np.ndarray]:
    """Map dlgraph's parameters onto a peer's, checking every shape.

    With ``rename`` (dlgraph name -> peer name), by name; without, in declaration order:
    both follow PyTorch's layouts and declare a layer's weight before its bias, so order and
    shape identify each tensor. A mismatch is a bug in the peer and raises.
    """
    dl = list(dl_weights.items())
    if len(dl) != len(peer_shapes):
        raise ValueError(f"dlgraph has {len(dl)} parameters ({', '.join(k for k, _ in dl)}), "
                         f"the peer {len(peer_shapes)} ({', '.join(peer_shapes)})")
    names = [rename(k) for k, _ in dl] if rename else list(peer_shapes)
    out = {}
    for (dk, dv), pk in zip(dl, names, strict=True):
        if pk not in peer_shapes:
            raise ValueError(f"dlgraph's {dk} maps to {pk}, which the peer does not have: "
                             f"{', '.join(peer_shapes)}")
        if tuple(dv.shape) != tuple(peer_shapes[pk]):
            raise ValueError(f"dlgraph's {dk} {tuple(dv.shape)} does not fit the peer's {pk} "
                             f"{tuple(peer_shapes[pk])}")
        out[pk] = dv
    return out


def _rename(family: str):
    """dlgraph name -> peer name, where order alone does not identify the parameters."""
    if family != "transformer":
        return None
    import re

    def rename(k: str) -> str:
        m = re.match(r"blk(\d+)\.(.*)", k)
        if m:
            return f"blocks.{int(m.group(1)) - 1}.{m.group(2)}"
        return k.replace("logits.", "head.", 1)
    return rename


# --------------------------------------------------------------------------- dlgraph


class DlgraphPeer:
    """dlgraph through its public pieces: load, init_params, PhaseStep, compile."""

    def __init__(self, spec, weights: dict[str, np.ndarray], sample: dict[str, np.ndarray]):
        from tinygrad import Tensor

        import dlgraph
        from dlgraph.engine.compile.device import use_device
        from dlgraph.engine.compile.interpret import input_dims, to_tensor
        from dlgraph.engine.compile.model import Model
        from dlgraph.engine.train.step import LocalStep, PhaseStep

        self.to_tensor = to_tensor
        g = dlgraph.load(spec["source"], base=spec.get("base"))
        use_device(None)
        self.graph = g
        # the harness hands every implementation the same initial weights: dlgraph's own
        # init_params(g, seed=0), computed once by the parent and passed as arrays
        self.params = {k: Tensor(np.ascontiguousarray(weights[k])).realize() for k in g.params}
        self.names = list(g.inputs)
        self.dtypes = {k: g.inputs[k].dtype for k in self.names}
        phase = g.spec.train.all_phases()[0]
        self.step = PhaseStep(g, phase, self.params, self.names)
        self.local = LocalStep(cache=False)
        self.step.dims = input_dims(g, sample)
        self.model = Model(g, self.params)
        self.out_name = self.model.outputs[0]
        # the model reads the inputs it needs from those it is given, the label among them
        self.infer_inputs = list(g.inputs)

    def train_step(self, batch: dict[str, np.ndarray]) -> float:
        # as `dlgraph run` takes a step on one device: the batch's arrays go into the
        # program's kept buffers, the loss comes straight from its buffer
        return self.local.take(self.step, self.local.whole(self.graph, self.names, batch), None)

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.model(**{k: batch[k] for k in self.infer_inputs})[self.out_name]


# --------------------------------------------------------------------------- tinygrad


def _tg_models():
    """The hand-written tinygrad networks (defined lazily: tinygrad imported on use)."""
    from tinygrad import Tensor, nn

    class MLP:
        def __init__(self):
            self.fc1, self.fc2, self.fc3 = nn.Linear(784, 256), nn.Linear(256, 256), \
                nn.Linear(256, 10)

        def __call__(self, x):
            x = x.flatten(1)
            return self.fc3(self.fc2(self.fc1(x).relu()).relu())

    class CNN:
        def __init__(self):
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 32, 3), nn.Conv2d(32, 64, 3), \
                nn.Conv2d(64, 64, 3)
            self.fc1, self.fc2 = nn.Linear(1024, 64), nn.Linear(64, 10)

        def __call__(self, x):
            x = self.c1(x).relu().max_pool2d(2)
            x = self.c2(x).relu().max_pool2d(2)
            x = self.c3(x).relu().flatten(1)
            return self.fc2(self.fc1(x).relu())

    class LSTM:
        """nn.LSTMCell (PyTorch gate order i, f, g, o) over time, read-out of the last h.

        The state is made ``.contiguous()`` each step: without it tinygrad fuses every step
        into the kernels of later ones and recomputes the whole recurrence (the plain loop
        did not finish its first step in 400 s here; FACTS.md: 25x slower at 32 steps).
        """

        def __init__(self, hidden=32, inp=1):
            self.cell, self.out = nn.LSTMCell(inp, hidden), nn.Linear(hidden, 1)

        def __call__(self, x):
            hc = None
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], hc)
                hc = (h.contiguous(), c.contiguous())
            return self.out(hc[0])

    class GRUCell:
        """tinygrad has no GRU: the cell written like nn.LSTMCell, PyTorch's equations."""

        def __init__(self, inp, hidden):
            s = 1.0 / math.sqrt(hidden)
            self.weight_ih = Tensor.uniform(hidden * 3, inp, low=-s, high=s)
            self.weight_hh = Tensor.uniform(hidden * 3, hidden, low=-s, high=s)
            self.bias_ih = Tensor.zeros(hidden * 3)
            self.bias_hh = Tensor.zeros(hidden * 3)

        def __call__(self, x, h):
            gi = x.linear(self.weight_ih.T, self.bias_ih)
            gh = h.linear(self.weight_hh.T, self.bias_hh)
            ir, iz, i_n = gi.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = (ir + hr).sigmoid(), (iz + hz).sigmoid()
            n = (i_n + r * hn).tanh()
            return (1 - z) * n + z * h

    class GRU:
        def __init__(self, hidden=32, inp=1):
            self.hidden = hidden
            self.cell, self.out = GRUCell(inp, hidden), nn.Linear(hidden, 1)

        def __call__(self, x):
            h = Tensor.zeros(x.shape[0], self.hidden)
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h).contiguous()   # see LSTM
            return self.out(h)

    return {"mlp": MLP, "cnn": CNN, "lstm": LSTM, "gru": GRU}


def _tg_transformer(cfg):
    from tinygrad import Tensor, nn

    class SelfAttention:
        """PyTorch's nn.MultiheadAttention (packed q, k, v projection), on tinygrad's
        scaled_dot_product_attention."""

        def __init__(self, d, heads):
            self.heads = heads
            self.in_proj_weight = Tensor.glorot_uniform(3 * d, d)
            self.in_proj_bias = Tensor.zeros(3 * d)
            self.out_proj = nn.Linear(d, d)

        def __call__(self, x):
            b, s, d = x.shape
            qkv = x.linear(self.in_proj_weight.T, self.in_proj_bias)
            q, k, v = [t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)
                       for t in qkv.chunk(3, dim=-1)]
            a = q.scaled_dot_product_attention(k, v)
            return self.out_proj(a.transpose(1, 2).reshape(b, s, d))

    class Block:
        """Pre-norm encoder block (PyTorch's TransformerEncoderLayer, norm_first=True)."""

        def __init__(self, d, heads, ff):
            self.self_attn = SelfAttention(d, heads)
            self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

        def __call__(self, x):
            x = x + self.self_attn(self.norm1(x))
            return x + self.linear2(self.linear1(self.norm2(x)).relu())

    class Transformer:
        def __init__(self):
            d = cfg["dim"]
            self.embed = nn.Embedding(cfg["vocab"], d)
            self.pe = Tensor(positional_encoding(cfg["seq"], d)).is_param_(False)  # a buffer
            self.blocks = [Block(d, cfg["heads"], cfg["ff"]) for _ in range(cfg["blocks"])]
            self.head = nn.Linear(d, cfg["vocab"])

        def __call__(self, ids):
            x = self.embed(ids) + self.pe
            for blk in self.blocks:
                x = blk(x)
            return self.head(x)

    return Transformer


def positional_encoding(seq: int, dim: int) -> np.ndarray:
    """The sinusoidal table of "Attention is all you need" ([seq, dim]; sin even, cos odd)."""
    pos = np.arange(seq)[:, None]
    div = np.exp(np.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = np.zeros((seq, dim))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return pe.astype(np.float32)


class TinygradPeer:
    def __init__(self, wl, weights: dict[str, np.ndarray]):
        from tinygrad import Context, Tensor, TinyJit, nn
        from tinygrad.nn.state import get_state_dict, load_state_dict

        self.Tensor = Tensor
        model = _tg_transformer(wl.arch)() if wl.family == "transformer" \
            else _tg_models()[wl.family]()
        sd = {k: v for k, v in get_state_dict(model).items() if k != "pe"}
        mapped = assign(weights, {k: tuple(v.shape) for k, v in sd.items()},
                        _rename(wl.family))
        load_state_dict(model, {k: Tensor(np.ascontiguousarray(v)) for k, v in mapped.items()},
                        strict=False, verbose=False)             # strict=False: keeps pe
        params = nn.state.get_parameters(model)
        o = wl.optimizer
        a = _opt_args(o)
        opt = nn.optim.SGD(params, **a) if o["type"] == "sgd" else nn.optim.Adam(params, **a)
        loss_of = _tg_loss(wl.loss)
        self.x, self.y = wl.x_name, wl.y_name
        self.x_dtype = wl.inputs[wl.x_name][1]

        @TinyJit
        def train_step(x: Tensor, y: Tensor) -> Tensor:
            with Context(TRAINING=1):
                opt.zero_grad()
                loss = loss_of(model(x), y)
                loss.backward()
                Tensor.realize(loss, *opt.schedule_step())
            return loss

        @TinyJit
        def forward(x: Tensor) -> Tensor:
            return model(x).realize()

        self._train, self._forward = train_step, forward

    def _t(self, a: np.ndarray):
        return self.Tensor(np.ascontiguousarray(a)).realize()

    def train_step(self, batch: dict[str, np.ndarray]) -> float:
        return self._train(self._t(batch[self.x]), self._t(batch[self.y])).item()

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self._forward(self._t(batch[self.x])).numpy()


def _tg_loss(kind: str):
    if kind == "mse":
        return lambda p, y: ((p - y) ** 2).mean()
    # cross-entropy over the last axis; labels hold the leading axes
    return lambda logits, y: logits.reshape(-1, logits.shape[-1]).sparse_categorical_crossentropy(
        y.reshape(-1))


# --------------------------------------------------------------------------- torch


def _torch_model(wl):
    import torch
    from torch import nn

    fam = wl.family
    if fam == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                             nn.ReLU(), nn.Linear(256, 10))
    if fam == "cnn":
        return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))
    if fam in ("lstm", "gru"):
        rnn_cls = nn.LSTM if fam == "lstm" else nn.GRU

        class Seq(nn.Module):
            def __init__(self):
                super().__init__()
                self.enc = rnn_cls(1, 32, batch_first=True)
                self.out = nn.Linear(32, 1)

            def forward(self, x):
                _, h = self.enc(x)
                h = h[0] if fam == "lstm" else h
                return self.out(h[-1])
        return Seq()
    if fam == "transformer":
        cfg = wl.arch

        class Transformer(nn.Module):
            def __init__(self):
                super().__init__()
                d = cfg["dim"]
                self.embed = nn.Embedding(cfg["vocab"], d)
                self.register_buffer("pe", torch.from_numpy(positional_encoding(cfg["seq"], d)))
                self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(
                    d, cfg["heads"], cfg["ff"], dropout=0.0, activation="relu", batch_first=True,
                    norm_first=True) for _ in range(cfg["blocks"])])
                self.head = nn.Linear(d, cfg["vocab"])

            def forward(self, ids):
                x = self.embed(ids) + self.pe
                for blk in self.blocks:
                    x = blk(x)
                return self.head(x)
        return Transformer()
    raise ValueError(fam)


class TorchPeer:
    def __init__(self, wl, weights: dict[str, np.ndarray]):
        import torch

        self.torch = torch
        model = _torch_model(wl)
        sd = {k: v for k, v in model.state_dict().items() if k != "pe"}
        names = [k for k, _ in model.named_parameters()]
        assert set(names) == set(sd), "the torch peer has buffers besides pe"
        mapped = assign(weights, {k: tuple(sd[k].shape) for k in names}, _rename(wl.family))
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in mapped.items()},
                              strict=False)
        o = wl.optimizer
        if o["type"] == "sgd":
            self.opt = torch.optim.SGD(model.parameters(), lr=o["lr"],
                                       momentum=o.get("momentum", 0.0),
                                       nesterov=o.get("nesterov", False),
                                       weight_decay=o.get("weight_decay", 0.0))
        else:
            self.opt = torch.optim.Adam(model.parameters(), lr=o["lr"],
                                        betas=(o.get("b1", 0.9), o.get("b2", 0.999)),
                                        eps=o.get("eps", 1e-8))
        F = torch.nn.functional
        self.loss_of = (lambda p, y: F.mse_loss(p, y)) if wl.loss == "mse" else \
            (lambda lg, y: F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1).long()))
        self.model = model
        self.x, self.y = wl.x_name, wl.y_name

    def train_step(self, batch: dict[str, np.ndarray]) -> float:
        t = self.torch
        x, y = t.from_numpy(batch[self.x]), t.from_numpy(batch[self.y])
        self.model.train()
        self.opt.zero_grad()
        loss = self.loss_of(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        t = self.torch
        self.model.eval()
        with t.no_grad():
            return self.model(t.from_numpy(batch[self.x])).numpy()


def build(impl: str, wl, weights: dict[str, np.ndarray], sample: dict[str, np.ndarray]):
    if impl == "dlgraph":
        return DlgraphPeer(wl.spec_source(), weights, sample)
    if impl == "tinygrad":
        return TinygradPeer(wl, weights)
    if impl == "torch":
        return TorchPeer(wl, weights)
    raise ValueError(impl)
