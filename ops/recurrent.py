"""Recurrent layers: rnn, lstm, gru — a scan over time of a cell written in primitives.

Each cell is a few lines of textbook equations below; copy one to make your own. The scan
hoists the input projection out of the loop (one matmul over all time steps) and puts the
cell into the body of one ``loop`` node (ops/control.py), which the lowering runs step by
step: the graph holds one copy of the cell whatever the sequence length. Weights use
PyTorch's names and layouts (``weight_ih_l0`` [gates*hidden, input], ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse`` for the backward direction), so PyTorch
weights load as they are.

Inputs: ``x`` [batch, time, features]; optional ``h0`` (and ``c0`` for lstm) of shape
[layers * directions, batch, hidden]. Outputs: ``out`` [batch, time, directions * hidden]
(every step of the last layer), ``h`` [batch, directions * hidden] (last state of the last
layer) and, for lstm, ``c``. The number of steps may be a named dim (``[batch, time,
features]``: one compiled program for every length); ``mask:`` names a [batch, time] value
of 1s for real steps and 0s for padding, over which the state is kept as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from dlgraph.engine.errors import ShapeError, suggest
from dlgraph.engine.spec.base import ParamLayer
from dlgraph.engine.types import fmt
from dlgraph.ops import reference as R
from dlgraph.ops.control import step_type
from dlgraph.ops.examples import E, F
from dlgraph.ops.linalg import swap_last
from dlgraph.ops.registry import attrs, register


def _gate(b, v, k, hidden):
    """The k-th block of `hidden` features of a stacked gate vector."""
    return b.emit("slice", v, axis=-1, start=k * hidden, stop=(k + 1) * hidden)


def rnn_cell(b, xw, hw, h, c, hidden):
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh)."""
    return b.emit("tanh", b.emit("add", xw, hw), as_="h"), None


def lstm_cell(b, xw, hw, h, c, hidden):
    """Gates in PyTorch's order: input i, forget f, candidate g, output o.

    i = σ(.), f = σ(.), g = tanh(.), o = σ(.);  c' = f * c + i * g;  h' = o * tanh(c')
    """
    z = b.emit("add", xw, hw, as_="gates")
    i = b.emit("sigmoid", _gate(b, z, 0, hidden), as_="input_gate")
    f = b.emit("sigmoid", _gate(b, z, 1, hidden), as_="forget_gate")
    g = b.emit("tanh", _gate(b, z, 2, hidden), as_="candidate")
    o = b.emit("sigmoid", _gate(b, z, 3, hidden), as_="output_gate")
    c = b.emit("add", b.emit("mul", f, c), b.emit("mul", i, g), as_="c")
    return b.emit("mul", o, b.emit("tanh", c), as_="h"), c


def gru_cell(b, xw, hw, h, c, hidden):
    """Gates in PyTorch's order: reset r, update z, candidate n.

    r = σ(W_ir x + W_hr h), z = σ(W_iz x + W_hz h), n = tanh(W_in x + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h
    """
    r = b.emit("sigmoid", b.emit("add", _gate(b, xw, 0, hidden), _gate(b, hw, 0, hidden)),
               as_="reset_gate")
    z = b.emit("sigmoid", b.emit("add", _gate(b, xw, 1, hidden), _gate(b, hw, 1, hidden)),
               as_="update_gate")
    n = b.emit("tanh", b.emit("add", _gate(b, xw, 2, hidden),
                              b.emit("mul", r, _gate(b, hw, 2, hidden))), as_="candidate")
    keep_old = b.emit("sub", b.const(1.0), z)
    return b.emit("add", b.emit("mul", keep_old, n), b.emit("mul", z, h), as_="h"), None


CELLS = {"rnn": (rnn_cell, 1), "lstm": (lstm_cell, 4), "gru": (gru_cell, 3)}


