"""Spec text to plain data, safely, with the line of every key (for located errors).

YAML or JSON is read as plain data only (no Python tags, no merge keys), under caps that keep
a hostile file from taking the machine (:data:`MAX_SPEC_BYTES`, :data:`MAX_SPEC_VALUES`,
:data:`MAX_SPEC_DEPTH`). Validation against the models is :mod:`dlgraph.engine.spec.read`.
"""

from __future__ import annotations

import json
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dlgraph.engine.errors import Source, SpecError


class _Loader(yaml.SafeLoader):
    """Safe YAML: plain data only, no Python tags, and scalars read by the YAML 1.2 core
    schema (as JSON and every other current YAML library read them): ``010`` is 10, not
    octal 8; ``on``, ``off``, ``yes``, ``no`` are text, not booleans; ``1e3`` is a number;
    ``1:20`` is text, not the sexagesimal 80."""


def _core_schema(loader: type) -> None:
    """Replace PyYAML's YAML 1.1 implicit types by the 1.2 core schema's."""
    loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag not in (_BOOL, _INT, _FLOAT)]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for tag, rx, first in ((_BOOL, _CORE_BOOL, "tTfF"), (_INT, _CORE_INT, "-+0123456789"),
                           (_FLOAT, _CORE_FLOAT, "-+0123456789.")):
        loader.add_implicit_resolver(tag, rx, list(first))
    loader.add_constructor(_INT, lambda self, node: _core_int(self.construct_scalar(node)))


_BOOL, _INT, _FLOAT = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                       "tag:yaml.org,2002:float")
_CORE_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_CORE_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_CORE_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                         r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _core_int(text: str) -> int:
    """A core-schema int: decimal (leading zeros are decimal), 0o octal or 0x hex."""
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text, 10)


_core_schema(_Loader)


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


def parse_value(text: str, where: str) -> Any:
    """One YAML value typed on a command line (``{source: spirals, samples: 500}``), read
    by the spec's rules (YAML 1.2 scalars, the same caps); a located SpecError otherwise.

    >>> parse_value("{samples: 010, on: yes}", "--data")
    {'samples': 10, 'on': 'yes'}
    """
    data, _ = parse_text(f"v: {text}\n", where) if text.strip() else ({"v": None}, {})
    return data["v"]


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


_DEEP_INDENT = re.compile(rf"^[ \t]{{{4 * MAX_SPEC_DEPTH},}}\S", re.M)


def _check_flow_depth(text: str, file: str) -> None:
    """Refuse deep nesting before YAML's scanner (quadratic in [ { depth, slow on deep
    indentation) or JSON see it."""
    m = _DEEP_INDENT.search(text)
    if m:
        raise SpecError(f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                        source=Source(file, text.count("\n", 0, m.start()) + 1),
                        help="flatten the nesting")
    raw = np.frombuffer(text.encode("utf-8", "replace"), np.uint8)
    at = np.flatnonzero(np.isin(raw, np.frombuffer(b"[]{}", np.uint8)))
    if len(at) > 2 * MAX_SPEC_DEPTH:
        step = np.where((raw[at] == ord("[")) | (raw[at] == ord("{")), 1, -1)
        deep = np.flatnonzero(np.cumsum(step) > 2 * MAX_SPEC_DEPTH)
        if len(deep):
            line = int(np.count_nonzero(raw[:at[deep[0]]] == ord("\n"))) + 1
            raise SpecError(f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep",
                            source=Source(file, line), help="flatten the nesting")


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
                deep = count <= MAX_SPEC_VALUES
                raise SpecError(f"the spec is nested more than {MAX_SPEC_DEPTH} levels deep"
                                if deep else f"the spec has more than {MAX_SPEC_VALUES} values",
                                source=Source(file, line), help="flatten the nesting" if deep
                                else "a spec is a short text; keep data in data files")
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
        elif isinstance(v, float) and node.tag == _FLOAT and _EXPONENT.fullmatch(node.value) \
                and "." not in node.value and v.is_integer():
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
