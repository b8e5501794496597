"""The extension tables (initialisers, optimizers, schedules, metrics): every name the spec
accepts is a record with its implementation, and each implementation gives the numbers its
definition says (checked against numpy float64 and PyTorch's initialisers)."""

import math
import typing

import numpy as np
import pytest
import torch
from tinygrad import Context, Tensor
from tinygrad.nn import optim

import dlgraph
from dlgraph.engine.graph.ir import Param
from dlgraph.engine.spec.base import Init
from dlgraph.engine.spec.init import INITIALISERS, init_param
from dlgraph.engine.spec.train import (
    METRICS,
    OPTIMIZERS,
    SCHEDULES,
    MetricSpec,
    ScheduleSpec,
    TrainSpec,
)
from dlgraph.engine.train.loop import lr_at

SPEC = """
dlgraph: 1
name: t
inputs: {x: {shape: [batch, 2]}, y: {shape: [batch, 1]}}
nodes:
  fc: {op: linear, in: x, out: 1, init: {weight: %s}}
  loss: {op: mse, in: [fc, y]}
outputs: [fc]
train:
  data: {source: sine, samples: 64}
  objective: loss
  optimizer: {type: %s}
  schedule: {type: %s}
  metrics: [{type: %s, in: [fc, y]}]
"""


def test_the_spec_accepts_exactly_the_names_of_the_tables():
    assert typing.get_args(Init) == tuple(INITIALISERS)
    assert typing.get_args(ScheduleSpec.model_fields["type"].annotation) == tuple(SCHEDULES)
    assert typing.get_args(MetricSpec.model_fields["type"].annotation) == tuple(METRICS)
    schema = TrainSpec.model_json_schema()
    tags = {v["properties"]["type"]["const"] for k, v in schema["$defs"].items()
            if k in {d.model.__name__ for d in OPTIMIZERS.values()}}
    assert tags == set(OPTIMIZERS)


@pytest.mark.parametrize("slot, misspelt, close", [
    ("optimizer", "adamm", "adam"), ("schedule", "cosin", "cosine"),
    ("metric", "accuracyy", "accuracy"), ("init", "he_normall", "he_normal")])
