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

Its VJP is another loop running the other way, whose body is the reversal of this body
(recomputing the step, then the ordinary VJP rules), so the backward pass never unrolls.
The lowering decides how the steps run: one compiled call for a chunk of steps over a
symbolic time index, or inline (unrolled) where a single program is needed.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.spec.base import NodeSpec
from dlgraph.engine.types import TType, dim_add, fmt
from dlgraph.ops.registry import PICK, attrs, register

F = "control"


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


def _loop_vjp(b, n, cts: list):
    """Cotangents of the loop's inputs: a loop the other way over the reversed body."""
    return b.reverse_loop(n, cts)


register("loop", doc="run a body subgraph over the time axis (internal: rnn/lstm/gru/scan "
         "lower to it)", family=F, inputs="xs*", internal=True, multi=True,
         attrs_model=attrs("loop", base=LoopBase,
                           body=(Any, Field(description="the step graph")),
                           steps=(int | str, Field(description="time steps: a number, or a "
                                                   "named dim (a length known at run time)")),
                           reverse=(bool, Field(False, description="run from the last step")),
                           n_seq=(int, 0), n_state=(int, 0), n_out=(int, 0)),
         infer=_loop_infer, forward=lambda c, a, *xs: c.run_loop(a, xs), vjp=_loop_vjp)

register("pick", doc="one output of a multi-output node (internal)", family=F, inputs="x",
         internal=True,
         attrs_model=attrs("pick", base=LoopBase, index=(int, 0),
                           type=(Any, Field(description="the output's type"))),
         infer=lambda a, t: a.type, forward=lambda c, a, xs: xs[a.index], vjp=PICK)
