"""Forward correctness of every registered op against an independent numpy reference.

Each row of :data:`CASES` is an example from an op's record: it builds a one-op spec, runs
it through ``dlgraph.compile`` (eval mode, float32) and compares the output, its shape and
its dtype with the record's float64 ``reference`` and with the type the op's ``infer``
rule declared; where the op promises PyTorch's behaviour, also with PyTorch
(``helpers.TORCH_REF``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    FAST,
    TORCH_REF,
    Case,
    F,
    attrs_of,
    cases,
    concrete,
    evaluate,
    forward,
    make_ctx,
    realize,
    run_ref,
    run_torch_ref,
)
from tinygrad import Context, Tensor

import dlgraph
from dlgraph.engine.compile.interpret import Ctx, Interpreter, input_dims, to_tensor
from dlgraph.engine.types import NUMPY_DTYPES as NP_DTYPES
from dlgraph.engine.types import TType
from dlgraph.ops import NO_GRAD, OPS, REGISTRY, register
from dlgraph.ops.examples import E

CASES: list[Case] = cases("examples")
"""Every forward example of every op's record (``register(..., examples=...)``)."""


def _check(case: Case, g, m, feeds, xs, got, *, training=False):
    out = g[g.resolve("out")].type
    dims = input_dims(g, feeds)
    assert got.shape == concrete(out.shape, dims), f"shape differs from infer's {out}"
    assert got.dtype == NP_DTYPES[out.dtype], f"dtype {got.dtype}, but infer says {out.dtype}"
    params = {k: v.numpy() for k, v in m.params.items()}
    ctx = make_ctx(params, training=training, dims=dims)
    want = run_ref(case, attrs_of(case), xs, ctx)
    if want.ndim == 0 and want.item() is None:      # no value reference (random ops)
        return
    if got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=case.rtol, atol=case.atol)
    torch_want = run_torch_ref(case, attrs_of(case), xs, ctx)
    if torch_want is not None:
        np.testing.assert_allclose(got, torch_want, rtol=case.rtol, atol=case.atol,
                                   err_msg="differs from PyTorch")


XFAIL: dict[str, str] = {}


def _param(case: Case):
    marks = [pytest.mark.xfail(reason=XFAIL[case.id], strict=True)] if case.id in XFAIL else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_forward(case):
    g, m, feeds, xs, got = forward(case)
    _check(case, g, m, feeds, xs, got)


# -------------------------------------------------------------------------- the registry


def test_every_op_has_a_forward_case():
    missing = sorted(set(REGISTRY) - {c.op for c in CASES})
    assert not missing, f"ops without `examples` in their record: {missing}"
    no_ref = sorted(n for n, d in REGISTRY.items() if d.reference is None)
    assert not no_ref, f"ops without a numpy `reference` in their record: {no_ref}"
    assert set(TORCH_REF) <= set(REGISTRY), "PyTorch references of ops that do not exist"
    assert len({c.id for c in CASES}) == len(CASES), "two forward examples share an id"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_opdef_is_complete(name):
    d = REGISTRY[name]
    assert d.name == name
    assert d.doc.strip(), "every op needs a doc line"
    assert d.attrs.model_fields["op"].annotation.__args__ == (name,)
    assert all(isinstance(i, str) and i for i in d.inputs)
    assert not any(i.endswith("*") for i in d.inputs[:-1]), "only the last input is variadic"
    if d.composite:
        assert callable(d.expand)
        assert d.infer is None and d.forward is None and d.vjp is None
        assert d.outputs
    else:
        assert d.expand is None
        assert callable(d.infer) and callable(d.forward)
        assert callable(d.vjp) or d.vjp == NO_GRAD


def test_register_refuses_examples_that_do_not_fit_the_record():
    """An op's examples are checked when it registers, and a refused op is not registered."""
    base = dict(doc="t", family="elementwise", inputs="x", infer=lambda a, x: x,
                forward=lambda c, a, x: x, vjp=NO_GRAD)
    ref = lambda a, xs, c: xs[0]                             # noqa: E731
    wrong = [(dict(examples=[E([F((2,))])]), "has examples but no reference"),
             (dict(reference=ref, examples=[E([F((2,)), F((2,))])]), "has 2 inputs for \\(x\\)"),
             (dict(reference=ref, examples=[E([F((2,))], {"nope": 1})]), "bad attributes"),
             (dict(reference=ref, examples=[E([F((2,))], id="add")]),
              "two examples are called 'add'"),
             (dict(reference=ref, grad_examples=[E([F((2,))])]), "no gradient, but grad_examples")]
    for rules, message in wrong:
        with pytest.raises(RuntimeError, match=message):
            register("test_only_op", **base, **rules)
    assert "test_only_op" not in OPS