def test_a_name_outside_a_table_is_a_located_spec_error(slot, misspelt, close):
    names = {"init": "zeros", "optimizer": "sgd", "schedule": "constant", "metric": "mse"}
    names[slot] = misspelt
    text = SPEC % (names["init"], names["optimizer"], names["schedule"], names["metric"])
    with pytest.raises(dlgraph.SpecError) as e:
        dlgraph.load(text)
    assert str(e.value).startswith("<string>:")
    assert misspelt in str(e.value)
    assert f"help: did you mean '{close}'?" in str(e.value)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_record_steps_like_pytorch(name):
    fields = {"type": name, "lr": 0.1} | ({"momentum": 0.9} if name == "sgd" else {})
    spec = OPTIMIZERS[name].model.model_validate(fields)
    w = Tensor([1.0, -2.0, 0.5])
    opt = OPTIMIZERS[name](params=[w], spec=spec)
    ref = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    rec = OPTIMIZERS[name]                          # its record names PyTorch's counterpart
    ropt = getattr(torch.optim, rec.torch)([ref], **rec.torch_args(spec)) if rec.torch else None
    for step in range(3):
        g = np.array([0.5, -1.0, 2.0]) * (step + 1)
        w.grad = Tensor(g.astype(np.float32))       # as the training step hands them over
        with Context(TRAINING=1):
            Tensor.realize(*opt.schedule_step())
        if ropt is not None:
            ref.grad = torch.tensor(g)
            ropt.step()
    if ropt is None:                                # LAMB: no PyTorch optimizer to compare
        assert isinstance(opt, optim.LAMB) and not np.allclose(w.numpy(), [1.0, -2.0, 0.5])
    else:
        np.testing.assert_allclose(w.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_starts_at_the_base_rate_and_ends_where_its_doc_says(name):
    s = ScheduleSpec(type=name, min_lr=0.1, step_size=50, gamma=0.5)
    assert lr_at(s, 1.0, 0, 100) == pytest.approx(1.0)
    # step: 0.5 ** 2; plateau: only its callback cuts the rate, never the step count
    end = {"constant": 1.0, "step": 0.25, "cosine": 0.1, "linear": 0.1, "plateau": 1.0}[name]
    assert lr_at(s, 1.0, 100, 100) == pytest.approx(end)


def metric_value(kind, *values, sizes=None):
    """A metric over one batch per value (``sizes``: the batches' sizes)."""
    parts = [[v] for v in values] if sizes is None else list(values)
    return METRICS[kind].over(parts, sizes or [len(values[0])])


def test_metrics_against_numpy_float64():
    pred = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    labels = np.array([1, 1, 1])
    assert metric_value("accuracy", pred, labels) == pytest.approx(2 / 3)
    p, t = np.array([1.0, -2.0, 0.5], np.float32), np.array([0.0, 0.0, 0.5])
    d = p.astype(np.float64) - t
    assert metric_value("mse", p, t) == pytest.approx(np.mean(d ** 2), rel=1e-12)
    assert metric_value("mae", p, t) == pytest.approx(np.mean(np.abs(d)), rel=1e-12)
    assert metric_value("rmse", p, t) == pytest.approx(np.sqrt(np.mean(d ** 2)), rel=1e-12)
    # mean: a node's values over every batch; a scalar per batch (a loss term) weighs by size
    a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.float32([[10, 20]])
    assert metric_value("mean", [a, b], sizes=[3, 1]) == \
        pytest.approx(np.mean([*a.ravel(), 10, 20]))
    assert metric_value("mean", [np.float32(2.0), np.float32(6.0)], sizes=[3, 1]) == \
        pytest.approx((2 * 3 + 6) / 4)


# (name, torch initialiser on a [out, in] weight, or None) — same distribution, other draws
TORCH = {
    "glorot_uniform": torch.nn.init.xavier_uniform_,
    "glorot_normal": torch.nn.init.xavier_normal_,
    "he_uniform": lambda w: torch.nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "he_normal": lambda w: torch.nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "lecun_normal": lambda w: torch.nn.init.normal_(w, std=1 / math.sqrt(w.shape[1])),
    "zeros": torch.nn.init.zeros_,
    "ones": torch.nn.init.ones_,
    "normal": torch.nn.init.normal_,
    "uniform": lambda w: torch.nn.init.uniform_(w, -1 / math.sqrt(w.shape[1]),
                                                1 / math.sqrt(w.shape[1])),
    "orthogonal": torch.nn.init.orthogonal_,
}


@pytest.mark.parametrize("name", list(INITIALISERS))
def test_every_initialiser_matches_pytorchs_distribution(name):
    shape = (300, 200)
    ours = init_param(Param("fc.weight", "fc/weight", shape, name, 200, 300), seed=1)
    torch.manual_seed(0)        # the reference's draw must not depend on the tests before
    ref = TORCH[name](torch.empty(shape, dtype=torch.float64)).numpy()
    assert ours.dtype == np.float32 and ours.shape == shape
    assert ours.mean() == pytest.approx(ref.mean(), abs=0.01)
    assert ours.std() == pytest.approx(ref.std(), rel=0.03, abs=1e-12)
    assert np.abs(ours).max() <= np.abs(ref).max() * 1.3 + 1e-12
    if name == "orthogonal":
        np.testing.assert_allclose(ours.T @ ours, np.eye(200), atol=1e-5)


def test_an_initial_value_depends_only_on_the_seed_and_the_name():
    p = Param("fc.weight", "fc/weight", (4, 3), "he_normal", 3, 4)
    q = Param("other.weight", "other/weight", (4, 3), "he_normal", 3, 4)
    np.testing.assert_array_equal(init_param(p, 7), init_param(p, 7))
    assert not np.array_equal(init_param(p, 7), init_param(p, 8))
    assert not np.array_equal(init_param(p, 7), init_param(q, 7))
    np.testing.assert_array_equal(init_param(Param("b", "b", (3,), 0.25, 3, 3), 0),
                                  np.full(3, 0.25, np.float32))
