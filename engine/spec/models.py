"""The spec format as pydantic models: inputs, dims, nodes (every registered op's model,
told apart by `op`; any other op is a module call), modules, and the GraphSpec itself.

Reading a spec file into these models is :mod:`dlgraph.engine.spec.read` (text to data with
source lines: :mod:`~dlgraph.engine.spec.parse`; modules and includes:
:mod:`~dlgraph.engine.spec.library`; pydantic errors as located :class:`SpecError`:
:mod:`~dlgraph.engine.spec.explain`).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from dlgraph.engine.io.data.text import VOCAB
from dlgraph.engine.spec.base import IDENT, NodeSpec, Strict
from dlgraph.engine.spec.sweep import SweepSpec
from dlgraph.engine.spec.train import TrainSpec
from dlgraph.ops import REGISTRY

SCHEMA_VERSION = 1
"""The spec format's version: `dlgraph: 1` in a spec, and the version of its JSON Schema."""
SCHEMA_ID = f"urn:dlgraph:spec:{SCHEMA_VERSION}"

Dim = Annotated[int | str, Field(description="a size, or a symbolic name such as `batch`"),
                WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1},
                                          {"type": "string", "pattern": IDENT.pattern}]})]


def _keys(*, builtins: bool = True) -> dict:
    """The JSON Schema of a mapping's keys: names (letters, digits, _), with ``builtins``
    False not the name of a built-in op either (a module's name)."""
    names: dict = {"pattern": IDENT.pattern}
    if not builtins:
        names["not"] = {"enum": sorted(REGISTRY)}
    return {"propertyNames": names}


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


def _module_op(schema: dict) -> None:
    # a module call is any op that is not built in: so exactly one branch of a node's
    # `oneOf` matches, and a built-in op with a wrong field is not taken for a module call
    schema["properties"]["op"]["not"] = {"enum": sorted(REGISTRY)}


class ModuleCall(NodeSpec):
    """A node whose op is a module of the spec (`modules:` or `include:`); its other fields
    are the module's args."""

    model_config = ConfigDict(extra="allow", populate_by_name=True,
                              json_schema_extra=_module_op)
    op: str = Field(description="the name of a module defined in `modules:` or included")
    share: str | None = Field(None, description="the id of another call of the same module "
                              "whose parameters this one uses (weight sharing)")

    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModuleSpec(Strict):
    """A composite defined in the spec: used like an op, any number of times."""

    doc: str | None = Field(None, description="what it computes")
    inputs: list[str] = Field(description="names its nodes use for the call's `in:`, in order",
                              json_schema_extra={"uniqueItems": True, "items": {
                                  "type": "string", "pattern": IDENT.pattern}})
    args: dict[str, Any] = Field(default_factory=dict, description="arg name -> default "
                                 "(null: required); `$name` in a node field is replaced by it")
    nodes: dict[str, dict[str, Any]] = Field(
        description="its nodes, as in `nodes:` (fields may be `$arg`, so each is checked "
                    "when the module is called)",
        json_schema_extra={**_keys(), "additionalProperties": {
            "type": "object", "required": ["op"], "properties": {"op": {"type": "string"}}}})
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
        inputs: dict[str, TensorSpec] = Field(description="graph inputs by name",
                                              json_schema_extra=_keys())
        dims: dict[str, DimSpec] = Field(default_factory=dict, description="bounds of named "
                                         "dims, e.g. `time: {max: 256}` for a sequence "
                                         "length left symbolic (`shape: [batch, time, 1]`); "
                                         "without one the longest length seen is used")
        nodes: dict[str, Node] = Field(description="node id to node, in file order",
                                       json_schema_extra=_keys())
        outputs: list[str] = Field(description="node ids whose values `run` returns")
        modules: dict[str, ModuleSpec] = Field(default_factory=dict, description=
                                               "composites defined here, used like ops",
                                               json_schema_extra=_keys(builtins=False))
        include: list[str] = Field(default_factory=list, description="spec files whose "
                                   "`modules:` this spec may use (paths relative to it, "
                                   "inside its folder tree; other folders only when listed "
                                   "in the DLGRAPH_INCLUDE_PATH environment variable)",
                                   json_schema_extra={"items": {
                                       "type": "string", "pattern": r"\.(yaml|yml|json)$"}})
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


