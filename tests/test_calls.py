"""A compiled model called again and again, as a server or another tool calls it: every call
answers for its own inputs (the lean replay reuses buffers), whichever thread makes it."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import dlgraph

ROOT = Path(__file__).resolve().parent.parent


def batches(model, sizes, seed=0):
    return [{k: v for k, v in model.random_inputs(b, seed=seed + i).items()
             if k in model.input_names} for i, b in enumerate(sizes)]


@pytest.fixture(scope="module")
def mlp():
    return dlgraph.compile(dlgraph.load(ROOT / "graphs" / "mlp.yaml"), seed=0)


@pytest.mark.parametrize("spec", ["mlp.yaml", "lstm.yaml", "cnn.yaml"])
def test_each_call_answers_for_its_own_inputs(spec):
    """Calls of one model (replayed on its kept buffers) against the first call of a fresh
    model with the same weights, which runs through tinygrad's own JIT capture (its
    generated kernels: the replay's products run on the BLAS, which rounds otherwise, a few
    1e-6 for cnn.yaml's sums of up to 1,024 products; another caller's inputs miss by ~1)."""
    g = dlgraph.load(ROOT / "graphs" / spec)
    model = dlgraph.compile(g, seed=0)
    feeds = batches(model, [2, 2, 2, 3, 2])
    got = [model(**f) for f in feeds]
    for f, out in zip(feeds, got, strict=True):
        ref = dlgraph.compile(g, seed=0)(**f)
        for k in out:
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[0][model.outputs[0]], got[1][model.outputs[0]])


def test_outputs_are_the_callers_own_arrays(mlp):
    f, h = batches(mlp, [2, 2])
    first = mlp(**f)["logits"]
    kept = first.copy()
    mlp(**h)
    np.testing.assert_array_equal(first, kept)      # not a view of a buffer reused later


def test_threads_calling_one_model_get_their_own_answers(mlp):
    feeds = batches(mlp, [1] * 40 + [3] * 10, seed=100)
    alone = [mlp(**f)["logits"] for f in feeds]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda f: mlp(**f)["logits"], feeds * 4))
    # the first calls at a batch size run tinygrad's own kernels while it captures, later
    # ones replay (products on the host's BLAS): float32 rounding apart, another caller's
    # answer would differ at the first digit
    for a, b in zip(alone * 4, together, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_threads_compiling_and_calling_several_models_at_once():
    specs = ["mlp.yaml", "lstm.yaml"]
    graphs = [dlgraph.load(ROOT / "graphs" / s) for s in specs]
    refs = [dlgraph.compile(g, seed=1) for g in graphs]
    feeds = [batches(m, [2] * 6, seed=7) for m in refs]
    want = [[m(**f) for f in fs] for m, fs in zip(refs, feeds, strict=True)]
    models = [None, None]

    def work(i):
        models[i] = models[i] or dlgraph.compile(graphs[i], seed=1)
        return [models[i](**f) for f in feeds[i]]

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(work, [0, 1]))
    for w, g in zip(want, got, strict=True):
        for a, b in zip(w, g, strict=True):
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
