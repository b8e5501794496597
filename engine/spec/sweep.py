"""The `sweep:` section of a spec: which fields to vary, how to search, what to optimise.

The same models hold the `dlgraph sweep` flags (the flags override the section), so a sweep
written in the spec and one typed on the command line are checked alike::

    sweep:
      parameters:
        train.optimizer.lr: {low: 0.0001, high: 0.1, log: true}
        nodes.fc1.out: [16, 32, 64]
      search: random
      samples: 8
      metric: val_accuracy
      mode: max
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dlgraph.engine.spec.base import Strict

#: the most trials a sweep plans unless `max_trials` (--max-trials) raises it
MAX_TRIALS = 10_000
#: a dotted path into the spec: names (letters, digits, _, -) or list positions
PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.([A-Za-z0-9_][A-Za-z0-9_-]*))*$")


class RangeSpec(Strict):
    """A range to sample from (random or optuna search): whole numbers when both ends are."""

    low: int | float = Field(description="the smallest value")
    high: int | float = Field(description="the largest value (included for whole numbers)")
    log: bool = Field(False, description="sample evenly on a log scale (both ends above 0)")

    @model_validator(mode="after")
    def _order(self):
        if isinstance(self.low, bool) or isinstance(self.high, bool):
            raise ValueError("a range's ends must be numbers")
        if not self.low < self.high:
            raise ValueError(f"a range needs low < high, got {self.low} and {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    @property
    def whole(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def text(self) -> str:
        return f"{'log:' if self.log else ''}{self.low}:{self.high}"


class SweepSpec(Strict):
    """A hyperparameter sweep: every trial is one ordinary training run of the spec with
    some fields overridden (`dlgraph sweep`)."""

    parameters: dict[str, list[Any] | RangeSpec] = Field(
        default_factory=dict, description="a dotted path into the spec (`train.optimizer.lr`, "
        "`nodes.fc1.out`) -> the values to try, or a range `{low, high, log}`")
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of the listed values; random: `samples` "
        "draws (seeded by `train.seed`); optuna: `samples` trials chosen by Optuna's sampler "
        "(needs optuna)")
    samples: int | None = Field(None, ge=1, description="grid: times the grid is run, each "
                                "time with the next seed (default 1); random and optuna: "
                                "trials (default 8)")
    metric: str | None = Field(None, description="the logged value that ranks trials "
                               "(default: the target's metric, else val_loss)")
    mode: Literal["min", "max"] | None = Field(None, description="whether lower or higher is "
                                               "better (default: by the target, else min)")
    concurrency: int | None = Field(None, ge=1, description="trials at once (default: as "
                                    "many as the CPUs hold)")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs Ray reserves for each trial")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs Ray reserves for each trial")
    time_budget: float | None = Field(None, gt=0, description="seconds after which the sweep "
                                      "stops its trials")
    max_trials: int = Field(MAX_TRIALS, ge=1, description="the most trials a sweep may plan "
                            "(a grid's combinations times `samples`); more is refused before "
                            "anything is built")

    @field_validator("parameters")
    @classmethod
    def _paths(cls, v):
        for path, values in v.items():
            if not PATH.match(path):
                raise ValueError(f"'{path}' is not a dotted path such as train.optimizer.lr")
            if path.split(".")[0] == "sweep":
                raise ValueError(f"'{path}': a sweep cannot vary its own `sweep:` section")
            if isinstance(values, list) and not values:
                raise ValueError(f"'{path}' lists no values")
        return v


__all__ = ["MAX_TRIALS", "PATH", "RangeSpec", "SweepSpec"]
