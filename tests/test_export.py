"""ONNX export of every spec we ship, checked by onnx's own checker and by onnxruntime.

Every spec in graphs/ (its sub-folders too), bench/specs/ and tests/specs/good/ is exported,
the model passes ``onnx.checker.check_model(full_check=True)`` and strict shape inference,
and onnxruntime's outputs agree with dlgraph's own forward pass within float32 tolerance.
Layers inside modules, at any depth, are written as their ONNX operators (a ResNet written
with modules has a Conv per conv2d), and a spec that cannot be exported stops with one
located error that names the primitives ONNX has no operator for.
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.errors import GraphError
from dlgraph.engine.spec.init import random_inputs

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted([*ROOT.glob("graphs/**/*.yaml"), *ROOT.glob("bench/specs/*.yaml"),
                *ROOT.glob("tests/specs/good/*.yaml")])
SPECS = [p for p in SPECS if "pipelines" not in p.parts]      # pipelines are not graphs
RESNET = ROOT / "tests/specs/good/resnet_modules.yaml"
TOL = dict(atol=2e-5, rtol=1e-4)      # float32: onnxruntime and tinygrad sum in other orders

REFUSED: dict[str, str] = {}
"""Specs of the folders above that cannot be exported, and why. None today: every layer
has an ONNX operator or exports primitive by primitive (a `windows` primitive, which ONNX
lacks, only ever appears inside conv and pool layers, which export as Conv and *Pool, in
modules and scanned modules too). See test_a_spec_that_cannot_be_exported_... for the
error a user gets."""


def run_ort(path, inputs: dict) -> dict:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].astype(np.int64) if i.type == "tensor(int64)"
            else inputs[i.name] for i in s.get_inputs()}
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed), strict=True))


def noisy(g) -> set[str]:
    """Outputs drawn from random noise (a GAN's generator): compared by shape only."""
    return {name for name, nid in g.outputs.items()
            if any(g[a].op == "noise" for a in g.ancestors([nid]))}


def is_graph(path: Path) -> bool:
    import yaml
    data = yaml.safe_load(path.read_text())
    return isinstance(data, dict) and "nodes" in data


@pytest.mark.parametrize("path", [p for p in SPECS if is_graph(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_spec_exports_and_onnxruntime_agrees(path, tmp_path):
    g = dlgraph.load(path)
    if path.name in REFUSED:
        with pytest.raises(GraphError, match=REFUSED[path.name]):
            dlgraph.export(g, tmp_path / "m.onnx")
        return
    out = dlgraph.export(g, tmp_path / "m.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    x = random_inputs(g, 3, seed=1)
    ref = dlgraph.compile(g)(**x)
    got = run_ort(out, x)
    assert list(got) == list(g.outputs)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        if k not in noisy(g):
            np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=f"{path.name}: {k}")


def test_a_resnet_written_with_modules_exports_each_layer_as_its_operator(tmp_path):
    g = dlgraph.load(RESNET)
    model = onnx.load(str(dlgraph.export(g, tmp_path / "resnet.onnx")))
    ops = Counter(n.op_type for n in model.graph.node)
    # 5 conv2d (stem, and two per block: one in conv_bn, one in the block), 3 batch_norm
    assert (ops["Conv"], ops["BatchNormalization"], ops["AveragePool"]) == (5, 3, 1)
    inits = {i.name for i in model.graph.initializer}
    assert {"stem.c.weight", "b.c1.c.weight", "b.c1.bn.running_var", "b2.c2.bias"} <= inits
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("b2/"))
    assert conv.input[1] == "b2.c1.c.weight"


def test_shared_module_parameters_are_written_once(tmp_path):
    g = dlgraph.load(ROOT / "tests/specs/good/nested_modules.yaml")
    model = onnx.load(str(dlgraph.export(g, tmp_path / "nested.onnx")))
    names = [i.name for i in model.graph.initializer]
    assert "a.f.weight" in names and not any(n.startswith("b.") for n in names)
    ops = Counter(n.op_type for n in model.graph.node)
    # head's linear layers (in a and b), layer_norm in the encoder module, the conv1d
    assert (ops["Gemm"], ops["LayerNormalization"], ops["Conv"]) == (4, 2, 1)
    scan = next(n for n in model.graph.node if n.op_type == "Scan" and n.name.startswith("r/"))
    body = next(a.g for a in scan.attribute if a.name == "body")
    assert [n.op_type for n in body.node].count("Conv") == 1   # the conv in the scanned cell


def test_a_spec_that_cannot_be_exported_is_one_located_error(monkeypatch, tmp_path):
    """With conv2d's ONNX rule gone its primitives would be exported one by one, and one of
    them (`windows`) has no ONNX operator: one error, at the innermost spec node, listing
    them; no file is written."""
    exporter = importlib.import_module("dlgraph.engine.io.onnx.export")
    monkeypatch.delitem(exporter.LAYERS, "conv2d")
    out = tmp_path / "resnet.onnx"
    with pytest.raises(GraphError) as e:
        dlgraph.export(dlgraph.load(RESNET), out)
    assert str(e.value) == (
        f"{RESNET}:9: node 'stem/c' (conv2d): no ONNX export for 5 primitive(s): "
        "'stem/c/windows' (windows), 'b/c1/c/windows' (windows), 'b/c2/windows' (windows), "
        "'b2/c1/c/windows' (windows), 'b2/c2/windows' (windows)\n"
        "  help: ONNX has no operator for these primitives of dlgraph; write the node with "
        "layers and ops that export (see docs/onnx.md)")
    assert not out.exists()


def test_cli_exports_a_resnet_written_with_modules(tmp_path):
    out = tmp_path / "r.onnx"
    r = CliRunner().invoke(main, ["export", str(RESNET), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output == f"wrote {out}\n"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_a_model_onnx_refuses_is_a_located_error_and_not_written(monkeypatch, tmp_path):
    """A bug in an export rule (here a Gemm without its weight) is caught by onnx's checker
    before anything is written, and reported as dlgraph's own error, not a traceback."""
    exporter = importlib.import_module("dlgraph.engine.io.onnx.export")
    monkeypatch.setitem(exporter.LAYERS, "linear", lambda lay: {"out": lay.w.op("Gemm",
                                                                               lay.ins[0])})
    spec = ROOT / "tests/specs/good/tiny_mlp.yaml"
    out = tmp_path / "bad.onnx"
    with pytest.raises(GraphError) as e:
        dlgraph.export(dlgraph.load(spec), out)
    text = str(e.value)
    assert text.startswith(f"{spec}: the ONNX model of 'tiny-mlp' fails onnx's checker: ")
    assert "Gemm" in text
    assert text.endswith("\n  help: this is a bug in dlgraph's ONNX export: please report it "
                         "with the spec; nothing was written")
    assert not out.exists()
