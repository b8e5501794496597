"""Graph → ONNX model: spec layers ONNX has as one operator, the rest as primitives.

Layers with an ONNX operator of their own (``LAYERS``) are written from the spec node —
its op, attributes and parameters — and every primitive of their scope is skipped, at any
depth of modules (``graph.layers``) and in loop bodies; all other nodes are written one
primitive at a time (``PRIMITIVES``). A primitive without a rule (``windows`` outside a
conv) stops the export with one located error listing all of them. Named dims become
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
from dlgraph.ops import REGISTRY

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


def layer_specs(graph: Graph) -> dict[tuple[str, ...], object]:
    """The scope of every spec layer ONNX has one operator for -> its spec node: the
    spec's own nodes and the nodes of modules at any depth (``graph.layers``)."""
    out: dict[tuple[str, ...], object] = {}
    if graph.spec is not None:
        out.update({(sid,): nd for sid, nd in graph.spec.nodes.items() if nd.op in LAYERS})
    out.update({tuple(path.split("/")): nd for path, nd in graph.layers.items()
                if nd.op in LAYERS})
    return out


def param_prefix(graph: Graph, scope: tuple[str, ...]) -> str:
    """The checkpoint name prefix of a layer's parameters: its own scope, or the scope of
    the node it shares them with (``share:``, on it or on a module call around it)."""
    for k in range(len(scope), 0, -1):
        owner = graph.shared.get("/".join(scope[:k]))
        if owner is not None:
            return param_prefix(graph, tuple(owner.split("/")) + scope[k:])
    return ".".join(scope)


def spec_node_of(graph: Graph, n) -> tuple[str, str]:
    """(scope path, op) of the innermost spec node a primitive was expanded from."""
    for k in range(len(n.scope), 1, -1):
        path = "/".join(n.scope[:k])
        if path in graph.layers:
            return path, graph.layers[path].op
    if n.scope and graph.spec is not None and n.scope[0] in graph.spec.nodes:
        return n.scope[0], graph.spec.nodes[n.scope[0]].op
    return n.user_id, n.op


