"""Backprop by graph reversal.

:func:`reverse` walks the forward graph backwards from the objective and asks each
node's VJP rule for its inputs' cotangents. The rules emit ordinary nodes through a
:class:`GradBuilder` (a :class:`~dlgraph.engine.graph.build.Builder`), so the backward pass is
itself a graph: validated, shape-inferred, drawable and run like any other. Cotangents of a
value used twice are summed; broadcasting is undone by ``reduce_to``. A higher-order op's
rule (``loop``'s, in ops/control.py) differentiates its body with the same builder.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch

from dlgraph.engine.errors import GradientError, ShapeError, Source, SpecError, suggest
from dlgraph.engine.graph.build import Builder
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.types import fmt
from dlgraph.ops import NO_GRAD, OPS

SAVED = ("sigmoid", "tanh", "exp", "relu")
"""Ops whose forward value the backward pass reads (their VJP uses their output) and that
cost a software exp an element on tinygrad's CPU: the value is kept in a buffer (a kernel
boundary) rather than recomputed inside every backward kernel that reads it. Measured on 2
loaded cores (CPU seconds per training step): the LSTM's gate-cotangent kernel, which
assembles four gates and so evaluated every gate's exps at every element, went from 0.73
to 0.025 ms a launch; the transformer step from about 22 to 17 ms. Realising the pieces of
a split before they are padded into one cotangent instead gained nothing (measured).
relu: its output kept, the next layer's weight gradient reads it as it is instead of
applying the relu inside the product, which leaves that product a plain matrix product
for the host's BLAS (engine/compile/gemm.py): the mlp workload's step 3.3 -> 2.1 ms of
kernels (loaded cores)."""


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
    upstream = graph.ancestors([obj])
    for p in wrt:
        if graph.params[p].node not in upstream:
            raise GradientError(f"parameter '{p}' does not affect the objective '{objective}'",
                                node=graph.params[p].scope[0] if graph.params[p].scope else p,
                                help="freeze it with `trainable: false`, or leave it out of "
                                     "this phase's `params`")
    out = copy.copy(graph)
    out.nodes, out.params, out.aliases = dict(graph.nodes), dict(graph.params), dict(graph.aliases)
    b = GradBuilder(out)
    b.role, b.origin = "backward", obj
    with b.within("grad"):
        seed = b.emit("const", as_="seed", value=1.0)
    ct = backprop(b, graph, {obj: seed}, {graph.params[p].node for p in wrt})
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
    _prune(out, graph, out.grads.values())
    return out


class GradBuilder(Builder):
    """The builder of a backward pass. VJP rules emit through it like through any builder;
    the rule of a higher-order op (``loop``) also asks it which values need a cotangent
    (:meth:`needs_grad`), for the outputs of a multi-output node (:meth:`outputs_of`) and to
    differentiate a body graph in turn (:meth:`backprop`, on the builder of that body)."""

    def __init__(self, graph: Graph):
        super().__init__(graph)
        self.needs: set[str] = set()              # values depending differentiably on wrt
        self.picks: dict[str, list[str]] = {}     # multi-output node -> its pick nodes

    def needs_grad(self, nid: str) -> bool:
        """Whether the value ``nid`` of the graph being differentiated needs a cotangent."""
        return nid in self.needs

    def outputs_of(self, nid: str) -> list[str]:
        """The ``pick`` nodes of a multi-output node, by output index."""
        return self.picks[nid]

    def backprop(self, graph: Graph, seeds: dict[str, str], wrt: set[str]) -> dict[str, str]:
        """Cotangents of ``graph``'s nodes, emitted into this builder (see :func:`backprop`)."""
        return backprop(self, graph, seeds, wrt)


VIEWS = ("reshape", "reshape_like", "flatten", "transpose", "squeeze", "unsqueeze")
EXPANDED = ("windows",)
"""A convolution's patches: each input value repeated per window, kept a view (a buffer of
them cost the cnn workload's step 75 -> 186 ms, measured)."""


def product_operands(g: Graph):
    """``(product node, operand)`` for each operand of each matrix product of ``g``, the
    operand followed back through views to the value they show."""
    for n in [n for n in g.nodes.values() if n.op == "matmul"]:
        for src in n.inputs:
            while (m := g.nodes.get(src)) is not None and m.op in VIEWS:
                src = m.inputs[0]
            yield n, src


