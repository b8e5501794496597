"""Regenerate the generated sections of docs/spec.md from the live models.

The hand-written prose of docs/spec.md stays as it is; only the text between

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

is replaced, by what :data:`SECTIONS` [NAME] produces from the pydantic models of the spec,
the op registry and the data sources. So the reference never drifts from the code.

    .venv/bin/python scripts/gen_docs.py           # rewrite docs/spec.md in place
    .venv/bin/python scripts/gen_docs.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "spec.md"

BEGIN = re.compile(r"^<!-- generated: ([a-z_]+) -->$", re.M)
END = "<!-- end generated -->"

# family -> heading, in the order they appear; a family not listed here comes after these,
# in alphabetical order, under its own name
FAMILIES = {
    "elementwise": "Elementwise",
    "activation": "Activations",
    "linalg": "Linear algebra and parameters",
    "reduce": "Reductions",
    "shape": "Shape and indexing",
    "nn": "Layers",
    "recurrent": "Recurrent layers",
    "attention": "Attention and transformers",
    "loss": "Losses",
}


# ------------------------------------------------------------------------------ types


def _literal_text(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else _yaml(v)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _init_names() -> tuple[str, ...]:
    from dlgraph.engine.spec.base import Init
    return typing.get_args(Init)


def type_text(ann: Any) -> str:
    """A readable type for an annotation without models: ``int | list[int]``, ``"a" | "b"``.

    >>> type_text(int | list[int])
    'int | list[int]'
    >>> type_text(typing.Literal["relu", "gelu"] | None)
    '"relu" | "gelu"'
    """
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return type_text(args[0])
    if ann is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " | ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        if set(args) == set(_init_names()):
            return "initialiser"
        return " | ".join(_literal_text(a) for a in args)
    if origin in (list, tuple, set):
        return f"list[{', '.join(type_text(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"dict[{type_text(args[0])}, {type_text(args[1])}]"
    if ann is typing.Any:
        return "any"
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _models_in(ann: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation refers to, in order."""
    if _is_model(ann):
        return [ann]
    out: list = []
    for a in typing.get_args(ann):
        out += [m for m in _models_in(a) if m not in out]
    return out


class Links:
    """Where each model is documented: model -> (label, anchor); models found on the way
    that need a section of their own are queued with their path."""

    def __init__(self, fixed: dict[Callable[[type], bool], tuple[str, str]]):
        self.fixed = fixed
        self.own: dict[type, tuple[str, str]] = {}
        self.queue: list[tuple[str, type[BaseModel]]] = []

    def of(self, model: type[BaseModel]) -> tuple[str, str] | None:
        for test, link in self.fixed.items():
            if test(model):
                return link
        return self.own.get(model)

    def add(self, path: str, model: type[BaseModel], label: str | None = None) -> None:
        """Give ``model`` the section headed `` `path` `` (code: paths hold ``<name>``)."""
        if self.of(model) is None:
            heading = f"`{path}`"
            self.own[model] = (f"`{label}`" if label else heading, anchor(heading))
            self.queue.append((heading, model))


def type_md(ann: Any, links: Links, path: str) -> str:
    """A type as markdown: plain types in code, models as links to their section."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return type_md(args[0], links, path)
    models = _models_in(ann)
    if not models:
        return f"`{type_text(ann)}`"
    if _is_model(ann):
        _register(ann, links, path, alone=True)
        label, href = links.of(ann)  # type: ignore[misc]
        return f"[{label}](#{href})"
    if origin in (list, tuple, set):
        return "list of " + type_md(args[0], links, path)
    if origin is dict:
        return f"map: `{type_text(args[0])}` → " + type_md(args[1], links, path + ".<name>")
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return type_md(real[0], links, path)
        alone = len([a for a in real if _models_in(a)]) == 1
        for m in models:
            _register(m, links, path, alone=alone)
        parts = list(dict.fromkeys(type_md(a, links, path) for a in real))
        return parts[0] if len(parts) == 1 else "one of " + ", ".join(parts)
    return f"`{type_text(ann)}`"


def _register(model: type[BaseModel], links: Links, path: str, alone: bool) -> None:
    if links.of(model) is not None:
        return
    if alone:
        links.add(path, model)
        return
    tag = _tag(model)
    links.add(f"{path}: {tag}" if tag else f"{path}: {model.__name__}", model,
              label=tag or model.__name__)


def _tag(model: type[BaseModel]) -> str | None:
    """The value of a model's one-value Literal field (its discriminator), if any."""
    for f in model.model_fields.values():
        args = typing.get_args(f.annotation)
        if typing.get_origin(f.annotation) is typing.Literal and len(args) == 1:
            return str(args[0])
    return None


