"""The code keeps the shape the design promises: imports only point down the chain
(cli -> dlgraph -> engine -> ops -> leaves) and no function is too long to read at once.

The import graph is read from the source with ``ast`` (module-level and function-level
imports alike), with module names from pyproject's package-dir mapping, so it is the graph
of the installed package ``dlgraph``, not of whatever happens to be on ``sys.path``.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60

# Files whose functions may run long while they are rewritten (none now: keep it that way).
LONG_FUNCTIONS_ALLOWED: set[str] = set()


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Package name -> folder, from pyproject's ``[tool.setuptools.package-dir]``."""
    conf = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    return {pkg: root / folder
            for pkg, folder in conf["tool"]["setuptools"]["package-dir"].items()}


def modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every .py file of the mapped packages (subfolders too)."""
    out: dict[str, Path] = {}
    for pkg, folder in sorted(dirs.items(), key=lambda kv: len(kv[0])):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((pkg, *parts))] = path     # a deeper mapping overrides (same file)
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement asks for (``from a import b``: a.b and a)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" for a in node.names] + [target]


def import_graph(dirs: dict[str, Path] | None = None) -> nx.DiGraph:
    """An edge from each module to every module of ours it imports, wherever the import is."""
    mods = modules(dirs or package_dirs())
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            asked = _imported(node, name, path.name == "__init__.py")
            # `from pkg import name`: the submodule when there is one, else the package
            hits = [t for t in asked[:-1] if t in mods] or [t for t in asked[-1:] if t in mods]
            if isinstance(node, ast.Import):
                hits = [t for t in asked if t in mods]
            g.add_edges_from((name, t) for t in hits if t != name)
    return g


def cycles(g: nx.DiGraph) -> list[list[str]]:
    """One cycle per strongly connected group of modules, as the list of modules on it."""
    out = []
    for group in nx.strongly_connected_components(g):
        if len(group) > 1:
            loop = nx.find_cycle(g.subgraph(group))
            out.append([u for u, _ in loop] + [loop[0][0]])
    return sorted(out)


def long_functions(files: list[Path], limit: int = MAX_LINES, root: Path = ROOT) -> list[str]:
    """``file:line name (n lines)`` for every function or method over ``limit`` lines."""
    out = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return out


# --------------------------------------------------------------------------------- tests


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_import_graph_is_read_from_the_sources():
    g = import_graph()
    # a top-level import, a relative one, a function-level one, a package import
    assert g.has_edge("dlgraph.engine.spec.models", "dlgraph.ops")
    assert g.has_edge("dlgraph.engine.train.loop", "dlgraph.engine.graph.autodiff")
    assert g.has_edge("dlgraph.api", "dlgraph.engine.train.loop")        # inside train()
    assert g.has_edge("dlgraph.ops.nn", "dlgraph.engine.spec.base")
    assert g.has_edge("dlgraph.cli.main", "dlgraph.engine.errors")
    assert "dlgraph.engine.io.data.base" in g and "dlgraph.engine.io.onnx" in g


def test_the_leaves_import_nothing_above_them():
    g = import_graph()
    for leaf in ("dlgraph.engine.errors", "dlgraph.engine.types", "dlgraph.engine.graph.ir",
                 "dlgraph.engine.spec.base"):
        above = {m for m in nx.descendants(g, leaf)
                 if m.startswith(("dlgraph.ops", "dlgraph.cli", "dlgraph.api"))
                 or m in ("dlgraph.engine.spec.models", "dlgraph.engine.graph.build",
                          "dlgraph.engine.graph.autodiff", "dlgraph.engine.report.summary")}
        assert not above, f"{leaf} reaches up to {sorted(above)}"
    ops = {m for m in g if m.startswith("dlgraph.ops")}
    up = {(m, t) for m in ops for t in g.successors(m)
          if t.startswith("dlgraph.") and not t.startswith("dlgraph.ops")
          and t not in ("dlgraph.engine.errors", "dlgraph.engine.types",
                        "dlgraph.engine.spec.base", "dlgraph.engine.spec.init",
                        "dlgraph.engine.graph.ir")}
    assert not up, f"ops/ imports above the leaves: {sorted(up)}"


def test_a_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("import top.a\n")
    (pkg / "d.py").write_text("from . import c\n")                       # not on the cycle
    g = import_graph({"top": pkg})
    assert cycles(g) == [["top.a", "top.sub.b", "top.c", "top.a"]]


def test_no_function_in_dlgraph_engine_ops_or_cli_is_over_60_lines():
    files = [p for d in ("dlgraph", "engine", "ops", "cli")
             for p in sorted((ROOT / d).rglob("*.py"))
             if str(p.relative_to(ROOT)) not in LONG_FUNCTIONS_ALLOWED]
    too_long = long_functions(files)
    assert not too_long, "functions over 60 lines:\n" + "\n".join(too_long)


def test_the_length_check_counts_from_def_to_last_line(tmp_path):
    def lines(n, indent):
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))
    (tmp_path / "m.py").write_text("def fits():\n" + lines(59, "    ")        # 60 lines
                                   + "\n\nclass C:\n    def over(self):\n"
                                   + lines(60, "        "))                  # 61 lines
    assert long_functions([tmp_path / "m.py"], root=tmp_path) == ["m.py:64 over (61 lines)"]


def test_the_allow_list_names_real_files():
    assert all((ROOT / path).is_file() for path in LONG_FUNCTIONS_ALLOWED)


# ------------------------------------------------------------- tinygrad behind one door

DOOR = "dlgraph.engine.compile.tinygrad_door"
# tinygrad's public API: what any module may import from it
PUBLIC_TINYGRAD = {"tinygrad", "tinygrad.nn", "tinygrad.nn.optim", "tinygrad.nn.state"}
# attributes that reach into tinygrad's objects (a captured JIT, a tensor's UOp graph)
INTERNAL_ATTRS = {"uop", "captured", "cnt", "fxn", "jit_cache", "lazydata", "_linear"}


def _internal_module(name: str) -> bool:
    """Whether ``name`` is one of tinygrad's modules outside its public API (``from tinygrad
    import helpers`` reaches its settings and its compile cache's connection)."""
    import importlib.util
    return name not in PUBLIC_TINYGRAD and importlib.util.find_spec(name) is not None


