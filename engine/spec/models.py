"""The spec format: pydantic models, safe YAML/JSON loading, and source lines for errors.

A spec is read in three steps: the text is parsed into plain data while the line of every
key is recorded (:func:`parse_text`), the data is validated against the models
(:func:`validate_data`), and pydantic's errors become :class:`SpecError` with file, line,
node, op and, for a misspelling, the close match.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dlgraph.engine.errors import Source, SpecError, suggest
from dlgraph.engine.io.data.text import bind_vocab
from dlgraph.engine.spec.base import IDENT, REF, NodeSpec, Strict
from dlgraph.engine.spec.sweep import SweepSpec
from dlgraph.engine.spec.train import TrainSpec
from dlgraph.ops import REGISTRY

Dim = Annotated[int | str, Field(description="a size, or a symbolic name such as `batch`")]


class TensorSpec(Strict):
    """A graph input: its shape (named dims are symbolic) and dtype."""

    shape: list[Dim] = Field(description="dims: sizes or names such as `batch`")
    dtype: Literal["float32", "int32"] = "float32"

    @field_validator("shape")
    @classmethod
    def _dims(cls, v):
        for d in v:
            if isinstance(d, int) and d < 1:
                raise ValueError(f"dims must be positive or named, got {d}")
            if isinstance(d, str) and not IDENT.match(d):
                raise ValueError(f"'{d}' is not a valid dim name")
        return v


class DimSpec(Strict):
    """A named dim's bounds: a sequence length that varies from call to call."""

    max: int = Field(ge=1, le=1_000_000, description="the longest length: the compiled "
                     "program and its buffers are made for it, shorter sequences reuse them")


def _check_ids(d: dict, what: str) -> dict:
    for k in d:
        if not IDENT.match(k):
            raise ValueError(f"{what} '{k}' is not a valid name: use letters, digits and _, "
                             "not starting with a digit")
    return d


class ModuleCall(NodeSpec):
    """A node whose op is a module of the spec (`modules:` or `include:`); its other fields
    are the module's args."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    op: str = Field(description="the name of a module defined in `modules:` or included")
    share: str | None = Field(None, description="the id of another call of the same module "
                              "whose parameters this one uses (weight sharing)")

    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModuleSpec(Strict):
    """A composite defined in the spec: used like an op, any number of times."""

    doc: str | None = Field(None, description="what it computes")
    inputs: list[str] = Field(description="names its nodes use for the call's `in:`, in order")
    args: dict[str, Any] = Field(default_factory=dict, description="arg name -> default "
                                 "(null: required); `$name` in a node field is replaced by it")
    nodes: dict[str, dict[str, Any]] = Field(description="its nodes, as in `nodes:`")
    outputs: list[str] = Field(min_length=1, description="node ids it returns; the first is "
                               "the default, others are referenced as `call.id`")

    @field_validator("inputs")
    @classmethod
    def _names(cls, v):
        for k in v:
            if not IDENT.match(k):
                raise ValueError(f"input '{k}' is not a valid name")
        return v


def _op_tag(v) -> str:
    op = v.get("op") if isinstance(v, dict) else getattr(v, "op", None)
    return op if isinstance(op, str) and op in REGISTRY else "module"


@functools.cache
def node_union():
    """Every registered op's model, picked by `op`; any other op is a module call."""
    tagged = [Annotated[d.attrs, Tag(d.name)] for d in REGISTRY.values()]
    tagged.append(Annotated[ModuleCall, Tag("module")])
    return Annotated[Union[tuple(tagged)], Discriminator(_op_tag)]  # noqa: UP007


