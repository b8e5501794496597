"""Gradients by graph reversal, held against independent oracles.

For every differentiable op (a primitive whose ``vjp`` is not ``NO_GRAD``, or a composite)
each gradient example of its record (:data:`CASES`) builds ``obj = sum(op(params...) * w)``
with the op's float inputs as ``param`` nodes and ``w`` fixed random weights, reverses it,
and compares our gradients (evaluated in float32) with

* tinygrad's own autograd on the very same forward tensors (relative error < 1e-4), and
* central finite differences (eps 1e-6) of the numpy float64 reference of the op's record
  (relative error < 1e-5: our float32 gradients against float64 differences; the worst
  case seen is 5e-7).

A compact subset (the examples marked ``float64``) also runs with float64 parameters: the
graph must stay in float64 and meet the finite differences within 1e-5. Whole networks are
held against PyTorch with :func:`helpers.torch_grads_match`. Relative errors are max-norm
errors over the reference's largest magnitude.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import (
    Case,
    F,
    attrs_of,
    cases,
    evaluate,
    feed_arrays,
    make_ctx,
    op_spec,
    realize,
    rel_err,
    run_ref,
    seed_of,
    torch_grads_match,
)
from tinygrad import Tensor

import dlgraph
from dlgraph.engine.graph.autodiff import reverse
from dlgraph.ops import REGISTRY

TOL_TINYGRAD = 1e-4   # float32: ours vs tinygrad's autograd
TOL_FD32 = 1e-5       # float32 ours vs central differences of the float64 reference
TOL_FD64 = 1e-5       # float64 ours vs central differences of the float64 reference
EPS = 1e-6

CASES: list[Case] = cases("grad_examples")
"""Every gradient example of every op's record (``register(..., grad_examples=...)``);
those marked ``float64`` also run with float64 parameters (kept compact: every run compiles
new kernels), and those with ``fd_training=False`` take finite differences in eval mode
(training masks are random)."""
XFAIL: dict[str, str] = {}


def _param(case: Case):
    marks = [pytest.mark.xfail(reason=XFAIL[case.id], strict=True)] if case.id in XFAIL else []
    return pytest.param(case, id=case.id, marks=marks)


def test_every_differentiable_op_has_a_gradient_case():
    missing = sorted({n for n, d in REGISTRY.items() if d.differentiable} - {c.op for c in CASES})
    assert not missing, f"differentiable ops without `grad_examples` in their record: {missing}"
    assert len({c.id for c in CASES}) == len(CASES), "two gradient examples share an id"


class Problem:
    """One case as a training graph, its parameter values and a float64 objective in numpy."""

    def __init__(self, case: Case):
        self.case = case
        self.training = case.fd_training
        rng = np.random.default_rng(seed_of(case.id))
        fwd = dlgraph.load(op_spec(case))
        out_shape = fwd[fwd.resolve("out")].type.shape
        self.g = dlgraph.load(op_spec(case, grad=True, out_shape=out_shape))
        self.feeds, self.xs = feed_arrays(case, rng, grad=True)
        values = {f"x{k}": np.asarray(x, np.float64) for k, (inp, x) in
                  enumerate(zip(case.ins, self.xs, strict=True)) if isinstance(inp, F)}
        for name, p in self.g.params.items():
            if name not in values:
                v = rng.uniform(0.5, 2.0, p.shape) if name.endswith("var") \
                    else rng.standard_normal(p.shape) * (1.0 if name == "w" else 0.5)
                values[name] = np.asarray(v, np.float32).astype(np.float64)
        self.values = values
        self.wrt = [n for n, p in self.g.params.items() if p.trainable]
        self.tg = reverse(self.g, "obj", wrt=self.wrt)
        self.attrs = attrs_of(case)

    def ours(self, dtype, training=True, tinygrad_too=False):
        """[objective, *gradients] by our graph, and tinygrad's gradients if asked."""
        params = {k: Tensor(v.astype(dtype)) for k, v in self.values.items()}
        targets = [self.tg.objective] + [self.tg.grads[n] for n in self.wrt]
        outs = evaluate(self.tg, targets, self.feeds, params, training=training, lazy=True)
        theirs = outs[0].gradient(*[params[n] for n in self.wrt]) if tinygrad_too else []
        realize(*outs, *theirs)
        return outs, theirs

    def objective(self, values) -> float:
        xs = [values.get(f"x{k}", x) for k, x in enumerate(self.xs)]
        out = run_ref(self.case, self.attrs, xs, make_ctx(values, training=self.training))
        return float(np.sum(out * values["w"]))

    def fd_errors(self, grads: list[np.ndarray]) -> dict[str, float]:
        """Relative error of each gradient against central differences of the reference.

        Small parameters are checked element by element; larger ones along a few random
        directions (a wrong element still moves every projection).
        """
        errs = {}
        for name, grad in zip(self.wrt, grads, strict=True):
            base = self.values[name]
            if base.size <= FD_ELEMENTS:
                dirs = np.eye(base.size).reshape((base.size,) + base.shape)
            else:
                dirs = np.random.default_rng(0).standard_normal((FD_DIRECTIONS,) + base.shape)
            fd = np.array([(self.objective({**self.values, name: base + EPS * v})
                            - self.objective({**self.values, name: base - EPS * v})) / (2 * EPS)
                           for v in dirs])
            ours = np.tensordot(dirs, np.asarray(grad, np.float64), axes=base.ndim)
            errs[name] = rel_err(ours, fd)
        return errs