def _keep(b, m, new, old):
    """``new`` where the step is real (m = 1), ``old`` where it is padding (m = 0)."""
    return b.emit("add", old, b.emit("mul", m, b.emit("sub", new, old)))


def _direction(b, kind, a, seq, init, k, sfx, reverse, mask=None):
    """One direction of one layer: the input projection over all steps, then a loop."""
    cell, gates = CELLS[kind]
    hidden, steps = a.hidden, b.shape(seq)[1]
    fin = b.shape(seq)[-1]
    fan = (hidden, hidden)
    w_ih = b.param(f"weight_ih{sfx}", (gates * hidden, fin), "uniform", fan=fan)
    w_hh = b.param(f"weight_hh{sfx}", (gates * hidden, hidden), "uniform", fan=fan)
    b_ih = b.param(f"bias_ih{sfx}", (gates * hidden,), "uniform", fan=fan)
    b_hh = b.param(f"bias_hh{sfx}", (gates * hidden,), "uniform", fan=fan)
    xw = b.emit("add", b.emit("matmul", seq, swap_last(b, w_ih)), b_ih, as_=f"input_proj{sfx}")
    w_hh_t = swap_last(b, w_hh)
    names = ("h", "c") if kind == "lstm" else ("h",)
    starts = [b.emit("take", init[j], axis=0, index=k) if len(init) > j
              else b.emit("zeros", seq, shape=[hidden], as_=f"{n}0{sfx}")
              for j, n in enumerate(names)]
    body = b.body()
    with body.within(f"step{sfx}"):
        xt = body.input("/".join(body.scope + ("x",)), step_type(b.type(xw)))
        mt = body.input("/".join(body.scope + ("mask",)), step_type(b.type(mask))) \
            if mask else None     # seq inputs first, then states
        h = body.input("/".join(body.scope + ("h",)), b.type(starts[0]))
        c = body.input("/".join(body.scope + ("c",)), b.type(starts[1])) \
            if kind == "lstm" else None
        hw = body.emit("add", body.emit("matmul", h, body.const_input(w_hh_t)),
                       body.const_input(b_hh), cut=True)
        h_new, c_new = cell(body, xt, hw, h, c, hidden)
        if mt:                  # past a sequence's end its state stays as it was
            h_new = _keep(body, mt, h_new, h)
            c_new = _keep(body, mt, c_new, c) if c is not None else None
        h, c = h_new, c_new
        body.cut(h, c)
    body.graph.outputs = {"h": h, **({"c": c} if c is not None else {})}
    stacks = b.loop(body, [xw] + ([mask] if mask else []), starts, steps=steps,
                    reverse=reverse, as_=f"loop{sfx}")
    # states are stacked [batch, time + 1, hidden]; the initial one first (or last)
    lo, hi = (0, -1) if reverse else (1, None)
    out = b.emit("slice", stacks[0], axis=1, start=lo, stop=hi)
    if mask:                    # zeros past each sequence's end, as PyTorch's packed outputs
        out = b.emit("mul", out, mask, as_=f"masked{sfx}")
    last = [b.emit("take", s, axis=1, index=0 if reverse else -1) for s in stacks]
    return out, last


def _mask(b, kind, a, x):
    """The `mask:` [batch, time] as [batch, time, 1], checked against the sequence."""
    if a.mask is None:
        return None
    t, m = b.type(x), b.type(a.mask)
    if m.dtype != "float32" or m.shape != t.shape[:2]:
        raise ShapeError(f"{kind} mask has type {m}, expected {fmt(t.shape[:2])} float32: "
                         f"1 for each real step, 0 for padding",
                         help="give one float per sequence step, e.g. an input "
                              f"{{shape: {fmt(t.shape[:2])}}}")
    return b.emit("unsqueeze", a.mask, axis=-1, as_="mask")