def cut_products(g: Graph) -> None:
    """Every matrix product's computed operands (through views) kept in buffers, forward
    and backward, in place: a value recomputed inside a product (a layer norm's output in
    the weight gradient, a concatenated cotangent) leaves it no plain product for the host's
    BLAS (engine/compile/gemm.py), and the backward products read the forward ones."""
    for _, src in list(product_operands(g)):
        m = g.nodes.get(src)
        if m is not None and m.role in ("forward", "backward") and not m.cut and \
                m.op not in EXPANDED:
            g.nodes[src] = dataclasses.replace(m, cut=True)


def backprop(b: GradBuilder, graph: Graph, seeds: dict[str, str],
             wrt: set[str]) -> dict[str, str]:
    """Cotangents of ``graph``'s nodes given ``seeds`` (node -> cotangent id), emitted by
    ``b`` in reverse schedule order; only values that depend on ``wrt`` get one.

    This is the transpose pass of autodidax: each node's VJP rule gives one cotangent per
    input (``None``: none), summed where a value is used twice. A multi-output node
    (``loop``) gets the list of its outputs' cotangents, read through its ``pick`` nodes.
    """
    b.needs, b.picks = _needs_grad(graph, wrt), _picks(graph)
    upstream = graph.ancestors(seeds)
    picks = b.picks
    ct = dict(seeds)
    for nid in reversed(list(graph.nodes)):
        n = graph[nid]
        if nid not in upstream or n.role in ("input", "param") or n.op == "pick":
            continue
        d = OPS[n.op]
        got = [ct.get(p) for p in picks[nid]] if d.multi else ct.get(nid)
        if got is None or (d.multi and not any(got)):
            continue
        if n.cut and not d.multi:
            b.graph.nodes[got].cut = True
        if d.vjp is None:
            raise GradientError(f"op '{n.op}' has no gradient rule", node=n.user_id,
                                op=n.op, source=n.source)
        if d.vjp == NO_GRAD:
            continue
        b.origin, b.source, b.user = nid, n.source, (n.user_id, n.op)
        b.scope = ("grad",) + tuple(nid.split("/"))
        cots = d.vjp(b, n, got)
        if n.op in SAVED and not n.cut and b.graph.nodes.get(nid) is n:
            b.graph.nodes[nid] = dataclasses.replace(n, cut=True)
        if len(cots) != len(n.inputs):
            raise GradientError(f"the VJP of '{n.op}' gave {len(cots)} cotangents for "
                                f"{len(n.inputs)} inputs (a bug in dlgraph)", node=nid)
        for src, c in zip(n.inputs, cots, strict=True):
            if c is None or src not in b.needs:
                continue
            if b.shape(c) != b.shape(src):
                c = b.emit("reduce_to", c, src)
            ct[src] = b.emit("add", ct[src], c, as_="acc") if src in ct else c
    cut_products(b.graph)
    return ct


def _picks(graph: Graph) -> dict[str, list[str]]:
    """Multi-output node -> its pick nodes, by output index."""
    out: dict[str, list] = {}
    for n in graph.nodes.values():
        if n.op == "pick":
            lst = out.setdefault(n.inputs[0], [])
            lst.extend([None] * (n.attrs.index + 1 - len(lst)))
            lst[n.attrs.index] = n.id
    return out


def _needs_grad(graph: Graph, seeds: set[str]) -> set[str]:
    """Nodes whose value depends differentiably on a seed (in emission order = topological)."""
    needs = set(seeds)
    for n in graph.nodes.values():
        if n.id in needs or OPS.get(n.op) is None or OPS[n.op].vjp == NO_GRAD:
            continue
        if n.type.dtype == "float32" and any(i in needs for i in n.inputs):
            needs.add(n.id)
    return needs


def _prune(out: Graph, forward: Graph, wanted) -> None:
    """Drop backward nodes that no wanted value uses (cotangents of constant inputs)."""
    keep = out.ancestors(wanted) | set(forward.nodes)
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
                        help=suggest(ref, [n for n in g.aliases if "." not in n])
                        or "set `objective:` to the id of the loss node")
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
