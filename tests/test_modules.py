"""User-defined modules: `modules:`, `include:`, args, nesting, errors, and `scan` over a
module cell (checked against the built-in lstm on the same weights)."""

from pathlib import Path

import numpy as np
import pytest

import dlgraph

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = ROOT / "tests/specs/modules"


def spec_text(nodes: str, extra: str = "") -> str:
    return ("dlgraph: 1\nname: m\ninclude: [blocks.yaml]\n" + extra +
            "inputs:\n  x: {shape: [batch, 4]}\nnodes:\n" + nodes + "outputs: [out]\n")


def load(tmp_path, nodes, extra=""):
    p = tmp_path / "spec.yaml"
    (tmp_path / "blocks.yaml").write_text((BLOCKS / "blocks.yaml").read_text())
    p.write_text(spec_text(nodes, extra))
    return dlgraph.load(p)


def test_module_used_twice_has_separate_params(tmp_path):
    g = load(tmp_path, "  a: {op: residual, in: x, hidden: 8}\n"
                       "  out: {op: residual, in: a, hidden: 3, act: tanh}\n")
    assert sorted(g.params) == ["a.f.bias", "a.f.weight", "a.h.bias", "a.h.weight",
                                "out.f.bias", "out.f.weight", "out.h.bias", "out.h.weight"]
    assert g.params["out.h.weight"].shape == (3, 4)
    m = dlgraph.compile(g, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    p = {k: v.numpy() for k, v in m.params.items()}

    def block(x, pre, act):
        h = act(x @ p[f"{pre}.h.weight"].T + p[f"{pre}.h.bias"])
        return x + h @ p[f"{pre}.f.weight"].T + p[f"{pre}.f.bias"]
    ref = block(block(x, "a", lambda v: np.maximum(v, 0)), "out", np.tanh)
    np.testing.assert_allclose(m(x=x)["out"], ref, rtol=1e-5, atol=1e-6)


def test_named_output_of_a_module(tmp_path):
    g = load(tmp_path, "  a: {op: residual, in: x, hidden: 8}\n"
                       "  out: {op: relu, in: a.h}\n")
    assert g[g.outputs["out"]].type.shape == ("batch", 8)


def test_module_defined_in_the_spec(tmp_path):
    extra = ("modules:\n  twice:\n    inputs: [v]\n    nodes:\n"
             "      d: {op: add, in: [v, v]}\n    outputs: [d]\n")
    g = load(tmp_path, "  out: {op: twice, in: x}\n", extra)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(dlgraph.compile(g)(x=x)["out"], 2 * x)


@pytest.mark.parametrize("nodes,extra,message", [
    ("  out: {op: residul, in: x, hidden: 8}\n", "",
     "spec.yaml:7: node 'out': unknown op 'residul'\n  help: did you mean 'residual'?"),
    ("  out: {op: residual, in: x}\n", "",
     "spec.yaml:7: node 'out' (residual): module 'residual' needs arg hidden\n"
     "  help: add hidden: ... to the node"),
    ("  out: {op: residual, in: x, hiden: 3}\n", "",
     "spec.yaml:7: node 'out' (residual): module 'residual' has no arg 'hiden'\n"
     "  help: did you mean 'hidden'?"),
    ("  out: {op: residual, in: [x, x], hidden: 3}\n", "",
     "spec.yaml:7: node 'out' (residual): module 'residual' takes 1 input (x), got 2\n"
     "  help: set `in:` to [x]"),
    ("  out: {op: residual, in: x, hidden: 3, act: relux}\n", "",
     "blocks.yaml:9: node 'out/h' (linear): unknown activation 'relux'\n"
     "  help: did you mean 'relu'?"),
    ("  out: {op: loop, in: x}\n",
     "modules:\n  loop:\n    inputs: [v]\n    nodes:\n      d: {op: loop, in: v}\n"
     "    outputs: [d]\n",
     "spec.yaml:8: node 'out/d' (loop): module 'loop' uses itself (through loop)\n"
     "  help: modules cannot be recursive"),
])
def test_module_errors(tmp_path, nodes, extra, message):
    with pytest.raises(dlgraph.DlgraphError) as e:
        load(tmp_path, nodes, extra)
    got = str(e.value).replace(str(tmp_path) + "/", "")
    assert got == message


def test_missing_include(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(spec_text("  out: {op: relu, in: x}\n").replace("blocks.yaml", "nope.yaml"))
    with pytest.raises(dlgraph.SpecError) as e:
        dlgraph.load(p)
    assert str(e.value).startswith(f"{p}:3: included file not found: nope.yaml")


def test_scan_of_module_cell_equals_builtin_lstm():
    """graphs/modules/cells.yaml's lstm_cell under scan computes the built-in lstm."""
    custom = dlgraph.load(ROOT / "graphs/custom_cell.yaml")
    builtin = dlgraph.load(ROOT / "graphs/lstm.yaml")
    mc, mb = dlgraph.compile(custom, seed=0), dlgraph.compile(builtin, seed=0)
    # one step's params per gate k of (i, f, g, o) are rows k*H:(k+1)*H of the fused weights
    pc = {k: v.numpy() for k, v in mc.params.items()}
    H = 32
    w_ih = np.concatenate([pc[f"enc.cell.x{g}.weight"] for g in "ifgo"])
    w_hh = np.concatenate([pc[f"enc.cell.h{g}.weight"] for g in "ifgo"])
    b_ih = np.concatenate([pc[f"enc.cell.x{g}.bias"] for g in "ifgo"])
    from tinygrad import Tensor
    for name, value in [("enc.weight_ih_l0", w_ih), ("enc.weight_hh_l0", w_hh),
                        ("enc.bias_ih_l0", b_ih), ("enc.bias_hh_l0", np.zeros(4 * H)),
                        ("pred.weight", pc["pred.weight"]), ("pred.bias", pc["pred.bias"])]:
        mb.params[name] = Tensor(value.astype(np.float32)).realize()
    x = np.random.default_rng(0).standard_normal((3, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(mc(x=x)["pred"], mb(x=x)["pred"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module,message", [
    ("    inputs: [v]\n    nodes:\n      a: {op: relu, in: w}\n    outputs: [a]\n",
     "lib.yaml:7: node 'a' (relu): 'w' is not an input or a node of module 'm1'\n"
     "  help: its inputs: v; its nodes: none"),
    ("    inputs: [v]\n    nodes:\n      9a: {op: relu, in: v}\n    outputs: [a]\n",
     "lib.yaml:7: node id '9a' of module 'm1' is not a valid name\n"
     "  help: use letters, digits and _, not starting with a digit"),
    ("    inputs: [v]\n    nodes:\n      v: {op: relu, in: v}\n    outputs: [v]\n",
     "lib.yaml:7: node 'v' (relu): 'v' is both an input and a node id of module 'm1'\n"
     "  help: rename the node (or the input): a name means one value"),
    ("    inputs: [v, v]\n    nodes:\n      a: {op: relu, in: v}\n    outputs: [a]\n",
     "lib.yaml:5: module 'm1' lists input 'v' twice\n"
     "  help: each input of a module has its own name"),
    ("    inputs: [v]\n    nodes:\n      a: {op: relu, in: v}\n    outputs: [b]\n",
     "lib.yaml:8: module 'm1' output 'b' is not one of its nodes\n  help: its nodes: a"),
])
def test_included_module_is_checked_where_it_is_written(tmp_path, module, message):
    """An included module's names are checked when the spec is loaded, even when no node
    calls it, and the error names the module's own file and line."""
    (tmp_path / "lib.yaml").write_text("dlgraph: 1\nname: lib\nmodules:\n  m1:\n" + module)
    p = tmp_path / "spec.yaml"
    p.write_text("dlgraph: 1\nname: s\ninclude: [lib.yaml]\ninputs:\n  x: {shape: [batch, 4]}\n"
                 "nodes:\n  out: {op: relu, in: x}\noutputs: [out]\n")
    with pytest.raises(dlgraph.DlgraphError) as e:
        dlgraph.load(p)
    assert str(e.value).replace(str(tmp_path) + "/", "") == message


def test_unused_module_input_is_a_warning(tmp_path):
    extra = ("modules:\n  pair:\n    inputs: [v, w]\n    nodes:\n      d: {op: relu, in: v}\n"
             "    outputs: [d]\n")
    g = load(tmp_path, "  out: {op: pair, in: [x, x]}\n", extra)
    assert [w.replace(str(tmp_path) + "/", "") for w in g.warnings] == [
        "spec.yaml:6: input 'w' of module 'pair' is not used by any of its nodes"]