def scan(kind):
    def expand(b, a, x, *init):
        t = b.type(x)
        if t.rank != 3 or isinstance(t.shape[2], str):
            raise ShapeError(f"{kind} needs [batch, time, features] with a fixed number of "
                             f"features, got {fmt(t.shape)}",
                             help="declare the input like {shape: [batch, time, 1]}")
        dirs = 2 if a.bidirectional else 1
        seq, last_h, last_c = x, [], []
        mask = _mask(b, kind, a, x)
        for layer in range(a.layers):
            outs_dir = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                out, last = _direction(b, kind, a, seq, init, layer * dirs + d, sfx, bool(d),
                                       mask)
                outs_dir.append(out)
                last_h.append(last[0])
                last_c.append(last[-1])
            seq = outs_dir[0] if dirs == 1 else b.emit("concat", *outs_dir, axis=-1)
        res = {"out": seq,
               "h": last_h[-1] if dirs == 1 else b.emit("concat", *last_h[-dirs:], axis=-1)}
        if kind == "lstm":
            res["c"] = last_c[-1] if dirs == 1 else b.emit("concat", *last_c[-dirs:], axis=-1)
        return res
    return expand


class Recurrent(ParamLayer):
    """rnn, lstm and gru: a layer with parameters whose `mask:` names a value."""

    ref_fields: ClassVar[tuple[str, ...]] = ("mask",)


_fields = dict(
    hidden=(int, Field(gt=0, description="state size")),
    layers=(int, Field(1, ge=1, description="stacked layers")),
    bidirectional=(bool, Field(False, description="also run backwards in time and "
                                                  "concatenate the features")),
    mask=(str | None, Field(None, description="an input or node [batch, time] of 1 for each "
                            "real step and 0 for padding: padded steps leave the state as it "
                            "is (so `h` is each sequence's last real state, and the backward "
                            "direction starts at each one's end) and give zero outputs")))


def _recurrent_ref(kind):
    """PyTorch's RNN / LSTM / GRU in numpy float64 (:func:`.reference.recurrent`)."""
    return lambda a, xs, c: R.recurrent(kind, xs[0], xs[1:], c.p, a.hidden, a.layers,
                                        a.bidirectional)["out"]


SEQ = F((2, 3, 2))
register("rnn", doc="Elman RNN with tanh over [batch, time, features]", family="recurrent",
         inputs="x, h0*", attrs_model=attrs("rnn", base=Recurrent, **_fields),
         expand=scan("rnn"), outputs=("out", "h"), reference=_recurrent_ref("rnn"),
         examples=[E([SEQ], {"hidden": 3})], grad_examples=[E([F((2, 2, 2))], {"hidden": 3})])
register("lstm", doc="LSTM (input, forget, output gates; cell state) over [batch, time, "
         "features]", family="recurrent", inputs="x, states*",
         attrs_model=attrs("lstm", base=Recurrent, **_fields), expand=scan("lstm"),
         outputs=("out", "h", "c"), reference=_recurrent_ref("lstm"),
         examples=[E([SEQ], {"hidden": 3}),
                   E([SEQ, F((4, 2, 3)), F((4, 2, 3))],
                     {"hidden": 3, "layers": 2, "bidirectional": True},
                     id="lstm_stacked_bidir_states")],
         grad_examples=[E([F((2, 2, 2))], {"hidden": 3})])
register("gru", doc="GRU (reset and update gates) over [batch, time, features]",
         family="recurrent", inputs="x, h0*", attrs_model=attrs("gru", base=Recurrent,
                                                                **_fields),
         expand=scan("gru"), outputs=("out", "h"), reference=_recurrent_ref("gru"),
         examples=[E([SEQ], {"hidden": 3}), E([SEQ, F((1, 2, 3))], {"hidden": 3}, id="gru_h0")],
         grad_examples=[E([F((2, 2, 2)), F((1, 2, 3))], {"hidden": 3})])