@functools.cache
def spec_model() -> type[BaseModel]:
    """The GraphSpec model, with every op and the train section."""
    Node = node_union()

    class GraphSpec(Strict):
        """A dlgraph spec, version 1."""

        dlgraph: Literal[1] = Field(description="spec format version; must be 1")
        name: str = Field(description="a short name, used for run directories")
        doc: str | None = Field(None, description="what the network learns and the result "
                                                  "it reaches")
        inputs: dict[str, TensorSpec] = Field(description="graph inputs by name")
        dims: dict[str, DimSpec] = Field(default_factory=dict, description="bounds of named "
                                         "dims, e.g. `time: {max: 256}` for a sequence "
                                         "length left symbolic (`shape: [batch, time, 1]`); "
                                         "without one the longest length seen is used")
        nodes: dict[str, Node] = Field(description="node id to node, in file order")
        outputs: list[str] = Field(description="node ids whose values `run` returns")
        modules: dict[str, ModuleSpec] = Field(default_factory=dict, description=
                                               "composites defined here, used like ops")
        include: list[str] = Field(default_factory=list, description="spec files whose "
                                   "`modules:` this spec may use (paths relative to it, "
                                   "inside its folder tree; other folders only when listed "
                                   "in the DLGRAPH_INCLUDE_PATH environment variable)")
        train: TrainSpec | None = Field(None, description="how to train; absent: inference "
                                                          "only")
        sweep: SweepSpec | None = Field(None, description="a hyperparameter sweep over this "
                                        "spec (`dlgraph sweep`); ignored by `dlgraph run`")

        @field_validator("inputs")
        @classmethod
        def _inputs(cls, v):
            return _check_ids(v, "input")

        @field_validator("nodes")
        @classmethod
        def _nodes(cls, v):
            return _check_ids(v, "node id")

        @model_validator(mode="after")
        def _unique(self):
            for k in self.nodes:
                if k in self.inputs:
                    raise ValueError(f"'{k}' is both an input and a node id")
            named = {d for t in self.inputs.values() for d in t.shape if isinstance(d, str)}
            for k in self.dims:
                if k not in named:
                    raise ValueError(f"dims names '{k}', which no input's shape uses"
                                     + (f" (inputs use {', '.join(sorted(named))})"
                                        if named else ""))
            return self

    return GraphSpec


# --------------------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """Safe YAML: plain data only, no Python tags."""


#: Caps that keep a hostile spec from taking the machine: bytes of a spec file, values built
#: (YAML aliases can expand a few lines into billions), and nesting depth.
MAX_SPEC_BYTES = 2**20
MAX_SPEC_VALUES = 20_000
MAX_SPEC_DEPTH = 64


def parse_text(text: str, file: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML or JSON into plain data and the line of every mapping key and list item.

    Duplicate keys are errors (PyYAML would silently keep the last one), and so are NaN and
    infinities, recursive anchors, and aliases that expand past ``MAX_SPEC_VALUES`` values.

    >>> data, lines = parse_text("a: 1\\nb: {c: 2}\\n", "x.yaml")
    >>> data, lines[("b", "c")]
    ({'a': 1, 'b': {'c': 2}}, 2)
    """
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"the spec has {len(text)} characters; at most {MAX_SPEC_BYTES} are read",
                        source=Source(file), help="a spec is a short text; keep data in files")
    _check_chars(text, file)
    _check_flow_depth(text, file)
    _check_events(text, file)
    if file.endswith(".json"):
        _check_json(text, file)
    try:
        data, lines = _compose(text, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"not valid YAML: {e.problem or e.context}",
                        source=Source(file, line),
                        help="check indentation and quoting on this line") from None
    except yaml.YAMLError as e:
        raise SpecError(f"not valid YAML: {e}", source=Source(file)) from None
    except RecursionError:
        raise SpecError(f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                        source=Source(file), help="flatten the nesting") from None
    if data is None:
        raise SpecError("the file is empty", source=Source(file),
                        help="a spec starts with `dlgraph: 1`; see docs/spec.md")
    if not isinstance(data, dict):
        raise SpecError(f"a spec must be a mapping of fields, not a {type(data).__name__}",
                        source=Source(file, 1), help="a spec starts with `dlgraph: 1`")
    return data, lines


def _compose(text: str, file: str) -> tuple[Any, dict[tuple, int]]:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        lines: dict[tuple, int] = {}
        walk = _Walk(loader, file, lines)
        return (walk.value(root, ()) if root is not None else None), lines
    finally:
        loader.dispose()


_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")
_NONFINITE = re.compile(r"[-+]?(NaN|Infinity)")  # JSON's spellings; YAML's own are floats
_BAD_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def _check_chars(text: str, file: str) -> None:
    """Control characters and the replacement mark of undecodable bytes, by line and column."""
    m = _BAD_CHAR.search(text)
    if m:
        i, ch = m.start(), m.group()
        line, col = text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1
        what = "a byte that is not UTF-8" if ch == "\ufffd" else \
            f"the control character U+{ord(ch):04X}"
        raise SpecError(f"{what} at column {col}", source=Source(file, line),
                        help="specs are UTF-8 text; remove or retype this character")


_OTHER_BYTES = bytes(b for b in range(256) if b not in b"[]{}")


_DEEP_INDENT = re.compile(rf"^[ \t]{{{4 * MAX_SPEC_DEPTH},}}\S", re.M)


def _check_flow_depth(text: str, file: str) -> None:
    """Refuse deep nesting before YAML's scanner (quadratic in [ { depth, slow on deep
    indentation) or JSON see it."""
    m = _DEEP_INDENT.search(text)
    if m:
        raise SpecError(f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                        source=Source(file, text.count("\n", 0, m.start()) + 1),
                        help="flatten the nesting")
    brackets = np.frombuffer(text.encode("utf-8", "replace").translate(None, _OTHER_BYTES),
                             np.uint8)
    if len(brackets) > 2 * MAX_SPEC_DEPTH:
        step = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
        if np.cumsum(step).max() > 2 * MAX_SPEC_DEPTH:
            raise SpecError(f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                            source=Source(file), help="flatten the nesting")


_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _check_events(text: str, file: str) -> None:
    """Count values and depth on the event stream before anything is built: the C parser
    (where PyYAML has it) gets through a megabyte in a fraction of a second, the pure Python
    composer would take many seconds and hundreds of MB. Syntax errors are left to the
    parse proper, which words them."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    depth = count = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            count += 1
            depth += isinstance(event, _OPEN) - isinstance(event, _CLOSE)
            if count > MAX_SPEC_VALUES or depth > MAX_SPEC_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else None
                raise SpecError(f"the spec has more than {MAX_SPEC_VALUES} values"
                                if count > MAX_SPEC_VALUES else
                                f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                                source=Source(file, line),
                                help="a spec is a short text; keep data in data files")
    except yaml.YAMLError:
        pass
    finally:
        loader.dispose()


