"""Pydantic's validation errors, told as a person reads them: a :class:`SpecError` with the
file and line of the value, the node and op, and for a misspelt field the close match (or
dlgraph's name for another library's, `units` -> `out`).
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Union

from pydantic import BaseModel, ValidationError

from dlgraph.engine.errors import Source, SpecError, suggest
from dlgraph.engine.spec.models import ModuleCall, spec_model
from dlgraph.engine.spec.parse import line_of
from dlgraph.ops import REGISTRY

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


def _as_written(v) -> str:
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


def explain_error(err: dict, data: dict, lines: dict, file: str,
                  registry=REGISTRY) -> SpecError:
    """One pydantic error entry (``ValidationError.errors()[k]``) of validating ``data``
    (read from ``file`` with ``lines``) as a located :class:`SpecError`."""
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
        msg = f"field '{field}' {PLAIN[kind]}, got {_as_written(err.get('input'))}"
    else:
        text = err["msg"].removeprefix("Value error, ")
        msg = f"field '{field}': {text}" if field else text
        src = Source(file, _named_line(lines, loc, text) or src.line)
    if help is None:        # what the field is, from its model: every error gets a help line
        help = _described(model, field_path, data["nodes"][node] if node else data) or \
            "docs/spec.md describes every field (`dlgraph schema` for the JSON Schema)"
    return SpecError(msg, node=node, op=op, source=src, help=help)


def _described(model, field_path: tuple, data) -> str | None:
    """The description of the field at ``field_path`` (its model's Field), as a hint."""
    names = [p for p in field_path if isinstance(p, str)]
    if not names:
        return None
    here = _model_at(model, field_path[:len(field_path) - field_path[::-1].index(names[-1]) - 1],
                     data)
    info = next((f for k, f in here.model_fields.items() if names[-1] in (k, f.alias)), None) \
        if here is not None else None
    return f"{names[-1]}: {info.description}" if info is not None and info.description else None


def _named_line(lines: dict, loc: tuple, text: str) -> int | None:
    """The line of the key a whole-model error names in quotes (``dims names 'tiem'``),
    searched under the error's location: more exact than the section's first line."""
    for name in re.findall(r"'([^']+)'", text):
        hits = [line for path, line in lines.items()
                if path[:len(loc)] == loc and len(path) > len(loc) and path[-1] == name]
        if hits:
            return min(hits)
    return None


def explain_validation(exc: ValidationError, data: dict, lines: dict, file: str) -> SpecError:
    """The first problem of a failed spec validation (an unknown field first), with a count
    of the others: ``... (and 2 more problems)``."""
    errs = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = explain_error(errs[0], data, lines, file)
    more = len({_value_loc(e["loc"], data) for e in errs}) - 1   # a union's members: one value
    if more:
        first.message += f" (and {more} more problem{'s' * (more > 1)})"
    return first


_MODULE_HELP = {
    "inputs": "inputs are names (letters, digits and _, not starting with a digit), e.g. "
              "`inputs: [x]`",
    "nodes": "nodes are written as in the top-level `nodes:`: `id: {op: relu, in: x}`",
    "outputs": "list the node ids the module returns, e.g. `outputs: [out]`",
}


def explain_module_error(exc: ValidationError, name: str, file: str, lines: dict) -> SpecError:
    """A module definition that does not validate as a ``ModuleSpec``: its first problem,
    located in the file that defines it."""
    e = exc.errors()[0]
    if not e["loc"]:                            # the module itself is not a mapping
        return SpecError(f"module '{name}' is a mapping of inputs, nodes and outputs, not "
                         f"{_as_written(e.get('input'))}",
                         source=Source(file, line_of(lines, ("modules", name))),
                         help="write e.g. `block: {inputs: [x], nodes: {...}, outputs: [...]}`")
    loc = ("modules", name) + tuple(e["loc"])
    field = ".".join(map(str, e["loc"]))
    msg = PLAIN.get(e["type"]) and f"field '{field}' {PLAIN[e['type']]}, got " \
        f"{_as_written(e.get('input'))}" or f"{field}: " + e["msg"].removeprefix("Value error, ")
    return SpecError(f"module '{name}': {msg}", source=Source(file, line_of(lines, loc)),
                     help=_MODULE_HELP.get(str(e["loc"][0])))
