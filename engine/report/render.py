"""Draw a graph as graphviz DOT: folded into the spec's nodes, expanded, with its backward pass.

The drawing is computed from the IR alone. Every primitive knows the ``scope`` of the
composite it came from and every backward node the forward node it came from (``origin``),
so a drawing can fold primitives back into the boxes the user wrote, open some of them as
clusters, and pair each forward box with the ``∇`` box of its gradient.

DOT node names are stable and readable: a folded spec node is its id (``fc1``), a
primitive its IR id (``fc1/matmul``), a folded nested composite its scope path
(``loss/log_softmax``), a folded gradient ``grad:`` + that (``grad:fc1``), and the optimizer
``@optimizer``. Clusters are ``cluster_`` + the scope path (``cluster_fc1``,
``cluster_grad:fc1``). The text depends only on the graph, so it is byte-identical between
runs.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from dlgraph.engine.errors import DlgraphError, suggest
from dlgraph.engine.graph.ir import Graph, Node
from dlgraph.engine.types import numel
from dlgraph.ops import OPS

FORMATS = (".dot", ".gv", ".svg", ".png", ".pdf")
RANKDIRS = ("TB", "LR", "BT", "RL")
GRAD = "grad:"                  # prefix of a folded gradient box and of its scope path
OPTIMIZER = "@optimizer"
FONT = "Helvetica,Arial,sans-serif"

# (fill, border) per op family: soft fills, a darker border of the same hue
PALETTE = {
    "nn": ("#dbe8f7", "#4a78b0"),
    "recurrent": ("#d4eeee", "#2a8a8a"),
    "attention": ("#f5dcec", "#a64d86"),
    "activation": ("#dff0d8", "#5a9a4a"),
    "loss": ("#fadcd9", "#c0392b"),
    "linalg": ("#e7e0f3", "#7a5ca8"),
    "elementwise": ("#fbf0cf", "#a88a1c"),
    "reduce": ("#fce3cf", "#c2691f"),
    "shape": ("#ececec", "#858585"),
    "param": ("#f2f2f2", "#9a9a9a"),
    "": ("#ffffff", "#707070"),
}
MAX_OPTIMIZER_EDGES = 24      # more gradient sources are marked, not wired to the optimizer
GRAD_EDGE = "#c0392b"           # cotangents flowing back
SAVED_EDGE = "#a0a0a0"          # forward values the backward pass reads
PARAM_EDGE = "#7a5ca8"          # gradients into the optimizer


def render(graph: Graph, path: str | Path | None = None, *, expand: bool | list[str] = False,
           backward: bool | str = False, rankdir: str = "TB", depth: int | None = None,
           shapes: bool = True, dtypes: bool = False) -> str:
    """The DOT text of a graph; also written to ``path`` when given (.dot, .gv, .svg, .png, .pdf).

    ``expand`` opens composites as clusters: ``True`` for all, or a list of spec node ids;
    nested composites open down to ``depth`` scope levels (default: all). ``backward`` draws
    the training graph: each forward box gets a ``∇`` box, parameter gradients flow into
    the optimizer; with ``train.phases`` the first phase is drawn, or the phase named by
    ``backward="<phase name>"``. Edges carry shapes (``batch×64``); dtypes show when
    ``dtypes`` is set, and always for non-float tensors.

    >>> import dlgraph                                                   # doctest: +SKIP
    >>> dot = render(dlgraph.load("graphs/mlp.yaml"), "mlp.svg", backward=True)  # doctest: +SKIP
    >>> dot.splitlines()[0]                                             # doctest: +SKIP
    'digraph "mlp-spirals" {'
    """
    if rankdir not in RANKDIRS:
        raise DlgraphError(f"unknown rankdir '{rankdir}'",
                           help=f"use one of: {', '.join(RANKDIRS)}")
    if depth is not None and depth < 0:
        raise DlgraphError(f"depth must be 0 or more, got {depth}")
    suffix = _check_path(path) if path is not None else None
    g, objectives, optimizer = _training(graph, backward)
    g = _splice_loops(g)
    drawing = _Drawing(g, expand=expand, backward=bool(backward), depth=depth, shapes=shapes,
                       dtypes=dtypes, objectives=objectives, optimizer=optimizer)
    text = drawing.dot(rankdir)
    if path is not None:
        _write(drawing, rankdir, text, Path(path), suffix)
    return text


# ----------------------------------------------------------------------------- output files


def _check_path(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DlgraphError(f"cannot write {path}: unknown format '{suffix or Path(path).name}'",
                           help=f"use one of: {', '.join(FORMATS)}")
    return suffix


def _write(drawing: _Drawing, rankdir: str, text: str, path: Path, suffix: str) -> None:
    if suffix in (".dot", ".gv"):
        data = text.encode()
    else:
        import graphviz
        # a sharper PNG than graphviz's 96 dpi; vector formats stay as they are
        # a sharper PNG than graphviz's 96 dpi, where the picture is small enough that
        # rasterising it stays quick
        sharp = suffix == ".png" and len(drawing.items) <= 120
        src = drawing.dot(rankdir, dpi=144) if sharp else text
        try:
            data = graphviz.pipe("dot", suffix[1:], src.encode(), quiet=True)
        except graphviz.ExecutableNotFound:
            raise DlgraphError(f"cannot write {path}: graphviz's `dot` program is not installed",
                               help="install graphviz (apt-get install graphviz), or write .dot"
                               ) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        raise DlgraphError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- what to draw


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


# ----------------------------------------------------------------------------- the drawing


@dataclass
class _Item:
    """One drawn node: a primitive (``leaf``) or a folded scope (``box``)."""

    key: str
    kind: str                         # leaf | box
    node: Node                        # the primitive, or the first primitive of the box
    path: tuple[str, ...]             # the scope it stands for (box) or lies in (leaf)
    container: tuple[str, ...]        # the open cluster it is drawn in; () = top level
    count: int = 0                    # primitives folded into it


@dataclass
class _Edge:
    src: str
    dst: str
    attrs: dict[str, str] = field(default_factory=dict)
    upward: bool = False              # written head -> tail with dir=back: ranked upwards

    def dot(self) -> str:
        a, b, attrs = self.src, self.dst, dict(self.attrs)
        if self.upward:
            a, b, attrs["dir"] = b, a, "back"
        return f"{_q(a)} -> {_q(b)}" + (f" [{_attrs(attrs)}]" if attrs else "") + ";"


class _Drawing:
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
        users = list(dict.fromkeys(n.user_id for n in g.nodes.values() if n.role != "backward"))
        if expand is True:
            self.expanded = set(users)
        elif not expand:
            self.expanded = set()
        else:
            if isinstance(expand, str):
                expand = [expand]
            for uid in expand:
                if uid not in users:
                    raise DlgraphError(f"cannot expand '{uid}': it is not a node of the graph",
                                       help=suggest(uid, users) or f"nodes: {', '.join(users)}")
            self.expanded = set(expand)
        self.paths = {nid: self._path(n) for nid, n in g.nodes.items()}
        self.canon, self.steps, self.repeats = self._repeats()
        self.times = self._merge_per_step()
        self.keys: dict[str, str | None] = {}       # None: a scalar constant shown as a note
        self.items: dict[str, _Item] = {}
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

    def _open(self, prefix: tuple[str, ...]) -> bool:
        user = prefix[0].removeprefix(GRAD)
        return user in self.expanded and (self.depth is None or len(prefix) <= self.depth)

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
                    item = self.items[key] = _Item(key, "box", n, path[:k], path[:k - 1])
                item.count += 1
                self.keys[nid] = key
                return
        if n.op == "const" and n.type.shape == () and (n.scope or n.role == "backward"):
            # a scalar constant inside a layer or a VJP: a note on its consumer, not a node
            self.keys[nid] = None
            return
        self.keys[nid] = nid
        self.items[nid] = _Item(nid, "leaf", n, path, path, 1)

    # -- edges ----------------------------------------------------------------------------
    def _edges(self) -> list[_Edge]:
        edges: dict[tuple[str, str, str], _Edge] = {}
        for n in self.g.nodes.values():
            dst = self.keys[n.id]
            if dst is None:
                continue
            for src_id in n.inputs:
                src = self.keys[src_id]
                if src is None:
                    if self.items[dst].kind == "leaf" and n.id not in self.canon:
                        self.notes.setdefault(dst, []).append(_value(self.g.nodes[src_id]))
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
                edges[(src, dst, value)] = _Edge(src, dst, attrs, upward=up)
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
                    edges[(fwd, key, "")] = _Edge(fwd, key, {
                        "style": "dashed", "color": SAVED_EDGE, "arrowhead": "none"})

    def _grads(self, edges: dict) -> None:
        """Parameter gradients into the optimizer: one edge per drawn gradient source."""
        by_src: dict[str, list[str]] = {}
        for pname, gid in self.g.grads.items():
            line = pname
            if self.shapes:
                line += " " + _dims(self.g.nodes[gid].type.shape)
            by_src.setdefault(self.keys[gid], []).append(line)
        self.grad_notes = by_src
        if len(by_src) > MAX_OPTIMIZER_EDGES:
            # each edge would span the whole drawing, and dot's time grows with their length:
            # the gradient sources get a purple outline and the list of their parameters instead
            return
        for src, lines in by_src.items():
            attrs = {"label": "\n".join(lines), "color": PARAM_EDGE, "fontcolor": PARAM_EDGE,
                     "penwidth": "1.4"}
            edges[(src, OPTIMIZER, "")] = _Edge(src, OPTIMIZER, attrs, upward=True)

    @property
    def mirror(self) -> bool:
        """Lay ∇ boxes beside their forward boxes (a folded drawing without clusters)."""
        return self.backward and not any(i.container for i in self.items.values())

    def _type_label(self, n: Node) -> str:
        t = n.type
        parts = [_dims(t.shape)] if self.shapes else []
        if self.dtypes or (self.shapes and t.dtype != "float32"):
            parts.append(t.dtype)
        return " ".join(parts)

    # -- DOT text -------------------------------------------------------------------------
    def dot(self, rankdir: str, dpi: int | None = None) -> str:
        title: str = self.g.name
        if self.backward:
            title = _html([(f"{self.g.name} · training graph", None, None),
                           ("red: gradients flowing back · purple: parameter gradients · "
                            "dashed: forward values the backward pass reads", None, 9)])
        graph_attrs = {"rankdir": rankdir, "fontname": FONT, "fontsize": "13",
                       "label": title, "labelloc": "t", "nodesep": "0.35", "ranksep": "0.4",
                       "bgcolor": "white", "newrank": "true"}
        if dpi:
            graph_attrs["dpi"] = str(dpi)
        if len(self.items) > 400:
            # crossing minimisation dominates dot's time on big graphs; fewer passes suffice
            graph_attrs.update(mclimit="0.3", nslimit="2", nslimit1="2")
        node_attrs = {"fontname": FONT, "fontsize": "11", "shape": "box",
                      "style": "rounded,filled", "penwidth": "1.2"}
        edge_attrs = {"fontname": FONT, "fontsize": "9", "color": "#606060",
                      "fontcolor": "#505050", "arrowsize": "0.7"}
        lines = [f"digraph {_q(self.g.name)} {{", f"  graph [{_attrs(graph_attrs)}];",
                 f"  node [{_attrs(node_attrs)}];", f"  edge [{_attrs(edge_attrs)}];"]
        tree: dict[tuple[str, ...], list] = {(): []}
        for item in self.items.values():
            self._add_to_tree(tree, item.container, ("item", item.key))
        self._emit(tree, (), lines, 1)
        if self.backward:
            lines.append(f"  {_q(OPTIMIZER)} [{_attrs(self._optimizer_attrs())}];")
        if self.mirror:
            for key, item in self.items.items():
                if item.kind == "box" and key.startswith(GRAD) and key[len(GRAD):] in self.items:
                    lines.append(f"  {{rank=same; {_q(key[len(GRAD):])}; {_q(key)};}}")
        lines.extend("  " + e.dot() for e in self.edges)
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _add_to_tree(self, tree: dict, container: tuple[str, ...], entry) -> None:
        if container not in tree:
            tree[container] = []
            self._add_to_tree(tree, container[:-1], ("cluster", container))
        tree[container].append(entry)

    def _emit(self, tree: dict, container: tuple[str, ...], lines: list[str], level: int) -> None:
        pad = "  " * level
        for kind, what in tree[container]:
            if kind == "item":
                lines.append(f"{pad}{_q(what)} [{_attrs(self._node_attrs(self.items[what]))}];")
                continue
            lines.append(f"{pad}subgraph {_q('cluster_' + '/'.join(what))} {{")
            lines.append(f"{pad}  graph [{_attrs(self._cluster_attrs(what))}];")
            self._emit(tree, what, lines, level + 1)
            lines.append(f"{pad}}}")

    # -- looks ----------------------------------------------------------------------------
    def _family(self, path: tuple[str, ...], n: Node | None, kind: str) -> str:
        if n is not None and kind == "leaf":
            if n.role == "param":
                return "param"
            op = n.op
        elif len(path) == 1:
            op = self.user_op.get(path[0].removeprefix(GRAD), "")
        else:
            op = self.user_op.get("/".join((path[0].removeprefix(GRAD),) + path[1:])) or \
                re.sub(r"_\d+$", "", path[-1])
        d = OPS.get(op)
        return d.family if d is not None and d.family in PALETTE else ""

    def _repeat_note(self, path: tuple[str, ...]) -> str:
        loops = getattr(self.g, "loop_notes", {})
        fwd = (path[0].removeprefix(GRAD),) + path[1:]
        if fwd in loops:
            return f"{path[-1]} {loops[fwd]}"
        if path in self.repeats:
            times, last = self.repeats[path]
            return f"{path[-1]} … {last} × {times}"
        return path[-1]

    def _cluster_attrs(self, path: tuple[str, ...]) -> dict[str, str]:
        grad = path[0].startswith(GRAD)
        fill, border = PALETTE[self._family(path, None, "box")]
        if len(path) == 1:
            user = path[0].removeprefix(GRAD)
            op = self._op_text(user)
            owner = getattr(self.g, "shared", {}).get(user)
            op += f"; the parameters of {owner}" if owner and not grad else ""
            label = ("∇ " if grad else "") + user + (f" ({op})" if op else "")
        else:
            op = "" if grad else self._op_text("/".join(path))
            label = ("∇ " if grad else "") + self._repeat_note(path) + (f" ({op})" if op else "")
        attrs = {"label": label, "labeljust": "l", "fontsize": "11", "color": border,
                 "fillcolor": _tint(fill), "style": "rounded,filled" + (",dashed" * grad),
                 "fontcolor": "#333333"}
        if len(path) > 1:
            attrs["fontsize"] = "10"
        return attrs

    def _node_attrs(self, item: _Item) -> dict[str, str]:
        n = item.node
        grad = n.role == "backward"
        fill, border = PALETTE[self._family(item.path, n, item.kind)]
        attrs = {"fillcolor": fill, "color": border}
        if grad:
            attrs["style"] = "rounded,filled,dashed"
        if item.kind == "box":
            attrs["label"] = self._box_label(item)
            user = item.path[0].removeprefix(GRAD)
            if len(item.path) == 1 and user in self.user_doc:
                attrs["tooltip"] = self.user_doc[user]
        elif n.role == "input":
            attrs.update(shape="ellipse", style="filled", fillcolor="white", color="#37474f",
                         label=_html([(n.id, "b", None)]))
        elif n.role == "param":
            attrs.update(fontsize="9", height="0.3", margin="0.06,0.02",
                         label=_html([(n.id.rsplit("/", 1)[-1], None, None),
                                      (_dims(n.type.shape), None, 8)]))
        elif n.op == "const" and not n.scope and n.role != "backward":      # the user's own
            attrs["label"] = _html([(n.id, "b", None), (f"const {_value(n)}", None, 9)])
        elif n.op == "const":
            attrs.update(shape="ellipse", fontsize="9", height="0.25", width="0.3",
                         margin="0.03,0.01", label=_html([(_value(n), None, None)]))
        else:
            notes = list(self.notes.get(item.key, []))
            if item.key in self.times:
                notes.insert(0, f"× {self.times[item.key]}")
            attrs["label"] = self._leaf_label(n, notes)
        if item.key in self.objectives:
            fill, border = PALETTE["loss"]
            attrs.update(shape="octagon", style="filled", fillcolor=fill, color=border,
                         penwidth="1.6")
        if item.key in self.outputs:
            attrs["peripheries"] = "2"
        if item.key in self.grad_notes and len(self.grad_notes) > MAX_OPTIMIZER_EDGES:
            attrs.update(color=PARAM_EDGE, penwidth="2.2")
            attrs["tooltip"] = "to the optimizer: " + ", ".join(self.grad_notes[item.key])
        if item.kind == "leaf" and n.role != "input":
            attrs["tooltip"] = self.user_doc.get(n.id) if not n.scope and n.id in self.user_doc \
                else f"{n.id}: {n.op} → {n.type}"
        return attrs

    def _leaf_label(self, n: Node, notes: list[str]) -> str:
        local = n.id.rsplit("/", 1)[-1]
        times = [x for x in notes if x.startswith("× ")]
        consts = [x for x in notes if not x.startswith("× ")]
        note = [(" · ".join(times + ([f"with {', '.join(consts)}"] if consts else [])), None, 8)
                ] if notes else []
        if n.role == "backward" or (n.scope and re.sub(r"_\d+$", "", local) == n.op):
            return _html([(n.op, None, None)] + note)
        if not n.scope:                                  # a primitive the user wrote
            return _html([(n.id, "b", None)] + ([(n.op, None, 9)] if n.op != n.id else [])
                         + note)
        return _html([(local, None, None), (n.op, None, 8)] + note)

    def _box_label(self, item: _Item) -> str:
        path = item.path
        grad = path[0].startswith(GRAD)
        if len(path) == 1:
            user = path[0].removeprefix(GRAD)
            op = self._op_text(user)
            title = ("∇ " if grad else "") + user
            if grad:
                detail = f"{item.count} op{'s' * (item.count != 1)}"
            else:
                count, frozen = self._params(user)
                params = f"{count:,} param{'s' * (count != 1)}" + " (frozen)" * frozen
                if user in getattr(self.g, "shared", {}):
                    params, count = f"shares the parameters of {self.g.shared[user]}", 1
                detail = " · ".join(p for p in (op, params if count else "") if p)
        else:
            title = ("∇ " if grad else "") + self._repeat_note(path)
            op = "" if grad else self._op_text("/".join(path))
            detail = " · ".join(p for p in (op, f"{item.count} op{'s' * (item.count != 1)}")
                                if p)
        return _html([(title, "b", None)] + ([(detail, None, 9)] if detail else []))

    def _op_text(self, user: str) -> str:
        """``linear``, or ``linear + relu`` for a layer with a fused activation."""
        op = self.user_op.get(user, "")
        return f"{op} + {self.user_act[user]}" if user in self.user_act else op

    def _params(self, user: str) -> tuple[int, bool]:
        ps = [p for p in self.g.params.values() if (p.scope[0] if p.scope else p.node) == user]
        count = sum(numel(p.shape) for p in ps)
        return count, bool(ps) and not any(p.trainable for p in ps)

    def _optimizer_attrs(self) -> dict[str, str]:
        fill, border = PALETTE["linalg"]
        lines = [("optimizer", "b", None), (self.optimizer or "", None, 9)]
        if len(self.grad_notes) > MAX_OPTIMIZER_EDGES:
            n = sum(len(v) for v in self.grad_notes.values())
            lines.append((f"{n} parameter gradients, from the nodes outlined in purple",
                          None, 9))
        return {"shape": "box3d", "style": "filled", "fillcolor": fill, "color": border,
                "label": _html([ln for ln in lines if ln[0]])}


# ----------------------------------------------------------------------------- small helpers


def _dims(shape) -> str:
    """``('batch', 64)`` -> ``batch×64``; a scalar is ``scalar``."""
    return "×".join(str(d) for d in shape) if shape else "scalar"


def _value(n: Node) -> str:
    value = getattr(n.attrs, "value", "?")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fused(nd) -> bool:
    """Is the node's ``activation`` applied to its output (linear, conv), rather than inside
    it (a transformer block's feed-forward)?"""
    f = type(nd).model_fields.get("activation")
    return f is not None and (f.description or "").startswith("an activation op applied to "
                                                                "the output")


def _shape_of_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """A scope path with its step indices blanked, to compare repetitions."""
    return tuple(re.sub(r"\d+", "#", s) for s in path)


def _tint(color: str) -> str:
    """A much lighter version of a ``#rrggbb`` colour, for cluster backgrounds."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{c + (255 - c) * 2 // 3:02x}" for c in (r, g, b))


def _q(s: str) -> str:
    """A DOT string: quoted, with quotes and backslashes escaped."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _Html(str):
    """An HTML-like label, written ``<...>`` instead of quoted."""


def _attrs(attrs: dict[str, str]) -> str:
    return ", ".join(f"{k}={v if isinstance(v, _Html) else _q(v)}" for k, v in attrs.items())


def _html(lines: list[tuple[str, str | None, int | None]]) -> str:
    """An HTML-like label: one (text, tag, point size) per line, text escaped."""
    out = []
    for text, tag, size in lines:
        s = html.escape(text, quote=True)
        if tag:
            s = f"<{tag}>{s}</{tag}>"
        if size:
            s = f'<font point-size="{size}" color="#444444">{s}</font>'
        out.append(s)
    return _Html("<" + "<br/>".join(out) + ">")


__all__ = ["render", "FORMATS"]
