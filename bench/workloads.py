"""The benchmark workloads: which spec, which shapes, which data, which loss.

Each workload names a dlgraph spec (an example graph of graphs/ where one exists, else a
bench-only spec of bench/specs/) and how to feed it. Batch size and optimizer are taken
from the issue and written over the spec's, so the three implementations agree by
construction. Data is seeded random numbers of the declared shapes: speed does not depend
on the values, and the first-step loss check needs only that all three see the same.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"


@dataclass
class Workload:
    name: str
    title: str                  # what the table shows
    family: str                 # mlp | cnn | lstm | gru | transformer: picks the peers' model
    specs: list[Path]           # the first that exists is used
    batch: int
    inputs: dict[str, tuple[tuple[int, ...], str, Any]]   # name -> (shape, dtype, generator)
    loss: str                   # mse | ce
    optimizer: dict[str, Any]
    x_name: str = "x"
    y_name: str = "y"
    arch: dict[str, int] = field(default_factory=dict)
    needs: tuple[str, ...] = ()                # ops the spec needs (skip with a note if absent)
    seq: int | None = None                     # sequence length written over the spec's

    @property
    def spec_path(self) -> Path:
        for p in self.specs:
            if p.exists():
                return p
        return self.specs[-1]

    def spec_dict(self) -> dict:
        """The spec as a dict, with the workload's batch and optimizer written over it."""
        d = yaml.safe_load(self.spec_path.read_text())
        d = copy.deepcopy(d)
        d["train"]["batch"] = self.batch
        d["train"]["optimizer"] = dict(self.optimizer)
        if self.seq is not None:                   # [batch, time, features]
            d["inputs"][self.x_name]["shape"][1] = self.seq
            d["train"]["data"]["length"] = self.seq
        return d

    def spec_source(self) -> dict:
        return {"source": self.spec_dict(), "base": str(self.spec_path.parent)}

    def missing_ops(self) -> list[str]:
        from dlgraph.ops import REGISTRY
        return [op for op in self.needs if op not in REGISTRY]

    def batches(self, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            b = {}
            for name, (shape, dtype, gen) in self.inputs.items():
                b[name] = gen(rng, (self.batch, *shape)).astype(dtype)
            out.append(b)
        return out


def _normal(rng, shape):
    return rng.standard_normal(shape)


def _unit(rng, shape):
    return rng.uniform(0, 1, shape)


def _ints(k):
    return lambda rng, shape: rng.integers(0, k, shape)


def _sine(rng, shape):  # sums of sines in [-1, 1], like the lstm spec's own data
    b, t = shape[0], shape[1]
    f = rng.uniform(1 / 32, 1 / 8, (b, 1))
    ph = rng.uniform(0, 2 * np.pi, (b, 1))
    return (0.5 * np.sin(2 * np.pi * f * np.arange(t) + ph)).reshape(shape)


TRANSFORMER = {"blocks": 2, "dim": 64, "heads": 4, "ff": 128, "seq": 16, "vocab": 16}

WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("mlp", "MLP 784-256-256-10, batch 128, SGD", "mlp", [SPECS / "mlp.yaml"], 128,
             {"x": ((1, 28, 28), "float32", _unit), "y": ((), "int32", _ints(10))}, "ce",
             {"type": "sgd", "lr": 0.01}),
    Workload("cnn", "CNN 3 conv + 2 dense, 32x32x3, batch 64, Adam", "cnn",
             [ROOT / "graphs" / "cnn.yaml", SPECS / "cnn.yaml"], 64,
             {"x": ((3, 32, 32), "float32", _unit), "y": ((), "int32", _ints(10))}, "ce",
             {"type": "adam", "lr": 0.001}),
    Workload("lstm", "LSTM 1→32, 16 steps, batch 64, Adam", "lstm",
             [ROOT / "graphs" / "lstm.yaml"], 64,
             {"x": ((16, 1), "float32", _sine), "y": ((1,), "float32", _normal)}, "mse",
             {"type": "adam", "lr": 0.01}),
    Workload("gru", "GRU 1→32, 16 steps, batch 64, Adam", "gru", [SPECS / "gru.yaml"], 64,
             {"x": ((16, 1), "float32", _sine), "y": ((1,), "float32", _normal)}, "mse",
             {"type": "adam", "lr": 0.01}),
    Workload("transformer", "Transformer 2 blocks, d 64, 4 heads, seq 16, batch 32, Adam",
             "transformer", [SPECS / "transformer.yaml"], 32,
             {"x": ((16,), "int32", _ints(16)), "y": ((16,), "int32", _ints(16))}, "ce",
             {"type": "adam", "lr": 0.001}, arch=TRANSFORMER,
             needs=("multi_head_attention", "transformer_encoder_block",
                    "positional_encoding")),
]}


# The sequence-length scaling table (bench/run.py --scaling): the lstm and gru workloads
# above at other lengths; the quick setting is the smoke check.
SCALING_FAMILIES = ("lstm", "gru")
SCALING_LENGTHS = (16, 64, 256, 1024)
SCALING_QUICK_LENGTHS = (16, 64)


def scaled(family: str, steps: int) -> Workload:
    """The ``family`` workload (lstm or gru) at sequence length ``steps``: ``lstm-t256``."""
    base = WORKLOADS[family]
    cell = family.upper()
    return dataclasses.replace(
        base, name=f"{family}-t{steps}", seq=steps,
        title=f"{cell} 1→32, {steps} steps, batch {base.batch}, Adam",
        inputs={"x": ((steps, 1), "float32", _sine), "y": ((1,), "float32", _normal)})


def workload(name: str) -> Workload:
    """A workload by name: one of WORKLOADS, or ``lstm-t<T>`` / ``gru-t<T>``."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    m = re.fullmatch(r"(lstm|gru)-t([1-9][0-9]*)", name)
    if m is None:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}, "
                       "lstm-t<T>, gru-t<T>")
    return scaled(m[1], int(m[2]))
