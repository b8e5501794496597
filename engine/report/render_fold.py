"""What a drawing shows: the graph folded into the spec's nodes, some opened as clusters,
with its backward pass; the drawn boxes and the edges between them, before any DOT.

The drawing is computed from the IR alone. Every primitive knows the ``scope`` of the
composite it came from and every backward node the forward node it came from (``origin``),
so a drawing can fold primitives back into the boxes the user wrote, open some of them as
clusters, and pair each forward box with the ``∇`` box of its gradient.

DOT node names are stable and readable: a folded spec node is its id (``fc1``), a
primitive its IR id (``fc1/matmul``), a folded nested composite its scope path
(``loss/log_softmax``), a folded gradient ``grad:`` + that (``grad:fc1``), and the optimizer
``@optimizer``. Clusters are ``cluster_`` + the scope path (``cluster_fc1``,
``cluster_grad:fc1``). They depend only on the graph, so the text is byte-identical between
runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dlgraph.engine.errors import DlgraphError, suggest
from dlgraph.engine.graph.ir import Graph, Node
from dlgraph.engine.report.render_style import (
    GRAD_EDGE,
    PARAM_EDGE,
    SAVED_EDGE,
    const_text,
    dims,
)

GRAD = "grad:"                  # prefix of a folded gradient box and of its scope path
OPTIMIZER = "@optimizer"
MAX_OPTIMIZER_EDGES = 24      # more gradient sources are marked, not wired to the optimizer


def what_to_draw(graph: Graph, backward: bool | str) -> tuple[Graph, list[str], str | None]:
    """The graph to draw (loops spliced in), the objective node ids, and the optimizer's
    label (None when the backward pass is not drawn)."""
    g, objectives, optimizer = _training(graph, backward)
    return _splice_loops(g), objectives, optimizer


def _training(graph: Graph, backward: bool | str):
    """The graph to draw, the objective node ids, and the optimizer's label (or None)."""
    spec_train = getattr(graph.spec, "train", None) if graph.spec is not None else None
    phases = spec_train.all_phases() if spec_train is not None else []
    if not backward:
        objs = [graph.resolve(p.objective) for p in phases]
        if graph.objective:
            objs.append(graph.objective)
        return _forward_only(graph), [o for o in dict.fromkeys(objs) if o in graph.nodes], None
    if graph.objective and any(n.role == "backward" for n in graph.nodes.values()):
        opt = spec_train.optimizer if spec_train is not None else None
        return graph, [graph.objective], f"{opt.type} · lr {opt.lr:g}" if opt else ""
    if not phases:
        raise DlgraphError(f"graph '{graph.name}' has no training objective to differentiate",
                           help="add a `train:` section with an `objective:` to the spec, "
                                "or draw it without backward")
    phase = phases[0]
    if isinstance(backward, str):
        names = [p.name for p in phases]
        if backward not in names:
            raise DlgraphError(f"graph '{graph.name}' has no training phase '{backward}'",
                               help=suggest(backward, names) or f"phases: {', '.join(names)}")
        phase = phases[names.index(backward)]
    from dlgraph.engine.graph.autodiff import training_graph
    tg = training_graph(graph, phase)
    opt = phase.optimizer
    label = f"{opt.type} · lr {opt.lr:g}"
    if len(phases) > 1:
        label = f"{phase.name} phase · {label}"
    return tg, [tg.objective], label


def _forward_only(graph: Graph) -> Graph:
    if not any(n.role == "backward" for n in graph.nodes.values()):
        return graph
    import copy
    g = copy.copy(graph)
    g.nodes = {k: n for k, n in graph.nodes.items() if n.role != "backward"}
    return g


