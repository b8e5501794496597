"""Control flow: ``loop`` runs a body subgraph over time; ``pick`` takes one of its outputs.

A loop is one node of the IR whatever the number of steps (JAX's ``lax.scan``, ONNX's
``Scan``): its ``body`` is an ordinary graph whose inputs are, in order,

- ``seq`` inputs: one time step ``x[:, t]`` of a ``[batch, time, ...]`` value,
- ``state`` inputs: the carried state before step t,
- ``const`` inputs: values every step reads (weights, biases),

and whose outputs are the new states, then per-step outputs, then accumulators (summed over
the steps). The loop node yields, in that order, each state stacked over time
``[batch, time + 1, ...]`` (the initial state at index 0, or at index ``time`` when the loop
runs backwards in time), each per-step output stacked ``[batch, time, ...]`` and each sum.

Its VJP (an ordinary rule of this record) is another loop running the other way, whose
body is the reversal of this body (reading the step values the forward loop saved for it,
then the ordinary VJP rules), so the backward pass never unrolls. The lowering decides how
the steps run: one compiled step program called once for each time step, or inline
(unrolled) where a single program is needed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from pydantic import ConfigDict, Field
from tinygrad import Tensor

from dlgraph.engine.errors import GradientError, ShapeError
from dlgraph.engine.spec.base import NodeSpec
from dlgraph.engine.types import TType, dim_add, dim_value, fmt
from dlgraph.ops.registry import PICK, attrs, register

FAMILY = "control"


class LoopBase(NodeSpec):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


def step_type(t: TType) -> TType:
    """The type of one step of a ``[batch, time, ...]`` value."""
    return TType((t.shape[0],) + t.shape[2:], t.dtype)


def stacked(t: TType, steps) -> TType:
    return TType((t.shape[0], steps) + t.shape[1:], t.dtype)


def loop_types(a) -> list[TType]:
    """The types of a loop's outputs, in pick order."""
    outs = [a.body[o].type for o in a.body.outputs.values()]
    st, per, acc = outs[:a.n_state], outs[a.n_state:a.n_state + a.n_out], \
        outs[a.n_state + a.n_out:]
    return [stacked(t, dim_add(a.steps, 1)) for t in st] + [stacked(t, a.steps) for t in per] + acc


def _loop_infer(a, *ts: TType) -> TType:
    want = list(a.body.inputs.values())
    if len(ts) != len(want):
        raise ShapeError(f"loop takes {len(want)} inputs, got {len(ts)} (a bug in dlgraph)")
    for k, (t, w) in enumerate(zip(ts, want, strict=True)):
        got = step_type(t) if k < a.n_seq else t
        if k < a.n_seq and (t.rank < 2 or t.shape[1] != a.steps):
            raise ShapeError(f"loop input {k} has shape {fmt(t.shape)}, expected "
                             f"[batch, {a.steps}, ...]")
        if got.shape != w.shape and not (got.rank == w.rank and k >= a.n_seq):
            raise ShapeError(f"loop input {k} has type {got}, its body expects {w} "
                             f"(a bug in dlgraph)")
    return loop_types(a)[0]