class _Export:
    """The state of one export: the writer, the value of each node, what was skipped."""

    def __init__(self, graph: Graph, params: dict[str, np.ndarray]):
        self.g, self.params = graph, params
        self.w = Writer(named_dims(graph))
        self.env: dict[str, str] = {}
        self.specs = layer_specs(graph)
        self.members: dict[tuple[str, ...], list[str]] = {}   # layer scope -> its nodes
        for nid, n in graph.nodes.items():
            for k in range(1, len(n.scope) + 1):
                if n.scope[:k] in self.specs:
                    self.members.setdefault(n.scope[:k], []).append(nid)
        self.readers: dict[str, list[str]] = {}
        for nid, n in graph.nodes.items():
            for i in n.inputs:
                self.readers.setdefault(i, []).append(nid)
        self.done: set[tuple[str, ...]] = set()
        self.free: set[str] = set()            # a layer's activation, written as primitives
        self.fallback: set[tuple[str, ...]] = set()
        self.missing: list = []                    # nodes with no ONNX rule (loop bodies' too)
        self.multi: dict[str, list[str] | None] = {}   # a loop -> its outputs, read by picks
        self.needed: set[str] = set(graph.nodes)

    def value(self, nid: str) -> str:
        n = self.g[nid]
        if n.role == "param" and nid not in self.env:
            pname = nid.replace("/", ".")
            self.env[nid] = self.w.init(pname, np.asarray(self.params[pname], np.float32))
        if nid not in self.env:
            raise GraphError(f"the ONNX export has no value for '{nid}'", node=n.user_id,
                             op=n.op, source=n.source,
                             help="this is a bug in dlgraph's ONNX export")
        return self.env[nid]

    def is_param(self, nid: str) -> bool:
        """A parameter: its node, or a loop body's input standing for it."""
        n = self.g[nid]
        return n.role == "param" or n.role == "input" and nid.replace("/", ".") in self.params

    def _wiring(self, scope: tuple[str, ...], nd):
        """(input node ids, {output name: the node ids whose value it is}) of the layer at
        `scope`, or None where they cannot be told apart (its primitives are exported)."""
        if len(scope) == 1:                # a node of the spec itself: its refs by name
            sid = scope[0]
            outs = {k: [self.g.aliases[f"{sid}.{k}"]] for k in REGISTRY[nd.op].outputs
                    if f"{sid}.{k}" in self.g.aliases}
            return [self.g.resolve(r) for r in nd.in_], outs
        # inside a module the spec node's `in` are the module's own names: read the
        # layer's wiring off the graph (its values in, and the one value it hands on)
        members = set(self.members[scope])
        refs = {self.g.resolve(r) for f, r in nd.refs() if f != "in"}
        ins = list(dict.fromkeys(i for m in self.members[scope] for i in self.g[m].inputs
                                 if i not in members and i not in refs
                                 and not self.is_param(i)))    # (shared: the owner's)
        exits = {m for m in members if self.g[m].role != "param" and (
            m in self.g.outputs.values() or any(
            c in self.needed and c not in members for c in self.readers.get(m, ())))}
        if len(nd.in_) != 1 or len(ins) != 1 or len(REGISTRY[nd.op].outputs) != 1 \
                or len(exits) != 1:
            return None
        return ins, {REGISTRY[nd.op].outputs[0]: list(exits)}

    def _pre_activation(self, scope: tuple[str, ...], act: str) -> str | None:
        """The node holding a layer's value before its `activation` (an op ONNX lacks):
        the activation's own nodes are then exported as primitives, reading it."""
        members = self.members[scope]
        mine = {m for m in members if self.g[m].scope[len(scope):len(scope) + 1] == (act,)
                or self.g[m].scope == scope and self.g[m].op == act}
        pre = {i for m in mine for i in self.g[m].inputs if i not in mine and i in members}
        if len(pre) != 1:
            return None
        self.free.update(mine)
        return pre.pop()

    def layer(self, scope: tuple[str, ...]) -> bool:
        """Write the spec layer at `scope` as its ONNX operator; False: export its primitives."""
        if scope in self.done:
            return True
        if scope in self.fallback:
            return False
        nd = self.specs[scope]
        wiring = self._wiring(scope, nd)
        if wiring is None:
            self.fallback.add(scope)
            return False
        refs, targets = wiring
        act = getattr(nd, "activation", None)
        if act is not None and act not in L.ACTIVATIONS:
            pre = self._pre_activation(scope, act)
            if pre is None:
                self.fallback.add(scope)
                return False
            nd, targets = nd.model_copy(update={"activation": None}), {"out": [pre]}
        lay = L.Layer(self.w, "/".join(scope), nd, [self.value(r) for r in refs],
                      [self.g[r].type for r in refs], self.params,
                      {f: self.value(self.g.resolve(r)) for f, r in nd.refs() if f != "in"},
                      owner=param_prefix(self.g, scope))
        outer = self.w.prefix                 # a loop body's values are named under its loop
        self.w.prefix = f"{outer}/{lay.sid}" if outer else lay.sid
        try:
            outs = LAYERS[nd.op](lay)
        finally:
            self.w.prefix = outer
        if outs is None:
            self.fallback.add(scope)
            return False
        for k, v in outs.items():
            for nid in targets.get(k, ()):
                self.env[nid] = v
        self.done.add(scope)
        return True

    def node(self, nid: str) -> None:
        n = self.g[nid]
        if n.role == "input":
            self.env[nid] = nid
            return
        if n.role == "param" or nid in self.env:       # (a loop wrote some of its readers)
            return
        layer = next((n.scope[:k] for k in range(1, len(n.scope) + 1)
                      if n.scope[:k] in self.specs), None)
        if layer is not None and nid not in self.free and self.layer(layer):
            return
        if n.op == "loop":                  # a scan over a module: ONNX Scan (see .scan)
            before = len(self.missing)
            self.multi[nid] = export_loop(self, n, _Export)
            if len(self.missing) > before:
                self.multi[nid] = None
            return
        if n.op == "pick":
            outs = self.multi[n.inputs[0]]
            if outs is None:                 # its body has a primitive ONNX lacks (below)
                self.env[nid] = nid
            elif outs[n.attrs.index]:
                self.env[nid] = outs[n.attrs.index]
            return
        rule = PRIMITIVES.get(n.op)
        if rule is None:
            self.missing.append(n)
            self.env[nid] = nid      # a stand-in: the export goes on only to list them all
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
        listed = ", ".join(f"'{n.id}' ({n.op})" for n in ex.missing[:8])
        more = f" and {len(ex.missing) - 8} more" if len(ex.missing) > 8 else ""
        first = ex.missing[0]
        node, op = spec_node_of(graph, first)
        raise GraphError(f"no ONNX export for {len(ex.missing)} primitive(s): {listed}{more}",
                         node=node, op=op, source=first.source,
                         help="ONNX has no operator for these primitives of dlgraph; write "
                              "the node with layers and ops that export (see docs/onnx.md)")
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