def _check_json(text: str, file: str) -> None:
    """JSON is read strictly as JSON (YAML would accept a trailing comma, Python NaN)."""
    def no_constant(name: str):
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise SpecError(f"not valid JSON: {e.msg}", source=Source(file, e.lineno),
                        help=f"at column {e.colno}") from None
    except ValueError as e:  # from no_constant
        line = next((n + 1 for n, t in enumerate(text.splitlines()) if str(e) in t), None)
        raise SpecError(f"{e} is not a number a spec can hold", source=Source(file, line),
                        help="write a finite number") from None
    except RecursionError:
        raise SpecError(f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                        source=Source(file), help="flatten the nesting") from None


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:str",
               "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
               "tag:yaml.org,2002:null"}


@dataclass
class _Walk:
    """Builds plain data from composed YAML nodes, recording lines and enforcing the caps."""

    loader: Any
    file: str
    lines: dict
    count: int = 0
    stack: tuple = ()

    def fail(self, node, message: str, help: str | None = None) -> SpecError:
        return SpecError(message, source=Source(self.file, node.start_mark.line + 1), help=help)

    def value(self, node, path: tuple):
        self.count += 1
        if self.count > MAX_SPEC_VALUES:
            raise self.fail(node, f"the spec expands to more than {MAX_SPEC_VALUES} values",
                            help="YAML aliases (*name) multiply what they repeat; write less "
                                 "or use a module")
        if any(node is n for n in self.stack):
            raise self.fail(node, "a YAML anchor refers to itself",
                            help="an alias (*name) cannot sit inside its own anchor (&name)")
        if len(self.stack) >= MAX_SPEC_DEPTH:
            raise self.fail(node, f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                            help="flatten the nesting")
        _check_tag(node, self.file)
        self.stack += (node,)
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return self.sequence(node, path)
            return self.scalar(node)
        finally:
            self.stack = self.stack[:-1]

    def mapping(self, node, path: tuple) -> dict:
        out: dict = {}
        for knode, vnode in node.value:
            _check_tag(knode, self.file)
            if not isinstance(knode, yaml.ScalarNode):
                raise self.fail(knode, "mapping keys must be plain names")
            key = self.scalar(knode)
            if not isinstance(key, str | int | float | bool):
                raise self.fail(knode, "mapping keys must be plain names")
            if key in out:
                raise self.fail(knode, f"duplicate key '{key}'"
                                + (f" in '{path[-1]}'" if path else ""),
                                help=f"'{key}' is already defined on line "
                                     f"{self.lines[path + (key,)]}; rename or remove one of them")
            self.lines[path + (key,)] = knode.start_mark.line + 1
            out[key] = self.value(vnode, path + (key,))
        return out

    def sequence(self, node, path: tuple) -> list:
        items = []
        for i, item in enumerate(node.value):
            self.lines[path + (i,)] = item.start_mark.line + 1
            items.append(self.value(item, path + (i,)))
        return items

    def scalar(self, node):
        v = self.loader.construct_object(node, deep=True)
        if isinstance(v, str) and node.style is None and _NONFINITE.fullmatch(v):
            v = float("nan")  # JSON's NaN/Infinity: YAML reads a string, pydantic a float
        elif isinstance(v, str) and node.style is None and _EXPONENT.fullmatch(v):
            v = float(v)  # 1e12 is a number in YAML 1.2 and JSON; PyYAML reads a string
            if "." not in node.value and v.is_integer():
                v = int(v)    # written without a point, it is a count: hidden: 1e3
        if isinstance(v, float) and not math.isfinite(v):
            raise self.fail(node, f"{node.value} is not a number a spec can hold",
                            help="write a finite number")
        return v


