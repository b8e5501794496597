"""Spec → Graph: check references, schedule the spec's nodes, expand composites.

The :class:`Builder` is the one way nodes come into being: spec nodes, the primitives a
composite expands to, and the backward nodes VJP rules emit all go through
:meth:`Builder.emit`, which validates attributes and infers the output type on the spot.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
from pydantic import TypeAdapter, ValidationError

from dlgraph.engine.errors import CycleError, DlgraphError, GraphError, Source, SpecError, suggest
from dlgraph.engine.graph.ir import Graph, Node, Param, schedule
from dlgraph.engine.spec.checks import unused_nodes
from dlgraph.engine.spec.explain import explain_error as _spec_error
from dlgraph.engine.spec.library import library
from dlgraph.engine.spec.models import node_union
from dlgraph.engine.spec.parse import parse_text
from dlgraph.engine.spec.read import read_spec, validate_data
from dlgraph.engine.types import TType
from dlgraph.ops import OPS, REGISTRY
from dlgraph.ops.control import loop_types


class Builder:
    """Emits nodes into a graph, inferring types as it goes.

    >>> from dlgraph.engine.types import TType
    >>> b = Builder(Graph())
    >>> x = b.input("x", TType(("batch", 3)))
    >>> y = b.emit("relu", x)
    >>> b.graph[y].type
    TType(shape=('batch', 3), dtype='float32')
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        self.scope: tuple[str, ...] = ()
        self.source: Source | None = None
        self.user: tuple[str, str] | None = None     # (spec node id, op) for error messages
        self.role = "forward"
        self.origin: str | None = None
        self._counts: dict[str, int] = {}
        self.modules: dict = {}                       # name -> ModuleDef, for module calls
        self._layers: list = []                       # (scope, attrs) of enclosing layers
        self.outer: Builder | None = None             # for a loop body: the enclosing builder
        self.consts: dict[str, str] = {}              # loop body: const input id -> outer id
        self._shares: list[_Share] = []               # enclosing `share:` redirections
        self.owners: dict[tuple, tuple] = {}          # sharing scope -> the scope owning them

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
        d = OPS[op]
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
        before = set(self.graph.params)
        with self.within(local):
            layered = hasattr(attrs, "init")
            if layered:
                self._layers.append((self.scope, attrs))
            try:
                out = d.expand(self, attrs, *inputs)
            except DlgraphError as e:
                raise e.located(node=self.user and self.user[0], op=d.name,
                                source=self.source) from None
            finally:
                if layered:
                    self._layers.pop()
            prefix = ".".join(self.scope) + "."
        made = [p.removeprefix(prefix) for p in self.graph.params if p not in before]
        for key in getattr(attrs, "init", None) or {}:
            if key not in made:
                raise SpecError(f"`init` names '{key}', which is not a parameter of "
                                f"{d.name}", help=suggest(key, made) or
                                f"its parameters: {', '.join(made) or 'none'}").located(
                                    node=self.user and self.user[0], op=d.name,
                                    source=self.source)
        return out if isinstance(out, dict) else {d.outputs[0]: out}

    # -- blocks of spec nodes (the top level and module bodies) ----------------------------
    def emit_nodes(self, nodes: dict, env: dict[str, str], where, stack=()) -> dict[str, str]:
        """Emit spec nodes in dependency order; ``env`` maps names (inputs, ``id``,
        ``id.out``) to node ids and is returned extended with the new nodes."""
        names = set(env) | set(nodes)
        dg = nx.DiGraph()
        for i, nid in enumerate(nodes):
            dg.add_node(nid, pos=i)
        for nid, nd in nodes.items():
            for k, (key, ref) in enumerate(nd.refs()):
                base = ref.split(".")[0]
                if base not in names:
                    raise GraphError(f"'{ref}' is not an input or a node", node=nid, op=nd.op,
                                     source=where(nid, "in", k) if key == "in" and len(
                                         nd.in_) > 1 else where(nid, key),
                                     help=suggest(base, sorted(names))
                                     or f"known names: {', '.join(sorted(names))}")
                if base in nodes:
                    dg.add_edge(base, nid)
            if getattr(nd, "share", None) is not None:
                dg.add_edge(self._share_target(nodes, nid, nd, where), nid)
        try:
            order = schedule(dg)
        except CycleError as e:
            raise e.located(source=where(e.node)) from None
        prefix = "/".join(self.scope)
        failed: list[DlgraphError] = []
        for nid in order:
            if any(r.split(".")[0] not in env for _, r in nodes[nid].refs()):
                continue                # it reads a node that failed: nothing new to say
            try:
                self._emit_one(nodes, nid, env, where, prefix, stack)
            except DlgraphError as e:
                if prefix or stack:     # inside a module: its call reports it
                    raise
                failed.append(e)
        if failed:
            failed[0].also = failed[1:]
            raise failed[0]
        return env

    def _emit_one(self, nodes: dict, nid: str, env: dict[str, str], where, prefix: str,
                  stack) -> None:
        """Emit spec node ``nid`` (its inputs in ``env``) and enter its outputs in ``env``."""
        nd = nodes[nid]
        self.source, self.user = where(nid), (f"{prefix}/{nid}" if prefix else nid, nd.op)
        ins, resolved = [], {}
        for key, ref in nd.refs():
            if ref not in env:
                base, _, part = ref.partition(".")
                outs = self._outputs_of(nodes[base].op) if base in nodes else ()
                raise GraphError(f"'{base}' has no output '{part}'", node=nid, op=nd.op,
                                 source=where(nid, key),
                                 help=f"outputs of '{base}': {', '.join(outs) or 'one'}"
                                 + (f"; {suggest(part, outs)}" if suggest(part, outs)
                                    else ""))
            if key == "in":
                ins.append(env[ref])
            else:
                resolved[key] = env[ref]
        nd = nd.model_copy(update=resolved) if resolved else nd
        if prefix:
            self.graph.layers[self.user[0]] = nd
        with self._sharing(nid, nd):
            outs = self._emit_spec_node(nid, nd, ins, stack)
        env[nid] = next(iter(outs.values()))
        env.update({f"{nid}.{k}": v for k, v in outs.items()})

    def _emit_spec_node(self, nid: str, nd, ins: list[str], stack) -> dict[str, str]:
        if nd.op not in REGISTRY:
            try:
                return self.call_module(nd.op, ins, nid, call=nd, stack=stack)
            except DlgraphError as e:
                raise e.located(node=self.user[0], op=nd.op) from None
        if REGISTRY[nd.op].composite:
            return self.expand(REGISTRY[nd.op], nd, ins, nid)
        return {"out": self.emit(nd.op, *ins, as_=nid, _attrs=nd)}

    # -- weight sharing ------------------------------------------------------------------
    def _share_target(self, nodes: dict, nid: str, nd, where) -> str:
        """The node whose parameters ``nid`` uses (``share:``), checked: one of this block's
        nodes, not itself, of the same op, and the sharer sets no ``init``/``trainable``."""
        ref, src = nd.share, where(nid, "share")
        if ref not in nodes or ref == nid:
            others = [k for k in nodes if k != nid and nodes[k].op == nd.op]
            raise GraphError(f"`share: {ref}` names no other node" if ref == nid else
                             f"`share: {ref}`: '{ref}' is not a node", node=nid, op=nd.op,
                             source=src, help=suggest(ref, others) or
                             (f"nodes of op {nd.op}: {', '.join(others)}" if others else
                              f"no other node is a {nd.op}; share names one to reuse its "
                              "parameters"))
        if nodes[ref].op != nd.op:
            raise GraphError(f"`share: {ref}`: '{ref}' is a {nodes[ref].op}, this node a "
                             f"{nd.op}", node=nid, op=nd.op, source=src,
                             help="parameters are shared between nodes of the same op (or "
                                  "calls of the same module)")
        own = sorted({"init", "trainable"} & nd.model_fields_set)
        if own:
            raise SpecError(f"a node that shares the parameters of '{ref}' takes their "
                            f"{' and '.join(own)} from it", node=nid, op=nd.op,
                            source=where(nid, own[0]),
                            help=f"set {' and '.join(own)} on '{ref}', or remove `share:`")
        return ref

    @contextlib.contextmanager
    def _sharing(self, nid: str, nd):
        """While a sharing node is emitted, :meth:`param` answers with the parameters of the
        node it shares (``to``) instead of making new ones; all of them must be used."""
        if getattr(nd, "share", None) is None:
            yield
            return
        frm, ref = self.scope + (nid,), self.scope + (nd.share,)
        share = _Share(frm, self.owners.get(ref, ref), "/".join(ref), self.source,
                       self.user)
        self._shares.append(share)
        try:
            yield
        finally:
            self._shares.pop()
        prefix, root = ".".join(share.to) + ".", self
        while root.outer is not None:                  # a loop body's parameters live outside
            root = root.outer
        owned = {p for p in root.graph.params if p.startswith(prefix)}
        if not owned or owned - share.used:
            missing = sorted(p.removeprefix(prefix) for p in owned - share.used)
            raise share.error(f"'{share.name}' has no parameters to share" if not owned else
                              f"this node does not use {', '.join(missing)} of "
                              f"'{share.name}'", "shared nodes need the same fields (sizes, "
                                                 "bias, layers) and inputs of the same size")
        self.owners[frm] = share.to
        self.graph.shared["/".join(frm)] = "/".join(share.to)

    def _shared_param(self, name: str, shape: tuple[int, ...]) -> str | None:
        """The id of the shared parameter standing for ``<scope>/name``; None if not shared."""
        path, hit = self.scope + (name,), []
        for share in reversed(self._shares):
            if path[:len(share.frm)] == share.frm:
                path = share.to + path[len(share.frm):]
                hit.append(share)
        if not hit:
            return None
        nid, outer = "/".join(path), hit[-1]
        rel = ".".join(self.scope[len(hit[0].frm):] + (name,))
        p = self.graph.params.get(nid.replace("/", "."))
        if p is None:
            raise outer.error(f"'{outer.name}' has no parameter {rel}",
                              "shared nodes need the same fields (sizes, bias, layers)")
        if tuple(p.shape) != tuple(shape):
            raise outer.error(f"parameter {rel} of '{outer.name}' is {list(p.shape)}, here it "
                              f"would be {list(shape)}", "a node that shares parameters must "
                              f"have the same sizes and see inputs of the same size as "
                              f"'{outer.name}'")
        for share in hit:
            share.used.add(nid.replace("/", "."))
        return nid

    def _outputs_of(self, op: str) -> tuple[str, ...]:
        if op in REGISTRY:
            return REGISTRY[op].outputs
        return tuple(self.modules[op].spec.outputs) if op in self.modules else ()

    def call_module(self, name: str, ins: list[str], local: str, *, call=None, args=None,
                    stack=()) -> dict[str, str]:
        """Expand a spec-defined module in scope ``local``; returns its named outputs."""
        mdef = self.modules[name]
        m = mdef.spec
        where_call = self.source
        given = call.args() if call is not None else dict(args or {})
        for k in given:
            if k not in m.args:
                raise SpecError(f"module '{name}' has no arg '{k}'", source=where_call,
                                help=suggest(k, m.args) or f"its args: "
                                f"{', '.join(m.args) or 'none'}")
        values = {**m.args, **given}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise SpecError(f"module '{name}' needs arg{'s' * (len(missing) > 1)} "
                            f"{', '.join(missing)}", source=where_call,
                            help=f"add {', '.join(f'{k}: ...' for k in missing)} to the node")
        if name in stack:
            raise SpecError(f"module '{name}' uses itself (through {' -> '.join(stack)})",
                            source=where_call, help="modules cannot be recursive")
        if len(ins) != len(m.inputs):
            raise SpecError(f"module '{name}' takes {len(m.inputs)} input"
                            f"{'s' * (len(m.inputs) != 1)} ({', '.join(m.inputs)}), "
                            f"got {len(ins)}", source=where_call,
                            help=f"set `in:` to [{', '.join(m.inputs)}]")

        def where(nid, *more):
            base = mdef.prefix + ("nodes", nid)
            return Source(mdef.file, mdef.lines.get(base + more) or mdef.lines.get(base))

        nodes = {}
        adapter = _adapter(node_union())
        for nid, raw in m.nodes.items():
            try:
                nodes[nid] = adapter.validate_python(_substitute(raw, values, name))
            except SpecError as e:
                raise e.located(node=nid, source=where(nid)) from None
            except ValidationError as exc:
                view = {("nodes",) + k[len(mdef.prefix) + 1:]: v for k, v in mdef.lines.items()
                        if k[:len(mdef.prefix) + 1] == mdef.prefix + ("nodes",)}
                err = exc.errors()[0]
                err = {**err, "loc": ("nodes", nid) + tuple(err["loc"])}
                raise _spec_error(err, {"nodes": {nid: raw}}, view, mdef.file, REGISTRY) from None
        saved = (self.source, self.user)
        with self.within(local):
            env = self.emit_nodes(nodes, dict(zip(m.inputs, ins, strict=True)), where,
                                  stack + (name,))
        self.source, self.user = saved
        out = {}
        for k, ref in enumerate(m.outputs):
            if ref not in env:
                raise GraphError(f"module '{name}' output '{ref}' is not one of its nodes",
                                 source=Source(mdef.file, mdef.lines.get(
                                     mdef.prefix + ("outputs", k))),
                                 help=suggest(ref, m.nodes) or f"its nodes: "
                                 f"{', '.join(m.nodes)}")
            out[ref.split(".")[-1] if "." in ref else ref] = env[ref]
        return out

    def cut(self, *nids: str | None) -> None:
        """Mark values as kernel boundaries: lowering realises them (e.g. recurrent states)."""
        for nid in nids:
            if nid is not None:
                self.graph.nodes[nid].cut = True

    def const(self, value: float, dtype: str = "float32") -> str:
        return self.emit("const", value=value, dtype=dtype)

    def param(self, name: str, shape: tuple[int, ...], init, *, trainable: bool = True,
              fan: tuple[int, int] | None = None) -> str:
        """A parameter of the current scope, e.g. ``b.param('weight', (10, 64), 'he_normal')``.

        ``init`` is the layer's default; the ``init:`` field of the layer or of any
        composite around it overrides it by relative name (``self_attn.in_proj_weight``),
        and ``trainable: false`` on any of them freezes it. In a loop body the parameter
        lives in the enclosing graph (one for every step) and enters the body as a const.
        """
        if self.outer is not None:
            saved = self.outer.scope, self.outer._layers
            self.outer.scope, self.outer._layers = self.scope, self._layers
            try:
                nid = self.outer.param(name, shape, init, trainable=trainable, fan=fan)
            finally:
                self.outer.scope, self.outer._layers = saved
            return self.const_input(nid)
        shared = self._shared_param(name, tuple(shape))
        if shared is not None:
            return shared
        own = self.scope
        for scope, attrs in self._layers:           # outermost first: the user's word wins
            rel = ".".join(own[len(scope):] + (name,))
            if own[:len(scope)] == scope and rel in attrs.init:
                init = attrs.init[rel]
                break
        trainable = trainable and all(a.trainable for s, a in self._layers
                                      if own[:len(s)] == s)
        nid = self.emit("param", as_=name, shape=list(shape), init=init, trainable=trainable)
        if fan:
            p = self.graph.params[nid.replace("/", ".")]
            p.fan_in, p.fan_out = fan
        return nid

    # -- loops ---------------------------------------------------------------------------
    def body(self) -> Builder:
        """A builder for a loop body: a fresh graph in this scope. Parameters and outer
        values it reads enter it as const inputs (:meth:`const_input`)."""
        sub = type(self)(Graph(name="/".join(self.scope) or "body", source=self.graph.source))
        sub.outer, sub.scope, sub.source, sub.user = self, self.scope, self.source, self.user
        sub.role, sub.origin, sub.modules = self.role, self.origin, self.modules
        sub._layers = list(self._layers)
        sub.graph.layers, sub.graph.shared = self.graph.layers, self.graph.shared  # one record
        sub._shares, sub.owners = self._shares, self.owners
        return sub

    def const_input(self, outer_id: str) -> str:
        """The body input carrying the outer value ``outer_id``, made on first use."""
        if outer_id not in self.consts:
            self.input(outer_id, self.outer.graph.nodes[outer_id].type)
            self.consts[outer_id] = outer_id
        return outer_id

    def loop(self, body: Builder, seqs, states, *, steps: int, n_out: int = 0,
             reverse: bool = False, as_: str = "loop") -> list[str]:
        """Emit a loop over ``body`` (inputs: seq steps, states, then consts; outputs: new
        states, per-step outputs, sums) and one ``pick`` per output; returns the picks."""
        nid = self.emit("loop", *seqs, *states, *body.consts.values(), as_=as_,
                        body=body.graph, steps=steps, reverse=reverse, n_seq=len(seqs),
                        n_state=len(states), n_out=n_out)
        types = loop_types(self.graph.nodes[nid].attrs)
        names = [o.replace(":", "_").split("/")[-1] for o in body.graph.outputs]
        return [self.emit("pick", nid, as_=f"{nid.split('/')[-1]}_{name}", index=k, type=t)
                for k, (name, t) in enumerate(zip(names, types, strict=True))]