def _loop_vjp(b, n, cts: list) -> list:
    """The VJP of a loop: a loop running the other way over the reversed body.

    Its body reads the saved state before the step and the step values it needs, saved by
    the forward loop (:func:`_save_residuals`), then runs the ordinary VJP rules: the
    carried state is the cotangent of the state, the per-step outputs are the cotangents
    of the sequence inputs, and the cotangents of the consts (weights) are summed over the
    steps (a product's, after the loop: :func:`_sums_as_products`). Nothing is unrolled.
    ``b`` is the backward pass's builder (engine/graph/autodiff.py's GradBuilder): besides
    emitting it says which inputs need a cotangent, gives the loop's pick nodes and
    differentiates the body.
    """
    a, fwd = n.attrs, not n.attrs.reverse
    ns, nst = a.n_seq, a.n_state
    if len(a.body.outputs) > nst + a.n_out:
        raise GradientError("second derivatives through a loop are not supported",
                            node=n.user_id, op=n.op)
    ct_st, ct_per = cts[:nst], cts[nst:nst + a.n_out]
    bb, wanted = _backward_body(b, n, ct_st, ct_per)
    # the outer graph: saved states before each step, cotangents after it, zero carries
    before, after = ((0, -1), (1, None)) if fwd else ((1, None), (0, -1))
    picks = b.outputs_of(n.id)
    seqs = list(n.inputs[:ns])
    seqs += [b.emit("slice", picks[j], axis=1, start=before[0], stop=before[1])
             for j in range(nst)]
    seqs += [b.emit("slice", c, axis=1, start=after[0], stop=after[1])
             for c in ct_st if c is not None]
    seqs += [c for c in ct_per if c is not None]
    seqs += _save_residuals(b, n, bb, len(seqs))
    extra, moved = _sums_as_products(bb, seqs, wanted, list(a.body.inputs), nst)
    inits = n.inputs[ns:ns + nst]
    zeros = [b.emit("zeros", i, shape=list(b.shape(i)[1:]), as_="carry0") for i in inits]
    n_per = len(wanted["seq"])
    got = b.loop(bb, seqs, zeros, steps=a.steps, n_out=n_per + len(extra), reverse=fwd)
    first = 0 if fwd else -1
    out: list = [None] * len(n.inputs)
    for j in range(nst):
        c = b.emit("take", got[j], axis=1, index=first)
        if ct_st[j] is not None:
            c = b.emit("add", c, b.emit("take", ct_st[j], axis=1, index=first))
        out[ns + j] = c
    for k, g in zip(wanted["seq"] + wanted["const"], got[nst:nst + n_per]
                    + got[nst + n_per + len(extra):], strict=True):
        out[k] = g
    stacked_steps = got[nst + n_per:nst + n_per + len(extra)]
    for k, operands in moved.items():
        x, g = (stacked_steps[v] if isinstance(v, int) else v for v in operands)
        b.cut(x, g)                 # plain buffers: the sum is one product on the BLAS
        out[k] = b.emit("sum", b.emit("mul", b.emit("unsqueeze", x, axis=-1),
                                      b.emit("unsqueeze", g, axis=-2)), axes=[0, 1])
    return out


def _sums_as_products(bb, seqs, wanted, names, nst) -> tuple[list[str], dict]:
    """A weight's gradient summed over the steps, ``sum_t x_t^T g_t`` (an RNN's dW_hh),
    taken out of the backward body: the body hands on its x_t and g_t as per-step outputs
    (or x is a sequence the loop reads already) and the sum becomes one product over every
    batch row and step after the loop, ``X^T G`` (one BLAS call rather than one small
    accumulating product a step). Returns the new per-step outputs and, for each moved
    weight (by loop input index), its two operands: the index of a new per-step output,
    or the outer id of a sequence input."""
    g = bb.graph
    inputs = list(g.inputs)
    outer = dict(zip(inputs[:len(seqs)], seqs, strict=True))
    varying = g.dependents(inputs[:len(seqs)] + [k for k in inputs if k.startswith("carry:")])
    extra: list[str] = []
    moved: dict[int, tuple] = {}
    for k in list(wanted["const"]):
        node = g.nodes[g.outputs[f"ct:{names[k]}"]]
        t = g.nodes.get(node.inputs[0]) if node.op == "matmul" else None
        if t is None or t.op != "transpose" or t.attrs.axes != [1, 0] or \
                not {t.inputs[0], node.inputs[1]} <= varying:
            continue
        pair = []
        for v in (t.inputs[0], node.inputs[1]):
            if v not in outer and v not in extra:
                extra.append(v)
            pair.append(outer[v] if v in outer else extra.index(v))
        moved[k] = tuple(pair)
        wanted["const"].remove(k)
        del g.outputs[f"ct:{names[k]}"]
    if extra:
        outs = list(g.outputs.items())
        cut = nst + len(wanted["seq"])
        g.outputs = dict(outs[:cut] + [(f"step:{v}", v) for v in extra] + outs[cut:])
        keep = g.ancestors(g.outputs.values()) | set(g.inputs)
        g.nodes = {k: v for k, v in g.nodes.items() if k in keep}
    return extra, moved


