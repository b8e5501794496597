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