FD_ELEMENTS = 16
FD_DIRECTIONS = 4


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_gradient(case):
    """float32: ours vs tinygrad's autograd, and vs finite differences in float64."""
    pb = Problem(case)
    outs, theirs = pb.ours(np.float32, tinygrad_too=True)
    for name, ours, tiny in zip(pb.wrt, outs[1:], theirs, strict=True):
        err = rel_err(ours.numpy(), tiny.numpy())
        assert err < TOL_TINYGRAD, f"d obj / d {name}: ours vs tinygrad, relative error {err:.2e}"
    if pb.training:
        want = pb.objective(pb.values)
        assert abs(outs[0].numpy() - want) <= 1e-5 * max(1.0, abs(want)), \
            f"objective {outs[0].numpy()} vs reference {want}"
    else:
        outs, _ = pb.ours(np.float32, training=False)
    errs = pb.fd_errors([o.numpy() for o in outs[1:]])
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e < TOL_FD32}
    assert not bad, f"float32 gradients vs finite differences, relative error: {bad}"


@pytest.mark.parametrize("case", [_param(c) for c in CASES if c.float64])
def test_gradient_float64(case):
    """Fed float64 parameters, our graph stays in float64 and meets finite differences."""
    pb = Problem(case)
    outs, _ = pb.ours(np.float64, training=pb.training)
    low = {n: o.dtype for n, o in zip(["obj", *pb.wrt], outs, strict=True)
           if o.dtype.itemsize != 8}
    assert not low, f"float64 parameters gave lower-precision results: {low}"
    want = pb.objective(pb.values)
    assert abs(outs[0].numpy() - want) <= 1e-6 * max(1.0, abs(want)), \
        f"objective {outs[0].numpy()} vs reference {want}"
    errs = pb.fd_errors([o.numpy() for o in outs[1:]])
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e < TOL_FD64}
    assert not bad, f"float64 gradients vs finite differences, relative error: {bad}"


@pytest.mark.xfail(strict=True, reason="ops/elementwise.py const: the value is always a "
                   "float32 tensor, so in a float64 graph every constant (eps, 1 - smoothing, "
                   "gelu's coefficients, 1/sqrt(d)) is rounded to float32")
def test_constants_keep_float64_precision():
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [2]},
                            "c": {"op": "const", "value": 0.1},
                            "m": {"op": "mul", "in": ["a", "c"]},
                            "obj": {"op": "sum", "in": "m"}}))
    (obj,) = evaluate(g, ["obj"], {}, {"a": Tensor(np.ones(2))})
    assert obj.dtype.itemsize == 8
    assert obj.numpy() == 0.2


# ------------------------------------------------------------------- rules beyond the table


def _grads(spec: dict, values: dict[str, np.ndarray], objective="obj", wrt=None,
           training=True, feeds=None):
    g = dlgraph.load(spec)
    tg = reverse(g, objective, wrt=wrt)
    names = list(tg.grads)
    outs = evaluate(tg, [tg.grads[n] for n in names], feeds or {},
                    {k: Tensor(np.asarray(v, np.float32)) for k, v in values.items()},
                    training=training)
    return {n: o.numpy() for n, o in zip(names, outs, strict=True)}


def _spec(nodes, inputs=None):
    return {"dlgraph": 1, "name": "t", "inputs": inputs or {}, "nodes": nodes,
            "outputs": ["obj"]}


W = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], np.float32)


