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
    field_validator,
    model_validator,
)

from dlgraph.engine.spec.base import IDENT, NodeSpec, Strict
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