# ------------------------------------------------------------------------------ values


def _yaml(v: Any) -> str:
    """A value as YAML flow text: ``true``, ``0.001``, ``['*']``, ``{split: 0.1}``."""
    if isinstance(v, BaseModel):
        v = v.model_dump(by_alias=True)
    if isinstance(v, float) and not isinstance(v, bool):
        return repr(v)
    text = yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def default_md(f: FieldInfo) -> str:
    if f.is_required():
        return "required"
    if f.default_factory is not None:
        value = f.default_factory()  # type: ignore[call-arg]
    else:
        value = f.default
    if value is None or value is PydanticUndefined:
        return "—"
    return f"`{_yaml(value)}`"


def constraints(f: FieldInfo) -> str:
    """Bounds of a field as text: ``> 0``, ``≥ 0, < 1``, ``2 items``."""
    out: list[str] = []
    lo = hi = None
    for m in f.metadata:
        if isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Ge):
            out.append(f"≥ {m.ge}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.Le):
            out.append(f"≤ {m.le}")
        elif isinstance(m, at.MinLen):
            lo = m.min_length
        elif isinstance(m, at.MaxLen):
            hi = m.max_length
    if lo == hi and lo is not None:
        out.append(f"length {lo}")
    else:
        out += [f"length ≥ {lo}"] if lo else []
        out += [f"length ≤ {hi}"] if hi is not None else []
    return ", ".join(out)


def md_text(text: str) -> str:
    """Plain text for markdown, outside code spans: a ``*`` that could start or end emphasis
    and a ``<`` that could start an HTML tag are escaped (``x * y`` and ``x < 0`` stay)."""
    def star(m: re.Match) -> str:
        s, a, b = m.string, m.start(), m.end()
        free = (a == 0 or s[a - 1].isspace()) and (b == len(s) or s[b].isspace())
        return m.group(0) if free else m.group(0).replace("*", "\\*")

    def plain(part: str) -> str:
        return re.sub(r"<(?=[A-Za-z/!?])", r"\\<", re.sub(r"\*+", star, part))

    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else plain(p) for p in parts)


def cell(text: str) -> str:
    """Text for a table cell: one line, markdown-safe, pipes escaped."""
    return md_text(" ".join(text.split())).replace("|", "\\|")


def fields_table(model: type[BaseModel], links: Links, path: str,
                 skip: tuple[str, ...] = ()) -> str:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        key = f.alias or name
        t = type_md(f.annotation, links, f"{path}.{key}" if path else key)
        bounds = constraints(f)
        t = f"{t} {bounds}" if bounds else t
        rows.append(_escape_code_pipes(f"| `{key}` | {t} | {cell(default_md(f))} | ")
                    + f"{cell(f.description or '')} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _escape_code_pipes(row: str) -> str:
    """Escape `|` inside code spans of a table row (GitHub splits cells on them)."""
    return re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" | ", " \\| "), row)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def docstring(obj: Any) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    return rst_to_md(inspect.cleandoc(doc)) if doc else ""


def rst_to_md(text: str) -> str:
    """Literal ``x`` to `x` and :func:`name` to `name`; RST tables to markdown tables."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return _rst_tables(text)


def _rst_tables(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if re.fullmatch(r"=+( +=+)+", lines[i]):
            rows, i = _read_rst_table(lines, i)
            out += ["| " + " | ".join(rows[0]) + " |",
                    "|" + "---|" * len(rows[0])]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                    for r in rows[1:]]
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def rst_table(text: str) -> list[list[str]] | None:
    """The rows (header first) of the first simple RST table in ``text``, or None."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if re.fullmatch(r" *=+( +=+)+ *", line):
            return _read_rst_table([x.strip("\n") for x in lines], i)[0]
    return None


