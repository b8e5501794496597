"""ONNX model → a spec a person can read, and its weights as safetensors.

Each ONNX node becomes spec nodes through :data:`RULES`, one table assembled here from the
rule tables of :mod:`.import_ops` (one operator at a time), :mod:`.import_views` (reshapes
and transposes followed as views), :mod:`.import_fold` (patterns folded back into layers)
and :mod:`.import_scan` (Scan): recognised patterns fold back into layers (Gemm → linear,
Conv → conv2d, LSTM → lstm, ...), the rest map to primitives. Values known at import time
(initializers, Constant nodes, shape arithmetic on them) are folded; shape computations at
run time are read from ONNX's shape inference instead. Every ONNX node that cannot be
imported is listed in one error, and nothing is written until the spec has been loaded and
checked against its weights.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from dlgraph.engine.errors import DataError, DlgraphError, Source, SpecError
from dlgraph.engine.io.onnx.fold_attention import fold_attention
from dlgraph.engine.io.onnx.formats import require_onnx
from dlgraph.engine.io.onnx.import_base import OPSET, Importer, Unsupported, valid_id
from dlgraph.engine.io.onnx.import_checks import (
    check_declared,
    check_float64,
    check_graph,
    check_ranges,
)
from dlgraph.engine.io.onnx.import_fold import FOLD_RULES
from dlgraph.engine.io.onnx.import_nn import NN_RULES
from dlgraph.engine.io.onnx.import_ops import OPERATOR_RULES
from dlgraph.engine.io.onnx.import_scan import SCAN_RULES, run_nodes
from dlgraph.engine.io.onnx.import_views import VIEW_RULES

RULES = {**OPERATOR_RULES, **NN_RULES, **VIEW_RULES, **FOLD_RULES, **SCAN_RULES}
"""ONNX operator type -> its import rule: the importer's one table. A later table takes an
operator over from an earlier one (a view or fold rule hands the cases it does not handle
back to the operator's rule in :data:`.import_ops.OPERATOR_RULES`; :data:`.import_nn.NN_RULES`
holds operators that map onto a few dlgraph ops)."""


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
            # dlgraph's inputs are float32 or int32: a mask is fed as int32 0/1, cast here
            entry["dtype"] = "int32"
            imp.bind(vi.name, imp.add(f"{nid}_bool", "cast", [nid],
                                      [f"bool input '{vi.name}', fed as int32 0/1"],
                                      dtype="bool"))
        elif imp.dtypes[vi.name] != "float32":
            entry["dtype"] = imp.dtypes[vi.name]
        out[nid] = entry
    return out


def prepare(path: Path):
    """Load, convert to opset 21 and infer shapes; unknown input dims get names."""
    onnx = require_onnx("ONNX import")
    try:
        # weights in files beside the model are read only once their sizes are checked
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, Exception) as e:  # protobuf raises its own DecodeError
        if not Path(path).is_file():
            raise DataError(f"no such ONNX file: {path}", source=Source(str(path))) from None
        raise DataError(f"not a readable ONNX model: {e}", source=Source(str(path))) from None
    check_declared(model, path)
    try:
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(model, str(Path(path).parent))
    except (OSError, Exception) as e:  # onnx refuses paths outside the model's folder
        raise DataError(f"cannot read the model's external weights: {e}",
                        source=Source(str(path)),
                        help="keep the weights files beside the .onnx file, as exported") \
            from None
    return prepare_model(model, path)


def prepare_model(model, path=None):
    """Check what a ModelProto declares (sizes, float64 values; :mod:`.import_checks`),
    convert it to opset 21 and infer shapes; unknown input dims get names."""
    from onnx import shape_inference, version_converter
    where = path or f"ONNX model '{model.graph.name}'"
    check_graph(model, where)
    check_declared(model, where)
    check_float64(model, where)
    check_ranges(model, where)
    have = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               default=OPSET)
    # the rules read opsets 13 on as they are (axes as attributes or inputs); older models
    # (Softmax over flattened axes, say) and newer ones go through onnx's converter
    if not 13 <= have <= OPSET:
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception:  # the converter lacks some adapters; the model may still import
            pass
    if have < 9 and any(n.op_type == "Scan" for n in model.graph.node):
        # opset 8's Scan has a batch axis and sequence lengths; the converter drops both
        # from the graph's declared inputs, so its Scan cannot be trusted after conversion
        from onnx import helper
        helper.set_model_props(model, {"dlgraph_scan_opset": str(have)})
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and not d.HasField("dim_param"):
                d.dim_param = "batch" if i == 0 else f"{valid_id(vi.name)}_d{i}"
    model = shape_inference.infer_shapes(model, data_prop=True)
    check_declared(model, where)        # sizes shape inference derived (Expand, Tile, ...)
    return model


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
    imp.prune(outputs)
    doc = imp.model.doc_string or f"Imported from ONNX ({imp.model.producer_name or 'unknown'} "\
        f"{imp.model.producer_version}).".replace(" )", ")")
    return {"dlgraph": 1, "name": name, "doc": doc.strip(), "inputs": inputs,
            "modules": imp.modules, "nodes": imp.nodes, "outputs": outputs}


def _node_lines(nodes: dict, origins: dict, indent: str, flow) -> list[str]:
    out = []
    for nid, nd in nodes.items():
        where = ", ".join(origins.get(nid, []))
        out.append(f"{indent}{nid}: {flow(nd)}" + (f"   # onnx: {where}" if where else ""))
    return out


def dump_spec(spec: dict, origins: dict[str, list[str]],
              module_origins: dict | None = None) -> str:
    """The spec as YAML: one line per node, with a comment naming its ONNX origin."""
    module_origins = module_origins or {}
    flow = lambda v: yaml.safe_dump(v, default_flow_style=True, sort_keys=False,
                                    width=10**6).strip().removesuffix("...").strip()
    lines = ["dlgraph: 1", f"name: {flow(spec['name'])}",
             "doc: >", textwrap.fill(" ".join(spec["doc"].split()) or "(none)", 90,
                                     initial_indent="  ", subsequent_indent="  "),
             "", "inputs:" if spec["inputs"] else "inputs: {}"]
    lines += [f"  {k}: {flow(v)}" for k, v in spec["inputs"].items()]
    if spec.get("modules"):
        lines += ["", "modules:"]
        for name, m in spec["modules"].items():
            lines += [f"  {name}:", f"    inputs: {flow(m['inputs'])}", "    nodes:"]
            lines += _node_lines(m["nodes"], module_origins.get(name, {}), "      ", flow)
            lines.append(f"    outputs: {flow(m['outputs'])}")
    lines += ["", "nodes:" if spec["nodes"] else "nodes: {}"]
    lines += _node_lines(spec["nodes"], origins, "  ", flow)
    lines += ["", f"outputs: {flow(spec['outputs'])}", ""]
    return "\n".join(lines)


def import_proto(model, name: str | None = None, base: Path | None = None):
    """An in-memory import: (spec text, weights, the loaded Graph, the Importer)."""
    from dlgraph.engine.graph.build import load_graph
    imp = Importer(model, RULES)
    spec = to_spec(imp, name or valid_id(model.graph.name or "model").replace("_", "-"))
    text = dump_spec(spec, imp.origin, imp.module_origins)
    g = load_graph(text, base=base or Path.cwd())
    if fold_attention(imp, g, spec["outputs"]):
        imp.prune(spec["outputs"])
        spec["nodes"] = imp.nodes
        text = dump_spec(spec, imp.origin, imp.module_origins)
        g = load_graph(text, base=base or Path.cwd())
    wrong = {k for k in g.params if k not in imp.weights
             or tuple(imp.weights[k].shape) != g.params[k].shape}
    if wrong or set(imp.weights) - set(g.params):
        raise DlgraphError(f"the imported spec and its weights disagree on {sorted(wrong)}",
                           help="this is a bug in dlgraph's ONNX import")
    return text, imp.weights, g, imp


def import_model(path: Path, out_spec: Path, *, name: str | None = None,
                 force: bool = False):
    """See :func:`dlgraph.import_onnx`. Both files are checked before the import starts
    (engine/io/outputs.py: a file is replaced only if dlgraph wrote it, or with ``force``)."""
    from dlgraph.engine.io.outputs import check_output, write_output
    from dlgraph.engine.train.checkpoint import tensors_bytes
    wpath = out_spec.with_suffix(".safetensors")
    for p in (out_spec, wpath):
        check_output(p, force=force)
    text, weights = import_file(path, out_spec, name)
    write_output(wpath, tensors_bytes(weights, {"source": str(path.name)}), force=force)
    write_output(out_spec, text.encode(), force=force)
    return out_spec, wpath


def import_file(path: Path, out_spec: Path, name: str | None = None) -> tuple[str, dict]:
    """The spec text and weights of an ONNX file; every error names the file (the spec
    written from it is never a file a user has seen, so its lines mean nothing to them)."""
    require_onnx("ONNX import")          # a missing package is not the file's fault
    try:
        model = prepare(path)
        text, weights, _, _ = import_proto(model, name or valid_id(
            model.graph.name or path.stem).replace("_", "-"), out_spec.parent)
    except DlgraphError as e:
        if e.source is None or e.source.file == "<string>":
            e.source = Source(str(path))
        raise
    return text, weights