def _check_tag(node, file: str) -> None:
    if node.tag == "tag:yaml.org,2002:merge":
        raise SpecError("YAML merge keys (<<) are not supported", help="write the fields out, "
                        "or define a module for the repeated part",
                        source=Source(file, node.start_mark.line + 1))
    if node.tag not in _PLAIN_TAGS:
        raise SpecError(f"unsupported YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')}: "
                        "specs hold plain data only",
                        source=Source(file, node.start_mark.line + 1),
                        help="remove the tag; Python objects are never constructed")


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the deepest known prefix of a location path."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


# --------------------------------------------------------------------------- validation


def validate_data(data: dict, lines: dict[tuple, int], file: str, base: Path | None = None):
    """Validate plain data against the GraphSpec model, raising a located :class:`SpecError`.

    ``base`` is where `include:` paths start (default: the file's folder, or the cwd).
    """
    data = bind_vocab(data, lines, file, base)      # `num: vocab`: a text source's size
    _precheck_nodes(data, lines, file, base)
    try:
        return spec_model().model_validate(data)
    except ValidationError as exc:
        errs = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = _spec_error(errs[0], data, lines, file, REGISTRY)
        more = len({_value_loc(e["loc"], data) for e in errs}) - 1   # a union's members: one value
        if more:
            first.message += f" (and {more} more problem{'s' * (more > 1)})"
        raise first from None


def _precheck_nodes(data: dict, lines: dict, file: str, base: Path | None = None):
    """Names and ops, checked by hand so that errors suggest the close match."""
    if data.get("dlgraph") not in (1, None) or isinstance(data.get("dlgraph"), bool | float):
        raise SpecError(f"unsupported spec version {data.get('dlgraph')!r}",
                        source=Source(file, lines.get(("dlgraph",))),
                        help="this dlgraph reads `dlgraph: 1`")
    for section, what in (("inputs", "input name"), ("nodes", "node id"),
                          ("modules", "module name")):
        for k in data.get(section) or {} if isinstance(data.get(section), dict) else {}:
            if not isinstance(k, str) or not IDENT.match(k):
                raise SpecError(f"{what} '{k}' is not a valid name",
                                source=Source(file, lines.get((section, k))),
                                help="use letters, digits and _, not starting with a digit")
    inputs, nodes = data.get("inputs"), data.get("nodes")
    if isinstance(inputs, dict) and isinstance(nodes, dict):
        for k in nodes:
            if k in inputs:
                raise SpecError(f"'{k}' is both an input and a node id",
                                source=Source(file, lines.get(("nodes", k))),
                                help=f"rename the node (or the input on line "
                                     f"{lines.get(('inputs', k))}): a name means one value")
    modules = set(library(data, file, lines, base))
    _check_ops(data.get("nodes"), ("nodes",), modules, lines, file)
    for name, m in (data.get("modules") or {}).items():
        if isinstance(m, dict):
            _check_ops(m.get("nodes"), ("modules", name, "nodes"), modules, lines, file)


