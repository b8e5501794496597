"""ONNX import of what users bring: hostile files refused with located errors, and the
operators of common PyTorch blocks checked against onnxruntime.

Models are built with onnx.helper (or exported by PyTorch) in a temporary folder, imported
through the CLI or the API, and run by dlgraph and onnxruntime on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import dlgraph
from dlgraph.cli.main import main

FLOAT = TensorProto.FLOAT


def model(nodes, inputs, outputs, inits=(), opset=21):
    """A ModelProto from node protos, (name, type, shape) inputs/outputs and arrays."""
    vi = lambda spec: helper.make_tensor_value_info(*spec)
    g = helper.make_graph(nodes, "g", [vi(s) for s in inputs], [vi(s) for s in outputs],
                          [numpy_helper.from_array(v, k) for k, v in dict(inits).items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def cli_import(tmp_path, m, name="m"):
    """(exit code, output, files written) of `dlgraph import` of a model (or raw bytes)."""
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(m if isinstance(m, bytes) else m.SerializeToString())
    r = CliRunner().invoke(main, ["import", str(path), "-o", str(tmp_path / f"{name}.yaml")])
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".onnx")
    return r.exit_code, r.output.replace(str(tmp_path) + "/", ""), written


def run_both(tmp_path, m, feeds: dict, name="m", tol=1e-5):
    """Import `m`, run it in dlgraph and onnxruntime on `feeds`; outputs compared."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, str(path))
    spec, weights = dlgraph.import_onnx(path, tmp_path / f"{name}.yaml")
    g = dlgraph.load(spec)
    got = dlgraph.compile(g, weights=weights)(**{k.replace(".", "_"): v
                                                 for k, v in feeds.items()})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)
    for (k, a), e in zip(got.items(), ref, strict=True):
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol, err_msg=k)
    return g


# -- hostile files ---------------------------------------------------------------------------
def test_an_initializer_declaring_terabytes_is_refused_before_it_is_read(tmp_path):
    w = TensorProto(name="w", data_type=FLOAT, dims=[3, 2**40], raw_data=bytes(16))
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", FLOAT, [3, 4])],
              [("y", FLOAT, None)])
    m.graph.initializer.append(w)
    code, out, written = cli_import(tmp_path, m)
    assert code == 1 and "Traceback" not in out
    assert out.startswith("error: m.onnx: initializer 'w' is declared [3, 1099511627776]: "
                          "12.0 TiB, more than the ")
    assert "help: the file is damaged or the model too large for this machine" in out
    assert written == []


def test_an_initializer_storing_fewer_bytes_than_it_declares_is_refused(tmp_path):
    w = TensorProto(name="w", data_type=FLOAT, dims=[3, 4], raw_data=bytes(16))
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", FLOAT, [3, 4])],
              [("y", FLOAT, None)])
    m.graph.initializer.append(w)
    code, out, written = cli_import(tmp_path, m)
    assert (code, written) == (1, [])
    assert out == "error: m.onnx: initializer 'w' is declared [3, 4] (48 bytes) but stores 16 " \
                  "bytes\n  help: the file is damaged or truncated; export the model again\n"


def test_external_weights_are_read_beside_the_model_once_checked(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", FLOAT, [3, 4])],
              [("y", FLOAT, None)], {"w": w})
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="m.weights",
                    size_threshold=0)
    spec, weights = dlgraph.import_onnx(path, tmp_path / "m.yaml")
    got = dlgraph.compile(dlgraph.load(spec), weights=weights)(x=np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(got["y"], w + 1)
    (tmp_path / "m.weights").unlink()
    (tmp_path / "m.yaml").unlink()
    (tmp_path / "m.safetensors").unlink()
    code, out, written = cli_import(tmp_path, onnx.load(str(path), load_external_data=False))
    assert (code, written) == (1, [])
    assert out.startswith("error: m.onnx: cannot read the model's external weights: ")
    assert out.endswith("  help: keep the weights files beside the .onnx file, as exported\n")


def test_an_input_declaring_more_than_memory_is_refused_at_import(tmp_path):
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2**40, 2**40])],
              [("y", FLOAT, None)])
    code, out, written = cli_import(tmp_path, m)
    assert (code, written) == (1, [])
    assert out.startswith("error: m.onnx: 'x' is declared [1099511627776, 1099511627776]: ")
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, ["N", 2**40])],
              [("y", FLOAT, None)])
    code, out, written = cli_import(tmp_path, m)
    assert (code, written) == (1, [])
    assert out.startswith("error: m.onnx: 'x' is declared [N, 1099511627776]: 4.0 TiB per "
                          "sample, more than the ")


