"""Graph → ONNX model: spec layers ONNX has as one operator, the rest as primitives.

Layers with an ONNX operator of their own (``LAYERS``) are written from the spec node —
its op, attributes and parameters — and every primitive of their scope is skipped; all
other nodes are written one primitive at a time (``PRIMITIVES``). Named dims become
``dim_param``s, weights initializers, and the spec's name, doc and the dlgraph version go
into the model's metadata.
"""

from __future__ import annotations

import numpy as np

from dlgraph.engine.errors import GraphError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.onnx import layers as L
from dlgraph.engine.io.onnx.prims import PRIMITIVES
from dlgraph.engine.io.onnx.recurrent import recurrent
from dlgraph.engine.io.onnx.scan import export_loop
from dlgraph.engine.io.onnx.writer import Writer, value_info

OPSET = 21
OPSETS = range(17, 27)
"""Opsets offered: onnxruntime 1.31 ran 21–26 here; below 21 onnx's version converter
writes the model down."""
IR_VERSION = 10
"""onnx 1.23 stamps IR 14 by default, which onnxruntime 1.31 refuses (it reads up to 13)."""

LAYERS = {
    "linear": L.linear, "conv2d": L.conv, "conv1d": L.conv,
    "conv_transpose2d": L.conv_transpose,
    "max_pool2d": L.pool("MaxPool"), "avg_pool2d": L.pool("AveragePool", count_include_pad=1),
    "softmax": L.softmax("Softmax"), "log_softmax": L.softmax("LogSoftmax"),
    "layer_norm": L.layer_norm, "batch_norm": L.batch_norm, "embedding": L.embedding,
    "dropout": L.dropout,
    "rnn": recurrent("rnn"), "lstm": recurrent("lstm"), "gru": recurrent("gru"),
}
"""Spec op -> the rule writing it as ONNX operators (see :mod:`.layers`)."""


def named_dims(graph: Graph) -> dict[str, tuple[str, int]]:
    """Each named dim -> the first (input, axis) that carries it."""
    out: dict[str, tuple[str, int]] = {}
    for name, t in graph.inputs.items():
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                out.setdefault(d, (name, axis))
    return out


class _Export:
    """The state of one export: the writer, the value of each node, what was skipped."""

    def __init__(self, graph: Graph, params: dict[str, np.ndarray]):
        self.g, self.params = graph, params
        self.w = Writer(named_dims(graph))
        self.env: dict[str, str] = {}
        self.layer_of = {sid: nd.op for sid, nd in (graph.spec.nodes.items()
                                                    if graph.spec is not None else ())
                         if nd.op in LAYERS}
        self.done: set[str] = set()
        self.fallback: set[str] = set()
        self.missing: list[tuple[str, str]] = []
        self.multi: dict[str, list[str]] = {}      # a loop -> its outputs, read by picks
        self.needed: set[str] = set(graph.nodes)

    def value(self, nid: str) -> str:
        n = self.g[nid]
        if n.role == "param" and nid not in self.env:
            pname = nid.replace("/", ".")
            self.env[nid] = self.w.init(pname, np.asarray(self.params[pname], np.float32))
        if nid not in self.env:
            raise GraphError(f"the ONNX export has no value for '{nid}'", node=n.user_id,
                             op=n.op, help="this is a bug in dlgraph's ONNX export")
        return self.env[nid]

    def layer(self, sid: str) -> bool:
        """Write the spec layer `sid` as its ONNX operator; False: export its primitives."""
        if sid in self.done:
            return True
        if sid in self.fallback:
            return False
        nd = self.g.spec.nodes[sid]
        refs = [self.g.resolve(r) for r in nd.in_]
        lay = L.Layer(self.w, sid, nd, [self.value(r) for r in refs],
                      [self.g[r].type for r in refs], self.params,
                      {f: self.value(self.g.resolve(r)) for f, r in nd.refs() if f != "in"})
        self.w.prefix = sid
        try:
            outs = LAYERS[nd.op](lay)
        finally:
            self.w.prefix = ""
        if outs is None:
            self.fallback.add(sid)
            return False
        for k, v in outs.items():
            for ref in (f"{sid}.{k}",) + ((sid,) if k == next(iter(outs)) else ()):
                if ref in self.g.aliases:
                    self.env[self.g.aliases[ref]] = v
        self.done.add(sid)
        return True

    def node(self, nid: str) -> None:
        n = self.g[nid]
        if n.role == "input":
            self.env[nid] = nid
            return
        if n.role == "param" or nid in self.env:       # (a loop wrote some of its readers)
            return
        if n.scope and n.scope[0] in self.layer_of and self.layer(n.scope[0]):
            return
        if n.op == "loop":                  # a scan over a module: ONNX Scan (see .scan)
            self.multi[nid] = export_loop(self, n, _Export)
            return
        if n.op == "pick":
            outs = self.multi.get(n.inputs[0])
            if outs and outs[n.attrs.index]:
                self.env[nid] = outs[n.attrs.index]
            return
        rule = PRIMITIVES.get(n.op)
        if rule is None:
            self.missing.append((nid, n.op))
            return
        ins = [self.value(i) for i in n.inputs]
        self.env[nid] = rule(self.w, n, ins, [self.g[i].type for i in n.inputs])


def to_onnx(graph: Graph, params: dict[str, np.ndarray], *, opset: int = OPSET):
    """The ONNX ModelProto of a graph's inference pass (parameters as initializers).

    >>> m = to_onnx(dlgraph.load("graphs/mlp.yaml"), params)          # doctest: +SKIP
    """
    ex = _Export(graph, params)
    targets = [nid for nid in graph.outputs.values()]
    needed = graph.ancestors(targets)
    ex.needed = needed
    for nid in graph.nodes:
        if nid in needed:
            ex.node(nid)
    if ex.missing:
        listed = ", ".join(f"'{nid}' ({op})" for nid, op in ex.missing[:8])
        more = f" and {len(ex.missing) - 8} more" if len(ex.missing) > 8 else ""
        raise GraphError(f"no ONNX export for {len(ex.missing)} node(s): {listed}{more}",
                         help="these primitives have no ONNX rule; use layers that do "
                              "(see docs/onnx.md)")
    return _model(graph, ex, needed, opset)


def _model(graph: Graph, ex: _Export, needed: set[str], opset: int):
    import onnx
    from onnx import helper
    w = ex.w
    outputs = []
    for name, nid in graph.outputs.items():
        v = ex.value(nid)
        if v != name:
            w.op("Identity", v, out=name)
        outputs.append(value_info(name, graph[nid].type))
    inputs = [value_info(n, t) for n, t in graph.inputs.items() if n in needed]
    g = helper.make_graph(w.nodes, graph.name, inputs, outputs, list(w.inits.values()))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", max(opset, OPSET))],
                              producer_name="dlgraph", producer_version=_version())
    model.ir_version = IR_VERSION
    spec = graph.spec
    doc = (getattr(spec, "doc", None) or "").strip()
    model.doc_string = doc
    helper.set_model_props(model, {"name": graph.name, "doc": doc,
                                   "dlgraph_version": _version()})
    if opset < OPSET:
        model = onnx.version_converter.convert_version(model, opset)
        model.ir_version = IR_VERSION
    return model


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dlgraph")
    except PackageNotFoundError:
        return "0.1.0"