def _read_rst_table(lines: list[str], i: int) -> tuple[list[list[str]], int]:
    border = lines[i]
    starts = [m.start() for m in re.finditer(r"=+", border)]  # a cell may overrun its border
    spans = list(zip(starts, [*starts[1:], 10_000], strict=True))

    def split(line: str) -> list[str]:
        return [line[a:b].strip() for a, b in spans]

    rows: list[list[str]] = []
    borders = 0
    while i < len(lines) and borders < 3:
        line = lines[i]
        if line.strip() and set(line.strip()) <= {"=", " "}:
            borders += 1
        elif line.strip():
            cells = split(line)
            if rows and not cells[0] and borders > 1:   # continuation of the row above
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        i += 1
    return [[c.replace("``", "`") for c in r] for r in rows], i


# ------------------------------------------------------------------------------ ops


def probe_params(d) -> list[tuple[str, str, bool]] | None:
    """The parameters a layer op creates with its default fields: (name, init, trainable).

    The op is expanded on small probe inputs (float of rank 2-4, int ids); required fields get
    small values. None where no probe builds.
    """
    from dlgraph.engine.graph.build import Builder
    from dlgraph.engine.graph.ir import Graph
    from dlgraph.engine.types import TType

    fields: dict[str, Any] = {"op": d.name}
    for k, f in d.fields().items():
        if f.is_required():
            fields[f.alias or k] = _probe_value(f.annotation)
    try:
        attrs = d.attrs.model_validate(fields)
    except Exception:
        return None
    n = len(d.inputs) - d.variadic
    for shape, dtype in (((2, 4), "float32"), ((2, 3, 4), "float32"),
                         ((2, 4, 6, 6), "float32"), ((2, 4, 6), "float32"),
                         ((2, 3), "int32")):
        g = Graph()
        b = Builder(g)
        ids = [b.input(f"probe_in{k}", TType(shape, dtype)) for k in range(n)]
        try:
            b.expand(d, attrs, ids, "probe")
        except Exception:
            continue
        return [(p.name.removeprefix("probe."), str(p.init), p.trainable)
                for p in g.params.values()]
    return None


def _probe_value(ann: Any) -> Any:
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return args[0]
    for t in (ann, *args):
        if t is int or typing.get_origin(t) is list:
            return 2 if t is int else [2]
        if t is float:
            return 1.0
        if t is bool:
            return False
    return None


def families() -> dict[str, list]:
    from dlgraph.ops import REGISTRY
    by: dict[str, list] = {}
    for d in REGISTRY.values():
        by.setdefault(d.family, []).append(d)
    order = [f for f in FAMILIES if f in by] + sorted(f for f in by if f not in FAMILIES)
    return {f: by[f] for f in order}


def family_title(family: str) -> str:
    return FAMILIES.get(family, family.replace("_", " ").capitalize())


def op_entry(d, links: Links) -> str:
    from dlgraph.engine.spec.base import NodeSpec, ParamLayer
    out = [f"#### {d.name}", "", cell(d.doc)]
    extra = docstring(d.attrs)
    if extra and " ".join(extra.split()) != " ".join(d.doc.split()):
        out += ["", extra]
    facts = ["composite" if d.composite else "primitive"]
    ins = [f"`{i[:-1]}` (zero or more)" if i.endswith("*") else f"`{i}`" for i in d.inputs]
    facts.append("inputs: " + (", ".join(ins) if ins else "none"))
    if len(d.outputs) > 1:
        facts.append("outputs: " + ", ".join(
            f"`{o}`" + (" (default)" if k == 0 else "") for k, o in enumerate(d.outputs)))
    out += ["", " · ".join(facts)]
    if issubclass(d.attrs, ParamLayer):
        params = probe_params(d)
        tail = "set with `init:`, freeze with `trainable: false`."
        if params:
            shown = ", ".join(f"`{n}` ({i}{', not trained' if not t else ''})"
                              for n, i, t in params)
            out += ["", f"Parameters (with the default fields; default initialiser): {shown}; "
                        + tail]
        elif params is not None:
            out += ["", "Parameters: none with the default fields; " + tail]
        else:
            out += ["", "Parameters: see the description; " + tail]
    base = ParamLayer if issubclass(d.attrs, ParamLayer) else NodeSpec
    skip = (*base.model_fields, "op")
    table = fields_table(d.attrs, links, d.name, skip=skip)
    if table:
        out += ["", table]
    return "\n".join(out)


def _fixed_links() -> dict[Callable[[type], bool], tuple[str, str]]:
    from dlgraph.engine.io.data import DataSource
    from dlgraph.engine.spec.base import NodeSpec
    return {
        (lambda m: issubclass(m, DataSource)): ("data source", "data-sources"),
        (lambda m: issubclass(m, NodeSpec)): ("node", "nodes"),
    }