def test_a_graph_whose_fixed_inputs_exceed_memory_is_refused_before_a_run(tmp_path):
    # what an imported model declared before import checked it: numpy was asked for it
    (tmp_path / "big.yaml").write_text("dlgraph: 1\nname: big\ninputs:\n  x: {shape: "
                                       "[1099511627776, 1099511627776]}\nnodes:\n  y: {op: "
                                       "relu, in: x}\noutputs: [y]\n")
    r = CliRunner().invoke(main, ["run", str(tmp_path / "big.yaml")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith(f"error: {tmp_path / 'big.yaml'}:4: this graph needs about ")
    assert "more than the " in r.output and "of memory here" in r.output


@pytest.mark.parametrize("content", [b"", "no graph"])
def test_an_empty_model_names_the_onnx_file(tmp_path, content):
    m = content if isinstance(content, bytes) else model([], [], [])
    code, out, written = cli_import(tmp_path, m, "empty")
    assert (code, written) == (1, [])
    assert out == "error: empty.onnx: the ONNX model is empty: its graph has no outputs\n" \
                  "  help: pass a model exported with its outputs (torch.onnx.export's " \
                  "output_names, say)\n"


def test_an_unsupported_nested_if_names_the_onnx_file(tmp_path):
    branch = lambda op, out: helper.make_graph([helper.make_node(op, ["x"], [out])], out, [],
                                               [helper.make_tensor_value_info(out, FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("Relu", "a"),
                            else_branch=branch("Neg", "b"))
    m = model([node], [("x", FLOAT, [2])], [("y", FLOAT, [2])], {"c": np.array(True)})
    code, out, written = cli_import(tmp_path, m)
    assert (code, written) == (1, [])
    assert out.startswith("error: m.onnx: 1 ONNX node(s) cannot be imported: 'y' (If): ")


def test_float64_values_beyond_float32_are_refused_naming_the_dtype(tmp_path):
    DOUBLE = TensorProto.DOUBLE
    m = model([helper.make_node("Mul", ["x", "w"], ["y"])], [("x", DOUBLE, [2])],
              [("y", DOUBLE, [2])], {"w": np.array([1e198, 2.0])})
    code, out, written = cli_import(tmp_path, m)
    assert (code, written) == (1, [])
    assert out == "error: m.onnx: initializer 'w' is float64 and holds 1e+198, beyond " \
                  "float32's 3.403e+38: dlgraph computes in float32 and would read it as inf\n" \
                  "  help: dlgraph has float32, int32 and bool; scale the model's values into " \
                  "float32's range and export it as float32\n"


def test_a_float64_model_whose_values_fit_runs_in_float32(tmp_path):
    DOUBLE = TensorProto.DOUBLE
    m = model([helper.make_node("Mul", ["x", "w"], ["y"])], [("x", DOUBLE, [2])],
              [("y", DOUBLE, [2])], {"w": np.array([1e30, 0.5])})
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    spec, weights = dlgraph.import_onnx(path, tmp_path / "m.yaml")
    got = dlgraph.compile(dlgraph.load(spec), weights=weights)(x=np.array([3.0, 4.0],
                                                                         np.float32))["y"]
    np.testing.assert_allclose(got, [3e30, 2.0], rtol=1e-6)


@pytest.mark.parametrize("shape, axis", [([2, 3, 4], 3), ([5], 1), ([2, 3, 4], 0),
                                         ([2, 3, 4], 2), ([2, 3], -1)])
def test_flatten_at_any_valid_axis_matches_onnxruntime(tmp_path, shape, axis):
    m = model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], [("x", FLOAT, shape)],
              [("y", FLOAT, None)])
    x = np.random.default_rng(0).standard_normal([2 if d == "N" else d for d in shape])
    run_both(tmp_path, m, {"x": x.astype(np.float32)})


# -- operators, each against onnxruntime ----------------------------------------------------
def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 2


def _node_model(op, shape=(2, 3, 5, 5), inits=None, n_out=1, extra_inputs=(), **attrs):
    ins = ["x", *(inits or {}), *extra_inputs]
    outs = [f"y{k}" for k in range(n_out)]
    return model([helper.make_node(op, ins, outs, **attrs)], [("x", FLOAT, list(shape))],
                 [(o, FLOAT, None) for o in outs], inits or {})


W = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
OPERATORS = {
    "erf": _node_model("Erf"),
    "gelu_exact": _node_model("Gelu"),
    "hard_sigmoid": _node_model("HardSigmoid", alpha=0.3, beta=0.4),
    "hard_swish": _node_model("HardSwish"),
    "leaky_relu_alpha": _node_model("LeakyRelu", alpha=0.2),
    "elu_alpha": _node_model("Elu", alpha=0.5),
    "selu": _node_model("Selu"),
    "prelu": _node_model("PRelu", inits={"slope": np.array([[[0.1]], [[0.2]], [[-0.3]]],
                                                           np.float32)}),
    "clip": _node_model("Clip", inits={"lo": np.array(-0.5, np.float32),
                                       "hi": np.array(1.0, np.float32)}),
    "sum": model([helper.make_node("Sum", ["x", "x", "w"], ["y"])], [("x", FLOAT, [2, 3])],
                 [("y", FLOAT, None)], {"w": np.ones(3, np.float32)}),
    "mean": model([helper.make_node("Mean", ["x", "w"], ["y"])], [("x", FLOAT, [2, 3])],
                  [("y", FLOAT, None)], {"w": np.arange(3, dtype=np.float32)}),
    "split": _node_model("Split", (2, 7, 3), {"s": np.array([2, 5])}, n_out=2, axis=1),
    "split_even": _node_model("Split", (2, 6, 3), n_out=3, axis=-2, num_outputs=3),
    "tile": _node_model("Tile", (2, 3), {"r": np.array([2, 3])}),
    "instance_norm": _node_model("InstanceNormalization",
                                 inits={"s": np.array([1.0, 2.0, 0.5], np.float32),
                                        "b": np.array([0.0, 1.0, -1.0], np.float32)},
                                 epsilon=1e-3),
    "pad_reflect": _node_model("Pad", inits={"p": np.array([0, 0, 1, 2, 0, 0, 2, 1])},
                               mode="reflect"),
    "pad_edge": _node_model("Pad", inits={"p": np.array([0, 0, 2, 0, 0, 0, 1, 3])},
                            mode="edge"),
    "pad_wrap": _node_model("Pad", (2, 4), inits={"p": np.array([1, 2, 0, 1])}, mode="wrap"),
    "pad_crop_and_axes": _node_model("Pad", inits={"p": np.array([-1, 2, 1, -2]),
                                                   "v": np.array(1.5, np.float32),
                                                   "axes": np.array([-1, 1])}),
    "maxpool_ceil": _node_model("MaxPool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "maxpool_pads_asymmetric": _node_model("MaxPool", kernel_shape=[3, 2], pads=[1, 0, 0, 1]),
    "maxpool_same_upper": _node_model("MaxPool", kernel_shape=[2, 2], strides=[2, 2],
                                      auto_pad="SAME_UPPER"),
    "maxpool_1d": _node_model("MaxPool", (2, 3, 9), kernel_shape=[3], strides=[2], pads=[1, 1]),
    "avgpool_exclude_pad": _node_model("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                       strides=[2, 2]),
    "avgpool_ceil_include_pad": _node_model("AveragePool", kernel_shape=[2, 2], strides=[2, 2],
                                            pads=[1, 1, 1, 1], ceil_mode=1,
                                            count_include_pad=1),
    "avgpool_1d": _node_model("AveragePool", (2, 3, 8), kernel_shape=[2], strides=[2]),
    "conv_same_upper": _node_model("Conv", inits={"w": W}, auto_pad="SAME_UPPER",
                                   strides=[2, 2]),
    "conv_pads_asymmetric": _node_model("Conv", inits={"w": W}, pads=[0, 1, 2, 1]),
    "conv1d_pads_asymmetric": _node_model("Conv", (2, 3, 9), inits={"w": W[:, :, 0]},
                                          pads=[2, 0]),
    "conv_same_lower": _node_model("Conv", (2, 3, 6, 7), inits={"w": W},
                                   auto_pad="SAME_LOWER", strides=[2, 2]),
    "maxpool_same_lower": _node_model("MaxPool", kernel_shape=[2, 3], auto_pad="SAME_LOWER"),
    "global_max_pool": _node_model("GlobalMaxPool"),
    "lrn": _node_model("LRN", (2, 6, 3, 3), size=3, alpha=0.01, beta=0.6, bias=2.0),
    "maxpool_dilated_ceil": _node_model("MaxPool", (2, 3, 9, 8), kernel_shape=[2, 2],
                                        dilations=[2, 3], strides=[2, 1], pads=[1, 1, 1, 1],
                                        ceil_mode=1),
    "celu": _node_model("Celu", alpha=0.7),
    "thresholded_relu": _node_model("ThresholdedRelu", alpha=0.4),
    "softsign": _node_model("Softsign"),
    "mish": _node_model("Mish"),
    "reciprocal": model([helper.make_node("Reciprocal", ["x"], ["y"])], [("x", FLOAT, [2, 3])],
                        [("y", FLOAT, None)]),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_operators_import_and_match_onnxruntime(tmp_path, name):
    m = OPERATORS[name]
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    run_both(tmp_path, m, {"x": _x(*shape)})


def test_a_bool_input_is_fed_as_int32_and_cast(tmp_path):
    m = model([helper.make_node("Where", ["mask", "x", "zero"], ["y"])],
              [("mask", TensorProto.BOOL, ["batch", 3]), ("x", FLOAT, ["batch", 3])],
              [("y", FLOAT, None)], {"zero": np.array(0.0, np.float32)})
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    spec, weights = dlgraph.import_onnx(path, tmp_path / "m.yaml")
    g = dlgraph.load(spec)
    assert g.inputs["mask"].dtype == "int32"
    mask, x = np.array([[1, 0, 1], [0, 0, 1]]), _x(2, 3)
    got = dlgraph.compile(g, weights=weights)(mask=mask.astype(np.int32), x=x)["y"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got, sess.run(None, {"mask": mask.astype(bool), "x": x})[0])


# -- blocks users bring, exported by PyTorch ------------------------------------------------
def _blocks():
    import torch
    from torch import nn

    class LayerNormGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 16)

        def forward(self, x):
            return nn.functional.gelu(self.fc(self.ln(x)))          # exact: Erf

    class MobileNetV3Block(nn.Module):     # HardSwish, HardSigmoid in squeeze-excitation
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

        def forward(self, x):
            y = self.dw(nn.functional.hardswish(self.bn(self.c1(x))))
            s = self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True))))
            return y * nn.functional.hardsigmoid(s)

    class SqueezeNetStem(nn.Module):       # MaxPool with ceil_mode
        def __init__(self):
            super().__init__()
            self.c, self.p = nn.Conv2d(3, 4, 3, stride=2), nn.MaxPool2d(3, 2, ceil_mode=True)

        def forward(self, x):
            return self.p(torch.relu(self.c(x)))

    class TinyViT(nn.Module):              # a class token expanded to the dynamic batch
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, 4)
            self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 16)), nn.Parameter(
                torch.randn(1, 5, 16))
            self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                                  activation="gelu")
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            p = self.patch(x).flatten(2).transpose(1, 2)
            z = torch.cat([self.cls.expand(x.shape[0], -1, -1), p], 1) + self.pos
            return self.head(self.enc(z)[:, 0])

    class PaddedAttention(nn.Module):      # a bool key padding mask: Where, Equal
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, mask):
            return self.a(x, x, x, key_padding_mask=mask, need_weights=False)[0]

    mask = torch.tensor([[False, False, False, True, True], [False] * 5, [True] + [False] * 4])
    return {"layer_norm_gelu": (LayerNormGelu, (torch.randn(3, 5, 8),), "gelu"),
            "mobilenet_v3_block": (MobileNetV3Block, (torch.randn(3, 3, 16, 16),),
                                   "hard_sigmoid"),
            "squeezenet_stem": (SqueezeNetStem, (torch.randn(3, 3, 17, 17),), "max_pool2d"),
            "vit": (TinyViT, (torch.randn(3, 3, 8, 8),), "multi_head_attention"),
            "padded_attention": (PaddedAttention, (torch.randn(3, 5, 8), mask), "where")}