def _splice_loops(graph: Graph) -> Graph:
    """A copy to draw, with each loop's body drawn in the loop's place: the body's nodes in
    their own scope (``enc/step_l0``), wired to the loop's inputs, each new state fed back
    to the step that reads it (``loop_edges``). A backward loop's body recomputes the
    forward step: those nodes are the forward loop's, drawn once."""
    if not any(n.op == "loop" for n in graph.nodes.values()):
        return graph
    import copy
    import dataclasses
    g = copy.copy(graph)
    nodes: dict[str, Node] = {}
    outs_of: dict[str, list[str]] = {}
    g.loop_edges, g.loop_notes = set(), {}
    for nid, n in graph.nodes.items():
        if n.op != "loop":
            nodes[nid] = n if not (n.op == "pick" and n.inputs[0] in outs_of) else \
                dataclasses.replace(n, inputs=(outs_of[n.inputs[0]][n.attrs.index],))
            continue
        a = n.attrs
        names, outs = list(a.body.inputs), list(a.body.outputs.values())
        wire = dict(zip(names, n.inputs, strict=True))
        for bid, bn in a.body.nodes.items():
            if bn.role != "input" and bid not in nodes:
                nodes[bid] = dataclasses.replace(bn, inputs=tuple(wire.get(i, i)
                                                                  for i in bn.inputs))
                if len(bn.scope) > len(n.scope):      # the step's own scope, not those in it
                    g.loop_notes.setdefault(bn.scope[:len(n.scope) + 1], _loop_note(a))
        for j in range(a.n_state):                       # the carried state: next step
            state = names[a.n_seq + j]
            for bid, bn in a.body.nodes.items():
                if state in bn.inputs and bid in nodes and bn.role == n.role:
                    nodes[bid] = dataclasses.replace(nodes[bid],
                                                     inputs=nodes[bid].inputs + (outs[j],))
                    g.loop_edges.add((outs[j], bid))
        outs_of[nid] = outs
    g.nodes = nodes
    return g


def _loop_note(a) -> str:
    return f"× {a.steps} step{'s' * (a.steps != 1)}" + (" backwards" if a.reverse else "")


@dataclass
class Item:
    """One drawn node: a primitive (``leaf``) or a folded scope (``box``)."""

    key: str
    kind: str                         # leaf | box
    node: Node                        # the primitive, or the first primitive of the box
    path: tuple[str, ...]             # the scope it stands for (box) or lies in (leaf)
    container: tuple[str, ...]        # the open cluster it is drawn in; () = top level
    count: int = 0                    # primitives folded into it


@dataclass
class Edge:
    src: str
    dst: str
    attrs: dict[str, str] = field(default_factory=dict)
    upward: bool = False              # written head -> tail with dir=back: ranked upwards