# ----------------------------------------------------------------- modes and state, by hand


def test_param_init_and_const_values():
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {}, "nodes": {
        "p": {"op": "param", "shape": [2, 3], "init": 0.25},
        "z": {"op": "param", "shape": [4], "init": "zeros"},
        "c": {"op": "const", "value": -1.5}}, "outputs": ["p", "z", "c"]})
    out = dlgraph.compile(g, seed=0)()
    np.testing.assert_array_equal(out["p"], np.full((2, 3), 0.25, np.float32))
    np.testing.assert_array_equal(out["z"], np.zeros(4, np.float32))
    assert out["c"].shape == () and out["c"] == -1.5


def test_dropout_training_mask():
    """Training: every value is dropped (0) or scaled by 1/(1-p), about p of them dropped."""
    p = 0.25
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x": {"shape": [64, 64]}},
                      "nodes": {"d": {"op": "dropout", "in": "x", "p": p}}, "outputs": ["d"]})
    x = np.random.default_rng(0).uniform(1.0, 2.0, (64, 64)).astype(np.float32)
    (y,) = evaluate(g, [g.resolve("d")], {"x": x}, {}, training=True)
    ratio = y.numpy() / x
    kept = ratio > 0
    np.testing.assert_allclose(ratio[kept], 1 / (1 - p), rtol=1e-6)
    np.testing.assert_array_equal(ratio[~kept], 0.0)
    assert abs((~kept).mean() - p) < 0.05


def test_batch_norm_training_uses_batch_stats_and_updates_running_ones():
    case = Case("batch_norm", [F((6, 3))], {"momentum": 0.2})
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x0": {"shape": [6, 3]}},
                      "nodes": {"out": {"op": "batch_norm", "in": "x0", "momentum": 0.2}},
                      "outputs": ["out"]})
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 3)) * 2 + 1).astype(np.float32)
    params = {k: Tensor(np.asarray(v, np.float32)) for k, v in
              {"out.weight": rng.standard_normal(3), "out.bias": rng.standard_normal(3),
               "out.running_mean": np.zeros((1, 3)), "out.running_var": np.ones((1, 3))}.items()}
    ctx = Ctx(training=True)
    (y,) = Interpreter(g, [g.resolve("out")])(ctx, {"x0": to_tensor(x, "float32")}, params)
    realize(y, *ctx.updates)
    np_params = {k: v.numpy() for k, v in params.items()}
    want = run_ref(case, attrs_of(case), [x], make_ctx(np_params, training=True))
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    # running = (1 - momentum) * running + momentum * batch statistic (unbiased variance,
    # as PyTorch keeps it)
    np.testing.assert_allclose(np_params["out.running_mean"], 0.2 * x.mean(0, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_params["out.running_var"],
                               0.8 + 0.2 * x.var(0, ddof=1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_statistics(kind):
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x": {"shape": ["batch", 1]}},
                      "nodes": {"n": {"op": "noise", "in": "x", "shape": [64], "kind": kind}},
                      "outputs": ["n"]})
    m = dlgraph.compile(g, seed=0)
    feed = {"x": np.zeros((128, 1), np.float32)}
    with Context(**FAST):
        a, b = m(**feed)["n"], m(**feed)["n"]
    assert a.shape == (128, 64) and a.dtype == np.float32
    assert not np.array_equal(a, b), "two calls gave the same samples"
    if kind == "normal":
        assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05
    else:
        assert a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.03


def test_moving_average_training_returns_the_batch_statistic():
    g = dlgraph.load({"dlgraph": 1, "name": "t",
                      "inputs": {"s": {"shape": [1, 3]}},
                      "nodes": {"r": {"op": "param", "shape": [1, 3], "init": 1.0,
                                      "trainable": False},
                                "m": {"op": "moving_average", "in": ["s", "r"],
                                      "momentum": 0.5}}, "outputs": ["m"]})
    s = np.array([[1.0, 2.0, 3.0]], np.float32)
    r = Tensor(np.ones((1, 3), np.float32))
    ctx = Ctx(training=True)
    (y,) = Interpreter(g, ["m"])(ctx, {"s": to_tensor(s, "float32")}, {"r": r})
    realize(y, *ctx.updates)
    np.testing.assert_array_equal(y.numpy(), s)
    np.testing.assert_allclose(r.numpy(), [[1.0, 1.5, 2.0]])


def test_infer_matches_declared_types_for_named_dims():
    """Named dims survive shape inference through a small stack of ops."""
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x": {"shape": ["batch", 2, 3]}},
                      "nodes": {"f": {"op": "flatten", "in": "x"},
                                "l": {"op": "linear", "in": "f", "out": 4},
                                "s": {"op": "softmax", "in": "l"}}, "outputs": ["s"]})
    assert g[g.resolve("s")].type == TType(("batch", 4))