@pytest.mark.parametrize("name", ["layer_norm_gelu", "mobilenet_v3_block", "squeezenet_stem",
                                  "vit", "padded_attention"])
def test_pytorch_blocks_import_and_match_pytorch_and_onnxruntime(tmp_path, name):
    import torch
    torch.manual_seed(0)
    make, args, op = _blocks()[name]
    m = make().eval()
    names = ["x", "mask"][:len(args)]
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(m, args, str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["y"], dynamic_axes={k: {0: "batch"} for k in names})
    spec, weights = dlgraph.import_onnx(path, tmp_path / f"{name}.yaml")
    g = dlgraph.load(spec)
    ops = [nd.op for nd in g.spec.nodes.values()]
    assert op in ops
    if name == "layer_norm_gelu":          # Div, Erf, Add, Mul, Mul folded back into one node
        assert ops == ["layer_norm", "linear", "gelu"]
        assert next(nd for nd in g.spec.nodes.values() if nd.op == "gelu").approximate == "none"
    feeds = {k: a.numpy() for k, a in zip(names, args, strict=True)}
    got = dlgraph.compile(g, weights=weights)(**{k: v.astype(np.int32) if v.dtype == bool
                                                  else v for k, v in feeds.items()})["y"]
    with torch.no_grad():
        np.testing.assert_allclose(got, m(*args).numpy(), rtol=1e-5, atol=1e-5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, sess.run(None, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, const, want", [
    ("ConstantOfShape", np.array([2**20, 2**20, 2**10]), "'c' is declared [1048576, 1048576, "
                                                         "1024]: 4.0 PiB, more than the "),
    ("Tile", np.array([2**20, 2**20]), "'c' is declared [2097152, 2097152]: 16.0 TiB, more "
                                       "than the "),
    ("Range", np.array(1e12, np.float32), "Range 'c' from 0 to 1e+12 by 1 makes 1e+12 "
                                          "values, more than the ")])