def test_max_ties_share_the_gradient():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]], np.float32)
    w = np.array([2.0, -4.0], np.float32)
    got = _grads(_spec({"a": {"op": "param", "shape": [2, 3]},
                        "w": {"op": "param", "shape": [2], "trainable": False},
                        "m": {"op": "max", "in": "a", "axes": -1},
                        "p": {"op": "mul", "in": ["m", "w"]},
                        "obj": {"op": "sum", "in": "p"}}), {"a": x, "w": w})
    np.testing.assert_array_equal(got["a"], [[0.0, 1.0, 1.0], [-2.0, 0.0, -2.0]])


@pytest.mark.parametrize("op, to_x", [("maximum", [1.0, 0.0, 1.0]), ("minimum", [0.0, 1.0, 1.0])])
def test_maximum_minimum_ties_go_to_x(op, to_x):
    nodes = {"a": {"op": "param", "shape": [3]}, "b": {"op": "param", "shape": [3]},
             "m": {"op": op, "in": ["a", "b"]}, "obj": {"op": "sum", "in": "m"}}
    got = _grads(_spec(nodes), {"a": np.array([2.0, -1.0, 0.5], np.float32),
                                "b": np.array([1.0, 0.0, 0.5], np.float32)})
    np.testing.assert_array_equal(got["a"], to_x)
    np.testing.assert_array_equal(got["b"], 1.0 - np.array(to_x))


def test_value_used_twice_sums_its_cotangents():
    """d/da sum(a * a * w + exp(a)) = 2 a w + exp(a): two uses in one node, one elsewhere."""
    a = np.array([[0.5, -1.0, 0.25], [1.0, 2.0, -0.5]], np.float32)
    nodes = {"a": {"op": "param", "shape": [2, 3]},
             "w": {"op": "param", "shape": [2, 3], "trainable": False},
             "sq": {"op": "mul", "in": ["a", "a"]}, "p": {"op": "mul", "in": ["sq", "w"]},
             "e": {"op": "exp", "in": "a"}, "t": {"op": "add", "in": ["p", "e"]},
             "obj": {"op": "sum", "in": "t"}}
    got = _grads(_spec(nodes), {"a": a, "w": W})
    np.testing.assert_allclose(got["a"], 2 * a * W + np.exp(a), rtol=1e-6)


@pytest.mark.parametrize("blocker", ["stop_gradient", "sign"])
def test_no_grad_ops_block_the_gradient(blocker):
    """sum(a * w) + sum(blocker(a) * w): only the first term reaches `a`."""
    a = np.array([[0.5, -1.0, 0.25], [1.0, 2.0, -0.5]], np.float32)
    nodes = {"a": {"op": "param", "shape": [2, 3]},
             "w": {"op": "param", "shape": [2, 3], "trainable": False},
             "s": {"op": blocker, "in": "a"}, "t": {"op": "add", "in": ["a", "s"]},
             "p": {"op": "mul", "in": ["t", "w"]}, "obj": {"op": "sum", "in": "p"}}
    np.testing.assert_allclose(_grads(_spec(nodes), {"a": a, "w": W})["a"], W)


def test_dropout_gradient_is_the_training_mask():
    """In training the gradient of sum(dropout(a) * w) is w times the very mask used."""
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [8, 8]},
                            "d": {"op": "dropout", "in": "a", "p": 0.5},
                            "obj": {"op": "sum", "in": "d"}}))
    tg = reverse(g, "obj")
    a = np.random.default_rng(0).uniform(1.0, 2.0, (8, 8)).astype(np.float32)
    d, grad = evaluate(tg, [g.resolve("d"), tg.grads["a"]], {}, {"a": Tensor(a)})
    mask = d.numpy() / a
    assert set(np.unique(np.round(mask, 5))) <= {0.0, 2.0} and 0 < (mask == 0).sum() < 64
    np.testing.assert_allclose(grad.numpy(), mask, rtol=1e-6)


# ---------------------------------------------------------------------------- errors


def test_objective_must_be_a_scalar():
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [3, 4]},
                            "obj": {"op": "exp", "in": "a"}}))
    with pytest.raises(dlgraph.GradientError,
                       match=re.escape("objective 'obj' must be a float scalar, got [3, 4]")):
        reverse(g, "obj")


def test_objective_must_be_float():
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [3]},
                            "obj": {"op": "argmax", "in": "a"}}))
    with pytest.raises(dlgraph.GradientError,
                       match=re.escape("objective 'obj' must be a float scalar, got [] int32")):
        reverse(g, "obj")


