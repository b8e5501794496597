"""The Python API takes what a person hands it: nested lists as inputs, a spec file of any
name; and refuses, in one located line, inputs that are not the graph's or not numbers."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import dlgraph

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mlp():
    return dlgraph.compile(dlgraph.load(ROOT / "graphs" / "mlp.yaml"), seed=0)


def test_lists_are_inputs_too(mlp):
    x = [[0.1, 0.2], [0.3, -0.4]]
    # float32 rounding apart: the first call at a size runs tinygrad's kernels, later ones
    # replay with products on the host's BLAS
    np.testing.assert_allclose(mlp(x=x)["logits"], mlp(x=np.array(x, np.float32))["logits"],
                               rtol=1e-6, atol=1e-7)


def test_inputs_that_are_not_the_graphs_or_not_numbers(mlp):
    with pytest.raises(dlgraph.ShapeError) as e:
        mlp(x=[[0.1, 0.2]], z=[1.0])
    assert str(e.value) == "unknown input: z\n  help: inputs: x, y"
    with pytest.raises(dlgraph.ShapeError, match="input 'x' holds <U1 values, not numbers"):
        mlp(x=[["a", "b"]])


def test_a_spec_file_of_any_name_is_read_by_its_content(tmp_path):
    for name in ("spec", "spec.txt"):
        path = tmp_path / name
        shutil.copy(ROOT / "graphs" / "mlp.yaml", path)
        assert dlgraph.load(str(path)).name == "mlp-spirals"
    with pytest.raises(dlgraph.SpecError, match="no such file"):
        dlgraph.load(str(tmp_path / "missing.yml2"))
