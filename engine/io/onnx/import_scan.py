"""ONNX Scan -> dlgraph's ``scan`` over a module of the spec, and the loop over a graph's
nodes that every import (the model's graph, a Scan's body) runs.

A Scan imports when dlgraph's ``scan`` can say the same thing: one scan input with an axis
besides the time axis (the time axis is made axis 1), running forwards; states of rank 1 or
more; every scan output read downstream a copy of one and the same new state (dlgraph's
``out`` is the first state at every step, so that state is put first); a body that reads
only constants of the outer graph (weights). The
body becomes a module under ``modules:``, imported by the same rules as the graph, and
its weights are the scan's (``<scan>.cell.<node>.weight``).
"""

from __future__ import annotations

from types import SimpleNamespace

from dlgraph.engine.io.onnx.import_base import Importer, Unsupported, Value, hint, origin, valid_id
from dlgraph.engine.io.onnx.import_ops import attrs
from dlgraph.engine.io.onnx.import_views import infer_missing


def run_nodes(imp: Importer) -> None:
    """Import every node of ``imp``'s graph in order by the rules of its table
    (``imp.rules``); failures are listed in imp.failed."""
    for node in imp.model.graph.node:
        if id(node) in imp.absorbed:
            continue
        rule = imp.rules.get(node.op_type)
        try:
            if rule is None:
                raise Unsupported("no dlgraph rule for this operator")
            missing = [i for i in node.input if i and i not in imp.values]
            if missing:
                continue            # an input failed already; that node is listed
            rule(imp, node)
            infer_missing(imp, node)
        except Unsupported as e:
            label = node.name or next((o for o in node.output if o), node.op_type)
            imp.failed.append((label, node.op_type, str(e)))


def _check(imp, node, a) -> tuple[int, int]:
    props = {p.key: p.value for p in getattr(imp.model, "metadata_props", [])}
    if "dlgraph_scan_opset" in props:
        raise Unsupported(f"Scan of opset {props['dlgraph_scan_opset']} (its batch axis and "
                          "sequence lengths; opset 9 on is imported)")
    n_in = a["num_scan_inputs"]
    n_state = len(node.input) - n_in
    rank = imp.rank(node.input[-1])
    problems = [
        (n_in != 1, f"{n_in} scan inputs (dlgraph's scan reads one sequence)"),
        (rank is None or rank < 2, "a scan input without an axis beside the time axis"),
        (any(a.get("scan_input_directions", [0])) or any(a.get("scan_output_directions", [0])),
         "scanning backwards"),
        (any(x not in (0, 1) for x in a.get("scan_input_axes", [0])), "a scan axis after 1"),
        (any(x not in (0, 1) for x in a.get("scan_output_axes", [0])), "an output axis after 1"),
        (n_state == 0, "a scan without states")]
    bad = [why for cond, why in problems if cond]
    if bad:
        raise Unsupported("; ".join(bad))
    return n_in, n_state


def _copied_state(body, n_state: int, k: int) -> int:
    """Which new state the k-th scan output of the body copies (through Identity)."""
    name = body.output[n_state + k].name
    made = {o: n for n in body.node for o in n.output}
    while name in made and made[name].op_type == "Identity":
        name = made[name].input[0]
    for j, o in enumerate(body.output[:n_state]):
        src = o.name
        while src in made and made[src].op_type == "Identity":
            src = made[src].input[0]
        if src == name:
            return j
    raise Unsupported(f"scan output {k} is not one of the states (dlgraph's scan yields "
                      "its states at every step)")


def _short_names(body):
    """A copy of the body whose node names lose the prefix they share (a dlgraph export
    names them `<loop>/step/<scope>/...`), so that the module's ids read like its nodes."""
    from onnx import GraphProto
    out = GraphProto()
    out.CopyFrom(body)
    paths = [n.name.split("/")[:-1] for n in out.node if n.op_type != "Identity" and n.name]
    common = paths[0] if paths else []
    for p in paths[1:]:
        while p[:len(common)] != common:
            common = common[:-1]
    cut = len("/".join(common)) + 1 if common else 0
    for n in out.node:
        if n.name.startswith("/".join(common) + "/"):
            n.name = n.name[cut:]
    return out


