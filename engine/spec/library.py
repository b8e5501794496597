"""The modules a spec may use: its own `modules:` and those of its `include:` files.

Included files are confined to the spec's folder tree (and the folders listed in
``DLGRAPH_INCLUDE_PATH``), read with the same caps as a spec, and every module is checked
where it was written, so that an error names the included file and its line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dlgraph.engine.errors import Source, SpecError, suggest
from dlgraph.engine.spec.base import IDENT, REF
from dlgraph.engine.spec.explain import explain_module_error
from dlgraph.engine.spec.models import ModuleSpec
from dlgraph.engine.spec.parse import line_of, parse_text, read_spec_text
from dlgraph.ops import REGISTRY


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
    for src_file, d, ls in _sources(data, file, lines or {}, base):
        mods = d.get("modules") or {}
        if not isinstance(mods, dict):
            raise SpecError(f"`modules:` maps module names to modules, not {mods!r}"[:200],
                            source=Source(src_file, ls.get(("modules",))),
                            help="write e.g. `modules: {block: {inputs: [x], nodes: {...}, "
                                 "outputs: [...]}}`")
        for name, raw in mods.items():
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
                raise explain_module_error(exc, name, src_file, ls) from None
            out[name] = ModuleDef(name, m, src_file, ls, ("modules", name))
            check_module(out[name])
    return out


def _sources(data: dict, file: str, lines: dict, base: Path) -> list[tuple[str, dict, dict]]:
    """(file, data, lines) of the spec and of each file it includes, read and parsed."""
    sources = [(file, data, lines)]
    for inc, path, where in _include_paths(data, file, lines, base):
        try:
            text = read_spec_text(path, "spec")
        except SpecError as e:
            raise SpecError(f"included file {inc}: {e.message}", source=where, help=e.help) \
                from None
        inc_data, inc_lines = parse_text(text, str(path))
        sources.append((str(path), inc_data, inc_lines))
    return sources


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