def test_integer_pow_matches_numpy():
    """tinygrad compiles no integer pow and fuses a float pow with the cast back wrongly:
    integer powers go through float32 and come back exact."""
    g = dlgraph.load({"dlgraph": 1, "name": "p", "inputs": {
        "a": {"shape": [5], "dtype": "int32"}, "b": {"shape": [5], "dtype": "int32"}},
        "nodes": {"p": {"op": "pow", "in": ["a", "b"]}}, "outputs": ["p"]})
    a, b = np.array([2, 3, -2, 0, 7], np.int32), np.array([3, 2, 3, 0, 5], np.int32)
    got = dlgraph.compile(g)(a=a, b=b)["p"]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a.astype(np.int64) ** b)


def test_keras_and_pytorch_layer_names_point_at_dlgraphs_ops():
    from dlgraph.ops.registry import ALIASES
    assert not [k for k, (op, _) in ALIASES.items() if op not in REGISTRY]
    spec = {"dlgraph": 1, "name": "k", "inputs": {"x": {"shape": ["batch", 4]}},
            "nodes": {"fc": {"op": "Dense", "in": "x", "out": 3}}, "outputs": ["fc"]}
    for name, help in (("Dense", "Keras' Dense is dlgraph's 'linear' (`dlgraph ops linear` "
                                 "describes it)"),
                       ("MaxPool2d", "PyTorch's MaxPool2d is dlgraph's 'max_pool2d' (`dlgraph "
                                     "ops max_pool2d` describes it)"),
                       ("LSTM", "LSTM is dlgraph's 'lstm' (`dlgraph ops lstm` describes it)"),
                       ("lienar", "did you mean 'linear'?")):
        spec["nodes"]["fc"]["op"] = name
        with pytest.raises(dlgraph.SpecError) as e:
            dlgraph.load(spec)
        assert str(e.value) == f"<dict>: node 'fc': unknown op '{name}'\n  help: {help}"


def test_an_output_that_is_a_slice_of_an_input_answers_every_call():
    # a suffix of an input is a view of its buffer in tinygrad: it must be copied, or the
    # compiled replay reads the first call's buffer (it crashed the process)
    spec = {"dlgraph": 1, "name": "s", "inputs": {"x": {"shape": [6]}},
            "nodes": {"head": {"op": "slice", "in": "x", "axis": 0, "start": 0, "stop": 2},
                      "tail": {"op": "slice", "in": "x", "axis": 0, "start": 2}},
            "outputs": ["head", "tail"]}
    model = dlgraph.compile(dlgraph.load(spec))
    for k in range(3):
        x = np.arange(6, dtype=np.float32) + k
        got = model(x=x)
        np.testing.assert_array_equal(got["head"], x[:2])
        np.testing.assert_array_equal(got["tail"], x[2:])


def test_a_keras_activation_name_points_at_dlgraphs():
    spec = {"dlgraph": 1, "name": "k", "inputs": {"x": {"shape": ["batch", 4]}},
            "nodes": {"fc": {"op": "linear", "in": "x", "out": 3, "activation": "swish"}},
            "outputs": ["fc"]}
    with pytest.raises(dlgraph.SpecError) as e:
        dlgraph.load(spec)
    assert str(e.value).endswith("unknown activation 'swish'\n  help: Keras' swish is "
                                 "dlgraph's 'silu' (`dlgraph ops silu` describes it)")