def _sub_importer(imp: Importer, body) -> Importer:
    """An importer over the body; the outer values it reads must be constants."""
    sub = Importer(SimpleNamespace(graph=body), imp.rules)
    sub.outputs = set()         # the module's outputs are node ids, whatever their names
    made = {o for n in body.node for o in n.output} | {i.name for i in body.input} | \
        {t.name for t in body.initializer}
    for n in body.node:
        for i in n.input:
            if i and i not in made and i not in sub.values:
                c = imp.peek(i)
                if c is None:
                    raise Unsupported(f"the body reads '{i}' of the outer graph, which is "
                                      "not a constant")
                sub.values[i] = Value(const=c)
    return sub


def _module(imp: Importer, node, order: list[int], n_state: int):
    """Import the body as a module: (name, module dict, state names in `order`)."""
    body = _short_names(attrs(node)["body"])
    sub = _sub_importer(imp, body)
    ins = list(body.input)
    names = []
    for vi in [ins[n_state]] + [ins[j] for j in order]:
        nid = sub.fresh(vi.name.split("/")[-1])
        sub.bind(vi.name, nid)
        names.append(nid)
    run_nodes(sub)
    if sub.failed:
        raise Unsupported("its body: " + "; ".join(f"'{n}' ({op}): {why}"
                                                  for n, op, why in sub.failed[:4]))
    outs = [sub.ref(body.output[j].name) for j in order]
    sub.prune(outs)
    name = imp.fresh(valid_id(hint(node)) + "_body")
    imp.modules[name] = {"inputs": names, "nodes": sub.nodes, "outputs": outs}
    imp.module_origins[name] = sub.origin
    return name, names[1:], sub.weights


def scan(imp, node):
    a = attrs(node)
    n_in, n_state = _check(imp, node, a)
    body = a["body"]
    used = [k for k, o in enumerate(node.output[n_state:]) if o and (o in imp.consumers
                                                                      or o in imp.outputs)]
    copies = [_copied_state(body, n_state, k) for k in used]
    if len(set(copies)) > 1:
        raise Unsupported("scan outputs of two different states")
    order = copies[:1] + [j for j in range(n_state) if j not in copies[:1]]
    name, states, weights = _module(imp, node, order, n_state)
    x = imp.ref(node.input[-1])
    if a.get("scan_input_axes", [0])[0] == 0:
        x = imp.add(f"{x}_batch_first", "transpose", [x], [],
                    axes=[1, 0] + list(range(2, imp.rank(node.input[-1]))))
    inits = [imp.ref(node.input[j]) for j in order]
    sizes = {s: int((imp.shape(node.input[j]) or (0, 0))[-1]) for s, j in
             zip(states, order, strict=True)}
    if all(imp.nodes.get(r, {}).get("op") == "zeros" and imp.nodes[r]["shape"] == [sizes[s]]
           for r, s in zip(inits, states, strict=True)):
        inits = []                                  # zeros: the scan's own initial states
    nid = imp.add(hint(node, imp), "scan", [x, *inits], [origin(node)], body=name,
                  state=sizes)
    for k, w in weights.items():
        imp.weights[f"{nid}.cell.{k}"] = w
    for s, j in zip(states, order, strict=True):
        if node.output[j]:
            imp.bind(node.output[j], f"{nid}.{s}")
    for k, out in enumerate(node.output[n_state:]):
        if k in used:
            ref = f"{nid}.out"
            if a.get("scan_output_axes", [0])[k] == 0:
                ref = imp.add(f"{nid}_time_major", "transpose", [ref], [],
                              axes=[1, 0] + list(range(2, 1 + imp.rank(node.input[order[0]]))))
            imp.bind(out, ref)


SCAN_RULES = {"Scan": scan}
"""ONNX operator type -> its import rule for control flow (a Scan's body is imported by the
same table as the outer graph)."""
