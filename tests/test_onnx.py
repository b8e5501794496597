"""ONNX export, import and round trips, checked against onnxruntime and PyTorch.

Compiled dlgraph models are slow to make (a few seconds each), so each example is
exported, compiled and run once per module and shared by the tests below.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.spec.init import random_inputs

GRAPHS = Path(__file__).resolve().parents[1] / "graphs"
EXAMPLES = sorted(p.stem for p in GRAPHS.glob("*.yaml"))
TOL = dict(atol=1e-5, rtol=1e-5)


def run_ort(path, inputs: dict) -> dict:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for i in s.get_inputs():
        a = inputs[i.name]
        feed[i.name] = a.astype(np.int64) if i.type == "tensor(int64)" else a
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed), strict=True))


def random_outputs(g) -> set[str]:
    """Outputs that depend on random noise (a GAN's generator): compared by shape only."""
    return {name for name, nid in g.outputs.items()
            if any(g[a].op == "noise" for a in g.ancestors([nid]))}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


_CACHE: dict = {}


def example(name: str, work: Path):
    """(graph, exported .onnx path, inputs, dlgraph's outputs) of an example, made once."""
    if name not in _CACHE:
        g = dlgraph.load(GRAPHS / f"{name}.yaml")
        path = dlgraph.export(g, work / f"{name}.onnx")
        x = random_inputs(g, 3, seed=1)
        _CACHE[name] = (g, path, x, dlgraph.compile(g)(**x))
    return _CACHE[name]


# -- export ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXAMPLES)
def test_export_matches_onnxruntime(name, work):
    g, path, x, ref = example(name, work)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    got = run_ort(path, x)
    assert list(got) == list(g.outputs)
    for k in ref:
        assert got[k].shape == ref[k].shape
        if k not in random_outputs(g):
            np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=f"{name}: {k}")


def test_a_scan_over_a_module_exports_as_one_onnx_scan(work):
    m = onnx.load(str(example("custom_cell", work)[1]))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Scan") == 1 and "LSTM" not in ops and "Sigmoid" not in ops
    scan = next(n for n in m.graph.node if n.op_type == "Scan")
    body = onnx.helper.get_attribute_value(next(a for a in scan.attribute if a.name == "body"))
    assert [i.name.split("/")[-1] for i in body.input] == ["h", "c", "x"]     # states first
    # the cell's linear layers are written as Gemm operators inside the body too
    assert {n.op_type for n in body.node} >= {"Sigmoid", "Tanh", "Gemm", "Mul"}
    assert not body.initializer       # the weights are the outer graph's initializers


SCAN_STATES = """
dlgraph: 1
name: scan-with-states
modules:
  cell:
    inputs: [x, h, t]
    args: {hidden: null}
    nodes:
      a: {op: linear, in: x, out: "$hidden"}
      b: {op: linear, in: h, out: "$hidden", bias: false}
      s: {op: add, in: [a, b]}
      h_new: {op: tanh, in: s}
      total: {op: add, in: [h_new, t]}
    outputs: [h_new, total]
inputs:
  x: {shape: [batch, 6, 3]}
  h0: {shape: [batch, 5]}
  t0: {shape: [batch, 5]}
nodes:
  enc: {op: scan, in: [x, h0, t0], body: cell, state: {h: 5, t: 5}, args: {hidden: 5}}
outputs: [enc.out, enc.h, enc.t]
"""


def test_a_scan_with_initial_states_matches_onnxruntime(work):
    g = dlgraph.load(SCAN_STATES)
    path = dlgraph.export(g, work / "scan_states.onnx", seed=2)
    x = random_inputs(g, 4, seed=5)
    ref = dlgraph.compile(g, seed=2)(**x)
    got = run_ort(path, x)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=k)
    # the final running sum is the initial one plus every step's state: a check that
    # the states are carried and stacked in the right order, independent of dlgraph
    np.testing.assert_allclose(got["enc.t"], x["t0"] + got["enc.out"].sum(axis=1), **TOL)


