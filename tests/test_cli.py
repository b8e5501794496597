"""The command line as a user types it: exit codes, files written, texts printed."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
FORWARD = str(ROOT / "tests/specs/good/forward.yaml")
TINY = str(ROOT / "tests/specs/good/tiny_mlp.yaml")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_usage_error_exits_2():
    assert cli("run").exit_code == 2
    assert cli("render", FORWARD, "--rankdir", "XY").exit_code == 2
    assert cli("frobnicate").exit_code == 2


def test_missing_file_exits_1_without_traceback():
    r = cli("validate", "nope.yaml")
    assert r.exit_code == 1
    assert r.stderr == "error: no such file: nope.yaml\n  help: check the path\n"


def test_validate_prints_summary():
    r = cli("validate", TINY)
    assert r.exit_code == 0, r.output
    assert "logits  linear         [batch, 2]" in r.stdout
    assert "params:  82 (82 trainable; 328 B as float32)" in r.stdout
    assert "backward (train):" in r.stdout
    assert r.stdout.rstrip().endswith(f"ok: {TINY} is valid")


def test_validate_backward_describes_the_backward_graph():
    plain, full = cli("validate", TINY), cli("validate", "--backward", TINY)
    assert full.exit_code == 0, full.output
    assert full.stdout != plain.stdout
    assert full.stdout.startswith(plain.stdout.rsplit("backward (train)", 1)[0])
    extra = full.stdout.split("backward (train): 29 nodes, derived by graph reversal\n")[1]
    # 3 matmuls: the weight gradients of both layers and the cotangent of h (x needs none)
    listed = extra.split("\n  gradients of")[0].removeprefix("  nodes by op: ")
    ops = {op: int(n) for op, n in (i.split() for i in listed.replace("\n", " ").split(","))}
    assert ops["matmul"] == 3
    assert sum(ops.values()) == 29
    assert "  gradients of 4 parameters (82 elements):\n" in extra
    for row in ("h.weight       [16, 2]         32", "h.bias         [16]            16",
                "logits.weight  [2, 16]         32", "logits.bias    [2]              2"):
        assert f"    {row}\n" in extra


def test_run_forward_with_inputs_and_output(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    r = cli("run", FORWARD, "--input", f"x={tmp_path / 'x.npy'}", "--output", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("p: [2, 4] float32  mean 0.25")
    p = np.load(out)["p"]
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    # the same numbers through the Python API with the same seed
    ref = dlgraph.compile(dlgraph.load(FORWARD), seed=0)(x=x)["p"]
    np.testing.assert_array_equal(p, ref)


def test_run_forward_random_inputs():
    r = cli("run", FORWARD, "--batch", "5")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("p: [5, 4] float32")


def test_run_input_shape_mismatch(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 5), np.float32))
    r = cli("run", FORWARD, "--input", f"x={tmp_path / 'x.npy'}")
    assert r.exit_code == 1
    assert r.stderr == (f"error: --input x={tmp_path / 'x.npy'}: input 'x' has shape [2, 5], "
                        "but the spec declares [batch, 3] "
                        "with batch=2\n  help: reshape the data, or change the input's "
                        "`shape:`\n")


def test_run_bad_input_argument():
    r = cli("run", FORWARD, "--input", "x.npy")
    assert r.exit_code == 2
    assert "use NAME=FILE.npy or FILE.npz" in r.output


def test_schema_is_json_with_every_op():
    r = cli("schema")
    assert r.exit_code == 0
    s = json.loads(r.stdout)
    from dlgraph.ops import REGISTRY
    names = {d["properties"]["op"]["const"] for d in s["$defs"].values()
             if "op" in d.get("properties", {}) and "const" in d["properties"]["op"]}
    assert names == set(REGISTRY)
    assert s["$defs"]["GraphSpec"]["required"] == ["dlgraph", "name", "inputs", "nodes", "outputs"]


def test_ops_lists_every_op_and_details():
    r = cli("ops")
    from dlgraph.ops import REGISTRY
    for name in REGISTRY:
        assert f"  {name} " in r.stdout
    r = cli("ops", "linear")
    assert r.stdout.startswith("linear (nn, composite): fully connected layer")
    assert "  out: output features" in r.stdout
    r = cli("ops", "lineer")
    assert r.exit_code == 1 and "did you mean 'linear'?" in r.stderr


def test_render_dot_file(tmp_path):
    out = tmp_path / "g.dot"
    r = cli("render", TINY, "-o", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("digraph") and '"logits"' in text


@pytest.mark.parametrize("device", ["tpu9"])
def test_unknown_device(device):
    r = cli("run", FORWARD, "--device", device)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: unknown device '{device}'")


def test_gradcheck_reports_every_parameter():
    r = cli("gradcheck", TINY, "--batch", "3")
    assert r.exit_code == 0, r.output
    rows = r.stdout.splitlines()
    assert [x.split()[0] for x in rows[:-1]] == ["h.weight", "h.bias", "logits.weight",
                                                  "logits.bias"]
    worst = float(rows[-1].split()[1])
    assert worst < 1e-6 and rows[-1].endswith("(ok)")


def test_missing_clang_is_one_line_with_the_fix(tmp_path):
    """No C compiler on PATH: tinygrad's CPU backend cannot compile; no traceback."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PATH": str(tmp_path), "HOME": str(tmp_path), "CACHELEVEL": "0"}
    env.pop("DEV", None)
    r = subprocess.run([sys.executable, "-m", "dlgraph.cli.main", "run", FORWARD],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no usable tinygrad device")
    assert r.stderr.rstrip().endswith(
        "help: install a C compiler for tinygrad's CPU backend: apt-get install clang")
