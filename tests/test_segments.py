"""A deep graph is compiled in segments (engine/compile/lower.py SEGMENT_NODES): cut
anywhere, it trains and answers as one program does (to float rounding: kernels fuse
differently across a cut)."""

from pathlib import Path

import numpy as np
import pytest

import dlgraph
from dlgraph.engine.compile import lower

ROOT = Path(__file__).resolve().parent.parent


def _train(spec, out, segment, monkeypatch):
    monkeypatch.setattr(lower, "SEGMENT_NODES", segment)
    # tinygrad's kernels on both sides: where a cut falls decides which products run on the
    # host's BLAS (tests/test_gemm.py), and Adam turns the rounding of a near-zero gradient
    # into a step of lr's size, far above the 1e-5 this test holds the cut program to
    monkeypatch.setenv("DLGRAPH_BLAS", "0")
    res = dlgraph.train(dlgraph.load(spec), out=out, steps=6, quiet=True, cache=False)
    model = dlgraph.compile(dlgraph.load(spec), weights=res.run_dir / "weights.safetensors",
                            cache=False)
    stages = len(model._program.stages)
    x = model.random_inputs(5, seed=3)
    return res, model(**{k: x[k] for k in model.input_names}), stages


def test_cut_into_segments_trains_and_answers_as_one_program(tmp_path, monkeypatch):
    spec = ROOT / "graphs" / "transformer.yaml"      # constants cross the cuts, dropout too
    whole, out_whole, n1 = _train(spec, tmp_path / "a", 10**9, monkeypatch)
    cut, out_cut, n2 = _train(spec, tmp_path / "b", 7, monkeypatch)
    assert n1 == 1 and n2 > 5
    drop = ("seconds", "time")       # fused differently: float rounding, not results
    assert len(cut.history) == len(whole.history)
    for a, b in zip(cut.history, whole.history, strict=True):
        assert a.keys() == b.keys()
        for k in a.keys() - set(drop):
            assert a[k] == (pytest.approx(b[k], rel=1e-5) if isinstance(b[k], float) else b[k])
    for k in out_whole:
        np.testing.assert_allclose(out_whole[k], out_cut[k], rtol=1e-5, atol=1e-6)