def _save_residuals(b, n, bb, n_seq: int) -> list[str]:
    """The step values the backward body reads (a gate's sigmoid, say) become per-step
    outputs of the forward loop and inputs of the backward body, which then no longer
    recomputes them (nor the recurrent product they came from); returns the stacked
    values, for the backward loop's sequence inputs. The forward loop node is replaced in
    the backward builder's graph only: inference keeps the plain loop."""
    a = n.attrs
    body, names = a.body, list(a.body.inputs)
    varying = body.dependents(names[:a.n_seq + a.n_state])
    mine = {k for k, m in body.nodes.items() if m.role != "input"}
    saved = list(dict.fromkeys(i for m in bb.graph.nodes.values() if m.id not in mine
                               for i in m.inputs if i in mine and i in varying))
    if not saved:
        return []
    new_body = copy.copy(body)
    outs = list(body.outputs.items())
    new_body.outputs = dict(outs[:a.n_state + a.n_out] + [(f"saved:{k}", k) for k in saved]
                            + outs[a.n_state + a.n_out:])
    new_attrs = a.model_copy(update={"body": new_body, "n_out": a.n_out + len(saved)})
    b.graph.nodes[n.id] = dataclasses.replace(b.graph.nodes[n.id], attrs=new_attrs)
    types = loop_types(new_attrs)[a.n_state + a.n_out:a.n_state + a.n_out + len(saved)]
    picks = [b.emit("pick", n.id, as_=f"{n.id.split('/')[-1]}_saved", index=a.n_state
                    + a.n_out + k, type=t) for k, t in enumerate(types)]
    order = list(bb.graph.inputs)           # after the backward loop's other seq inputs
    for k in saved:                 # the value itself becomes an input of the backward body
        bb.graph.nodes[k] = dataclasses.replace(bb.graph.nodes[k], op="input", attrs=None,
                                                inputs=(), role="input", cut=False)
    bb.graph.inputs = {**{k: bb.graph.inputs[k] for k in order[:n_seq]},
                       **{k: bb.graph.nodes[k].type for k in saved},
                       **{k: bb.graph.inputs[k] for k in order[n_seq:]}}
    keep = bb.graph.ancestors(bb.graph.outputs.values()) | set(bb.graph.inputs)
    bb.graph.nodes = {k: v for k, v in bb.graph.nodes.items() if k in keep}
    return picks


