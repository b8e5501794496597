"""Spec → Graph: check references, schedule the spec's nodes, expand composites.

The :class:`Builder` is the one way nodes come into being: spec nodes, the primitives a
composite expands to, and the backward nodes VJP rules emit all go through
:meth:`Builder.emit`, which validates attributes and infers the output type on the spot.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import networkx as nx

from dlgraph.ops import REGISTRY

from .errors import CycleError, DlgraphError, GraphError, ShapeError, Source, SpecError
from .ir import Graph, Node, Param, schedule
from .spec import suggest
from .types import TType


class Builder:
    """Emits nodes into a graph, inferring types as it goes.

    >>> from dlgraph.engine.types import TType
    >>> b = Builder(Graph())
    >>> x = b.input("x", TType(("batch", 3)))
    >>> y = b.emit("relu", x)
    >>> b.graph[y].type
    TType(shape=('batch', 3), dtype='float32')
    """

    def __init__(self, graph: Graph, seed_scope: tuple[str, ...] = ()):
        self.graph = graph
        self.scope: tuple[str, ...] = seed_scope
        self.source: Source | None = None
        self.user: tuple[str, str] | None = None     # (spec node id, op) for error messages
        self.role = "forward"
        self.origin: str | None = None
        self._counts: dict[str, int] = {}

    # -- context -----------------------------------------------------------------------
    @contextlib.contextmanager
    def within(self, name: str):
        """Nodes emitted inside get ids ``<scope>/<name>/...`` and remember the scope."""
        saved = self.scope
        self.scope = saved + (name,)
        try:
            yield
        finally:
            self.scope = saved

    def _fresh(self, local: str) -> str:
        base = "/".join(self.scope + (local,))
        if base not in self.graph.nodes and base not in self.graph.inputs:
            return base
        k = self._counts.get(base, 1)
        while f"{base}_{k}" in self.graph.nodes:
            k += 1
        self._counts[base] = k + 1
        return f"{base}_{k}"

    def type(self, nid: str) -> TType:
        return self.graph.nodes[nid].type

    def shape(self, nid: str) -> tuple:
        return self.graph.nodes[nid].type.shape

    # -- emitting ----------------------------------------------------------------------
    def input(self, name: str, t: TType) -> str:
        self.graph.inputs[name] = t
        self.graph.nodes[name] = Node(name, "input", None, (), t, role="input",
                                      source=self.source)
        return name

    def emit(self, op: str, *inputs: str, as_: str | None = None, cut: bool = False,
             **fields) -> str:
        """Emit one op on input ids; returns the new node's id (a composite: its first output)."""
        d = REGISTRY[op]
        attrs = fields.pop("_attrs", None) or d.attrs.model_validate({"op": op, **fields})
        if d.composite:
            return next(iter(self.expand(d, attrs, inputs, as_ or op).values()))
        self._check_arity(d, inputs)
        types = [self.graph.nodes[i].type for i in inputs]
        try:
            out = d.infer(attrs, *types)
        except DlgraphError as e:
            raise self._locate(e, op, inputs) from None
        nid = self._fresh(as_ or op)
        self.graph.nodes[nid] = Node(
            nid, op, attrs, tuple(inputs), out, scope=self.scope, source=self.source,
            origin=self.origin, role="param" if op == "param" else self.role, cut=cut)
        if op == "param":
            pname = nid.replace("/", ".")
            self.graph.params[pname] = Param(pname, nid, tuple(attrs.shape), attrs.init,
                                             *fans(tuple(attrs.shape)), attrs.trainable,
                                             self.scope)
        return nid

    def _check_arity(self, d, inputs) -> None:
        if d.arity_ok(len(inputs)):
            return
        n = len(d.inputs) - d.variadic
        want = f"at least {n}" if d.variadic else str(n)
        raise SpecError(f"{d.name} takes {want} input{'s' * (n != 1)} ({d.signature()}), "
                        f"got {len(inputs)}", help=f"set `in:` to [{d.signature()}]").located(
                            node=self.user and self.user[0], op=d.name, source=self.source)

    def _locate(self, e: DlgraphError, op: str, inputs) -> DlgraphError:
        if self.user:
            uid, uop = self.user
            if uop != op and self.role == "forward":
                e.message = f"in its {op}: {e.message}"
            if self.role == "backward":
                e.message = f"in the backward pass ({op}): {e.message}"
            return e.located(node=uid, op=uop, source=self.source)
        return e.located(op=op, source=self.source)

    def expand(self, d, attrs, inputs, local: str) -> dict[str, str]:
        """Expand a composite in its own scope; returns its named outputs."""
        self._check_arity(d, inputs)
        with self.within(local):
            try:
                out = d.expand(self, attrs, *inputs)
            except DlgraphError as e:
                raise e.located(node=self.user and self.user[0], op=d.name,
                                source=self.source) from None
        return out if isinstance(out, dict) else {d.outputs[0]: out}

    def cut(self, *nids: str | None) -> None:
        """Mark values as kernel boundaries: lowering realises them (e.g. recurrent states)."""
        for nid in nids:
            if nid is not None:
                self.graph.nodes[nid].cut = True

    def const(self, value: float, dtype: str = "float32") -> str:
        return self.emit("const", value=value, dtype=dtype)

    def param(self, name: str, shape: tuple[int, ...], init, *, layer=None,
              trainable: bool = True, fan: tuple[int, int] | None = None) -> str:
        """A parameter of the current scope, e.g. ``b.param('weight', (10, 64), 'he_normal')``.

        ``layer`` is the spec model of the layer: its ``init`` overrides and ``trainable``.
        """
        if layer is not None:
            init = layer.init.get(name, init)
            trainable = trainable and layer.trainable
        nid = self.emit("param", as_=name, shape=list(shape), init=init, trainable=trainable)
        if fan:
            p = self.graph.params[nid.replace("/", ".")]
            p.fan_in, p.fan_out = fan
        return nid


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """PyTorch's fan-in and fan-out: weights are [out, in, *kernel]."""
    if len(shape) < 2:
        return (shape[0] if shape else 1,) * 2
    rf = math.prod(shape[2:])
    return shape[1] * rf, shape[0] * rf