def test_objective_must_be_a_node():
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [3]},
                            "obj": {"op": "sum", "in": "a"}}))
    with pytest.raises(dlgraph.GradientError, match=re.escape("objective 'nope' is not a node")):
        reverse(g, "nope")


def test_unused_trainable_param_is_named():
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [3]},
                            "unused": {"op": "param", "shape": [2]},
                            "obj": {"op": "sum", "in": "a"}}))
    with pytest.raises(dlgraph.GradientError, match=re.escape(
            "parameter 'unused' does not affect the objective 'obj'")) as e:
        reverse(g, "obj")
    assert e.value.node == "unused"
    assert reverse(g, "obj", wrt=["a"]).grads.keys() == {"a"}


def test_unused_layer_param_is_named_with_its_layer():
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [2, 3]},
                            "fc": {"op": "linear", "in": "a", "out": 2},
                            "obj": {"op": "sum", "in": "a"}}))
    with pytest.raises(dlgraph.GradientError, match=re.escape(
            "parameter 'fc.weight' does not affect the objective 'obj'")) as e:
        reverse(g, "obj")
    assert e.value.node == "fc"


def test_param_behind_no_grad_ops_gets_no_gradient():
    g = dlgraph.load(_spec({"a": {"op": "param", "shape": [3]},
                            "i": {"op": "argmax", "in": "a", "keepdims": True},
                            "f": {"op": "cast", "in": "i", "dtype": "float32"},
                            "obj": {"op": "sum", "in": "f"}}))
    with pytest.raises(dlgraph.GradientError, match=re.escape(
            "no gradient reaches parameter 'a': every path to the objective goes through "
            "ops without a gradient")):
        reverse(g, "obj")


# ----------------------------------------------------------------- whole networks vs torch


def _load(module: torch.nn.Module, weights: dict[str, np.ndarray], prefix: str) -> dict:
    """Copy dlgraph weights `prefix.name` into a torch module; map our names to its tensors."""
    out = {}
    with torch.no_grad():
        for name, t in module.named_parameters():
            t.copy_(torch.from_numpy(weights[f"{prefix}.{name}"]))
            out[f"{prefix}.{name}"] = t
    return out


MLP = {"dlgraph": 1, "name": "mlp",
       "inputs": {"x": {"shape": ["batch", 5]}, "y": {"shape": ["batch"], "dtype": "int32"}},
       "nodes": {"fc1": {"op": "linear", "in": "x", "out": 8},
                 "h": {"op": "relu", "in": "fc1"},
                 "fc2": {"op": "linear", "in": "h", "out": 3},
                 "loss": {"op": "cross_entropy", "in": ["fc2", "y"]}},
       "outputs": ["fc2"]}


def mlp_torch(w):
    fc1, fc2 = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)
    tensors = {**_load(fc1, w, "fc1"), **_load(fc2, w, "fc2")}
    return (lambda x, y: TF.cross_entropy(fc2(torch.relu(fc1(x))), y)), tensors


def test_mlp_matches_torch():
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((6, 5)).astype(np.float32),
              "y": rng.integers(0, 3, 6).astype(np.int32)}
    errs = torch_grads_match(MLP, mlp_torch, inputs)
    assert set(errs) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


CONVNET = {"dlgraph": 1, "name": "convnet",
           "inputs": {"x": {"shape": ["batch", 3, 8, 8]},
                      "y": {"shape": ["batch"], "dtype": "int32"}},
           "nodes": {"conv": {"op": "conv2d", "in": "x", "out": 4, "kernel": 3, "stride": 2,
                              "padding": 1},
                     "pool": {"op": "max_pool2d", "in": "conv", "kernel": 2},
                     "act": {"op": "relu", "in": "pool"},
                     "flat": {"op": "flatten", "in": "act"},
                     "fc": {"op": "linear", "in": "flat", "out": 5},
                     "loss": {"op": "cross_entropy", "in": ["fc", "y"]}},
           "outputs": ["fc"]}


def convnet_torch(w):
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    fc = torch.nn.Linear(16, 5)
    tensors = {**_load(conv, w, "conv"), **_load(fc, w, "fc")}

    def loss(x, y):
        h = torch.relu(TF.max_pool2d(conv(x), 2))
        return TF.cross_entropy(fc(h.flatten(1)), y)
    return loss, tensors


def test_convnet_matches_torch():
    rng = np.random.default_rng(1)
    inputs = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
              "y": np.array([1, 4], np.int32)}
    errs = torch_grads_match(CONVNET, convnet_torch, inputs)
    assert set(errs) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