def test_a_value_computed_larger_than_memory_is_refused_before_it_is_made(tmp_path, op, const,
                                                                           want):
    ins = {"ConstantOfShape": ["k"], "Tile": ["w", "k"], "Range": ["zero", "k", "one"]}[op]
    inits = {"k": const, "w": np.ones((2, 2), np.float32), "zero": np.array(0, np.float32),
             "one": np.array(1, np.float32)}
    m = model([helper.make_node(op, ins, ["c"]), helper.make_node("Add", ["x", "c"], ["y"])],
              [("x", FLOAT, [1])], [("y", FLOAT, None)], {k: inits[k] for k in ins})
    code, out, written = cli_import(tmp_path, m)
    assert (code, written) == (1, [])
    assert out.startswith(f"error: m.onnx: {want}"), out


def test_a_constant_folded_at_import_is_sized_before_numpy_makes_it():
    # shape inference usually refuses these first; the importer's own folding checks too
    from dlgraph.engine.io.onnx.importer import import_proto
    m = model([helper.make_node("ConstantOfShape", ["k"], ["c"]),
               helper.make_node("Add", ["x", "c"], ["y"])], [("x", FLOAT, [1])],
              [("y", FLOAT, None)], {"k": np.array([2**30, 2**30])})
    with pytest.raises(dlgraph.DataError) as e:
        import_proto(m)
    assert str(e.value).startswith("ConstantOfShape 'c' would make 1,152,921,504,606,846,976 "
                                   "values, more than this machine's memory holds")
