"""The ``train:`` section of a spec: data, objective, optimizer, schedule, metrics, phases."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .data import DataSpec
from .spec_base import Strict


class Sgd(Strict):
    """Stochastic gradient descent (tinygrad.nn.optim.SGD)."""

    type: Literal["sgd"]
    lr: float = Field(0.01, gt=0, description="learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum factor")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty")


class Adam(Strict):
    """Adam (tinygrad.nn.optim.Adam)."""

    type: Literal["adam"]
    lr: float = Field(0.001, gt=0, description="learning rate")
    b1: float = Field(0.9, ge=0, lt=1, description="first moment decay")
    b2: float = Field(0.999, ge=0, lt=1, description="second moment decay")
    eps: float = Field(1e-8, gt=0, description="denominator term")


class AdamW(Adam):
    """Adam with decoupled weight decay (tinygrad.nn.optim.AdamW)."""

    type: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay")


class Lamb(AdamW):
    """LAMB: layer-wise adaptive Adam (tinygrad.nn.optim.LAMB)."""

    type: Literal["lamb"]  # type: ignore[assignment]
    weight_decay: float = Field(0.0, ge=0, description="weight decay")


OptimizerSpec = Annotated[Sgd | Adam | AdamW | Lamb, Field(discriminator="type")]


class ScheduleSpec(Strict):
    """Learning-rate schedule, applied per step on top of the optimizer's lr."""

    type: Literal["constant", "step", "cosine", "linear"] = Field(
        "constant", description="constant; step (times gamma every step_size steps); cosine "
                                "(to min_lr at the last step); linear (to min_lr)")
    warmup: int = Field(0, ge=0, description="steps of linear warm-up from 0")
    step_size: int = Field(1000, gt=0, description="for step: steps between decays")
    gamma: float = Field(0.1, gt=0, description="for step: decay factor")
    min_lr: float = Field(0.0, ge=0, description="for cosine and linear: final lr")


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
    """A metric computed on the validation set after each epoch."""

    type: Literal["accuracy", "mse", "mae", "rmse"] = Field(
        description="accuracy: argmax of logits vs int labels; mse/mae/rmse: vs target")
    in_: list[str] = Field(alias="in", min_length=2, max_length=2,
                           description="[prediction node, target input or node]")
    name: str | None = Field(None, description="the name in logs (default: the type)")


class ValidationSpec(Strict):
    split: float = Field(0.1, ge=0, lt=1, description="fraction of the data held out")
    every: int = Field(1, ge=1, description="evaluate every N epochs")


class TargetSpec(Strict):
    """The result the run must reach; training stops early once it is met."""

    metric: str = Field(description="a logged name, e.g. `val_mse` or `val_accuracy`")
    below: float | None = None
    above: float | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.below is None) == (self.above is None):
            raise ValueError("give exactly one of `below` or `above`")
        return self

    def met(self, value: float) -> bool:
        return value < self.below if self.below is not None else value > self.above


class TrainSpec(Strict):
    """How a spec is trained; a single objective, or several alternating phases."""

    data: DataSpec = Field(description="where the samples come from")
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