def gen_ops() -> str:
    links = Links(_fixed_links())
    fams = families()
    out = ["Every op, by family: its one-line meaning, whether it is a primitive or a composite, "
           "its inputs (in `in:` order), and its own fields (besides `op`, `in` and `doc`).",
           ""]
    for fam, ds in fams.items():
        out.append(f"- **{family_title(fam)}**: "
                   + ", ".join(f"[{d.name}](#{anchor(d.name)})" for d in ds))
    for fam, ds in fams.items():
        out += ["", f"### {family_title(fam)}"]
        for d in ds:
            out += ["", op_entry(d, links)]
    return "\n".join(out)


# ------------------------------------------------------------------------------ sections


def model_sections(root: type[BaseModel], path: str, links: Links, level: str,
                   heading: str | None = None) -> str:
    """A section per model reachable from ``root``: its docstring and its fields table.

    A model's heading is the path where it is first met (``train.schedule``), with the
    value of its tag for a member of a union (``train.optimizer: adam``).
    """
    links.add(path, root)
    if heading:
        links.queue[-1] = (heading, root)
        links.own[root] = (heading, anchor(heading))
    out: list[str] = []
    done: set[type] = set()
    while links.queue:
        title, model = links.queue.pop(0)
        if model in done:
            continue
        done.add(model)
        prefix = "" if model is root and heading else title.strip("`").split(":")[0]
        table = fields_table(model, links, prefix)
        doc = docstring(model)
        out += ["", f"{level} {title}"] + (["", doc] if doc else []) + ["", table]
    return "\n".join(out).strip()


IN_TYPE = "`str | list[str]`"   # a node's `in:` takes one name or a list (a before-validator)


def gen_layout() -> str:
    from dlgraph.engine.spec.base import NodeSpec, ParamLayer
    from dlgraph.engine.spec.models import spec_model
    links = Links({**_fixed_links(), (lambda m: m.__name__ == "TrainSpec"): ("`train`", "train")})
    top = model_sections(spec_model(), "", links, "###", heading="Top level")
    node = NodeSpec.model_fields
    layer = {k: f for k, f in ParamLayer.model_fields.items() if k not in node}

    def rows(fs: dict[str, FieldInfo]) -> str:
        return "\n".join(_escape_code_pipes(
            f"| `{f.alias or k}` | {IN_TYPE if k == 'in_' else type_md(f.annotation, links, k)} "
            f"| {cell(default_md(f))} | ") + f"{cell(f.description or '')} |"
            for k, f in fs.items())

    return "\n".join([
        top, "", "### `nodes.<id>`", "",
        "Every node has `op` (the op's name) and:", "",
        "| field | type | default | description |", "|---|---|---|---|", rows(dict(node)),
        "", "Layers that own parameters (marked *Parameters* in the op reference) also have:", "",
        "| field | type | default | description |", "|---|---|---|---|", rows(layer)])


def gen_train() -> str:
    from dlgraph.engine.spec.train import TrainSpec
    links = Links(_fixed_links())
    return model_sections(TrainSpec, "train", links, "###")


def gen_data() -> str:
    from dlgraph.engine.io.data import SOURCES
    by_module: dict[str, list] = {}
    for name, m in SOURCES.items():
        by_module.setdefault(m.__module__, []).append((name, m))
    out = ["Every data spec names its `source:`; every source also takes `seed` (data only; "
           "default: the run's `train.seed`). Arrays share their first (sample) axis; floats "
           "are float32, class labels and token ids int32. They feed the graph inputs of the "
           "same name (or as `train.feed` maps them).", ""]
    out.append("| source | what |\n|---|---|")
    for name, m in SOURCES.items():
        out.append(f"| [{name}](#{anchor('source: ' + name)}) | {cell(docstring(m))} |")
    links = Links(_fixed_links())
    for module, sources in by_module.items():
        mod = sys.modules[module]
        doc = inspect.cleandoc(mod.__doc__ or "")
        title, _, rest = doc.partition("\n")
        table = rst_table(doc)
        n = re.search(r"\(N = ([^)]*)\)", doc)
        keys = _keys_sentence(rest)
        intro = _without_tables(rest.replace(keys, "") if keys else rest)
        head, _, what = title.partition(": ")
        out += ["", f"### {head.rstrip('.')}"]
        out += ["", rst_to_md(what[:1].upper() + what[1:])] if what else []
        if intro:
            out += ["", rst_to_md(intro)]
        for name, m in sources:
            out += ["", f"#### source: {name}", "", docstring(m), "",
                    _arrays_line(name, table, keys, n.group(1) if n else None), "",
                    fields_table(m, links, "data", skip=("source",))]
    return "\n".join(out)


