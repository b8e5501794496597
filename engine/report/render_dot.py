"""The DOT text of a folded graph: clusters nested as the scopes are opened, each box,
cluster and edge with its label, colours and tooltip, the optimizer, the ∇ boxes laid
beside their forward boxes. The text depends only on the graph (byte-identical runs).
"""

from __future__ import annotations

import re

from dlgraph.engine.graph.ir import Node
from dlgraph.engine.report.render_fold import (
    GRAD,
    MAX_OPTIMIZER_EDGES,
    OPTIMIZER,
    Edge,
    Folded,
    Item,
)
from dlgraph.engine.report.render_style import (
    FONT,
    PALETTE,
    PARAM_EDGE,
    const_text,
    dims,
    dot_attrs,
    html_label,
    quote,
    tint,
)
from dlgraph.engine.types import numel
from dlgraph.ops import OPS


def edge_line(e: Edge) -> str:
    """One edge as DOT; an upward edge written head -> tail with dir=back."""
    a, b, attrs = e.src, e.dst, dict(e.attrs)
    if e.upward:
        a, b, attrs["dir"] = b, a, "back"
    return f"{quote(a)} -> {quote(b)}" + (f" [{dot_attrs(attrs)}]" if attrs else "") + ";"


class Drawing(Folded):
    """A folded graph that writes itself as DOT (:meth:`dot`)."""

    def dot(self, rankdir: str, dpi: int | None = None) -> str:
        title: str = self.g.name
        if self.backward:
            title = html_label([(f"{self.g.name} · training graph", None, None),
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
        lines = [f"digraph {quote(self.g.name)} {{", f"  graph [{dot_attrs(graph_attrs)}];",
                 f"  node [{dot_attrs(node_attrs)}];", f"  edge [{dot_attrs(edge_attrs)}];"]
        tree: dict[tuple[str, ...], list] = {(): []}
        for item in self.items.values():
            self._add_to_tree(tree, item.container, ("item", item.key))
        self._emit(tree, (), lines, 1)
        if self.backward:
            lines.append(f"  {quote(OPTIMIZER)} [{dot_attrs(self._optimizer_attrs())}];")
        if self.mirror:
            for key, item in self.items.items():
                if item.kind == "box" and key.startswith(GRAD) and key[len(GRAD):] in self.items:
                    lines.append(f"  {{rank=same; {quote(key[len(GRAD):])}; {quote(key)};}}")
        lines.extend("  " + edge_line(e) for e in self.edges)
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
                attrs = dot_attrs(self._node_attrs(self.items[what]))
                lines.append(f"{pad}{quote(what)} [{attrs}];")
                continue
            lines.append(f"{pad}subgraph {quote('cluster_' + '/'.join(what))} {{")
            lines.append(f"{pad}  graph [{dot_attrs(self._cluster_attrs(what))}];")
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
                 "fillcolor": tint(fill), "style": "rounded,filled" + (",dashed" * grad),
                 "fontcolor": "#333333"}
        if len(path) > 1:
            attrs["fontsize"] = "10"
        return attrs

    def _node_attrs(self, item: Item) -> dict[str, str]:
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
                         label=html_label([(n.id, "b", None)]))
        elif n.role == "param":
            attrs.update(fontsize="9", height="0.3", margin="0.06,0.02",
                         label=html_label([(n.id.rsplit("/", 1)[-1], None, None),
                                           (dims(n.type.shape), None, 8)]))
        elif n.op == "const" and not n.scope and n.role != "backward":      # the user's own
            attrs["label"] = html_label([(n.id, "b", None), (f"const {const_text(n)}", None, 9)])
        elif n.op == "const":
            attrs.update(shape="ellipse", fontsize="9", height="0.25", width="0.3",
                         margin="0.03,0.01", label=html_label([(const_text(n), None, None)]))
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
            return html_label([(n.op, None, None)] + note)
        if not n.scope:                                  # a primitive the user wrote
            return html_label([(n.id, "b", None)] + ([(n.op, None, 9)] if n.op != n.id
                                                     else []) + note)
        return html_label([(local, None, None), (n.op, None, 8)] + note)

    def _box_label(self, item: Item) -> str:
        path = item.path
        grad = path[0].startswith(GRAD)
        key = "/".join(path).removeprefix(GRAD)
        title = ("∇ " if grad else "") + (key if len(path) == 1 else self._repeat_note(path))
        op = "" if grad and len(path) > 1 else self._op_text(key)
        ops = f"{item.count} op{'s' * (item.count != 1)}"
        if grad:
            detail = ops
        elif len(path) == 1 or key in getattr(self.g, "layers", {}):
            # a node the user wrote (in the spec or in a module): what it is, its parameters
            count, frozen = self._params(path)
            params = f"{count:,} param{'s' * (count != 1)}" + " (frozen)" * frozen
            owner = self._owner(path)
            if owner is not None:
                params, count = f"shares the parameters of {owner}", 1
            detail = " · ".join(p for p in (op, params if count else "") if p)
        else:                                   # a part of a composite: what it is made of
            detail = " · ".join(p for p in (op, ops) if p)
        return html_label([(title, "b", None)] + ([(detail, None, 9)] if detail else []))

    def _op_text(self, user: str) -> str:
        """``linear``, or ``linear + relu`` for a layer with a fused activation."""
        op = self.user_op.get(user, "")
        return f"{op} + {self.user_act[user]}" if user in self.user_act else op

    def _owner(self, path: tuple[str, ...]) -> str | None:
        """Whose parameters the node at ``path`` uses (``share:`` on it or on a module call
        around it); None: its own."""
        shared = getattr(self.g, "shared", {})
        for k in range(len(path), 0, -1):
            if "/".join(path[:k]) in shared:
                return "/".join((shared["/".join(path[:k])],) + path[k:])
        return None

    def _params(self, path: tuple[str, ...]) -> tuple[int, bool]:
        """The parameters of the spec node at ``path`` (a `param` node has no scope)."""
        ps = [p for p in self.g.params.values()
              if (p.scope or (p.node,))[:len(path)] == path]
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
                "label": html_label([ln for ln in lines if ln[0]])}


__all__ = ["Drawing", "edge_line"]