def test_export_writes_layers_as_onnx_operators_and_metadata(work):
    m = onnx.load(str(example("mlp", work)[1]))
    assert [n.op_type for n in m.graph.node].count("Gemm") == 3
    assert {n.op_type for n in m.graph.node} == {"Gemm", "Relu", "Identity"}
    props = {p.key: p.value for p in m.metadata_props}
    assert props["name"] == "mlp-spirals" and props["dlgraph_version"] == dlgraph.__version__
    assert props["doc"].startswith("A feed-forward network") and m.doc_string == props["doc"]
    assert m.ir_version == 10 and m.opset_import[0].version == 21
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(m.graph.initializer) == 6
    ops = {n.op_type for n in onnx.load(str(example("lstm", work)[1])).graph.node}
    assert "LSTM" in ops and not ops & {"Sigmoid", "Slice", "Tanh", "Mul"}
    ops = {n.op_type for n in onnx.load(str(example("cnn", work)[1])).graph.node}
    assert {"Conv", "MaxPool", "Gemm"} <= ops


RECURRENT = """
dlgraph: 1
name: recurrent-variants
inputs:
  x: {shape: [batch, 5, 3]}
  h0: {shape: [4, batch, 6]}
  c0: {shape: [4, batch, 6]}
  g0: {shape: [2, batch, 6]}
nodes:
  lstm: {op: lstm, in: [x, h0, c0], hidden: 6, layers: 2, bidirectional: true}
  gru: {op: gru, in: [x, g0], hidden: 6, bidirectional: true}
  rnn: {op: rnn, in: x, hidden: 6, layers: 2}
outputs: [lstm.out, lstm.h, lstm.c, gru.out, gru.h, rnn.out, rnn.h]
"""


def test_stacked_bidirectional_recurrent_layers_with_initial_states(work):
    g = dlgraph.load(RECURRENT)
    path = dlgraph.export(g, work / "recurrent.onnx", seed=3)
    x = random_inputs(g, 2, seed=4)
    ref = dlgraph.compile(g, seed=3)(**x)
    got = run_ort(path, x)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=k)
    kinds = [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in
             ("LSTM", "GRU", "RNN")]
    assert kinds == ["LSTM", "LSTM", "GRU", "RNN", "RNN"]


def test_every_loop_exports_as_a_scan_backwards_ones_too(monkeypatch, work):
    """Recurrent layers written as their primitives (as if ONNX had no GRU or LSTM): each
    direction is a loop, the reverse ones Scans running backwards."""
    import importlib
    exporter = importlib.import_module("dlgraph.engine.io.onnx.export")
    monkeypatch.delitem(exporter.LAYERS, "gru")
    monkeypatch.delitem(exporter.LAYERS, "lstm")
    g = dlgraph.load(RECURRENT.replace("  rnn: {op: rnn, in: x, hidden: 6, layers: 2}\n", "")
                     .replace(", rnn.out, rnn.h", ""))
    path = dlgraph.export(g, work / "loops.onnx", seed=3)
    m = onnx.load(str(path))
    scans = [n for n in m.graph.node if n.op_type == "Scan"]
    assert len(scans) == 6 and not {"LSTM", "GRU"} & {n.op_type for n in m.graph.node}
    backwards = [a.ints for n in scans for a in n.attribute if a.name == "scan_input_directions"]
    assert sorted(list(d) for d in backwards) == [[0]] * 3 + [[1]] * 3
    x = random_inputs(g, 2, seed=4)
    ref = dlgraph.compile(g, seed=3)(**x)
    got = run_ort(path, x)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=k)


def test_without_onnx_export_and_import_say_what_to_install(monkeypatch, work):
    monkeypatch.setitem(sys.modules, "onnx", None)
    g = dlgraph.load(GRAPHS / "mlp.yaml")
    with pytest.raises(dlgraph.DlgraphError) as e:
        dlgraph.export(g, work / "none.onnx")
    assert str(e.value) == "ONNX export needs the onnx package: pip install 'dlgraph[onnx]'"
    with pytest.raises(dlgraph.DlgraphError) as e:
        dlgraph.import_onnx(work / "none.onnx", work / "none.yaml")
    assert str(e.value) == "ONNX import needs the onnx package: pip install 'dlgraph[onnx]'"


def test_opsets(work):
    g, _, x, ref = example("mlp", work)
    path = dlgraph.export(g, work / "mlp17.onnx", opset=17)
    assert onnx.load(str(path)).opset_import[0].version == 17
    np.testing.assert_allclose(run_ort(path, x)["logits"], ref["logits"], **TOL)
    with pytest.raises(dlgraph.SpecError, match="opset 30 is not offered"):
        dlgraph.export(g, work / "mlp30.onnx", opset=30)


