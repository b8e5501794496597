"""Backprop by graph reversal.

:func:`reverse` walks the forward graph backwards from the objective and asks each
node's VJP rule for its inputs' cotangents. The rules emit ordinary nodes through the
:class:`~dlgraph.engine.build.Builder`, so the backward pass is itself a graph: validated,
shape-inferred, drawable and run like any other. Cotangents of a value used twice are
summed; broadcasting is undone by ``reduce_to``.
"""

from __future__ import annotations

import copy
import fnmatch

from dlgraph.ops import NO_GRAD, REGISTRY

from .build import Builder
from .errors import GradientError, ShapeError, Source, SpecError
from .ir import Graph
from .types import fmt


def reverse(graph: Graph, objective: str, wrt: list[str] | None = None) -> Graph:
    """A training graph: the forward nodes, the backward nodes and ``grads`` for ``wrt``.

    ``objective`` is a node id (or spec reference) of a scalar; ``wrt`` lists parameter
    names (default: every trainable parameter).

    >>> import dlgraph                                                   # doctest: +SKIP
    >>> tg = reverse(dlgraph.load("graphs/mlp.yaml"), "loss")            # doctest: +SKIP
    >>> sorted(tg.grads)[:1]                                             # doctest: +SKIP
    ['fc1.bias']
    """
    obj = graph.resolve(objective)
    if obj not in graph.nodes:
        raise GradientError(f"objective '{objective}' is not a node",
                            help=f"nodes: {', '.join(n for n in graph.aliases if '.' not in n)}")
    on = graph[obj]
    if on.type.shape != () or on.type.dtype != "float32":
        raise GradientError(f"objective '{objective}' must be a float scalar, got {on.type}",
                            node=on.user_id, help="reduce it with mean or sum, or use a loss op")
    wrt = [p for p, v in graph.params.items() if v.trainable] if wrt is None else wrt
    needs = _needs_grad(graph, {graph.params[p].node for p in wrt})
    upstream = graph.ancestors([obj])
    for p in wrt:
        if graph.params[p].node not in upstream:
            raise GradientError(f"parameter '{p}' does not affect the objective '{objective}'",
                                node=graph.params[p].scope[0] if graph.params[p].scope else p,
                                help="freeze it with `trainable: false`, or leave it out of "
                                     "this phase's `params`")

    out = copy.copy(graph)
    out.nodes, out.params, out.aliases = dict(graph.nodes), dict(graph.params), dict(graph.aliases)
    b = Builder(out)
    b.role = "backward"
    b.origin = obj
    with b.within("grad"):
        ct: dict[str, str] = {obj: b.emit("const", as_="seed", value=1.0)}
    for nid in reversed(list(graph.nodes)):
        if nid not in ct or nid not in upstream or graph[nid].role in ("input", "param"):
            continue
        n = graph[nid]
        if graph[nid].cut:
            out.nodes[ct[nid]].cut = True
        d = REGISTRY[n.op]
        if d.vjp is None:
            raise GradientError(f"op '{n.op}' has no gradient rule", node=n.user_id,
                                op=n.op, source=n.source)
        if d.vjp == NO_GRAD:
            continue
        b.origin, b.source = nid, n.source
        b.user = (n.user_id, n.op)
        b.scope = ("grad",) + tuple(nid.split("/"))
        cots = d.vjp(b, n, ct[nid])
        if len(cots) != len(n.inputs):
            raise GradientError(f"the VJP of '{n.op}' gave {len(cots)} cotangents for "
                                f"{len(n.inputs)} inputs (a bug in dlgraph)", node=nid)
        for src, c in zip(n.inputs, cots, strict=True):
            if c is None or src not in needs:
                continue
            if b.shape(c) != b.shape(src):
                c = b.emit("reduce_to", c, src)
            ct[src] = b.emit("add", ct[src], c, as_="acc") if src in ct else c
    out.grads = {}
    for p in wrt:
        node = graph.params[p].node
        if node not in ct:
            raise GradientError(f"no gradient reaches parameter '{p}': every path to the "
                                f"objective goes through ops without a gradient",
                                help="argmax, comparisons and casts to int stop gradients")
        if out.nodes[ct[node]].type.shape != graph[node].type.shape:
            raise ShapeError(f"gradient of '{p}' has shape {fmt(out.nodes[ct[node]].type.shape)}"
                             f", expected {fmt(graph[node].type.shape)} (a bug in dlgraph)")
        out.grads[p] = ct[node]
    out.objective = obj
    _prune(out, graph)
    return out


def _needs_grad(graph: Graph, seeds: set[str]) -> set[str]:
    """Nodes whose value depends differentiably on a seed (in emission order = topological)."""
    needs = set(seeds)
    for n in graph.nodes.values():
        if n.id in needs or REGISTRY.get(n.op) is None or REGISTRY[n.op].vjp == NO_GRAD:
            continue
        if n.type.dtype == "float32" and any(i in needs for i in n.inputs):
            needs.add(n.id)
    return needs


def _prune(out: Graph, forward: Graph) -> None:
    """Drop backward nodes that no gradient uses (cotangents of constant inputs)."""
    keep = out.ancestors(out.grads.values()) | set(forward.nodes)
    out.nodes = {k: v for k, v in out.nodes.items() if k in keep}


# ------------------------------------------------------------------- training phases


def phase_params(g: Graph, phase) -> list[str]:
    """The trainable parameter names a phase's globs select (error if none)."""
    names = [n for n, p in g.params.items() if p.trainable
             and any(fnmatch.fnmatchcase(n, pat) for pat in phase.params)]
    if not names:
        raise SpecError(f"phase '{phase.name}': no trainable parameter matches "
                        f"{phase.params}", source=Source(g.source, g.lines.get(("train",))),
                        help="parameter names: " + ", ".join(list(g.params)[:12]))
    return names


def training_graph(g: Graph, phase) -> Graph:
    """The reversed graph of one phase; errors are located at the train section."""
    ref = phase.objective
    if ref not in g.aliases:
        raise SpecError(f"objective '{ref}' is not a node",
                        source=Source(g.source, g.lines.get(("train", "objective"))
                                      or g.lines.get(("train",))),
                        help="set `objective:` to the id of the loss node")
    try:
        return reverse(g, ref, phase_params(g, phase))
    except GradientError as e:
        line = g.lines.get(("nodes", e.node)) or g.lines.get(("train", "objective"))
        raise e.located(source=Source(g.source, line)) from None


def phase_graphs(g: Graph) -> dict[str, Graph]:
    """The training graph of every phase of the spec's ``train:`` section, by phase name
    (empty without one): reversed once, then handed to summaries, training and drawing."""
    if g.spec is None or g.spec.train is None:
        return {}
    return {phase.name: training_graph(g, phase) for phase in g.spec.train.all_phases()}
