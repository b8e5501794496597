"""The spec format: pydantic models, safe YAML/JSON loading, and source lines for errors.

A spec is read in three steps: the text is parsed into plain data while the line of every
key is recorded (:func:`parse_text`), the data is validated against the models
(:func:`validate_data`), and pydantic's errors become :class:`SpecError` with file, line,
node, op and, for a misspelling, the close match.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

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

from dlgraph.ops import REGISTRY

from .errors import Source, SpecError, suggest
from .spec_base import IDENT, NodeSpec, Strict
from .train_spec import TrainSpec

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
    return op if op in REGISTRY else "module"


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
        nodes: dict[str, Node] = Field(description="node id to node, in file order")
        outputs: list[str] = Field(description="node ids whose values `run` returns")
        modules: dict[str, ModuleSpec] = Field(default_factory=dict, description=
                                               "composites defined here, used like ops")
        include: list[str] = Field(default_factory=list, description="spec files whose "
                                   "`modules:` this spec may use (paths relative to it)")
        train: TrainSpec | None = Field(None, description="how to train; absent: inference "
                                                          "only")

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
            return self

    return GraphSpec


# --------------------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """Safe YAML: plain data only, no Python tags."""


def parse_text(text: str, file: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML or JSON into plain data and the line of every mapping key and list item.

    Duplicate keys are errors (PyYAML would silently keep the last one).

    >>> data, lines = parse_text("a: 1\\nb: {c: 2}\\n", "x.yaml")
    >>> data, lines[("b", "c")]
    ({'a': 1, 'b': {'c': 2}}, 2)
    """
    if file.endswith(".json"):
        _check_json(text, file)
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            lines: dict[tuple, int] = {}
            data = _construct(loader, root, (), lines, file) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"not valid YAML: {e.problem or e.context}",
                        source=Source(file, line),
                        help="check indentation and quoting on this line") from None
    except yaml.YAMLError as e:
        raise SpecError(f"not valid YAML: {e}", source=Source(file)) from None
    if data is None:
        raise SpecError("the file is empty", source=Source(file),
                        help="a spec starts with `dlgraph: 1`; see docs/spec.md")
    if not isinstance(data, dict):
        raise SpecError(f"a spec must be a mapping of fields, not a {type(data).__name__}",
                        source=Source(file, 1), help="a spec starts with `dlgraph: 1`")
    return data, lines


def _check_json(text: str, file: str) -> None:
    """JSON is read strictly as JSON (YAML would accept a trailing comma)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"not valid JSON: {e.msg}", source=Source(file, e.lineno),
                        help=f"at column {e.colno}") from None


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:str",
               "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
               "tag:yaml.org,2002:null"}


def _construct(loader, node, path: tuple, lines: dict, file: str):
    if node.tag == "tag:yaml.org,2002:merge":
        raise SpecError("YAML merge keys (<<) are not supported", help="write the fields out, "
                        "or define a module for the repeated part",
                        source=Source(file, node.start_mark.line + 1))
    if node.tag not in _PLAIN_TAGS:
        raise SpecError(f"unsupported YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')}: "
                        "specs hold plain data only",
                        source=Source(file, node.start_mark.line + 1),
                        help="remove the tag; Python objects are never constructed")
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                _construct(loader, knode, path, lines, file)      # raises: not supported
            key = loader.construct_object(knode, deep=True)
            if not isinstance(key, str | int | float | bool):
                raise SpecError("mapping keys must be plain names",
                                source=Source(file, knode.start_mark.line + 1))
            if key in out:
                raise SpecError(f"duplicate key '{key}'"
                                + (f" in '{path[-1]}'" if path else ""),
                                source=Source(file, knode.start_mark.line + 1),
                                help=f"'{key}' is already defined on line "
                                     f"{lines[path + (key,)]}; rename or remove one of them")
            lines[path + (key,)] = knode.start_mark.line + 1
            out[key] = _construct(loader, vnode, path + (key,), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            items.append(_construct(loader, item, path + (i,), lines, file))
        return items
    return loader.construct_object(node, deep=True)


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
    _precheck_nodes(data, lines, file, base)
    try:
        return spec_model().model_validate(data)
    except ValidationError as exc:
        errs = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = _spec_error(errs[0], data, lines, file, REGISTRY)
        if len(errs) > 1:
            first.message += f" (and {len(errs) - 1} more problem{'s' * (len(errs) > 2)})"
        raise first from None


def _precheck_nodes(data: dict, lines: dict, file: str, base: Path | None = None):
    """Names and ops, checked by hand so that errors suggest the close match."""
    if data.get("dlgraph") not in (1, None):
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
    for inc in data.get("include") or []:
        where = Source(file, lines.get(("include",)) if lines else None)
        path = base / str(inc)
        if not path.is_file():
            raise SpecError(f"included file not found: {inc}", source=where,
                            help=f"paths are relative to the spec's folder ({base})")
        inc_data, inc_lines = parse_text(path.read_text(encoding="utf-8"), str(path))
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
                raise SpecError(f"module '{name}': {'.'.join(map(str, e['loc']))}: "
                                f"{e['msg']}", source=Source(src_file, line_of(ls, loc))) \
                    from None
            out[name] = ModuleDef(name, m, src_file, ls, ("modules", name))
    return out


def _spec_error(err: dict, data: dict, lines: dict, file: str, registry) -> SpecError:
    loc = tuple(err["loc"])
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
        info = model.model_fields.get(str(field_path[-1])) if field_path else None
        help = info.description if info is not None and info.description else None
    elif kind == "union_tag_invalid":
        tag, disc = err["ctx"]["tag"], err["ctx"]["discriminator"].strip("'")
        expected = [t.strip(" '") for t in err["ctx"]["expected_tags"].split(",")]
        msg = f"unknown {field + '.' if field else ''}{disc} '{tag}'"
        help = suggest(tag, expected) or f"one of: {', '.join(expected)}"
    elif kind == "extra_forbidden":
        name = str(field_path[-1])
        fields = [f.alias or k for k, f in model.model_fields.items() if k != "op"]
        msg = f"unknown field '{name}'"
        help = suggest(name, fields) or f"known fields: {', '.join(sorted(fields))}"
    else:
        text = err["msg"].removeprefix("Value error, ")
        msg = f"field '{field}': {text}" if field else text
    return SpecError(msg, node=node, op=op, source=src, help=help)


def read_spec(path: str | Path):
    """Read and validate a spec file; returns ``(GraphSpec, lines)``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"no such file: {p}", help="check the path") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise SpecError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}",
                        source=Source(str(p))) from None
    data, lines = parse_text(text, str(p))
    return validate_data(data, lines, str(p)), lines
