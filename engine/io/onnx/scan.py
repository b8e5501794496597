"""dlgraph's ``loop`` (a ``scan`` over a module, or a recurrent layer written out) as ONNX Scan.

The loop's body is an ordinary graph, so it is exported the way the outer graph is, into the
Scan's ``body`` attribute. The two differ in their conventions:

- dlgraph's body reads ``[seq steps, states, consts]``; ONNX's body reads ``[states, scan
  inputs]`` and reads the consts (weights) by name from the outer graph.
- dlgraph's loop yields each state stacked over time ``[batch, time + 1, ...]`` with the
  initial one first (last when it runs backwards); ONNX's Scan yields the final states and
  the per-step outputs. So the body also emits each new state as a per-step output, and the
  initial state is put in front of that stack.

Sequences are batch-first here (``scan_input_axes`` / ``scan_output_axes`` 1), so no
transposes are needed around the Scan.
"""

from __future__ import annotations

from dlgraph.engine.errors import GraphError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.onnx.writer import value_info


def _renamed(body: Graph, prefix: str, keep: set[str]) -> Graph:
    """The body with its node ids under `prefix` (ONNX names are global to the model);
    the const inputs keep their ids: they are the outer graph's values."""
    from dataclasses import replace
    ren = {nid: nid if nid in keep else f"{prefix}/{nid}" for nid in body.nodes}
    nodes = {ren[nid]: replace(n, id=ren[nid], inputs=tuple(ren[i] for i in n.inputs))
             for nid, n in body.nodes.items()}
    return Graph(name=body.name, nodes=nodes,
                 inputs={ren[k]: t for k, t in body.inputs.items()},
                 outputs={k: ren[v] for k, v in body.outputs.items()}, params=body.params,
                 source=body.source, layers=body.layers, shared=body.shared)


def _body(ex, n, make_export, stacked: list[int]):
    """Export the loop body (with a per-step copy of the states in `stacked`); returns
    (GraphProto, []) or (None, the primitives that have no ONNX rule)."""
    from onnx import helper
    a = n.attrs
    names = list(a.body.inputs)
    carried = a.n_seq + a.n_state
    body = _renamed(a.body, f"{n.id}/step", set(names[carried:]))
    sub = make_export(body, ex.params)
    sub.w.prefix = f"{n.id}/step"
    sub.w.inits = ex.w.inits                       # constants live in the outer graph
    ids = list(body.inputs)
    for k, bid in enumerate(ids):
        sub.env[bid] = bid if k < carried else ex.value(n.inputs[k])
    for nid in body.nodes:
        if nid not in body.inputs:
            sub.node(nid)
    if sub.missing:
        return None, sub.missing
    outs = []
    state_outs = [o for k, o in enumerate(list(body.outputs.values())[:a.n_state])
                  if k in stacked]
    for k, oid in enumerate(list(body.outputs.values()) + state_outs):
        name = f"{n.id}/step/out_{k}"
        sub.w.op("Identity", sub.value(oid), out=name)
        outs.append(value_info(name, body[oid].type))
    order = ids[a.n_seq:carried] + ids[:a.n_seq]
    inputs = [value_info(i, body.inputs[i]) for i in order]
    return helper.make_graph(sub.w.nodes, f"{n.id}_step", inputs, outs), []


def _use(c, steps: int, reverse: bool) -> str:
    """How node `c` reads a state stacked over time: 'final' (the last state alone, as a
    slice of one), 'steps' (the state after each step) or 'stack' (anything else)."""
    if c.op != "slice" or c.attrs.axis not in (1, -c.type.rank):
        return "stack"
    lo = c.attrs.start + (steps + 1 if c.attrs.start < 0 else 0)
    hi = steps + 1 if c.attrs.stop is None else c.attrs.stop + (steps + 1 if c.attrs.stop < 0
                                                                else 0)
    final, each = ((0, 1), (0, steps)) if reverse else ((steps, steps + 1), (1, steps + 1))
    return "final" if (lo, hi) == final else "steps" if (lo, hi) == each else "stack"


def _state_uses(ex, n) -> dict[int, dict[str, str]]:
    """For each state of loop `n` read downstream: reader node id -> its use."""
    out: dict[int, dict[str, str]] = {}
    for p in ex.g.nodes.values():
        if p.op == "pick" and p.inputs[0] == n.id and p.id in ex.needed \
                and p.attrs.index < n.attrs.n_state:
            readers = [c for c in ex.g.nodes.values() if p.id in c.inputs and c.id in ex.needed]
            out[p.attrs.index] = {c.id: _use(c, n.attrs.steps, n.attrs.reverse)
                                  for c in readers}
    return out


def export_loop(ex, n, make_export) -> list[str]:
    """Write loop node `n` as one Scan. Returns the ONNX names of the loop's outputs in
    pick order ('' for a state only read as its final value or per step: the readers
    of those find their value in ``ex.env`` already)."""
    a, w = n.attrs, ex.w
    if len(a.body.outputs) != a.n_state + a.n_out:
        raise GraphError("a loop that sums over its steps has no ONNX export", node=n.user_id,
                         op="loop", help="export the inference graph, not a backward one")
    uses = _state_uses(ex, n)
    stacked = [k for k, u in sorted(uses.items()) if set(u.values()) - {"final"}]
    graph, missing = _body(ex, n, make_export, stacked)
    if graph is None:
        ex.missing.extend(missing)
        return []
    seqs = [ex.value(i) for i in n.inputs[:a.n_seq]]
    inits = [ex.value(i) for i in n.inputs[a.n_seq:a.n_seq + a.n_state]]
    k_out = a.n_out + len(stacked)
    rev = int(a.reverse)
    per_out = dict(scan_output_axes=[1] * k_out, scan_output_directions=[rev] * k_out) \
        if k_out else {}
    outs = w.op("Scan", *inits, *seqs, outputs=a.n_state + k_out, out=f"{n.id}/scan",
                body=graph, num_scan_inputs=a.n_seq, scan_input_axes=[1] * a.n_seq,
                scan_input_directions=[rev] * a.n_seq, **per_out)
    if a.n_state + k_out == 1:
        outs = [outs]
    per_step = outs[a.n_state:a.n_state + a.n_out]
    each = dict(zip(stacked, outs[a.n_state + a.n_out:], strict=True))
    stacks = [""] * a.n_state
    for k, readers in uses.items():
        for rid, use in readers.items():
            if use == "final":                   # x[:, T:T+1] of the stack
                ex.env[rid] = w.op("Unsqueeze", outs[k], w.const([1]), out=rid)
            elif use == "steps":                 # x[:, 1:T+1]: the scan output itself
                ex.env[rid] = w.op("Identity", each[k], out=rid)
        if "stack" in readers.values():
            first = w.op("Unsqueeze", inits[k], w.const([1]))
            parts = [each[k], first] if a.reverse else [first, each[k]]
            stacks[k] = w.op("Concat", *parts, axis=1)
    return stacks + per_step
