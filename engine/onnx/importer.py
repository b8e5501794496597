"""ONNX model → a spec a person can read, and its weights as safetensors.

Each ONNX node becomes spec nodes through the table in :mod:`.import_ops`: recognised
patterns fold back into layers (Gemm → linear, Conv → conv2d, LSTM → lstm, ...), the rest
map to primitives. Values known at import time (initializers, Constant nodes, shape
arithmetic on them) are folded; shape computations at run time are read from ONNX's shape
inference instead. Every ONNX node that cannot be imported is listed in one error, and
nothing is written until the spec has been loaded and checked against its weights.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from dlgraph.engine.errors import DataError, DlgraphError, Source, SpecError

from .formats import require_onnx

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

    def __init__(self, model):
        from onnx import numpy_helper
        self.model, g = model, model.graph
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
        if v.const is None:
            raise Unsupported(f"'{name}' is computed from shapes at run time")
        c = v.const
        if c.size == 1 and c.ndim == 0:
            kind = "bool" if c.dtype == np.bool_ else "int32" if c.dtype.kind in "iu" \
                else "float32"
            v.ref = self.add(f"{name}_const", "const", [], [name], value=float(c), dtype=kind)
        elif c.dtype.kind == "f":
            v.ref = self.add(name, "param", [], [name], shape=list(c.shape), init="zeros",
                             trainable=False)
            self.weights[v.ref] = c.astype(np.float32)
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


def run_nodes(imp: Importer) -> None:
    from .import_ops import OPS
    for node in imp.model.graph.node:
        if id(node) in imp.absorbed:
            continue
        rule = OPS.get(node.op_type)
        try:
            if rule is None:
                raise Unsupported("no dlgraph rule for this operator")
            missing = [i for i in node.input if i and i not in imp.values]
            if missing:
                continue            # an input failed already; that node is listed
            rule(imp, node)
        except Unsupported as e:
            label = node.name or next((o for o in node.output if o), node.op_type)
            imp.failed.append((label, node.op_type, str(e)))


def _inputs(imp: Importer) -> dict[str, dict]:
    inits = {t.name for t in imp.model.graph.initializer}
    out = {}
    for vi in imp.model.graph.input:
        if vi.name in inits:
            continue
        shape = imp.shape(vi.name)
        if shape is None or None in shape:
            shape = tuple("batch" if d is None else d for d in (shape or ()))
        nid = imp.fresh(vi.name)
        imp.bind(vi.name, nid)
        imp.input_ids[vi.name] = nid
        entry = {"shape": list(shape)}
        if imp.dtypes[vi.name] == "bool":
            imp.failed.append((vi.name, "input", "bool graph inputs (dlgraph's inputs are "
                                                 "float32 or int32)"))
        if imp.dtypes[vi.name] != "float32":
            entry["dtype"] = imp.dtypes[vi.name]
        out[nid] = entry
    return out


def prepare(path: Path):
    """Load, convert to opset 21 and infer shapes; unknown input dims get names."""
    onnx = require_onnx("ONNX import")
    try:
        model = onnx.load(str(path))
    except (OSError, Exception) as e:  # protobuf raises its own DecodeError
        if not Path(path).is_file():
            raise DataError(f"no such ONNX file: {path}", source=Source(str(path))) from None
        raise DataError(f"not a readable ONNX model: {e}", source=Source(str(path))) from None
    return prepare_model(model)


def prepare_model(model):
    """Convert a ModelProto to opset 21 and infer shapes; unknown input dims get names."""
    from onnx import shape_inference, version_converter
    have = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               default=OPSET)
    # the rules read opsets 13 on as they are (axes as attributes or inputs); older models
    # (Softmax over flattened axes, say) and newer ones go through onnx's converter
    if not 13 <= have <= OPSET:
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception:  # the converter lacks some adapters; the model may still import
            pass
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and not d.HasField("dim_param"):
                d.dim_param = "batch" if i == 0 else f"{valid_id(vi.name)}_d{i}"
    return shape_inference.infer_shapes(model, data_prop=True)


def to_spec(imp: Importer, name: str) -> dict:
    inputs = _inputs(imp)
    run_nodes(imp)
    outputs = []
    for o in imp.model.graph.output:
        try:
            outputs.append(imp.ref(o.name) if o.name in imp.values else None)
        except Unsupported as e:
            imp.failed.append((o.name, "output", str(e)))
    if imp.failed:
        listed = "; ".join(f"'{n}' ({op}): {why}" for n, op, why in imp.failed[:12])
        more = f"; and {len(imp.failed) - 12} more" if len(imp.failed) > 12 else ""
        ops = sorted({op for _, op, _ in imp.failed})
        raise SpecError(f"{len(imp.failed)} ONNX node(s) cannot be imported: {listed}{more}",
                        help=f"operators without a dlgraph rule here: {', '.join(ops)} "
                             "(see docs/onnx.md); nothing was written")
    prune(imp, outputs)
    doc = imp.model.doc_string or f"Imported from ONNX ({imp.model.producer_name or 'unknown'} "\
        f"{imp.model.producer_version}).".replace(" )", ")")
    return {"dlgraph": 1, "name": name, "doc": doc.strip(), "inputs": inputs,
            "nodes": imp.nodes, "outputs": outputs}


def prune(imp: Importer, outputs: list[str]) -> None:
    """Drop spec nodes no output depends on (shape helpers folded away, say)."""
    keep, stack = set(), [r.split(".")[0] for r in outputs]
    while stack:
        nid = stack.pop()
        if nid in keep or nid not in imp.nodes:
            continue
        keep.add(nid)
        ins = imp.nodes[nid].get("in", [])
        stack.extend(r.split(".")[0] for r in ([ins] if isinstance(ins, str) else ins))
    for nid in [n for n in imp.nodes if n not in keep]:
        del imp.nodes[nid]
        for k in [k for k in imp.weights if k == nid or k.startswith(nid + ".")]:
            del imp.weights[k]


def dump_spec(spec: dict, origins: dict[str, list[str]]) -> str:
    """The spec as YAML: one line per node, with a comment naming its ONNX origin."""
    flow = lambda v: yaml.safe_dump(v, default_flow_style=True, sort_keys=False,
                                    width=10**6).strip().removesuffix("...").strip()
    lines = ["dlgraph: 1", f"name: {flow(spec['name'])}",
             "doc: >", textwrap.fill(" ".join(spec["doc"].split()) or "(none)", 90,
                                     initial_indent="  ", subsequent_indent="  "),
             "", "inputs:"]
    lines += [f"  {k}: {flow(v)}" for k, v in spec["inputs"].items()]
    lines += ["", "nodes:" if spec["nodes"] else "nodes: {}"]
    for nid, nd in spec["nodes"].items():
        where = ", ".join(origins.get(nid, []))
        lines.append(f"  {nid}: {flow(nd)}" + (f"   # onnx: {where}" if where else ""))
    lines += ["", f"outputs: {flow(spec['outputs'])}", ""]
    return "\n".join(lines)


def import_proto(model, name: str | None = None, base: Path | None = None):
    """An in-memory import: (spec text, weights, the loaded Graph, the Importer)."""
    from dlgraph.engine.build import load_graph
    imp = Importer(model)
    spec = to_spec(imp, name or valid_id(model.graph.name or "model").replace("_", "-"))
    text = dump_spec(spec, imp.origin)
    g = load_graph(text, base=base or Path.cwd())
    wrong = {k for k in g.params if k not in imp.weights
             or tuple(imp.weights[k].shape) != g.params[k].shape}
    if wrong or set(imp.weights) - set(g.params):
        raise DlgraphError(f"the imported spec and its weights disagree on {sorted(wrong)}",
                           help="this is a bug in dlgraph's ONNX import")
    return text, imp.weights, g, imp


def import_model(path: Path, out_spec: Path, *, name: str | None = None):
    """See :func:`dlgraph.import_onnx`."""
    from dlgraph.engine.checkpoint import atomic_write, save_tensors
    model = prepare(path)
    text, weights, _, _ = import_proto(model, name or valid_id(model.graph.name or path.stem)
                                       .replace("_", "-"), out_spec.parent)
    wpath = out_spec.with_suffix(".safetensors")
    save_tensors(wpath, weights, {"source": str(path.name)})
    atomic_write(out_spec, text.encode())
    return out_spec, wpath
