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
from dlgraph.engine.ir import Graph

from .writer import value_info


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
                 source=body.source)


def _body(ex, n, make_export):
    """Export the loop body; returns (GraphProto, its input names for states then seqs)."""
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
    state_outs = list(body.outputs.values())[:a.n_state]
    for k, oid in enumerate(list(body.outputs.values()) + state_outs):
        name = f"{n.id}/step/out_{k}"
        sub.w.op("Identity", sub.value(oid), out=name)
        outs.append(value_info(name, body[oid].type))
    order = ids[a.n_seq:carried] + ids[:a.n_seq]
    inputs = [value_info(i, body.inputs[i]) for i in order]
    return helper.make_graph(sub.w.nodes, f"{n.id}_step", inputs, outs), []


def export_loop(ex, n, make_export) -> list[str]:
    """Write loop node `n` as one Scan; returns the ONNX names of the loop's outputs in
    pick order (stacked states, then per-step outputs)."""
    a, w = n.attrs, ex.w
    if len(a.body.outputs) != a.n_state + a.n_out:
        raise GraphError("a loop that sums over its steps has no ONNX export", node=n.user_id,
                         op="loop", help="export the inference graph, not a backward one")
    graph, missing = _body(ex, n, make_export)
    if graph is None:
        ex.missing.extend(missing)
        return []
    seqs = [ex.value(i) for i in n.inputs[:a.n_seq]]
    inits = [ex.value(i) for i in n.inputs[a.n_seq:a.n_seq + a.n_state]]
    k_out = a.n_out + a.n_state
    rev = int(a.reverse)
    outs = w.op("Scan", *inits, *seqs, outputs=a.n_state + k_out, out=f"{n.id}/scan",
                body=graph, num_scan_inputs=a.n_seq, scan_input_axes=[1] * a.n_seq,
                scan_input_directions=[rev] * a.n_seq, scan_output_axes=[1] * k_out,
                scan_output_directions=[rev] * k_out)
    if a.n_state + k_out == 1:
        outs = [outs]
    per_step = outs[a.n_state:a.n_state + a.n_out]
    stacks = []
    for init, steps in zip(inits, outs[a.n_state + a.n_out:], strict=True):
        first = w.op("Unsqueeze", init, w.const([1]))
        parts = [steps, first] if a.reverse else [first, steps]
        stacks.append(w.op("Concat", *parts, axis=1))
    return stacks + per_step