def tinygrad_reaches(path: Path) -> list[str]:
    """``line: what`` for every use of tinygrad beyond its public API in one file: an import
    of another tinygrad module (also as ``from tinygrad import helpers``) or of an underscore
    name, ``Tensor._x``, or an attribute of tinygrad's internals (``t.uop``,
    ``jit.captured``, ``jit.cnt``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tinygrad":
            private = [a.name for a in node.names if a.name.startswith("_")
                       or node.module == "tinygrad" and _internal_module(f"tinygrad.{a.name}")]
            if node.module not in PUBLIC_TINYGRAD or private:
                out.append(f"{node.lineno}: from {node.module} import "
                           + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            out += [f"{node.lineno}: import {a.name}" for a in node.names
                    if a.name.startswith("tinygrad.") and a.name not in PUBLIC_TINYGRAD]
        elif isinstance(node, ast.Attribute):
            private = (isinstance(node.value, ast.Name) and node.value.id == "Tensor"
                       and node.attr.startswith("_") and not node.attr.startswith("__"))
            if private or node.attr in INTERNAL_ATTRS:
                out.append(f"{node.lineno}: .{node.attr}")
    return out


def jit_builders(path: Path) -> list[int]:
    """Lines where a ``TinyJit(...)`` is constructed."""
    return [n.lineno for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None))
            in ("TinyJit", "_TinyJit")]


def test_tinygrad_internals_live_in_one_module():
    found = {name: hits for name, path in modules(package_dirs()).items()
             if name != DOOR and (hits := tinygrad_reaches(path))}
    assert not found, "tinygrad beyond its public API outside the door:\n" + "\n".join(
        f"{name}: {h}" for name, hits in sorted(found.items()) for h in hits)
    assert tinygrad_reaches(modules(package_dirs())[DOOR]), "the door reaches nothing?"


def test_the_tests_reach_tinygrad_through_the_door_too():
    """A test that needs tinygrad's internals asks the door (a tinygrad upgrade then touches
    one file, tests included)."""
    here = Path(__file__).resolve()
    found = {p.name: hits for p in sorted(here.parent.glob("*.py"))
             if p != here and (hits := tinygrad_reaches(p))}
    assert not found, "tinygrad beyond its public API in the tests:\n" + "\n".join(
        f"{name}: {h}" for name, hits in found.items() for h in hits)


def test_the_reach_check_sees_each_kind_of_reach(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from tinygrad import Tensor, TinyJit, _x\nfrom tinygrad.engine.jit import J\n"
                 "from tinygrad.nn.state import get_state_dict\n"
                 "a = Tensor._device_seeds\nb = t.uop.base\nj.cnt = 1\nc = t.shape\n"
                 "from tinygrad import helpers, nn, dtypes\n")
    assert sorted(int(h.split(":")[0]) for h in tinygrad_reaches(f)) == [1, 2, 4, 5, 6, 8]


def test_only_the_door_builds_a_tinyjit():
    found = {name: lines for name, path in modules(package_dirs()).items()
             if name != DOOR and (lines := jit_builders(path))}
    assert not found, f"TinyJit built outside {DOOR}: {found}"


# ------------------------------------------------------------------- private names stay home


def private_imports(dirs: dict[str, Path] | None = None) -> list[str]:
    """``module: from other import _name`` for every underscore name one of our modules
    imports from another of ours."""
    mods = modules(dirs or package_dirs())
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _imported(node, name, path.name == "__init__.py")[-1]
            if target.split(".")[0] != "dlgraph" or target == name:
                continue
            out += [f"{name}: from {target} import {a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_no_module_imports_another_modules_private_names():
    found = private_imports()
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_private_import_check_finds_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper(): pass\n")
    (pkg / "b.py").write_text("from .a import _helper\nfrom __future__ import annotations\n")
    assert private_imports({"dlgraph": pkg}) == ["dlgraph.b: from dlgraph.a import _helper"]


# ------------------------------------------------------------------ the CLI uses the API only

CLI_MAY_IMPORT = {"dlgraph", "dlgraph.api", "dlgraph.engine.errors"}


def test_the_cli_imports_only_the_public_api():
    g = import_graph()
    found = sorted((m, t) for m in g if m.startswith("dlgraph.cli") for t in g.successors(m)
                   if not t.startswith("dlgraph.cli") and t not in CLI_MAY_IMPORT)
    assert not found, f"the CLI goes around the API: {found}"


# ------------------------------------------------------------------ one job per long module

MAX_MODULE_LINES = 600
# Modules over MAX_MODULE_LINES, each with why its length is one job (anything else splits).
LONG_MODULES_ALLOWED: dict[str, str] = {
    "engine/io/onnx/import_ops.py": "one table: a rule per ONNX operator",
    "engine/compile/tinygrad_door.py": "one door: every use of tinygrad past its public API "
                                       "(what splits off knowing nothing of tinygrad has: "
                                       "chunks.py, gemm.py)",
}


def test_no_module_is_over_600_lines_unless_it_is_one_job():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for d in ("dlgraph", "engine", "ops", "cli") for p in sorted((ROOT / d).rglob("*.py"))}
    too_long = [f"{path} ({n} lines)" for path, n in sizes.items()
                if n > MAX_MODULE_LINES and path not in LONG_MODULES_ALLOWED]
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by concern):\n" \
        + "\n".join(too_long)
    assert all(path in sizes for path in LONG_MODULES_ALLOWED), "the allow-list names a " \
        "module that is not there"


def test_every_package_folder_is_installed():
    """A folder of modules missing from pyproject's ``packages`` works in an editable install
    and is absent from a wheel: ``pip install .`` would give an ``import dlgraph`` that fails."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(conf["tool"]["setuptools"]["packages"])
    found = {".".join((pkg, *init.parent.relative_to(folder).parts))
             for pkg, folder in package_dirs().items() for init in folder.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
