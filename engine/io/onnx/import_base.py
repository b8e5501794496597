"""The pieces every ONNX import rule works with: the :class:`Importer` state (values, ids,
shapes, weights), :class:`Value`, :class:`Unsupported` and the naming helpers. The rules
(:mod:`.import_ops` and the tables over it) and the driver (:mod:`.importer`) both build
on this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

OPSET = 21


class Unsupported(Exception):
    """One ONNX node that cannot be imported, and why."""


@dataclass
class Value:
    """What one ONNX value is in the spec."""

    ref: str | None = None              # a spec ref: input name, node id or `id.output`
    const: np.ndarray | None = None     # known at import time
    shape_of: str | None = None         # the run-time shape of this ONNX value
    dynamic: bool = False               # run-time shape arithmetic (read from inferred types)
    zeros: bool = False                 # zeros of a run-time shape (an initial state, say)
    dims: tuple | None = None           # a run-time shape's dims, names included ('batch', 8)
    view: object = None                 # a regrouped spec tensor (views.View), made on use


def valid_id(text: str) -> str:
    """A spec identifier made of an ONNX name: '/fc1/Gemm' -> 'fc1_Gemm'."""
    s = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    return s if s and not s[0].isdigit() else f"n_{s}"


def _dims(tp) -> tuple | None:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    out = []
    for d in tp.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and not d.dim_param.startswith("unk__"):
            out.append(valid_id(d.dim_param))
        else:
            out.append(None)
    return tuple(out)


DTYPES = {1: "float32", 11: "float32", 6: "int32", 7: "int32", 9: "bool"}
"""ONNX elem type -> dlgraph dtype (double and int64 are narrowed)."""


class Importer:
    """The state of one import: values, spec nodes in order, weights, what failed."""

    def __init__(self, model, rules: dict):
        from onnx import numpy_helper
        self.model, g = model, model.graph
        self.rules = rules          # ONNX operator type -> import rule (importer.RULES)
        self.values: dict[str, Value] = {}
        self.shapes: dict[str, tuple | None] = {}
        self.dtypes: dict[str, str] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self.shapes[vi.name] = _dims(vi.type)
            self.dtypes[vi.name] = DTYPES.get(vi.type.tensor_type.elem_type, "float32")
        for t in g.initializer:
            self.values[t.name] = Value(const=numpy_helper.to_array(t))
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.nodes: dict[str, dict] = {}
        self.origin: dict[str, list[str]] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.taken: set[str] = set()
        self.absorbed: set[int] = set()
        self.failed: list[tuple[str, str, str]] = []
        self.input_ids: dict[str, str] = {}          # ONNX graph input -> spec input
        self.modules: dict[str, dict] = {}             # a Scan's body -> its module
        self.module_origins: dict[str, dict[str, list[str]]] = {}

    # -- values -----------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        v = self.values.get(name)
        return None if v is None else v.const

    def peek(self, name: str) -> np.ndarray | None:
        """A constant, also one whose Constant node comes later in the file."""
        c = self.const(name)
        if c is None:
            from onnx import numpy_helper
            for n in self.model.graph.node:
                if n.op_type == "Constant" and name in n.output and n.attribute[0].name == "value":
                    return numpy_helper.to_array(n.attribute[0].t)
        return c

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def ref(self, name: str) -> str:
        """The spec ref of an ONNX value; a constant becomes a const or frozen param node."""
        v = self.values[name]
        if v.ref is not None:
            return v.ref
        if v.view is not None:
            v.ref = v.view.materialize(self)
            return v.ref
        if v.const is None:
            raise Unsupported(f"'{name}' is computed from shapes at run time")
        c = v.const
        if c.size == 1 and c.ndim == 0:
            kind = "bool" if c.dtype == np.bool_ else "int32" if c.dtype.kind in "iu" \
                else "float32"
            # -inf (an additive mask) is -1e9, as in weights files below
            v.ref = self.add(f"{name}_const", "const", [], [name], dtype=kind,
                             value=float(np.clip(c, -1e9, 1e9)) if kind == "float32"
                             else float(c))
        elif c.dtype.kind == "f":
            v.ref = self.add(name, "param", [], [name], shape=list(c.shape), init="zeros",
                             trainable=False)
            # weights files hold finite floats: an additive mask's -inf is dlgraph's -1e9
            # (exp(-1e9 - max) is 0 in float32 as well)
            self.weights[v.ref] = np.clip(c, -1e9, 1e9).astype(np.float32) \
                if np.isinf(c).any() else c.astype(np.float32)
        else:
            raise Unsupported(f"the {c.dtype} tensor '{name}' cannot be a value of the graph")
        return v.ref

    def fresh(self, hint: str) -> str:
        """A new node id; the ids of graph outputs are kept for the nodes making them."""
        mine = hint.startswith("=")          # hint() marks the name of a graph output so
        parts = [p for p in re.split(r"[/:]", hint.lstrip("=")) if p]
        base = valid_id("_".join(parts)) if parts else "node"
        reserved = {valid_id(o) for o in self.outputs} - ({base} if mine else set())
        nid, k = base, 2
        while nid in self.taken or nid in reserved:
            nid, k = f"{base}_{k}", k + 1
        self.taken.add(nid)
        return nid

    def add(self, hint: str, op: str, ins: list[str], origin: list[str], **fields) -> str:
        """Append a spec node; returns its id."""
        nid = self.fresh(hint)
        node = {"op": op}
        if ins:
            node["in"] = ins[0] if len(ins) == 1 else list(ins)
        node.update({k: v for k, v in fields.items() if v is not None})
        self.nodes[nid] = node
        self.origin[nid] = origin
        return nid

    def rename(self, old: str, hint: str) -> str:
        """Give the spec node `old` the id of a graph output (its value's ONNX name)."""
        new = self.fresh("=" + hint)
        self.nodes = {new if k == old else k: v for k, v in self.nodes.items()}
        self.origin[new] = self.origin.pop(old)
        swap = lambda r: new + r[len(old):] if r == old or r.startswith(old + ".") else r
        for nd in self.nodes.values():
            if "in" in nd:
                nd["in"] = swap(nd["in"]) if isinstance(nd["in"], str) else \
                    [swap(r) for r in nd["in"]]
        for v in self.values.values():
            v.ref = swap(v.ref) if v.ref else v.ref
        self.weights = {swap(k.split(".")[0]) + k[len(k.split(".")[0]):]: w
                        for k, w in self.weights.items()}
        self.taken.discard(old)
        return new

    def bind(self, name: str, ref: str) -> None:
        self.values[name] = Value(ref=ref)

    def sole_consumer(self, name: str, op_types: tuple[str, ...]):
        """The one node reading `name`, if it is of one of these types and `name` is not
        a graph output (so it can be folded into its producer)."""
        cs = self.consumers.get(name, [])
        if len(cs) == 1 and cs[0].op_type in op_types and name not in self.outputs:
            return cs[0]
        return None

    def absorb(self, node) -> None:
        self.absorbed.add(id(node))

    def prune(self, outputs: list[str]) -> None:
        """Drop spec nodes no output depends on (shape helpers folded away, say)."""
        keep, stack = set(), [r.split(".")[0] for r in outputs]
        while stack:
            nid = stack.pop()
            if nid in keep or nid not in self.nodes:
                continue
            keep.add(nid)
            ins = self.nodes[nid].get("in", [])
            stack.extend(r.split(".")[0] for r in ([ins] if isinstance(ins, str) else ins))
        for nid in [n for n in self.nodes if n not in keep]:
            del self.nodes[nid]
            for k in [k for k in self.weights if k == nid or k.startswith(nid + ".")]:
                del self.weights[k]
        used = {nd.get("body") for nd in self.nodes.values() if nd["op"] == "scan"}
        for name in [m for m in self.modules if m not in used]:
            del self.modules[name]


def hint(node, imp: Importer | None = None) -> str:
    """An id hint from an ONNX node: its graph output's name, else its name minus the op."""
    if imp is not None:
        for o in node.output:
            if o in imp.outputs:
                return "=" + o
    parts = [p for p in re.split(r"[/:]", node.name or "") if p]
    if parts and len(parts) > 1 and parts[-1].split("_")[0] in (node.op_type, node.op_type
                                                                 .lower()):
        parts = parts[:-1]
    return "_".join(parts) or node.op_type.lower()


def origin(node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


