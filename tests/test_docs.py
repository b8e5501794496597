"""docs/spec.md: up to date with the code, complete, and every example in it works.

Examples are checked by their first line: a YAML block starting with `dlgraph: 1` must load;
one starting with `# error: TEXT` (then the spec) must fail with TEXT in the message; one
starting with `train:` must validate as a train section. README.md's blocks are held to the
same rules when it exists.
"""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

import pytest
import yaml

import dlgraph
from dlgraph.engine.io.data import SOURCES
from dlgraph.ops import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "spec.md"
README = ROOT / "README.md"


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen_docs = _gen_docs()
TEXT = DOC.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line, body) of every fenced code block."""
    return [(m.group(1), text.count("\n", 0, m.start()) + 2, m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def headings(text: str) -> list[str]:
    body = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", body, re.M)]


def examples(path: Path) -> list[tuple[str, str]]:
    """(id, body) of the YAML/JSON blocks of a file that are specs or train sections."""
    if not path.exists():
        return []
    out = []
    for lang, line, body in code_blocks(path.read_text(encoding="utf-8")):
        first = body.lstrip().split("\n", 1)[0]
        if lang in ("yaml", "yml", "json") and (
                first.startswith(("dlgraph:", "# error:", "train:")) or '"dlgraph"' in first):
            out.append((f"{path.name}:{line}", body))
    return out


def test_generated_sections_are_up_to_date():
    stale = gen_docs.check(DOC)
    assert not stale, (f"docs/spec.md is out of date in {', '.join(stale)}; run "
                       ".venv/bin/python scripts/gen_docs.py")


def test_generation_is_deterministic():
    assert gen_docs.render(TEXT)[0] == gen_docs.render(gen_docs.render(TEXT)[0])[0]


def test_every_op_has_a_heading():
    found = set(headings(TEXT))
    missing = [name for name in REGISTRY if name not in found]
    assert not missing, f"ops without a heading in docs/spec.md: {missing}"


def test_every_data_source_has_a_heading():
    found = set(headings(TEXT))
    assert not [s for s in SOURCES if f"source: {s}" not in found]


def test_headings_have_unique_anchors():
    anchors = [gen_docs.anchor(h) for h in headings(TEXT)]
    dup = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not dup, f"headings with the same anchor: {dup}"


def test_internal_links_resolve():
    anchors = {gen_docs.anchor(h) for h in headings(TEXT)}
    body = re.sub(r"^```.*?^```", "", TEXT, flags=re.M | re.S)
    bad = sorted({a for a in re.findall(r"\]\(#([^)]+)\)", body) if a not in anchors})
    assert not bad, f"links to missing headings: {bad}"


def test_every_initialiser_of_the_table_is_documented_with_its_formula():
    from dlgraph.engine.spec.base import Init
    from dlgraph.engine.spec.init import INITIALISERS
    assert typing.get_args(Init) == tuple(INITIALISERS)
    section = TEXT.split("<!-- generated: initialisers -->")[1].split("<!-- end generated -->")[0]
    for d in INITIALISERS.values():
        assert f"| `{d.name}` | {d.formula} |" in section


def test_schedules_and_metrics_are_documented_from_their_tables():
    from dlgraph.engine.spec.train import METRICS, SCHEDULES
    for table in (SCHEDULES, METRICS):
        assert all(f"{d.name}: {d.doc}" in TEXT for d in table.values())


def test_type_text():
    assert gen_docs.type_text(int | list[int]) == "int | list[int]"
    assert gen_docs.type_text(typing.Literal["a", "b"] | None) == '"a" | "b"'
    assert gen_docs.type_text(dict[str, float]) == "dict[str, float]"


def test_check_reports_a_stale_section(tmp_path, capsys):
    doc = tmp_path / "spec.md"
    doc.write_text(TEXT.replace("#### linear\n", "#### linear (old)\n", 1), encoding="utf-8")
    assert gen_docs.main(["--check", str(doc)]) == 1
    assert "'ops' is out of date" in capsys.readouterr().out
    assert gen_docs.main([str(doc)]) == 0
    assert doc.read_text(encoding="utf-8") == TEXT
    assert gen_docs.main(["--check", str(doc)]) == 0


DOC_EXAMPLES = examples(DOC) + examples(README)


def test_the_docs_have_examples():
    assert len([b for _, b in examples(DOC) if b.startswith("dlgraph: 1")]) >= 3
    assert any(b.startswith("# error:") for _, b in examples(DOC))


@pytest.mark.parametrize("body", [b for _, b in DOC_EXAMPLES],
                         ids=[i for i, _ in DOC_EXAMPLES])
def test_example_loads(body):
    first = body.split("\n", 1)[0]
    if first.startswith("# error:"):
        expected = first.removeprefix("# error:").strip()
        with pytest.raises(dlgraph.DlgraphError) as e:
            dlgraph.load(body, base=ROOT)
        assert expected in str(e.value)
    elif first.startswith("train:"):
        from dlgraph.engine.spec.train import TrainSpec
        TrainSpec.model_validate(yaml.safe_load(body)["train"])
    else:
        g = dlgraph.load(body, base=ROOT)
        assert g.outputs