def _check_ops(nodes, path: tuple, modules: set[str], lines: dict, file: str):
    if not isinstance(nodes, dict):
        return
    for nid, nd in nodes.items():
        src = Source(file, lines.get(path + (nid,)))
        if not isinstance(nd, dict):
            raise SpecError(f"a node is a mapping with an `op`, got {nd!r}", node=str(nid),
                            source=src, help=f"write e.g. `{nid}: {{op: relu, in: x}}`")
        op = nd.get("op")
        if op is None:
            raise SpecError("missing `op`", node=str(nid), source=src,
                            help="every node names its op; `dlgraph ops` lists them")
        if not isinstance(op, str):
            raise SpecError(f"`op` is the name of one op, not {op!r}"[:160], node=str(nid),
                            source=Source(file, lines.get(path + (nid, "op")) or src.line),
                            help="write e.g. `op: relu`; `dlgraph ops` lists them")
        if op not in REGISTRY and op not in modules:
            raise SpecError(f"unknown op '{op}'", node=str(nid),
                            source=Source(file, lines.get(path + (nid, "op")) or src.line),
                            help=suggest(str(op), list(REGISTRY) + sorted(modules))
                            or "`dlgraph ops` lists the ops there are")


@dataclass(frozen=True)
class ModuleDef:
    """A module and where it was written (for error locations)."""

    name: str
    spec: ModuleSpec
    file: str
    lines: dict
    prefix: tuple                       # its path in that file's lines: ("modules", name)


def library(data: dict, file: str, lines: dict | None = None,
            base: Path | None = None) -> dict[str, ModuleDef]:
    """Every module a spec may use: its own `modules:` and those of its `include:` files."""
    out: dict[str, ModuleDef] = {}
    base = base or (Path(file).parent if not file.startswith("<") else Path.cwd())
    sources = [(file, data, lines or {})]
    for inc, path, where in _include_paths(data, file, lines or {}, base):
        try:
            text = read_spec_text(path, "spec")
        except SpecError as e:
            raise SpecError(f"included file {inc}: {e.message}", source=where, help=e.help) \
                from None
        inc_data, inc_lines = parse_text(text, str(path))
        sources.append((str(path), inc_data, inc_lines))
    for src_file, d, ls in sources:
        for name, raw in (d.get("modules") or {}).items():
            if name in REGISTRY:
                raise SpecError(f"module '{name}' has the name of a built-in op",
                                source=Source(src_file, ls.get(("modules", name))),
                                help="rename the module")
            if name in out:
                raise SpecError(f"module '{name}' is defined twice ({out[name].file} and "
                                f"{src_file})", source=Source(src_file,
                                                              ls.get(("modules", name))))
            try:
                m = ModuleSpec.model_validate(raw)
            except ValidationError as exc:
                e = exc.errors()[0]
                loc = ("modules", name) + tuple(e["loc"])
                field = ".".join(map(str, e["loc"]))
                msg = PLAIN.get(e["type"]) and f"field '{field}' {PLAIN[e['type']]}, got " \
                    f"{_yaml(e.get('input'))}" or f"{field}: " + e["msg"].removeprefix(
                        "Value error, ")
                raise SpecError(f"module '{name}': {msg}", source=Source(
                    src_file, line_of(ls, loc)), help=_MODULE_HELP.get(str(e["loc"][0]))) \
                    from None
            out[name] = ModuleDef(name, m, src_file, ls, ("modules", name))
            check_module(out[name])
    return out


_MODULE_HELP = {
    "inputs": "inputs are names (letters, digits and _, not starting with a digit), e.g. "
              "`inputs: [x]`",
    "nodes": "nodes are written as in the top-level `nodes:`: `id: {op: relu, in: x}`",
    "outputs": "list the node ids the module returns, e.g. `outputs: [out]`",
}