@dataclass
class _Share:
    """One `share:` being emitted: parameters under ``frm`` are those under ``to``."""

    frm: tuple[str, ...]
    to: tuple[str, ...]
    name: str                          # the node named by `share:`, as written in its block
    source: Source | None
    user: tuple[str, str] | None
    used: set[str] = field(default_factory=set)

    def error(self, message: str, help: str) -> GraphError:
        node, op = self.user or (None, None)
        return GraphError(f"`share: {self.name.rsplit('/', 1)[-1]}`: {message}", node=node,
                          op=op, source=self.source, help=help)


@functools.cache
def _adapter(union) -> TypeAdapter:
    return TypeAdapter(union)


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """PyTorch's fan-in and fan-out: weights are [out, in, *kernel]."""
    if len(shape) < 2:
        return (shape[0] if shape else 1,) * 2
    rf = math.prod(shape[2:])
    return shape[1] * rf, shape[0] * rf


# ----------------------------------------------------------------------------- spec → graph


def build(spec, lines: dict | None = None, file: str = "<spec>",
          base: Path | None = None) -> Graph:
    """Build the primitive graph of a validated spec.

    Raises :class:`GraphError` for a dangling reference or a bad output, ``CycleError``
    for a cycle, :class:`ShapeError` where types do not fit.
    """
    lines = lines or {}
    g = Graph(name=spec.name, source=file, spec=spec, lines=lines)
    b = Builder(g)
    b.modules = library(spec.model_dump(by_alias=True), file, lines, base)
    for name, ts in spec.inputs.items():
        b.source = Source(file, lines.get(("inputs", name)))
        b.input(name, TType(tuple(ts.shape), ts.dtype))

    def where(nid, *more):
        return Source(file, lines.get(("nodes", nid) + more) or lines.get(("nodes", nid)))

    env = b.emit_nodes(spec.nodes, {n: n for n in spec.inputs}, where)
    g.aliases.update({k: v for k, v in env.items() if k not in spec.inputs})
    b.user = None
    for k, ref in enumerate(spec.outputs):
        if ref.split(".")[0] not in spec.nodes and ref not in spec.inputs:
            raise GraphError(f"output '{ref}' is not a node",
                             source=Source(file, lines.get(("outputs", k))),
                             help=suggest(ref.split(".")[0], spec.nodes)
                             or f"nodes: {', '.join(spec.nodes)}")
        if ref not in env:
            raise GraphError(f"output '{ref}' does not exist",
                             source=Source(file, lines.get(("outputs", k))))
        g.outputs[ref] = env[ref]
    used = {ref.split(".")[0] for nd in spec.nodes.values() for _, ref in nd.refs()}
    g.warnings = [f"{Source(file, lines.get(('inputs', n)))}: input '{n}' is not used by any "
                  "node" for n in spec.inputs if n not in used] + _unused_module_inputs(b.modules) \
        + unused_nodes(spec, file, lines)
    return g


