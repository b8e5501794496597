"""The ``train:`` section of a spec: data, objective, optimizer, schedule, metrics, phases.

Optimizers, learning-rate schedules and metrics are each one table of records, like the
op registry: a record holds the name the spec uses, its fields or doc, and the code that
runs it. The spec models (the optimizer union, the schedule and metric ``type`` literals)
and docs/spec.md are generated from the tables, so a new one is one record here, and a
name cannot be declared without its implementation.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BeforeValidator, Field, model_validator
from tinygrad import Tensor
from tinygrad.nn import optim

from dlgraph.engine.io.data import DataSpec
from dlgraph.engine.spec.base import Strict
from dlgraph.engine.spec.optimizers import Adagrad, RMSprop

# ------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptimizerDef:
    """An optimizer: its spec model (``type: Literal[name]`` and its hyperparameters), how
    to make the tinygrad optimizer from the parameters and that model, and its PyTorch
    counterpart for the tests: a ``torch.optim`` class name and its keyword arguments from
    the model (None: PyTorch has none). ``runtime`` maps hyperparameters to the optimizer's
    attributes that may hold a [1] tensor instead of a number: the compiled update then reads
    them (like the learning rate, always a tensor), so a spec that changes only them reuses
    its compiled program; a zero stays a number (it changes what is computed)."""

    name: str
    model: type[Strict]
    make: Callable[[list, Any], optim.Optimizer]
    torch: str | None = None
    torch_args: Callable[[Any], dict] | None = None
    runtime: tuple[tuple[str, str], ...] = ()

    def __call__(self, params: list, spec) -> optim.Optimizer:
        opt = self.make(params, spec)
        for field, attr in self.runtime:
            if v := getattr(spec, field):
                setattr(opt, attr, Tensor([float(v)], device=opt.device).realize())
        return opt

    def key(self, spec) -> dict:
        """What of ``spec`` shapes the compiled update: runtime values only as zero or not."""
        runtime = {"lr", *(f for f, _ in self.runtime)}
        return {k: (bool(v) if k in runtime else v) for k, v in spec.model_dump().items()}


OPTIMIZERS: dict[str, OptimizerDef] = {}


def optimizer(make: Callable[[list, Any], optim.Optimizer], torch: str | None = None,
              torch_args: Callable[[Any], dict] | None = None, runtime=()):
    """Class decorator: enter a spec model into :data:`OPTIMIZERS` with its factory (and
    its PyTorch counterpart, ``torch.optim.<torch>(params, **torch_args(model))``)."""
    if (torch is None) != (torch_args is None):
        raise RuntimeError("an optimizer's PyTorch counterpart needs its name and its args")

    def enter(model: type[Strict]) -> type[Strict]:
        name, = typing.get_args(model.model_fields["type"].annotation)
        OPTIMIZERS[name] = OptimizerDef(name, model, make, torch, torch_args, tuple(runtime))
        return model
    return enter


@optimizer(lambda ps, o: optim.SGD(ps, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay),
           torch="SGD", torch_args=lambda o: dict(lr=o.lr, momentum=o.momentum,
                                                  weight_decay=o.weight_decay))
class Sgd(Strict):
    """Stochastic gradient descent (tinygrad.nn.optim.SGD)."""

    type: Literal["sgd"]
    lr: float = Field(0.01, gt=0, description="learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum factor")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty")


_ADAM = (("b1", "b1"), ("b2", "b2"), ("eps", "eps"))   # tinygrad's LAMB reads them as numbers


@optimizer(lambda ps, o: optim.Adam(ps, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps),
           torch="Adam", torch_args=lambda o: dict(lr=o.lr, betas=(o.b1, o.b2), eps=o.eps),
           runtime=_ADAM)
class Adam(Strict):
    """Adam (tinygrad.nn.optim.Adam)."""

    type: Literal["adam"]
    lr: float = Field(0.001, gt=0, description="learning rate")
    b1: float = Field(0.9, ge=0, lt=1, description="first moment decay")
    b2: float = Field(0.999, ge=0, lt=1, description="second moment decay")
    eps: float = Field(1e-8, gt=0, description="denominator term")


@optimizer(lambda ps, o: optim.AdamW(ps, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                     weight_decay=o.weight_decay),
           torch="AdamW", torch_args=lambda o: dict(lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                                    weight_decay=o.weight_decay),
           runtime=_ADAM + (("weight_decay", "wd"),))
class AdamW(Adam):
    """Adam with decoupled weight decay (tinygrad.nn.optim.AdamW)."""

    type: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay")


@optimizer(lambda ps, o: optim.LAMB(ps, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                    weight_decay=o.weight_decay),
           runtime=_ADAM + (("weight_decay", "wd"),))
class Lamb(AdamW):
    """LAMB: layer-wise adaptive Adam (tinygrad.nn.optim.LAMB)."""

    type: Literal["lamb"]  # type: ignore[assignment]
    weight_decay: float = Field(0.0, ge=0, description="weight decay")


@optimizer(lambda ps, o: RMSprop(ps, lr=o.lr, alpha=o.alpha, eps=o.eps,
                                  weight_decay=o.weight_decay, momentum=o.momentum,
                                  centered=o.centered),
           torch="RMSprop", torch_args=lambda o: dict(lr=o.lr, alpha=o.alpha, eps=o.eps,
                                                      weight_decay=o.weight_decay,
                                                      momentum=o.momentum, centered=o.centered))
class Rmsprop(Strict):
    """RMSprop: steps scaled by a moving average of squared gradients (PyTorch's RMSprop)."""

    type: Literal["rmsprop"]
    lr: float = Field(0.01, gt=0, description="learning rate")
    alpha: float = Field(0.99, ge=0, lt=1, description="decay of the squared-gradient average")
    eps: float = Field(1e-8, gt=0, description="denominator term")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty")
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum factor")
    centered: bool = Field(False, description="divide by the gradient's variance instead")


@optimizer(lambda ps, o: Adagrad(ps, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay,
                                 initial_accumulator_value=o.initial_accumulator_value),
           torch="Adagrad", torch_args=lambda o: dict(
               lr=o.lr, eps=o.eps, weight_decay=o.weight_decay,
               initial_accumulator_value=o.initial_accumulator_value))
class AdagradSpec(Strict):
    """Adagrad: steps scaled by the sum of all squared gradients so far (PyTorch's Adagrad)."""

    type: Literal["adagrad"]
    lr: float = Field(0.01, gt=0, description="learning rate")
    eps: float = Field(1e-10, gt=0, description="denominator term")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty")
    initial_accumulator_value: float = Field(0.0, ge=0, description="where the sum of "
                                             "squared gradients starts")


OptimizerSpec = Annotated[Union[tuple(d.model for d in OPTIMIZERS.values())],  # noqa: UP007
                          Field(discriminator="type")]

# ---------------------------------------------------------------- learning-rate schedules


@dataclass(frozen=True)
class ScheduleDef:
    """A schedule: its doc and its rate at step ``t`` of ``span`` steps after warm-up."""

    name: str
    doc: str
    lr: Callable[[Any, float, int, int], float]        # (ScheduleSpec, base lr, t, span)


SCHEDULES: dict[str, ScheduleDef] = {d.name: d for d in [
    ScheduleDef("constant", "the optimizer's lr", lambda s, base, t, span: base),
    ScheduleDef("step", "times gamma every step_size steps",
                lambda s, base, t, span: base * s.gamma ** (t // s.step_size)),
    ScheduleDef("cosine", "to min_lr at the last step",
                lambda s, base, t, span: s.min_lr + (base - s.min_lr) * 0.5
                * (1 + math.cos(math.pi * min(t / span, 1)))),
    ScheduleDef("linear", "to min_lr",
                lambda s, base, t, span: base + (s.min_lr - base) * min(t / span, 1)),
    # the cut itself is made between epochs by engine/train/callbacks.py's ReduceOnPlateau
    ScheduleDef("plateau", "times gamma when `metric` has not improved for `patience` epochs, "
                "down to min_lr (reduce-on-plateau)", lambda s, base, t, span: base),
]}


def _table_doc(table: dict) -> str:
    return "; ".join(f"{d.name}: {d.doc}" for d in table.values())


class ScheduleSpec(Strict):
    """Learning-rate schedule, applied per step on top of the optimizer's lr."""

    type: Literal[tuple(SCHEDULES)] = Field(  # type: ignore[valid-type]
        "constant", description=_table_doc(SCHEDULES))
    warmup: int = Field(0, ge=0, description="steps of linear warm-up from 0")
    step_size: int = Field(1000, gt=0, description="for step: steps between decays")
    gamma: float = Field(0.1, gt=0, description="for step and plateau: decay factor")
    min_lr: float = Field(0.0, ge=0, description="for cosine and linear: final lr; for "
                                                 "plateau: the floor")
    metric: str = Field("val_loss", description="for plateau: the logged value watched")
    mode: Literal["auto", "min", "max"] = Field("auto", description="for plateau: whether "
                                                "lower or higher is better (auto: max for "
                                                "accuracies, else min)")
    min_delta: float = Field(0.0, ge=0, description="for plateau: the least change that "
                                                    "counts as an improvement")
    patience: int = Field(3, ge=1, description="for plateau: epochs without improvement "
                                               "before the lr is cut")

# ---------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricDef:
    """A metric: its doc and its value over a whole data set (``compute`` of the values
    of its ``arity`` nodes, each concatenated over the batches)."""

    name: str
    doc: str
    compute: Callable[..., float]        # (prediction, target) -> value; or (values) -> value
    arity: int = 2

    def over(self, parts: list[list[np.ndarray]], sizes: list[int]) -> float:
        """The value over batches: ``parts[i]`` holds node i's value per batch, ``sizes`` the
        batches' sizes (a scalar per batch, as a loss term, counts by its batch's size)."""
        if self.arity == 1 and all(np.size(v) == 1 for v in parts[0]):
            return float(np.average([float(np.reshape(v, -1)[0]) for v in parts[0]],
                                    weights=sizes))
        return self.compute(*(np.concatenate([np.atleast_1d(v) for v in vs]) for vs in parts))


def _sq(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    d = pred.astype(np.float64) - target
    return d * d


METRICS: dict[str, MetricDef] = {d.name: d for d in [
    MetricDef("accuracy", "argmax of logits vs int labels",
              lambda p, t: float((p.argmax(-1) == t).mean())),
    MetricDef("mse", "mean squared error vs the target", lambda p, t: float(_sq(p, t).mean())),
    MetricDef("mae", "mean absolute error vs the target",
              lambda p, t: float(np.abs(p.astype(np.float64) - t).mean())),
    MetricDef("rmse", "root of the mse", lambda p, t: float(np.sqrt(_sq(p, t).mean()))),
    MetricDef("mean", "the mean of one node's values, e.g. a VAE's KL term (`in: kl`)",
              lambda v: float(np.mean(v, dtype=np.float64)), arity=1),
]}

# --------------------------------------------------------------------- the train section


class Phase(Strict):
    """One optimisation phase: an objective, the parameters it updates and how."""

    name: str = Field(description="shown in progress lines, e.g. `discriminator`")
    objective: str = Field(description="node id of the scalar to minimise")
    params: list[str] = Field(["*"], description="glob patterns over parameter names "
                                                 "(e.g. `disc.*`) this phase updates")
    optimizer: OptimizerSpec = Field(description="how the parameters are updated")
    schedule: ScheduleSpec | None = None
    clip: float | None = Field(None, gt=0, description="clip gradients to this global norm")
    repeat: int = Field(1, ge=1, description="steps of this phase per training step")


class MetricSpec(Strict):
    """A metric computed after each epoch on the validation set (logged as `val_<name>`)
    and on a sample of the training set as large (`train_<name>`)."""

    type: Literal[tuple(METRICS)] = Field(  # type: ignore[valid-type]
        description=_table_doc(METRICS))
    in_: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = \
        Field(alias="in", min_length=1, max_length=2,
              description="[prediction node, target input or node]; for `mean`, one node")
    name: str | None = Field(None, description="the name in logs (default: the type)")

    @model_validator(mode="after")
    def _arity(self):
        n = METRICS[self.type].arity
        if len(self.in_) != n:
            raise ValueError(f"a {self.type} metric takes {'one node' if n == 1 else 'two'}"
                             f" in `in:`, got {len(self.in_)}")
        return self


class ValidationSpec(Strict):
    split: float = Field(0.1, ge=0, lt=1, description="fraction of the data held out")
    every: int = Field(1, ge=1, description="evaluate every N epochs")
    stratify: str | None = Field(None, description="a graph input of class labels (e.g. "
                                 "`y`): each class keeps its share in both splits")


class TargetSpec(Strict):
    """The result the run must reach; training stops early once it is met (unless `stop:
    false`: then every epoch runs and the end says whether the last one met it)."""

    metric: str = Field(description="a logged name, e.g. `val_mse` or `val_accuracy`")
    below: float | None = None
    above: float | None = None
    stop: bool = Field(True, description="stop training once the target is met (false: "
                       "train every epoch, check the target at each, report the last)")

    @model_validator(mode="after")
    def _one(self):
        if (self.below is None) == (self.above is None):
            raise ValueError("give exactly one of `below` or `above`")
        return self

    def met(self, value: float) -> bool:
        return value < self.below if self.below is not None else value > self.above


class LogSpec(Strict):
    """Where else the metrics go, e.g. `{tensorboard: true}`."""

    tensorboard: bool | str = Field(False, description="write TensorBoard event files (needs "
                                    "tensorboardX): true for `<run dir>/tensorboard`, or a "
                                    "folder (relative to the current one, as --out); scalars "
                                    "per step and per epoch, and each phase's lr")


class MonitorSpec(Strict):
    """A logged value to watch, e.g. `{metric: val_accuracy}`."""

    metric: str = Field("val_loss", description="a logged name, e.g. `val_loss`, "
                                                "`val_accuracy` or `loss`")
    mode: Literal["auto", "min", "max"] = Field("auto", description="whether lower or higher "
                                                "is better (auto: max for accuracies, else min)")
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an "
                                                    "improvement")


class EarlyStoppingSpec(MonitorSpec):
    """Stop when the watched value has stopped improving."""

    patience: int = Field(5, ge=1, description="epochs without improvement before stopping")
    restore_best: bool = Field(True, description="end with the weights of the best epoch")


class InitFromSpec(Strict):
    """Parameters copied from a weights file before training (transfer learning)."""

    path: str = Field(description="a weights.safetensors or checkpoint; relative to the spec")
    params: list[str] = Field(["*"], description="glob patterns over this graph's parameter "
                                                 "names to copy")
    rename: dict[str, str] = Field(default_factory=dict, description="this graph's name "
                                   "prefix -> the file's, for renamed scopes (e.g. "
                                   "{enc: encoder})")


class TrainSpec(Strict):
    """How a spec is trained; a single objective, or several alternating phases."""

    data: DataSpec | None = Field(None, description="where the samples come from (leave out "
                                  "when arrays are passed: dlgraph.train(g, data={...}))")
    feed: dict[str, str] = Field(default_factory=dict, description="graph input -> data "
                                 "array name, where they differ (default: same names)")
    batch: int = Field(32, gt=0, description="samples per step")
    epochs: int = Field(10, gt=0, description="passes over the training data (at most)")
    steps: int | None = Field(None, gt=0, description="stop after this many steps")
    objective: str | None = Field(None, description="node id of the scalar loss")
    optimizer: OptimizerSpec | None = None
    schedule: ScheduleSpec | None = None
    clip: float | None = Field(None, gt=0, description="clip gradients to this global norm")
    phases: list[Phase] | None = Field(None, description="alternating phases (e.g. a GAN); "
                                       "instead of objective/optimizer")
    metrics: list[MetricSpec] = Field(default_factory=list)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    target: TargetSpec | None = None
    seed: int = Field(0, description="seeds parameter init, data order and dropout")
    checkpoint_every: int = Field(1, ge=1, description="write a checkpoint every N epochs")
    early_stopping: EarlyStoppingSpec | None = None
    best_checkpoint: MonitorSpec | None = Field(
        None, description="what best.safetensors is chosen by (default: what early_stopping "
                          "watches, else val_loss when logged)")
    init_from: InitFromSpec | None = None
    freeze: list[str] = Field(default_factory=list, description="glob patterns over parameter "
                              "names that are not trained (as `trainable: false`)")
    log: LogSpec | None = None

    @model_validator(mode="after")
    def _phases(self):
        if self.phases is None:
            if self.objective is None or self.optimizer is None:
                raise ValueError("give `objective` and `optimizer`, or `phases`")
        elif self.objective is not None or self.optimizer is not None:
            raise ValueError("give either `phases` or `objective`/`optimizer`, not both")
        return self

    def all_phases(self) -> list[Phase]:
        if self.phases is not None:
            return self.phases
        return [Phase(name="train", objective=self.objective, optimizer=self.optimizer,
                      schedule=self.schedule, clip=self.clip)]
