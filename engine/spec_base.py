"""The base models every op's spec model builds on: a leaf that ops/ and spec.py both import.

Nothing here knows the registry: ``NodeSpec`` holds what every node has (``in``, ``doc``),
``ParamLayer`` what a layer with parameters adds (``init``, ``trainable``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .init import INITIALISERS

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

Init = Literal[tuple(INITIALISERS)]          # the names of the initialiser table


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True,
                              allow_inf_nan=False)


class NodeSpec(Strict):
    """Fields every node has; each op's model adds its own and fixes ``op``."""

    in_: list[str] = Field(default_factory=list, alias="in",
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