def check_module(mdef: ModuleDef) -> None:
    """A module's names and references, checked as the top level's are: valid and distinct
    input names and node ids, every `in:` naming one of its inputs or nodes, every output
    one of its nodes. Errors point at the module's own file and line."""
    m, name = mdef.spec, mdef.name

    def at(*path) -> Source:
        return Source(mdef.file, line_of(mdef.lines, mdef.prefix + path))
    for k, inp in enumerate(m.inputs):
        if inp in m.inputs[:k]:
            raise SpecError(f"module '{name}' lists input '{inp}' twice", source=at("inputs", k),
                            help="each input of a module has its own name")
    for nid, nd in m.nodes.items():
        op = nd.get("op") if isinstance(nd, dict) else None
        op = op if isinstance(op, str) else None
        if not IDENT.match(str(nid)):
            raise SpecError(f"node id '{nid}' of module '{name}' is not a valid name",
                            source=at("nodes", nid), help="use letters, digits and _, not "
                                                          "starting with a digit")
        if nid in m.inputs:
            raise SpecError(f"'{nid}' is both an input and a node id of module '{name}'",
                            node=nid, op=op, source=at("nodes", nid),
                            help="rename the node (or the input): a name means one value")
        _check_module_refs(mdef, nid, nd, op, at)
    for k, ref in enumerate(m.outputs):
        if str(ref).split(".")[0] not in m.nodes:
            raise SpecError(f"module '{name}' output '{ref}' is not one of its nodes",
                            source=at("outputs", k), help=suggest(str(ref), m.nodes) or
                            f"its nodes: {', '.join(m.nodes) or 'none'}")


def _check_module_refs(mdef: ModuleDef, nid, nd, op, at) -> None:
    refs = nd.get("in", []) if isinstance(nd, dict) else []
    refs = [refs] if isinstance(refs, str) else refs if isinstance(refs, list) else []
    names = list(mdef.spec.inputs) + [k for k in mdef.spec.nodes if k != nid]
    for k, ref in enumerate(refs):
        if not isinstance(ref, str) or ref.startswith("$"):      # `$arg`: given by the call
            continue
        where = at("nodes", nid, "in", k) if len(refs) > 1 else at("nodes", nid, "in")
        if not REF.match(ref):
            raise SpecError(f"'{ref}' is not a node id or input name", node=nid, op=op,
                            source=where, help="a reference is a name of letters, digits and "
                                               "_, or `id.output`")
        base = ref.split(".")[0]
        if base == nid:
            raise SpecError(f"node '{nid}' of module '{mdef.name}' reads its own output",
                            node=nid, op=op, source=where, help="a node cannot depend on "
                            "its own output; use `scan` over a module for a recurrence")
        if base not in names:
            raise SpecError(f"'{ref}' is not an input or a node of module '{mdef.name}'",
                            node=nid, op=op, source=where, help=suggest(base, names) or
                            f"its inputs: {', '.join(mdef.spec.inputs) or 'none'}; its nodes: "
                            f"{', '.join(k for k in mdef.spec.nodes if k != nid) or 'none'}")


#: Folders besides the spec's own tree that `include:` may read from, separated like PATH
#: (``os.pathsep``); empty by default.
INCLUDE_PATH_VAR = "DLGRAPH_INCLUDE_PATH"


def include_roots(base: Path) -> list[Path]:
    """Where `include:` may read: the spec's folder tree, and the folders named in the
    ``DLGRAPH_INCLUDE_PATH`` environment variable (an explicit opt-in)."""
    extra = [Path(r).expanduser() for r in os.environ.get(INCLUDE_PATH_VAR, "").split(os.pathsep)
             if r.strip()]
    return [Path(r).resolve() for r in (base, *extra)]


