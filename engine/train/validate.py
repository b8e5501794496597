"""Validation: the objectives and metrics of a run evaluated on its validation set, in eval
mode, by a compiled program, between epochs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dlgraph.engine.compile.interpret import to_tensor
from dlgraph.engine.compile.lower import lower
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import batches
from dlgraph.engine.spec.train import METRICS
from dlgraph.engine.train.progress import loss_key


def metric_refs(graph: Graph, spec) -> list[tuple[str, str, str, str]]:
    """(name, type, prediction node, target node) per metric (checked by
    :func:`~.checks.check_training` when the graph was summarised)."""
    return [(m.name or m.type, m.type, graph.resolve(m.in_[0]), graph.resolve(m.in_[1]))
            for m in spec.metrics]


def metric_value(kind: str, pred: np.ndarray, target: np.ndarray) -> float:
    """A validation metric of the table (spec/train.py METRICS) over all batches."""
    return METRICS[kind].compute(pred, target)


class Validator:
    """Evaluates objectives and metrics on the validation set, in eval mode, compiled.

    Values that are graph inputs (metric targets) are taken from the data, not the program.
    """

    def __init__(self, graph: Graph, objectives: dict[str, str], metrics, names: list[str],
                 cache=None):
        self.objectives, self.metrics, self.names = objectives, metrics, names
        self.cache = cache
        wanted = list(objectives.values()) + [n for m in metrics for n in m[2:]]
        self.computed = [t for t in dict.fromkeys(wanted) if t not in graph.inputs]
        self.graph = graph
        self.dims: dict[str, int] = {}
        self.program = None

    def __call__(self, params, chunks: list[tuple[list, dict[str, np.ndarray]]]):
        if self.program is None:
            self.program = lower(self.graph, self.computed, params=params, cache=self.cache)
        got: dict[str, list[np.ndarray]] = {}
        for tensors, arrays in chunks:
            outs = self.program.arrays(dict(zip(self.names, tensors, strict=True)), self.dims)
            for nid, o in zip(self.computed, outs, strict=True):
                got.setdefault(nid, []).append(o)
            for k, a in arrays.items():
                got.setdefault(k, []).append(a)
        res = {f"val_{k}": float(np.mean(got[nid])) for k, nid in self.objectives.items()}
        for name, kind, pred, target in self.metrics:
            res[f"val_{name}"] = metric_value(kind, np.concatenate(got[pred]),
                                              np.concatenate(got[target]))
        return res


def validation(graph: Graph, spec, names: list[str], val_arrays: dict[str, np.ndarray],
               dims: dict[str, int], cache=None,
               whole: Callable[[Graph, list[str], dict], list] | None = None):
    """The validator of a run (every phase's objective, every metric; ``dims`` those of a
    whole batch) and its validation set as whole batches: (what the program takes, made by
    ``whole(graph, names, batch)``: tensors, or arrays it copies into its buffers; the
    batch's arrays)."""
    phases = spec.all_phases()
    objectives = {loss_key(p.name, phases): graph.resolve(p.objective) for p in phases}
    validator = Validator(graph, objectives, metric_refs(graph, spec), names, cache=cache)
    validator.dims = dict(dims)
    whole = whole or (lambda g, ns, b: [to_tensor(b[k], g.inputs[k].dtype) for k in ns])
    chunks = [(whole(graph, names, b), b)
              for b in batches(val_arrays, spec.batch, spec.seed, 0, shuffle=False)]
    return validator, chunks