def _unused_module_inputs(modules: dict) -> list[str]:
    """A warning per module input that none of the module's nodes reads."""
    out = []
    for name, mdef in modules.items():
        read = set()
        for nd in mdef.spec.nodes.values():
            refs = nd.get("in", []) if isinstance(nd, dict) else []
            read |= {r.split(".")[0] for r in ([refs] if isinstance(refs, str) else refs)
                     if isinstance(r, str)}
        if any(r.startswith("$") for r in read):     # `in: $arg`: known only at a call
            continue
        out += [f"{Source(mdef.file, mdef.lines.get(mdef.prefix + ('inputs', k)))}: input "
                f"'{i}' of module '{name}' is not used by any of its nodes"
                for k, i in enumerate(mdef.spec.inputs) if i not in read]
    return out


def _substitute(value, args: dict, module: str):
    """Replace ``$name`` strings by the module call's arg values, recursively."""
    if isinstance(value, str) and value.startswith("$"):
        if value[1:] not in args:
            raise SpecError(f"module '{module}' has no arg '{value[1:]}'",
                            help=suggest(value[1:], args) or
                            f"declare it under `args:` ({', '.join(args) or 'none yet'})")
        return args[value[1:]]
    if isinstance(value, dict):
        return {k: _substitute(v, args, module) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, args, module) for v in value]
    return value


