"""The base models every op's spec model builds on: a leaf that ops/ and spec/models.py both import.

Nothing here knows the registry: ``NodeSpec`` holds what every node has (``in``, ``doc``),
``ParamLayer`` what a layer with parameters adds (``init``, ``trainable``).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from dlgraph.engine.spec.init import INITIALISERS

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

Init = Literal[tuple(INITIALISERS)]          # the names of the initialiser table

_REF_SCHEMA = {"type": "string", "pattern": REF.pattern}
Refs = Annotated[list[str], WithJsonSchema({"anyOf": [
    _REF_SCHEMA, {"type": "array", "items": _REF_SCHEMA}]})]
"""`in:` is one name or a list (`in: x` is `in: [x]`); the JSON Schema says both."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True,
                              allow_inf_nan=False)


class NodeSpec(Strict):
    """Fields every node has; each op's model adds its own and fixes ``op``."""

    ref_fields: ClassVar[tuple[str, ...]] = ()
    """Fields besides ``in`` that name a value (an input or node id): the builder orders
    nodes by them too and hands the op the node id each resolves to."""

    in_: Refs = Field(default_factory=list, alias="in",
                           description="inputs: graph input names or node ids (`id.name` for "
                                       "a named output of a composite)")
    doc: str | None = Field(None, description="free text shown in drawings and summaries")

    @field_validator("in_", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("in_")
    @classmethod
    def _refs(cls, v):
        for ref in v:
            if not REF.match(ref):
                raise ValueError(f"'{ref}' is not a node id or input name (letters, digits, _)")
        return v

    @model_validator(mode="after")
    def _ref_fields(self):
        for f in self.ref_fields:
            ref = getattr(self, f)
            if ref is not None and not REF.match(ref):
                raise ValueError(f"{f}: '{ref}' is not a node id or input name")
        return self

    def refs(self) -> list[tuple[str, str]]:
        """(field, reference) for every value this node reads: ``in`` first."""
        return [("in", r) for r in self.in_] + [(f, getattr(self, f)) for f in self.ref_fields
                                                if getattr(self, f) is not None]


class ParamLayer(NodeSpec):
    """A layer that owns parameters: they are initialised under the seed, overridable."""

    init: dict[str, Init | float] = Field(
        default_factory=dict,
        description="initialiser per parameter name, e.g. `{weight: he_normal, bias: 0.1}`")
    trainable: bool = Field(True, description="false freezes this layer's parameters")
    share: str | None = Field(None, description="the id of another node of the same op whose "
                              "parameters this one uses (weight sharing: one set, gradients "
                              "summed over the uses)")


__all__ = ["IDENT", "REF", "Init", "Strict", "NodeSpec", "ParamLayer"]