class ModuleLibrary(Strict):
    """A file of modules for other specs to `include:` (graphs/modules/cells.yaml)."""

    dlgraph: Literal[1] = Field(description="spec format version; must be 1")
    name: str | None = Field(None, description="a short name")
    doc: str | None = Field(None, description="what its modules are for")
    modules: dict[str, ModuleSpec] = Field(description="composites, used like ops by the "
                                           "specs that include this file",
                                           json_schema_extra=_keys(builtins=False))


def _vocab_counts(schema) -> None:
    """Let every count of a node also be `vocab` (a text source's size, `num: vocab`:
    see io/data/text.py), as the spec is read."""
    items = schema.items() if isinstance(schema, dict) else enumerate(schema)
    for k, v in list(items):
        if isinstance(v, dict) and v.get("type") == "integer":
            schema[k] = {"anyOf": [v, {"const": VOCAB}]}
        elif isinstance(v, dict | list):
            _vocab_counts(v)


def _activations(props: dict) -> None:
    """A layer's `activation` (a plain string in its model, checked when it is built) is
    one of the activation ops."""
    act = props.get("activation", {})
    if act.get("anyOf") == [{"type": "string"}, {"type": "null"}]:
        names = sorted(n for n, d in REGISTRY.items() if d.family == "activation")
        act["anyOf"] = [{"enum": names}, {"type": "null"}]


def _standard(schema):
    """The schema without OpenAPI's `discriminator` (pydantic writes it beside a `oneOf`;
    JSON Schema has no such keyword, and validators in strict mode, ajv's default, refuse
    it). The `const` of each branch's tag says the same."""
    if isinstance(schema, dict):
        return {k: _standard(v) for k, v in schema.items() if k != "discriminator"}
    if isinstance(schema, list):
        return [_standard(v) for v in schema]
    return schema


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a spec file: a spec (`GraphSpec`) or a file of
    modules to include (`ModuleLibrary`), generated from the models that validate specs.

    A node is one of the built-in ops' models, told apart by its `op` (a const in each), or
    a module call, whose `op` is any name that is not a built-in op; `in` is one name or a
    list. What the schema cannot say (references between nodes, shapes, a module call's
    args) ``dlgraph validate`` checks.

    >>> json_schema()["$id"]
    'urn:dlgraph:spec:1'
    """
    adapter = TypeAdapter(Annotated[Union[spec_model(), ModuleLibrary],  # noqa: UP007
                                    Field(union_mode="left_to_right")])
    s = _standard(adapter.json_schema(by_alias=True))
    branches = s.pop("anyOf")               # [GraphSpec, ModuleLibrary]
    for ref in s["$defs"]["GraphSpec"]["properties"]["nodes"]["additionalProperties"]["oneOf"]:
        name = ref["$ref"].rsplit("/", 1)[1]
        if name != "ModuleCall":
            _vocab_counts(s["$defs"][name]["properties"])
            _activations(s["$defs"][name]["properties"])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": f"dlgraph spec, version {SCHEMA_VERSION}",
            "description": "A dlgraph spec (`dlgraph: 1` with inputs, nodes and outputs), or "
                           "a file of modules that specs include. Check one with "
                           "`dlgraph validate`; this schema is `dlgraph schema`.",
            "$comment": f"spec format version {SCHEMA_VERSION}",
            # a file with `modules:` and none of a spec's inputs, nodes and outputs is a
            # library of modules; anything else is checked as a spec (errors point into it)
            "if": {"type": "object", "required": ["modules"], "not": {"anyOf": [
                {"required": [k]} for k in ("inputs", "nodes", "outputs")]}},
            "then": branches[1], "else": branches[0], **s}