def _scan_module(b, a, x, *init):
    """A scan whose cell is a module of the spec: inputs [x_t, *states], outputs the new
    states in the same order. Its parameters are shared by every step."""
    t = b.type(x)
    if t.rank < 2:
        raise ShapeError(f"scan needs [batch, time, ...], got {fmt(t.shape)}")
    if a.body not in b.modules:
        raise ShapeError(f"no module '{a.body}' to scan",
                         help=suggest(a.body, b.modules) or "define it under `modules:`")
    names = list(a.state)
    if len(init) not in (0, len(names)):
        raise ShapeError(f"scan takes x and either no initial states or all {len(names)} "
                         f"({', '.join(names)}), got {len(init)}")
    states = list(init) or [b.emit("zeros", x, shape=[a.state[n]], as_=f"{n}0")
                            for n in names]
    body = b.body()
    xt = body.input("/".join(b.scope + ("x",)), step_type(t))
    ins = [body.input("/".join(b.scope + (n,)), b.type(s)) for n, s in zip(names, states,
                                                                             strict=True)]
    outs = body.call_module(a.body, [xt, *ins], "cell", args=a.args)
    if len(outs) < len(names):
        raise ShapeError(f"module '{a.body}' returns {len(outs)} values for "
                         f"{len(names)} states ({', '.join(names)})")
    new = list(outs.values())[:len(names)]
    for n, old, v in zip(names, ins, new, strict=True):
        if body.graph[v].type.shape != body.graph[old].type.shape:
            raise ShapeError(f"module '{a.body}' returns state '{n}' of shape "
                             f"{fmt(body.graph[v].type.shape)}, expected "
                             f"{fmt(body.graph[old].type.shape)}")
    body.cut(*new)
    body.graph.outputs = dict(zip(names, new, strict=True))
    stacks = b.loop(body, [x], states, steps=t.shape[1])
    out = b.emit("slice", stacks[0], axis=1, start=1, stop=None)
    last = [b.emit("take", s, axis=1, index=-1) for s in stacks]
    return {"out": out, **dict(zip(names, last, strict=True))}


ELMAN = {"modules": {"cell": {
    "inputs": ["x", "h"],
    "nodes": {"xw": {"op": "linear", "in": "x", "out": 3},
              "hw": {"op": "linear", "in": "h", "out": 3, "bias": False},
              "s": {"op": "add", "in": ["xw", "hw"]},
              "hn": {"op": "tanh", "in": "s"}},
    "outputs": ["hn"]}}}
"""The spec module of the ``scan`` examples: the Elman cell h' = tanh(W x + b + U h), 3
features."""


def _scan_ref(a, xs, c):
    """``scan`` of the :data:`ELMAN` cell (the only body the examples use)."""
    x, *init = xs
    w, b, u = c.p["cell.xw.weight"], c.p["cell.xw.bias"], c.p["cell.hw.weight"]
    h = init[0] if init else np.zeros((x.shape[0], u.shape[0]))
    out = []
    for t in range(x.shape[1]):
        h = np.tanh(x[:, t] @ w.T + b + h @ u.T)
        out.append(h)
    return np.stack(out, axis=1)


_ELMAN_STATE = {"body": "cell", "state": {"h": 3}}
register("scan", doc="run a module of the spec over time: its inputs are [x_t, *states], its "
         "outputs the new states; outputs `out` (the first state at every step) and each "
         "final state by name", family="recurrent", inputs="x, states*",
         attrs_model=attrs("scan", body=(str, Field(description="the module to run each step")),
                           state=(dict[str, int], Field(description="state name -> size, in "
                                                        "the module's input order")),
                           args=(dict[str, Any], Field(default_factory=dict,
                                                       description="args for the module"))),
         expand=_scan_module, outputs=("out",), reference=_scan_ref,
         examples=[E([SEQ], _ELMAN_STATE, extra=ELMAN),
                   E([SEQ, F((2, 3))], _ELMAN_STATE, extra=ELMAN, id="scan_initial_state")],
         grad_examples=[E([F((2, 2, 2)), F((2, 3))], _ELMAN_STATE, extra=ELMAN)])