class Folded:
    """The graph folded into drawn items (``items``: primitives and folded scopes, keyed
    by DOT name) and the edges between them; ``keys`` maps each IR node to its item."""

    def __init__(self, g: Graph, *, expand, backward: bool, depth: int | None, shapes: bool,
                 dtypes: bool, objectives: list[str], optimizer: str | None):
        self.g, self.backward, self.depth = g, backward, depth
        self.shapes, self.dtypes, self.optimizer = shapes, dtypes, optimizer
        spec_nodes = g.spec.nodes if g.spec is not None else {}
        self.user_op = {nid: nd.op for nid, nd in spec_nodes.items()}
        self.user_doc = {nid: nd.doc for nid, nd in spec_nodes.items() if nd.doc}
        # a layer's fused activation (`activation: relu`) is part of what the box says it is
        # and the same for the layers inside modules, by scope path (``disc/h1``)
        layers = {**getattr(g, "layers", {}), **spec_nodes}
        self.user_op.update({k: nd.op for k, nd in layers.items() if k not in self.user_op})
        self.user_act = {k: nd.activation for k, nd in layers.items()
                         if getattr(nd, "activation", None) and _fused(nd)}
        self.expanded = self._expanded(expand)
        self.on_the_way = {e[:k] for e in self.expanded for k in range(1, len(e))}
        self.paths = {nid: self._path(n) for nid, n in g.nodes.items()}
        self.canon, self.steps, self.repeats = self._repeats()
        self.times = self._merge_per_step()
        self.keys: dict[str, str | None] = {}       # None: a scalar constant shown as a note
        self.items: dict[str, Item] = {}
        self.notes: dict[str, list[str]] = {}
        self.grad_notes: dict[str, list[str]] = {}     # drawn node -> its parameter gradients
        for nid in g.nodes:
            self._place(nid)
        self.objectives = {self.keys[o] for o in objectives if o in self.keys}
        self.outputs = {self.keys[o] for o in g.outputs.values() if o in self.keys}
        self.edges = self._edges()

    # -- where each primitive goes ------------------------------------------------------
    def _path(self, n: Node) -> tuple[str, ...]:
        """The scope path: a forward node's scope; a backward node's origin's, ``grad:``-marked."""
        if n.role != "backward":
            return n.scope
        o = self.g.nodes[n.origin] if n.origin in self.g.nodes else None
        if o is None:
            return (GRAD + (n.scope[1] if len(n.scope) > 1 else n.id),)
        return (GRAD + o.scope[0],) + o.scope[1:] if o.scope else (GRAD + o.id,)

    def _expanded(self, expand) -> set[tuple[str, ...]]:
        """The scope paths to open: every spec node (``True``), or those named, each a spec
        node id or the path of a node inside a module (``b/c1``)."""
        users = list(dict.fromkeys(n.user_id for n in self.g.nodes.values()
                                   if n.role != "backward"))
        if expand is True:
            return {(u,) for u in users}
        if not expand:
            return set()
        scopes = {"/".join(n.scope[:k]) for n in self.g.nodes.values() if n.role != "backward"
                  for k in range(2, len(n.scope) + 1)}
        for name in [expand] if isinstance(expand, str) else expand:
            if name not in users and name not in scopes:
                raise DlgraphError(f"cannot expand '{name}': it is not a node of the graph",
                                   help=suggest(name, [*users, *sorted(scopes)])
                                   or f"nodes: {', '.join(users)}")
        return {tuple(name.split("/")) for name in ([expand] if isinstance(expand, str)
                                                    else expand)}

    def _open(self, prefix: tuple[str, ...]) -> bool:
        """Is this scope drawn open (a cluster of its insides)? The scopes on the way to an
        expanded one are, and below an expanded one those fewer than ``depth`` levels down
        (``depth=1``: its own nodes and layers, each folded into one box)."""
        path = (prefix[0].removeprefix(GRAD),) + prefix[1:]
        if path in self.on_the_way:
            return True
        return any(path[:k] in self.expanded and (self.depth is None
                                                  or len(path) - k < self.depth)
                   for k in range(1, len(path) + 1))

    def _repeats(self):
        """Fold structurally identical repetitions (an unrolled recurrence) onto their first.

        Inside an open cluster, child scopes named ``<stem><index>`` with the same ops in
        the same order are steps of one loop: only the first is drawn, labelled ``× T``.
        Returns ``canon`` (hidden node -> the node drawn for it), ``steps`` (node -> (loop,
        step)) and ``repeats`` (first step's path -> (T, last step's name)).
        """
        canon: dict[str, str] = {}
        steps: dict[str, tuple[tuple[str, ...], int]] = {}
        repeats: dict[tuple[str, ...], tuple[int, str]] = {}
        children: dict[tuple[str, ...], dict[str, list[str]]] = {}
        for nid, path in self.paths.items():
            for k in range(1, len(path)):
                if not self._open(path[:k]):
                    break
                children.setdefault(path[:k], {}).setdefault(path[k], []).append(nid)
        for container in sorted(children, key=lambda c: (len(c), c)):
            families: dict[str, list[str]] = {}
            for seg in children[container]:
                m = re.fullmatch(r"(.*?)(\d+)", seg)
                if m:
                    families.setdefault(m.group(1), []).append(seg)
            for stem, segs in families.items():
                segs.sort(key=lambda seg: int(seg[len(stem):]))
                depth = len(container) + 1
                same: dict[tuple, list[tuple[str, list[str]]]] = {}
                for seg in segs:
                    m = [n for n in children[container][seg] if n not in canon]
                    sig = tuple((_shape_of_path(self.paths[n][depth:]), self.g.nodes[n].op,
                                 self.g.nodes[n].type.shape) for n in m)
                    same.setdefault(sig, []).append((seg, m))
                # the boundary steps of a loop may differ (no incoming state, no summed
                # cotangent): each run of identical steps folds on its own; and only a
                # chain is a loop (norm1 and norm2 of a block, or two gates side by side,
                # share a name pattern and ops but are not steps of one another)
                for run in (c for sig, r in same.items() if sig for c in self._chains(r)):
                    if len(run) < 2:
                        continue
                    loop = container + (stem, run[0][0])
                    repeats[container + (run[0][0],)] = (len(run), run[-1][0])
                    for j, (_, m) in enumerate(run):
                        for first, nid in zip(run[0][1], m, strict=True):
                            steps[nid] = (loop, j)
                            if j:
                                canon[nid] = first
        return canon, steps, repeats

    def _chains(self, run: list[tuple[str, list[str]]]) -> list[list[tuple[str, list[str]]]]:
        """Split same-looking scopes (in index order) into chains of steps: each step reads
        a value of the one before it (or, backwards, the one before reads it)."""
        chains: list[list[tuple[str, list[str]]]] = []
        for seg, nodes in run:
            if chains and self._reads(nodes, chains[-1][-1][1]):
                chains[-1].append((seg, nodes))
            else:
                chains.append([(seg, nodes)])
        return chains

    def _reads(self, a: list[str], b: list[str]) -> bool:
        """Does a node of ``a`` read one of ``b``, or one of ``b`` read one of ``a``?"""
        sa, sb = set(a), set(b)
        return any(i in sb for n in a for i in self.g.nodes[n].inputs) or \
            any(i in sa for n in b for i in self.g.nodes[n].inputs)

    def _merge_per_step(self) -> dict[str, int]:
        """Merge the per-step copies of an op outside a folded loop (its outputs' gathering).

        Once steps fold onto their first, ops applied to each step's output (an ``unsqueeze``
        per step before a ``concat``) read the same drawn node: the same op in the same
        scope on the same drawn inputs is drawn once, marked ``× k``.
        """
        times: dict[str, int] = {}
        if not self.canon:
            return times
        seen: dict[tuple, str] = {}
        for n in self.g.nodes.values():
            if n.id in self.canon or not any(i in self.steps or i in self.canon
                                             for i in n.inputs):
                continue
            sig = (self.paths[n.id], n.op, n.role, n.origin and self._resolve(n.origin),
                   tuple(self._resolve(i) for i in n.inputs))
            first = seen.setdefault(sig, n.id)
            if first != n.id:
                self.canon[n.id] = first
                times[first] = times.get(first, 1) + 1
        return times

    def _resolve(self, nid: str) -> str:
        while nid in self.canon:
            nid = self.canon[nid]
        return nid

    def _place(self, nid: str) -> None:
        drawn = self._resolve(nid)
        if drawn != nid:
            if drawn not in self.keys:
                self._place(drawn)
            self.keys[nid] = self.keys[drawn]
            return
        n, path = self.g.nodes[nid], self.paths[nid]
        for k in range(1, len(path) + 1):
            if not self._open(path[:k]):
                key = "/".join(path[:k])
                item = self.items.get(key)
                if item is None:
                    item = self.items[key] = Item(key, "box", n, path[:k], path[:k - 1])
                item.count += 1
                self.keys[nid] = key
                return
        if n.op == "const" and n.type.shape == () and (n.scope or n.role == "backward"):
            # a scalar constant inside a layer or a VJP: a note on its consumer, not a node
            self.keys[nid] = None
            return
        self.keys[nid] = nid
        self.items[nid] = Item(nid, "leaf", n, path, path, 1)

    # -- edges ----------------------------------------------------------------------------
    def _edges(self) -> list[Edge]:
        edges: dict[tuple[str, str, str], Edge] = {}
        for n in self.g.nodes.values():
            dst = self.keys[n.id]
            if dst is None:
                continue
            for src_id in n.inputs:
                src = self.keys[src_id]
                if src is None:
                    if self.items[dst].kind == "leaf" and n.id not in self.canon:
                        self.notes.setdefault(dst, []).append(const_text(self.g.nodes[src_id]))
                    continue
                value = self._resolve(src_id)
                loop = self._recurrent(src_id, n.id)
                s = self.g.nodes[src_id]
                saved = n.role == "backward" and s.role != "backward"
                shared = s.role == "param" and not saved and s.user_id != n.user_id
                if saved or shared:  # one dashed edge per pair of drawn nodes
                    value = "shared" if shared else ""
                if (src == dst and not loop) or (src, dst, value) in edges:
                    if saved and src != dst:
                        edges[(src, dst, value)].attrs["tooltip"] += f", {src_id}"
                    continue
                attrs: dict[str, str] = {}
                if saved:
                    attrs = {"style": "dashed", "color": SAVED_EDGE, "arrowhead": "empty",
                             "arrowsize": "0.5", "tooltip": f"saved for the backward: {src_id}"}
                elif shared:           # weight sharing: the parameters of another node
                    attrs = {"style": "dashed", "color": PARAM_EDGE, "fontcolor": PARAM_EDGE,
                             "arrowhead": "empty", "label": "shared parameters",
                             "tooltip": f"{n.user_id} uses the parameters of {s.user_id}"}
                else:
                    label = self._type_label(s) if s.role != "param" or src != src_id else ""
                    if label:
                        attrs["label"] = label
                    if n.role == "backward":
                        attrs.update(color=GRAD_EDGE, fontcolor=GRAD_EDGE)
                if loop:
                    attrs.update(style="dashed", constraint="false")
                    attrs["label"] = "next step" + (f"\n{attrs['label']}" if "label" in attrs
                                                    else "")
                # cotangents run against the forward flow: ranked upwards, they mirror it
                up = n.role == "backward" and not saved and not loop
                edges[(src, dst, value)] = Edge(src, dst, attrs, upward=up)
        if self.backward:
            self._links(edges)
            self._grads(edges)
        return list(edges.values())

    def _recurrent(self, src: str, dst: str) -> bool:
        if (src, dst) in getattr(self.g, "loop_edges", ()):
            return True
        a, b = self.steps.get(src), self.steps.get(dst)
        return a is not None and b is not None and a[0] == b[0] and a[1] != b[1]

    def _links(self, edges: dict) -> None:
        """Tie each folded ∇ box to its forward box, where no saved value already does."""
        for key, item in self.items.items():
            if item.kind == "box" and key.startswith(GRAD) and key[len(GRAD):] in self.items:
                fwd = key[len(GRAD):]
                if not any(e.src == fwd and e.dst == key for e in edges.values()):
                    edges[(fwd, key, "")] = Edge(fwd, key, {
                        "style": "dashed", "color": SAVED_EDGE, "arrowhead": "none"})

    def _grads(self, edges: dict) -> None:
        """Parameter gradients into the optimizer: one edge per drawn gradient source."""
        by_src: dict[str, list[str]] = {}
        for pname, gid in self.g.grads.items():
            line = pname
            if self.shapes:
                line += " " + dims(self.g.nodes[gid].type.shape)
            by_src.setdefault(self.keys[gid], []).append(line)
        self.grad_notes = by_src
        if len(by_src) > MAX_OPTIMIZER_EDGES:
            # each edge would span the whole drawing, and dot's time grows with their length:
            # the gradient sources get a purple outline and the list of their parameters instead
            return
        for src, lines in by_src.items():
            attrs = {"label": "\n".join(lines), "color": PARAM_EDGE, "fontcolor": PARAM_EDGE,
                     "penwidth": "1.4"}
            edges[(src, OPTIMIZER, "")] = Edge(src, OPTIMIZER, attrs, upward=True)

    @property
    def mirror(self) -> bool:
        """Lay ∇ boxes beside their forward boxes (a folded drawing without clusters)."""
        return self.backward and not any(i.container for i in self.items.values())

    def _type_label(self, n: Node) -> str:
        t = n.type
        parts = [dims(t.shape)] if self.shapes else []
        if self.dtypes or (self.shapes and t.dtype != "float32"):
            parts.append(t.dtype)
        return " ".join(parts)


def _fused(nd) -> bool:
    """Is the node's ``activation`` applied to its output (linear, conv), rather than inside
    it (a transformer block's feed-forward)?"""
    f = type(nd).model_fields.get("activation")
    return f is not None and (f.description or "").startswith("an activation op applied to "
                                                                "the output")


def _shape_of_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """A scope path with its step indices blanked, to compare repetitions."""
    return tuple(re.sub(r"\d+", "#", s) for s in path)


__all__ = ["GRAD", "MAX_OPTIMIZER_EDGES", "OPTIMIZER", "Edge", "Folded", "Item",
           "what_to_draw"]
