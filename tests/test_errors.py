"""Every bad spec in tests/specs/bad gives exactly the error text in its .err file,
through the CLI (exit status 1, no traceback) and through the Python API."""

from pathlib import Path

import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted(p for p in (ROOT / "tests/specs/bad").iterdir() if p.suffix in (".yaml", ".json"))


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)          # error texts name files relative to the repository


@pytest.mark.parametrize("spec", BAD, ids=[p.name for p in BAD])
def test_cli_prints_exact_error(spec):
    rel = spec.relative_to(ROOT)
    expected = Path(f"{spec}.err").read_text()
    result = CliRunner().invoke(main, ["validate", str(rel)])
    assert result.exit_code == 1, result.output
    assert result.stderr == expected
    assert "Traceback" not in result.output


@pytest.mark.parametrize("spec", BAD, ids=[p.name for p in BAD])
def test_api_raises_the_same_error(spec):
    rel = spec.relative_to(ROOT)
    expected = Path(f"{spec}.err").read_text().removeprefix("error: ").rstrip("\n")
    with pytest.raises(dlgraph.DlgraphError) as info:
        dlgraph.validate(dlgraph.load(rel))
    assert str(info.value) == expected


def test_every_error_class_is_covered():
    kinds = set()
    for spec in BAD:
        try:
            dlgraph.validate(dlgraph.load(spec.relative_to(ROOT)))
        except dlgraph.DlgraphError as e:
            kinds.add(type(e).__name__)
    assert kinds >= {"SpecError", "GraphError", "CycleError", "ShapeError", "GradientError"}


def test_python_tag_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"dlgraph: 1\nname: e\ninputs: {{}}\nnodes:\n  a: !!python/object/apply:"
                    f"os.system ['touch {marker}']\noutputs: []\n")
    with pytest.raises(dlgraph.SpecError, match="unsupported YAML tag"):
        dlgraph.load(spec)
    assert not marker.exists()


def test_error_from_a_string_names_the_line():
    text = "dlgraph: 1\nname: s\ninputs:\n  x: {shape: [2, 3]}\nnodes:\n" \
           "  a: {op: relu, in: y}\noutputs: [a]\n"
    with pytest.raises(dlgraph.GraphError) as info:
        dlgraph.load(text)
    assert str(info.value) == ("<string>:6: node 'a' (relu): 'y' is not an input or a node\n"
                               "  help: known names: a, x")


def test_unused_input_is_a_warning(tmp_path):
    spec = tmp_path / "unused.yaml"
    spec.write_text("dlgraph: 1\nname: u\ninputs:\n  x: {shape: [2]}\n  z: {shape: [2]}\n"
                    "nodes:\n  a: {op: relu, in: x}\noutputs: [a]\n")
    result = CliRunner().invoke(main, ["validate", str(spec)])
    assert result.exit_code == 0
    assert f"warning: {spec}:5: input 'z' is not used by any node" in result.stderr


def test_many_independent_mistakes_are_capped():
    nodes = "".join(f"  c{i}: {{op: conv2d, in: x, out: 8, kernel: 3}}\n" for i in range(12))
    text = f"dlgraph: 1\nname: many\ninputs:\n  x: {{shape: [batch, 4]}}\nnodes:\n{nodes}" \
           f"outputs: [{', '.join(f'c{i}' for i in range(12))}]\n"
    with pytest.raises(dlgraph.ShapeError) as info:
        dlgraph.validate(dlgraph.load(text))
    shown = str(info.value).splitlines()
    assert [s.split(": node ")[1].split()[0] for s in shown if ": node " in s] == \
        [f"'c{i}'" for i in range(10)]
    assert shown[-1] == "error: ... and 2 more"
    assert shown[0].startswith("<string>:6: node 'c0' (conv2d): conv2d needs")