# ----------------------------------------------------------------------------- spec → graph


def build(spec, lines: dict | None = None, file: str = "<spec>") -> Graph:
    """Build the primitive graph of a validated spec.

    Raises :class:`GraphError` for a dangling reference or a bad output, ``CycleError``
    for a cycle, :class:`ShapeError` where types do not fit.
    """
    lines = lines or {}
    g = Graph(name=spec.name, source=file, spec=spec, lines=lines)
    b = Builder(g)
    for name, ts in spec.inputs.items():
        b.source = Source(file, lines.get(("inputs", name)))
        b.input(name, TType(tuple(ts.shape), ts.dtype))
    names = set(spec.inputs) | set(spec.nodes)

    def where(nid, *more):
        return Source(file, lines.get(("nodes", nid) + more) or lines.get(("nodes", nid)))

    dg = nx.DiGraph()
    for i, (nid, nd) in enumerate(spec.nodes.items()):
        dg.add_node(nid, pos=i)
    for nid, nd in spec.nodes.items():
        for k, ref in enumerate(nd.in_):
            base = ref.split(".")[0]
            if base not in names:
                raise GraphError(f"'{ref}' is not an input or a node", node=nid, op=nd.op,
                                 source=where(nid, "in", k) if len(nd.in_) > 1
                                 else where(nid, "in"),
                                 help=suggest(base, sorted(names))
                                 or f"known names: {', '.join(sorted(names))}")
            if base in spec.nodes:
                dg.add_edge(base, nid)
    try:
        order = schedule(dg)
    except CycleError as e:
        raise e.located(source=where(e.node)) from None

    used: set[str] = set()
    for nid in order:
        nd = spec.nodes[nid]
        d = REGISTRY[nd.op]
        b.source, b.user = where(nid), (nid, nd.op)
        ins = []
        for k, ref in enumerate(nd.in_):
            used.add(ref.split(".")[0])
            if ref not in g.aliases and ref not in g.inputs:
                base, _, part = ref.partition(".")
                outs = REGISTRY[spec.nodes[base].op].outputs if base in spec.nodes else ()
                raise GraphError(f"'{base}' has no output '{part}'", node=nid, op=nd.op,
                                 source=where(nid, "in"),
                                 help=f"outputs of '{base}': {', '.join(outs) or 'just one'}"
                                 + (f"; {suggest(part, outs)}" if suggest(part, outs) else ""))
            ins.append(g.resolve(ref))
        if d.composite:
            outs = b.expand(d, nd, ins, nid)
            for k, v in outs.items():
                g.aliases[f"{nid}.{k}"] = v
            g.aliases[nid] = next(iter(outs.values()))
        else:
            b.emit(nd.op, *ins, as_=nid, _attrs=nd)
            g.aliases[nid] = nid
    b.user = None
    for k, ref in enumerate(spec.outputs):
        if ref.split(".")[0] not in spec.nodes and ref not in spec.inputs:
            raise GraphError(f"output '{ref}' is not a node",
                             source=Source(file, lines.get(("outputs", k))),
                             help=suggest(ref.split(".")[0], spec.nodes)
                             or f"nodes: {', '.join(spec.nodes)}")
        if ref not in g.aliases and ref not in g.inputs:
            raise GraphError(f"output '{ref}' does not exist",
                             source=Source(file, lines.get(("outputs", k))))
        g.outputs[ref] = g.resolve(ref)
    g.warnings = [f"{Source(file, lines.get(('inputs', n)))}: input '{n}' is not used by any "
                  "node" for n in spec.inputs if n not in used]
    return g


def load_graph(source, *, base: Path | None = None) -> Graph:
    """A Graph from a path, a YAML/JSON string, or a dict (see :func:`dlgraph.load`)."""
    from .spec import parse_text, read_spec, validate_data
    if isinstance(source, dict):
        spec, lines, file = validate_data(source, {}, "<dict>"), {}, "<dict>"
    elif isinstance(source, str | Path) and ("\n" not in str(source)
                                             and str(source).endswith((".yaml", ".yml",
                                                                      ".json"))):
        spec, lines = read_spec(source)
        file = str(source)
    elif isinstance(source, str):
        data, lines = parse_text(source, "<string>")
        spec, file = validate_data(data, lines, "<string>"), "<string>"
    else:
        raise TypeError(f"load() takes a path, a YAML string or a dict, not {type(source)}")
    g = build(spec, lines, file)
    g.base = Path(file).parent if file not in ("<dict>", "<string>") else (base or Path.cwd())
    return g


__all__ = ["Builder", "build", "load_graph", "fans", "ShapeError"]