def load_graph(source, *, base: Path | None = None) -> Graph:
    """A Graph from a path, a YAML/JSON string, or a dict (see :func:`dlgraph.load`).

    ``base`` is the folder that relative paths (data, `include:`) of a string or dict spec
    start in; a file's own folder otherwise.
    """
    if _names_a_file(source):
        spec, lines = read_spec(source)
        file, folder = str(source), Path(source).parent
    elif isinstance(source, dict | str):
        file = "<dict>" if isinstance(source, dict) else "<string>"
        data, lines = (source, {}) if isinstance(source, dict) else parse_text(source, file)
        folder = base or Path.cwd()
        spec = validate_data(data, lines, file, folder)
    else:
        raise TypeError(f"load() takes a path, a YAML string or a dict, not {type(source)}")
    g = build(spec, lines, file, folder)
    g.base = folder
    return g


def _names_a_file(source) -> bool:
    """A Path, or a one-line string that is a spec file's name (any extension: the content
    is read as YAML, of which JSON is a part) rather than YAML text."""
    if isinstance(source, Path):
        return True
    if not isinstance(source, str) or "\n" in source:
        return False
    try:
        exists = Path(source).is_file()
    except (OSError, ValueError):
        exists = False
    return exists or source.endswith((".yaml", ".yml", ".json")) or ":" not in source


__all__ = ["Builder", "build", "load_graph", "fans"]