def _include_paths(data: dict, file: str, lines: dict, base: Path):
    """(as written, resolved path, where written) for each `include:`, confined to the roots."""
    incs = data.get("include")
    if incs is None:
        return []
    where = Source(file, lines.get(("include",)))
    if not isinstance(incs, list) or not all(isinstance(i, str) and i for i in incs):
        raise SpecError(f"`include:` is a list of spec file paths, not {incs!r}"[:200],
                        source=where, help="write e.g. `include: [modules/blocks.yaml]`")
    roots, out = include_roots(base), []
    for i, inc in enumerate(incs):
        at = Source(file, lines.get(("include", i), where.line))
        path = base / inc
        try:
            real = path.resolve()
        except (OSError, ValueError, RuntimeError):
            raise SpecError(f"included file not found: {inc}", source=at) from None
        if not any(real.is_relative_to(r) for r in roots):
            raise SpecError(f"included file {inc} is outside the spec's folder ({base})",
                            source=at, help=f"include files below the spec's folder, or add "
                                            f"their folder to {INCLUDE_PATH_VAR}")
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise SpecError(f"included file {inc} is not a .yaml, .yml or .json spec",
                            source=at, help="include spec files that define `modules:`")
        if not path.exists():
            raise SpecError(f"included file not found: {inc}", source=at,
                            help=f"paths are relative to the spec's folder ({base})")
        out.append((inc, path, at))
    return out


_MEMBER = re.compile(r"^(literal\[.*\]|float|int|str|bool|none|list\[.*\]|dict\[.*\])$")


def _value_loc(loc, data) -> tuple:
    """A pydantic error location without the union members it tried (``literal[...]``,
    ``float``): the path of the value in the spec. Parts that are keys of the data stay."""
    out, cur = [], data
    for p in loc:
        if isinstance(cur, dict) and p in cur or isinstance(cur, list) and \
                isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]
        elif isinstance(p, str) and _MEMBER.match(p):
            continue
        elif isinstance(cur, dict) and p in (cur.get("type"), cur.get("source")):
            continue        # the tag of a union told apart by `type:`/`source:` (adam)
        else:
            cur = None
        out.append(p)
    return tuple(out)


#: names other libraries use -> dlgraph's (Keras, PyTorch): where a did-you-mean by spelling
#: would point at the wrong field (`units` is not `init`)
SYNONYMS = {"units": "out", "out_features": "out", "filters": "out", "out_channels": "out",
            "hidden_size": "hidden", "num_layers": "layers", "kernel_size": "kernel",
            "num_heads": "heads", "rate": "p", "dropout": "p", "axes": "axis"}
#: (op, field) that does not exist on purpose, and what to say instead
NOT_SUPPORTED = {("slice", "step"): "slice takes no step: strided slices are not supported; "
                                    "reshape and take, or slice then pool"}


def _field_help(op, name: str, fields: list[str]) -> str:
    if (op, name) in NOT_SUPPORTED:
        return NOT_SUPPORTED[(op, name)]
    if SYNONYMS.get(name) in fields:
        return f"did you mean '{SYNONYMS[name]}'? (dlgraph's name for {name})"
    return suggest(name, fields) or f"known fields: {', '.join(sorted(fields))}"


def _model_at(model, path: tuple, data):
    """The pydantic model that holds the value at ``path`` of ``data`` (a union told apart
    by ``type``/``source``/``op`` resolved by the data); None where it cannot be told."""
    ann = model
    for p in path:
        ann, data = _member(ann, data), data
        if ann is None:
            return None
        if isinstance(p, int):
            args = typing.get_args(ann)
            ann, data = (args[0] if args else None), (data[p] if isinstance(data, list)
                                                     and p < len(data) else None)
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            f = next((f for k, f in ann.model_fields.items() if p in (k, f.alias)), None)
            ann, data = (f.annotation if f else None), (data.get(p) if isinstance(data, dict)
                                                        else None)
        else:
            args = typing.get_args(ann)
            ann, data = (args[-1] if args else None), (data.get(p) if isinstance(data, dict)
                                                       else None)
    ann = _member(ann, data)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _member(ann, data):
    """Unwrap Annotated/Optional/Union to the member ``data`` belongs to."""
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) not in (Union, types.UnionType):
        return ann
    members = [_member(m, data) for m in typing.get_args(ann) if m is not type(None)]
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    for m in models:
        for key in ("type", "source", "op"):
            f = m.model_fields.get(key)
            if f is not None and isinstance(data, dict) and \
                    data.get(key) in typing.get_args(f.annotation):
                return m
    return models[0] if len(models) == 1 else (members[0] if len(members) == 1 else None)


def _yaml(v) -> str:
    """A value as the spec wrote it: true, 'text', 3."""
    return {True: "true", False: "false", None: "null"}.get(v, repr(v)) \
        if isinstance(v, bool | None) else repr(v)