# -- import ------------------------------------------------------------------------------------
RUN_IMPORTED = ("mlp", "cnn", "lstm", "gru", "transformer", "custom_cell")


#: examples whose export the importer refuses, and the reason it gives
NO_IMPORT = {"adding_varlen": "'enc/LSTM_l0_0' (LSTM): sequence lengths"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_import_round_trip(name, work):
    g, path, x, ref = example(name, work)
    if name in NO_IMPORT:
        with pytest.raises(dlgraph.SpecError, match=re.escape(NO_IMPORT[name])):
            dlgraph.import_onnx(path, work / f"{name}_imported.yaml")
        assert not (work / f"{name}_imported.yaml").exists()
        return
    spec, weights = dlgraph.import_onnx(path, work / f"{name}_imported.yaml")
    g2 = dlgraph.load(spec)
    assert list(g2.inputs) == [n for n in g.inputs if n in x and n in g2.inputs]
    first = run_ort(path, x)
    again = dlgraph.export(g2, work / f"{name}_again.onnx", weights=weights)
    second = run_ort(again, x)
    for (k, a), b in zip(first.items(), second.values(), strict=True):
        if k not in random_outputs(g):
            np.testing.assert_allclose(b, a, **TOL, err_msg=f"{name}: {k}")
    if name in RUN_IMPORTED:
        mine = dlgraph.compile(g2, weights=weights)(**{k: x[k] for k in g2.inputs})
        for a, b in zip(first.values(), mine.values(), strict=True):
            np.testing.assert_allclose(b, a, **TOL, err_msg=name)


def test_import_folds_layers_back_with_their_origin(work):
    spec, _ = dlgraph.import_onnx(example("mlp", work)[1], work / "mlp_read.yaml")
    text = spec.read_text()
    assert "  fc1: {op: linear, in: x, out: 64, activation: relu}   # onnx: Gemm 'fc1/Gemm_1', " \
           "Relu 'fc1/Relu_2'" in text
    assert "outputs: [logits]" in text
    spec, _ = dlgraph.import_onnx(example("lstm", work)[1], work / "lstm_read.yaml")
    text = spec.read_text()
    assert "  enc: {op: lstm, in: x, hidden: 32}   # onnx: LSTM 'enc/LSTM_l0_0'" in text
    assert "pred: {op: linear, in: enc.h, out: 1}" in text
    # the transformer's blocks export as primitives (ReduceMean ... for its layer norms,
    # ReduceMax/Exp/ReduceSum for softmax, reshapes for the heads) and come back as layers
    spec, _ = dlgraph.import_onnx(example("transformer", work)[1], work / "tr_read.yaml")
    ops = [nd.op for nd in dlgraph.load(spec).spec.nodes.values()]
    assert ops.count("multi_head_attention") == 2 and ops.count("layer_norm") == 5
    assert not {"softmax", "mean", "matmul", "reshape", "transpose"} & set(ops)
    assert "  block1_self_attn: {op: multi_head_attention, in: block1_norm1, heads: 4}" in \
        spec.read_text()


def test_an_onnx_scan_imports_as_a_scan_over_a_module(work):
    spec, _ = dlgraph.import_onnx(example("custom_cell", work)[1], work / "cell_read.yaml")
    text = spec.read_text()
    assert "  enc_loop: {op: scan, in: x, body: enc_loop_body, state: {h: 32, c: 32}}" in text
    assert "  pred: {op: linear, in: enc_loop.h, out: 1}" in text
    g = dlgraph.load(spec)
    module = g.spec.modules["enc_loop_body"]
    assert module.inputs == ["x", "h", "c"] and module.outputs == ["h_new", "c_new"]
    assert sum(nd["op"] == "linear" for nd in module.nodes.values()) == 8
    assert "xi" in module.nodes and module.nodes["hi"]["bias"] is False


def _merged_batch_model(tail: str):
    """x [batch, 5, 6] -> Reshape [batch * 5, 6] (shape computed from Shape(x)) -> Gemm ->
    then `tail`: 'back' reshapes to [batch, 5, 4]; 'sum' reduces over the merged axis."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["bt"], axis=0),
             helper.make_node("Mul", ["bt", "five"], ["bt5"]),
             helper.make_node("Unsqueeze", ["bt5", "ax0"], ["bt5u"]),
             helper.make_node("Concat", ["bt5u", "six"], ["flat"], axis=0),
             helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("Gemm", ["x2", "w", "b"], ["y2"], transB=1)]
    if tail == "back":
        nodes += [helper.make_node("Unsqueeze", ["bt", "ax0"], ["btu"]),
                  helper.make_node("Concat", ["btu", "five4"], ["back"], axis=0),
                  helper.make_node("Reshape", ["y2", "back"], ["y"])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 4])
    else:
        nodes += [helper.make_node("ReduceSum", ["y2", "ax0"], ["y"], keepdims=0)]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 6])
    inits = [w, b, c("i0", 0), c("five", 5), c("ax0", [0]), c("six", [6]), c("five4", [5, 4])]
    model = helper.make_model(helper.make_graph(nodes, "merged", [x], [out], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_a_reshape_merging_the_batch_is_followed_without_writing_it(work):
    path = work / "merged.onnx"
    onnx.save(_merged_batch_model("back"), str(path))
    spec, weights = dlgraph.import_onnx(path, work / "merged.yaml")
    g = dlgraph.load(spec)
    assert [nd.op for nd in g.spec.nodes.values()] == ["linear"]       # no [batch * 5, 6]
    x = np.random.default_rng(4).standard_normal((3, 5, 6)).astype(np.float32)
    got = dlgraph.compile(g, weights=weights)(x=x)["y"]
    np.testing.assert_allclose(got, run_ort(path, {"x": x})["y"], **TOL)


def test_a_value_that_needs_the_merged_batch_is_refused_with_the_dims(work):
    path = work / "merged_sum.onnx"
    onnx.save(_merged_batch_model("sum"), str(path))
    with pytest.raises(dlgraph.SpecError) as e:
        dlgraph.import_onnx(path, work / "merged_sum.yaml")
    assert "merges the named dim of [batch, 5] with others (dlgraph keeps named dims " \
           "apart)" in str(e.value)
    assert not (work / "merged_sum.yaml").exists()


def test_unsupported_operators_are_listed_in_one_error_and_nothing_is_written(work):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Round", ["x"], ["e"], name="round1"),
             helper.make_node("Relu", ["e"], ["r"], name="relu1"),
             helper.make_node("Hardmax", ["r"], ["y"], name="hardmax1")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = work / "unsupported.onnx"
    onnx.save(model, str(path))
    with pytest.raises(dlgraph.SpecError) as e:
        dlgraph.import_onnx(path, work / "unsupported.yaml")
    msg = str(e.value)
    assert msg.startswith(f"{path}: 2 ONNX node(s) cannot be imported: 'round1' (Round): no "
                          "dlgraph rule for this operator; 'hardmax1' (Hardmax)")
    assert "operators without a dlgraph rule here: Hardmax, Round" in msg
    assert not (work / "unsupported.yaml").exists()
    assert not (work / "unsupported.safetensors").exists()


# -- models from PyTorch's own ONNX exporter -----------------------------------------------
def _torch_models():
    import torch

    class LM(torch.nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.emb, self.rnn, self.out = torch.nn.Embedding(20, 8), cell, torch.nn.Linear(16, 20)

        def forward(self, x):
            return self.out(self.rnn(self.emb(x))[0])

    class Last(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(3, 16, num_layers=2, bidirectional=True, batch_first=True)
            self.out = torch.nn.Linear(32, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    nn = torch.nn
    return {
        "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (2, 4)),
        "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5),
                                      nn.LogSoftmax(-1)), (2, 3, 8, 8)),
        "lstm_lm": (lambda: LM(nn.LSTM(8, 16, batch_first=True)), (2, 7)),
        "gru": (Last, (2, 5, 3)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm_lm", "gru"])
def test_models_exported_by_pytorch_import_and_match(name, work):
    import torch
    torch.manual_seed(0)
    make, shape = _torch_models()[name]
    m = make().eval()
    x = torch.randint(0, 20, shape) if name == "lstm_lm" else torch.randn(*shape)
    path = work / f"torch_{name}.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}})
    with torch.no_grad():
        ref = m(x).numpy()
    spec, weights = dlgraph.import_onnx(path, work / f"torch_{name}.yaml")
    g = dlgraph.load(spec)
    arr = x.numpy().astype(np.int32 if name == "lstm_lm" else np.float32)
    got = dlgraph.compile(g, weights=weights)(x=arr)["y"]
    np.testing.assert_allclose(got, ref, **TOL)


def load_weights_file(path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(path))


def mha_id(g) -> str:
    return next(k for k, nd in g.spec.nodes.items() if nd.op == "multi_head_attention")


class _Call:
    """Calls a module with its input alone (the legacy exporter would otherwise bake the
    defaults of TransformerEncoderLayer.forward, is_causal among them, into tensors)."""

    def __new__(cls, inner, mask=None):
        import torch

        class Call(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x) if mask is None else self.inner(x, src_mask=mask)
        return Call()


@pytest.mark.parametrize("batch_first, opset, causal", [(True, 17, False), (False, 17, False),
                                                        (True, 14, False), (False, 17, True)])
def test_a_pytorch_transformer_encoder_layer_imports_and_matches(batch_first, opset, causal,
                                                                 work):
    import torch
    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5) if causal else None
    m = _Call(layer, mask).eval()
    shape, axis = ((2, 5, 16), 0) if batch_first else ((5, 2, 16), 1)
    path = work / f"torch_encoder_{batch_first}_{opset}_{causal}.onnx"
    torch.onnx.export(m, (torch.randn(*shape),), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {axis: "batch"}})
    spec, weights = dlgraph.import_onnx(path, work / f"{path.stem}.yaml")
    g = dlgraph.load(spec)
    dlgraph.validate(g)
    assert "digraph" in dlgraph.render(g)
    # readable: the shape arithmetic is gone, attention and the norms are layers again
    # (below opset 17 PyTorch writes each layer norm as nine primitives)
    ops = [nd.op for nd in g.spec.nodes.values()]
    assert ops.count("multi_head_attention") == 1 and ops.count("layer_norm") == 2
    assert ops.count("transpose") == (0 if batch_first else 2) and len(ops) <= 10
    mha = next(nd for nd in g.spec.nodes.values() if nd.op == "multi_head_attention")
    assert mha.heads == 4 and len(mha.in_) == (3 if causal else 1)   # the mask: an input
    np.testing.assert_array_equal(load_weights_file(weights)[f"{mha_id(g)}.in_proj_weight"],
                                  layer.self_attn.in_proj_weight.detach().numpy())
    # another batch size than the exported one: the batch stays a named dim
    x = torch.randn(*(shape[:axis] + (3,) + shape[axis + 1:]))
    with torch.no_grad():
        ref = m(x).numpy()
    got = dlgraph.compile(g, weights=weights)(x=x.numpy())["y"]
    np.testing.assert_allclose(got, ref, **TOL)
    np.testing.assert_allclose(run_ort(path, {"x": x.numpy()})["y"], got, **TOL)


# -- command line ---------------------------------------------------------------------------
def test_cli_export_and_import(work):
    r = CliRunner().invoke(main, ["export", str(GRAPHS / "mlp.yaml"), "-o",
                                  str(work / "cli.onnx")])
    assert r.exit_code == 0, r.output
    assert r.output == f"wrote {work / 'cli.onnx'}\n"
    r = CliRunner().invoke(main, ["import", str(work / "cli.onnx"), "-o",
                                  str(work / "cli.yaml")])
    assert r.exit_code == 0, r.output
    assert (work / "cli.yaml").is_file() and (work / "cli.safetensors").is_file()
    r = CliRunner().invoke(main, ["export", str(GRAPHS / "mlp.yaml"), "-o",
                                  str(work / "cli.onx")])
    assert r.exit_code == 1
    assert "error: cannot tell the export format from 'cli.onx'\n  help: name the file " \
           "cli.onnx (known suffixes: .onnx)" in r.output


# -- conformance against ONNX's own test data ---------------------------------------------
SUBSET = ["test_add_bcast", "test_gemm_all_attributes", "test_matmul_3d", "test_relu",
          "test_softmax_axis_1", "test_logsoftmax_axis_2", "test_lstm_defaults",
          "test_lstm_bidirectional", "test_lstm_batchwise", "test_simple_rnn_defaults",
          "test_conv_with_strides_padding",
          "test_maxpool_2d_precomputed_strides", "test_averagepool_2d_default",
          "test_transpose_all_permutations_3", "test_slice_neg", "test_reduce_sum_keepdims_random",
          "test_concat_3d_axis_1", "test_sub_bcast", "test_max_example", "test_scan9_sum",
          "test_scan9_multi_state", "test_attention_3d", "test_attention_4d_attn_mask",
          "test_attention_4d_causal", "test_attention_3d_scaled",
          "test_layer_normalization_4d_axis1",
          "test_layer_normalization_3d_axis_negative_2_epsilon",
          # operators and options of issue 24, and a bool mask that leaves a row no key
          "test_maxpool_2d_ceil", "test_maxpool_2d_same_lower", "test_maxpool_2d_dilations",
          "test_averagepool_2d_ceil", "test_averagepool_1d_default", "test_lrn",
          "test_instancenorm_example", "test_reflect_pad", "test_clip", "test_prelu_example",
          "test_split_variable_parts_1d_opset13", "test_tile", "test_selu", "test_hardswish",
          "test_conv_with_autopad_same",
          "test_attention_23_boolmask_fullymasked_row_nan_robustness"]


@pytest.fixture(scope="module")
def node_cases():
    from dlgraph.engine.io.onnx.conformance import node_cases as collect
    return {c.name: c for c in collect()}


@pytest.mark.parametrize("name", SUBSET)
def test_onnx_node_cases_pass(name, node_cases):
    from dlgraph.engine.io.onnx.conformance import run_case
    r = run_case(node_cases[name])
    assert (r.status, r.name) == ("passed", name), r.detail


def test_refused_node_cases_say_why(node_cases):
    from dlgraph.engine.io.onnx.conformance import run_case
    r = run_case(node_cases["test_gru_defaults"])
    assert r.status == "unsupported" and r.operator == "GRU"
    assert "linear_before_reset=0 (dlgraph's GRU is PyTorch's" in r.detail
    r = run_case(node_cases["test_attention_4d_gqa"])
    assert r.status == "unsupported" and r.detail.endswith("(Attention): grouped query heads")
    r = run_case(node_cases["test_scan_sum"])
    assert r.status == "unsupported" and "Scan of opset 8" in r.detail
    r = run_case(node_cases["test_training_dropout"])
    assert r.status == "unsupported" and r.detail.endswith("(Dropout): Dropout in training "
                                                           "mode (an inference model drops "
                                                           "nothing)")
    r = run_case(node_cases["test_add_uint8"])
    assert (r.status, r.detail) == ("unsupported", "dtype uint8 (dlgraph has float32, int32 and "
                                                   "bool)")


def test_models_shipped_with_onnx_pass():
    from dlgraph.engine.io.onnx.conformance import data_cases, run_case
    cases = {c.name: c for c in data_cases(["pytorch-converted", "pytorch-operator"])}
    for name in ("test_Conv2d_depthwise_strided", "test_BatchNorm2d_eval", "test_Embedding",
                 "test_operator_addmm"):
        r = run_case(cases[name])
        assert r.status == "passed", (name, r.detail)


def test_dlgraph_is_an_onnx_backend(node_cases):
    from dlgraph.engine.io.onnx.conformance import backend
    b = backend()
    case = node_cases["test_add_bcast"]
    inputs, expected = case.data[0]
    assert b.supports_device("CPU") and not b.supports_device("CUDA")
    got = b.prepare(case.model).run(inputs)
    np.testing.assert_allclose(got[0], expected[0], rtol=case.rtol, atol=case.atol)
    got = b.run_model(case.model, inputs)
    np.testing.assert_allclose(got[0], expected[0], rtol=case.rtol, atol=case.atol)


def test_the_report_counts_per_operator():
    from dlgraph.engine.io.onnx.conformance import Result, report
    text = report([Result("test_add", "node", "Add", "passed"),
                   Result("test_add_int8", "node", "Add", "unsupported", "dtype int8"),
                   Result("test_x", "simple", "Relu", "failed", "output 0: values differ")],
                  "make onnx-conformance")
    assert "| Add | 1 | 0 | 1 |" in text
    assert "| node (2) | 1 | 0 | 1 |" in text and "| models (1) | 0 | 1 | 0 |" in text
    assert "| simple | test_x | failed | output 0: values differ |" in text
    assert "- `test_add_int8` (Add): dtype int8" in text


def test_an_imported_model_can_be_trained_further(work):
    from safetensors.numpy import load_file

    from dlgraph.engine.graph.autodiff import reverse
    spec, weights = dlgraph.import_onnx(example("mlp", work)[1], work / "mlp_tune.yaml")
    text = spec.read_text().replace("inputs:\n", "inputs:\n  y: {shape: [batch], dtype: int32}\n")
    text = text.replace("\noutputs:", "  loss: {op: cross_entropy, in: [logits, y]}\n\noutputs:")
    text += ("train:\n  data: {source: spirals, samples: 64, classes: 3}\n  batch: 32\n"
             "  epochs: 1\n  objective: loss\n  optimizer: {type: adam, lr: 0.01}\n")
    g = dlgraph.load(text, base=work)
    dlgraph.validate(g, backward=True)
    assert set(reverse(g, "loss").grads) == set(load_file(str(weights))) == {
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "logits.weight", "logits.bias"}


def test_export_takes_trained_weights_from_a_file(work):
    from onnx import numpy_helper

    from dlgraph.engine.train.checkpoint import save_tensors
    g = dlgraph.load(GRAPHS / "mlp.yaml")
    rng = np.random.default_rng(7)
    trained = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in g.params.items()}
    save_tensors(work / "trained.safetensors", trained)
    r = CliRunner().invoke(main, ["export", str(GRAPHS / "mlp.yaml"), "--weights",
                                  str(work / "trained.safetensors"), "-o",
                                  str(work / "trained.onnx")])
    assert r.exit_code == 0, r.output
    inits = {t.name: numpy_helper.to_array(t)
             for t in onnx.load(str(work / "trained.onnx")).graph.initializer}
    assert set(inits) == set(trained)
    for name, value in trained.items():
        np.testing.assert_array_equal(inits[name], value)


def test_cli_import_of_a_missing_or_broken_file_is_one_error(work):
    r = CliRunner().invoke(main, ["import", str(work / "nope.onnx"), "-o", str(work / "n.yaml")])
    assert r.exit_code == 1
    assert r.output == f"error: {work / 'nope.onnx'}: no such ONNX file: {work / 'nope.onnx'}\n"
    (work / "broken.onnx").write_bytes(b"\x08\x01garbage")
    r = CliRunner().invoke(main, ["import", str(work / "broken.onnx"), "-o",
                                  str(work / "b.yaml")])
    assert r.exit_code == 1 and r.output.startswith(f"error: {work / 'broken.onnx'}: not a "
                                                    "readable ONNX model")
    assert not (work / "n.yaml").exists() and not (work / "b.yaml").exists()


# -- the new op options export, run in onnxruntime, and import back --------------------------
OPTIONS_SPEC = """
dlgraph: 1
name: options
inputs:
  img: {shape: [batch, 3, 9, 8]}
  ids: {shape: [batch, 4], dtype: int32}
  seq: {shape: [batch, 2, 9]}
nodes:
  q1: {op: conv1d, in: seq, out: 3, kernel: 4, stride: 2, padding: same}
  q2: {op: conv1d, in: q1, out: 2, kernel: 3, padding: [2, 0]}
  c1: {op: conv2d, in: img, out: 4, kernel: 3, stride: 2, padding: same, activation: hard_swish}
  c2: {op: conv2d, in: c1, out: 4, kernel: [2, 3], padding: [0, 1, 2, 1]}
  p1: {op: max_pool2d, in: c2, kernel: 2, stride: 1, dilation: 2, padding: 1, ceil_mode: true}
  p2: {op: avg_pool2d, in: c2, kernel: 3, stride: 2, padding: 1, ceil_mode: true,
       count_include_pad: false}
  g: {op: gelu, in: p2, approximate: none}
  s: {op: selu, in: g}
  h: {op: hard_sigmoid, in: s}
  e: {op: embedding, in: ids, num: 5, dim: 3, padding_idx: 0}
outputs: [p1, h, e, q2]
"""


def test_new_op_options_export_match_onnxruntime_and_import_back(work):
    g = dlgraph.load(OPTIONS_SPEC)
    path = dlgraph.export(g, work / "options.onnx")
    x = random_inputs(g, 3, seed=2)
    x["ids"] = np.array([[0, 1, 4, 0], [2, 0, 3, 3], [1, 1, 0, 4]], np.int32)
    ref = dlgraph.compile(g)(**x)
    assert not ref["e"][x["ids"] == 0].any()                 # padding ids give zeros
    got = run_ort(path, x)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=k)
    spec, weights = dlgraph.import_onnx(path, work / "options_back.yaml")
    back = dlgraph.compile(dlgraph.load(spec), weights=weights)(**x)
    for k in ref:
        np.testing.assert_allclose(back[k], ref[k], **TOL, err_msg=k)