def _backward_body(b, n, ct_st, ct_per):
    """The body of a loop's VJP and the loop inputs its per-step outputs and sums are for."""
    a = n.attrs
    body, ns, nst = a.body, a.n_seq, a.n_state
    names = list(body.inputs)
    outs = list(body.outputs.values())
    bb = b.body()
    for name in names[:ns + nst]:                       # steps of x, saved states
        bb.input(name, body.inputs[name])
    after = [bb.input(f"ct:{o}", body[o].type) if c is not None else None
             for o, c in zip(outs[:nst], ct_st, strict=True)]
    per = [bb.input(f"ct:{o}", body[o].type) if c is not None else None
           for o, c in zip(outs[nst:], ct_per, strict=True)]
    carry = [bb.input(f"carry:{s}", body.inputs[s]) for s in names[ns:ns + nst]]
    for name, src in zip(names[ns + nst:], n.inputs[ns + nst:], strict=True):
        bb.input(name, body.inputs[name])
        bb.consts[name] = src
    bb.graph.nodes.update({k: v for k, v in body.nodes.items() if v.role != "input"})
    seeds: dict[str, str] = {}
    for o, c in zip(outs, carry + per, strict=False):
        if c is not None:
            seeds[o] = bb.emit("add", seeds[o], c) if o in seeds else c
    for o, c in zip(outs[:nst], after, strict=True):
        if c is not None:
            seeds[o] = bb.emit("add", seeds[o], c)
    wrt = {names[k] for k, src in enumerate(n.inputs) if b.needs_grad(src)} \
        | set(names[ns:ns + nst])
    ct = bb.backprop(bb.graph, seeds, wrt)
    res = {f"carry:{s}": ct.get(s) or bb.emit("zeros", c, shape=list(bb.shape(c)[1:]))
           for s, c in zip(names[ns:ns + nst], carry, strict=True)}
    wanted = {"seq": [], "const": []}
    for k, name in enumerate(names):
        if (k < ns or k >= ns + nst) and b.needs_grad(n.inputs[k]) and name in ct:
            res[f"ct:{name}"] = ct[name]
            wanted["seq" if k < ns else "const"].append(k)
    bb.graph.outputs = res
    keep = bb.graph.ancestors(res.values()) | set(bb.graph.inputs)
    bb.graph.nodes = {k: v for k, v in bb.graph.nodes.items() if k in keep}
    return bb, wanted



def _loop_forward(ctx, a, *xs):
    """The loop run inline: its body traced once per step into the current program (the
    staged lowering runs a long loop as one compiled step instead)."""
    names = list(a.body.inputs)
    ns, nst, steps = a.n_seq, a.n_state, dim_value(a.steps, ctx.dims)
    states = list(xs[ns:ns + nst])
    consts = dict(zip(names[ns + nst:], xs[ns + nst:], strict=True))
    hist = [[None] * (steps + 1) for _ in range(nst)]
    for j, s in enumerate(states):
        hist[j][steps if a.reverse else 0] = s
    per, acc = None, None
    for t in (reversed(range(steps)) if a.reverse else range(steps)):
        env = {n: x[:, t] for n, x in zip(names[:ns], xs[:ns], strict=True)}
        env.update(zip(names[ns:ns + nst], states, strict=True))
        outs = ctx.run_body(a.body, {**env, **consts})
        states = outs[:nst]
        for j, s in enumerate(states):
            hist[j][t if a.reverse else t + 1] = s
        step_out = outs[nst:nst + a.n_out]
        per = [[None] * steps for _ in step_out] if per is None else per
        for j, o in enumerate(step_out):
            per[j][t] = o
        inc = outs[nst + a.n_out:]
        acc = inc if acc is None else [u + v for u, v in zip(acc, inc, strict=True)]
    return (*[Tensor.stack(*h, dim=1) for h in hist],
            *[Tensor.stack(*p, dim=1) for p in (per or [])], *(acc or []))


register("loop", doc="run a body subgraph over the time axis (internal: rnn/lstm/gru/scan "
         "lower to it)", family=FAMILY, inputs="xs*", internal=True, multi=True,
         attrs_model=attrs("loop", base=LoopBase,
                           body=(Any, Field(description="the step graph")),
                           steps=(int | str, Field(description="time steps: a number, or a "
                                                   "named dim (a length known at run time)")),
                           reverse=(bool, Field(False, description="run from the last step")),
                           n_seq=(int, 0), n_state=(int, 0), n_out=(int, 0)),
         infer=_loop_infer, forward=_loop_forward, vjp=_loop_vjp)

register("pick", doc="one output of a multi-output node (internal)", family=FAMILY, inputs="x",
         internal=True,
         attrs_model=attrs("pick", base=LoopBase, index=(int, 0),
                           type=(Any, Field(description="the output's type"))),
         infer=lambda a, t: a.type, forward=lambda c, a, xs: xs[a.index], vjp=PICK)