#: pydantic error type -> what a person reads ("must be a whole number, got true")
PLAIN = {"int_type": "must be a whole number", "int_parsing": "must be a whole number",
         "int_from_float": "must be a whole number", "float_type": "must be a number",
         "float_parsing": "must be a number", "finite_number": "must be a finite number",
         "bool_type": "must be true or false", "bool_parsing": "must be true or false",
         "string_type": "must be text", "list_type": "must be a list",
         "dict_type": "must be a mapping of names to values"}


def _spec_error(err: dict, data: dict, lines: dict, file: str, registry) -> SpecError:
    loc = _value_loc(err["loc"], data)
    node = op = None
    model = spec_model()
    if len(loc) >= 2 and loc[0] == "nodes":
        node = loc[1]
        op = data["nodes"][node].get("op")
        if len(loc) >= 3 and loc[2] in (op, "module"):  # pydantic puts the union tag here
            loc = loc[:2] + loc[3:]
        model = registry[op].attrs if op in registry else ModuleCall
        field_path = loc[2:]
    else:
        field_path = loc
    src = Source(file, line_of(lines, loc))
    field = ".".join(str(p) for p in field_path if p != "in_") or None
    field = field or ("in" if "in_" in field_path else None)
    kind, help = err["type"], None
    if kind == "missing":
        msg = f"missing required field '{field}'"
        src = src if src.line else Source(file, line_of(lines, loc[:-1]) or 1)
        info = model.model_fields.get(str(field_path[-1])) if field_path else None
        help = info.description if info is not None and info.description else None
    elif kind == "union_tag_invalid":
        tag, disc = err["ctx"]["tag"], err["ctx"]["discriminator"].strip("'")
        expected = [t.strip(" '") for t in err["ctx"]["expected_tags"].split(",")]
        msg = f"unknown {field + '.' if field else ''}{disc} '{tag}'"
        help = suggest(tag, expected) or f"one of: {', '.join(expected)}"
    elif kind == "literal_error" and isinstance(err.get("input"), str):
        names = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        msg = f"field '{field}': '{err['input']}' is not one of {', '.join(names)}"
        help = suggest(err["input"], names)
    elif kind == "extra_forbidden":
        name = str(field_path[-1])
        here = _model_at(model, field_path[:-1], data["nodes"][node] if node else data)
        fields = [f.alias or k for k, f in here.model_fields.items() if k != "op"] \
            if here is not None else []
        msg = f"unknown field '{name}'"
        help = _field_help(op, name, fields)
    elif kind in PLAIN:
        msg = f"field '{field}' {PLAIN[kind]}, got {_yaml(err.get('input'))}"
    else:
        text = err["msg"].removeprefix("Value error, ")
        msg = f"field '{field}': {text}" if field else text
    return SpecError(msg, node=node, op=op, source=src, help=help)


def read_spec(path: str | Path):
    """Read and validate a spec file; returns ``(GraphSpec, lines)``."""
    p = Path(path)
    data, lines = parse_text(read_spec_text(p), str(p))
    return validate_data(data, lines, str(p)), lines


def read_spec_text(p: Path, what: str = "spec") -> str:
    """The text of a spec file: a regular file of at most ``MAX_SPEC_BYTES``, UTF-8.

    A FIFO or device is refused before it is opened (reading one blocks or never ends), and
    nothing of a file that is not UTF-8 is echoed back."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SpecError(f"no such file: {p}", help="check the path") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}",
                        source=Source(str(p))) from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{p} is a folder, not a {what} file", source=Source(str(p)),
                        help="name a .yaml or .json file")
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{p} is not a regular file (a pipe, device or socket is never read)",
                        source=Source(str(p)), help=f"name a {what} file")
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(f"the {what} file has {st.st_size} bytes; at most {MAX_SPEC_BYTES} are "
                        "read", source=Source(str(p)),
                        help="a spec is a short text; keep data in data files")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read {p}: {e.strerror or e}", source=Source(str(p))) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(f"a byte that is not UTF-8 at column {col}; this is not a {what} file",
                        source=Source(str(p), line),
                        help="specs are UTF-8 text (YAML or JSON)") from None