def _keys_sentence(text: str) -> str | None:
    """A module's ``Keys: ...`` sentence, where it has no table."""
    m = re.search(r"^Keys:.*?\.(?=\s|$)", text, re.M | re.S)
    return m.group(0) if m else None


def _without_tables(text: str) -> str:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
    keep = [p for p in paras if p and not re.search(r"^ *=+( +=+)+", p, re.M)
            and not p.startswith("Keys, shapes and dtypes")]
    return "\n\n".join(keep)


def _arrays_line(name: str, table: list[list[str]] | None, keys: str | None,
                 n: str | None) -> str:
    if table:
        head, *rows = table
        for row in rows:
            if name in [s.strip() for s in row[0].split(",")]:
                shown = "; ".join(f"`{h.split()[0]}`{h[len(h.split()[0]):]}: {c}"
                                  for h, c in zip(head[1:], row[1:], strict=True)
                                  if c and c != "(none)")
                where = f" (N = {rst_to_md(n)})" if n else ""
                return f"**Arrays**{where}: {rst_to_md(shown)}."
    if keys:
        return f"**Arrays**: {rst_to_md(' '.join(keys.removeprefix('Keys:').split()))}"
    return "**Arrays**: see the description above."


def gen_initialisers() -> str:
    """The initialiser table of engine/spec/init.py (fan_in/fan_out as PyTorch: weight
    [out, in, *kernel] -> in * kernel, out * kernel)."""
    rows = ["| `init:` value | initial value |", "|---|---|"]
    from dlgraph.engine.spec.init import INITIALISERS
    for d in INITIALISERS.values():
        rows.append(f"| `{d.name}` | {d.formula} |")
    rows.append("| a number, e.g. `0.1` | that value everywhere |")
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "layout": gen_layout,
    "initialisers": gen_initialisers,
    "train": gen_train,
    "data": gen_data,
    "ops": gen_ops,
}


# ------------------------------------------------------------------------------ in place


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated section regenerated, and the names of those changed."""
    out: list[str] = []
    changed: list[str] = []
    seen: set[str] = set()
    pos = 0
    for m in BEGIN.finditer(text):
        if m.start() < pos:
            continue
        name = m.group(1)
        if name not in SECTIONS:
            raise SystemExit(f"{DOC}: unknown generated section '{name}' "
                             f"(known: {', '.join(SECTIONS)})")
        end = text.find(END, m.end())
        if end < 0:
            raise SystemExit(f"{DOC}: generated section '{name}' has no '{END}'")
        new = "\n" + SECTIONS[name]().strip() + "\n"
        if text[m.end():end] != new:
            changed.append(name)
        out += [text[pos:m.end()], new]
        pos = end
        seen.add(name)
    out.append(text[pos:])
    missing = [n for n in SECTIONS if n not in seen]
    if missing:
        raise SystemExit(f"{DOC}: no marker for generated section(s) {', '.join(missing)}; "
                         f"add `<!-- generated: NAME -->` ... `{END}`")
    return "".join(out), changed


def check(path: Path = DOC) -> list[str]:
    """The generated sections of ``path`` that are out of date (empty: up to date)."""
    return render(path.read_text(encoding="utf-8"))[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if docs/spec.md is out of date; change nothing")
    ap.add_argument("path", nargs="?", type=Path, default=DOC)
    args = ap.parse_args(argv)
    new, changed = render(args.path.read_text(encoding="utf-8"))
    if args.check:
        for name in changed:
            print(f"{args.path}: generated section '{name}' is out of date")
        print("run: .venv/bin/python scripts/gen_docs.py" if changed
              else f"{args.path}: up to date")
        return 1 if changed else 0
    if changed:
        args.path.write_text(new, encoding="utf-8")
        print(f"{args.path}: regenerated {', '.join(changed)}")
    else:
        print(f"{args.path}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
