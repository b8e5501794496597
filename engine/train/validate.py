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


def metric_refs(graph: Graph, spec) -> list[tuple[str, str, list[str]]]:
    """(name, type, the nodes it reads) per metric (checked by
    :func:`~.checks.check_training` when the graph was summarised)."""
    return [(m.name or m.type, m.type, [graph.resolve(r) for r in m.in_]) for m in spec.metrics]


class Validator:
    """Evaluates objectives and metrics on the validation set, in eval mode, compiled.

    Values that are graph inputs (metric targets) are taken from the data, not the program.
    """

    def __init__(self, graph: Graph, objectives: dict[str, str], metrics, names: list[str],
                 cache=None):
        self.objectives, self.metrics, self.names = objectives, metrics, names
        self.cache = cache
        wanted = list(objectives.values()) + [n for m in metrics for n in m[2]]
        self.computed = [t for t in dict.fromkeys(wanted) if t not in graph.inputs]
        self.graph = graph
        self.dims: dict[str, int] = {}
        self.program = None

    def __call__(self, params, chunks: list[tuple[list, dict[str, np.ndarray]]],
                 prefix: str = "val_", losses: bool = True) -> dict[str, float]:
        """The objectives (unless ``losses`` is false) and metrics over ``chunks``, logged
        as ``<prefix><name>``."""
        if self.program is None:
            self.program = lower(self.graph, self.computed, params=params, cache=self.cache)
        got: dict[str, list[np.ndarray]] = {}
        sizes = []
        for tensors, arrays in chunks:
            outs = self.program.arrays(dict(zip(self.names, tensors, strict=True)), self.dims)
            for nid, o in zip(self.computed, outs, strict=True):
                got.setdefault(nid, []).append(o)
            for k, a in arrays.items():
                got.setdefault(k, []).append(a)
            sizes.append(len(next(iter(arrays.values()))))
        res = {f"{prefix}{k}": float(np.mean(got[nid])) for k, nid in self.objectives.items()
               if losses}
        for name, kind, refs in self.metrics:
            res[f"{prefix}{name}"] = METRICS[kind].over([got[r] for r in refs], sizes)
        return res


def validation(graph: Graph, spec, names: list[str], val_arrays: dict[str, np.ndarray],
               dims: dict[str, int], cache=None,
               whole: Callable[[Graph, list[str], dict], list] | None = None,
               train_arrays: dict[str, np.ndarray] | None = None):
    """The validator of a run (every phase's objective, every metric; ``dims`` those of a
    whole batch), its validation set as whole batches (what the program takes, made by
    ``whole(graph, names, batch)``: tensors, or arrays it copies into its buffers; the
    batch's arrays), and as many training samples the same way (for the ``train_``
    metrics: measured like the ``val_`` ones, in eval mode after the epoch, so that the two
    compare like with like; none without metrics)."""
    phases = spec.all_phases()
    objectives = {loss_key(p.name, phases): graph.resolve(p.objective) for p in phases}
    validator = Validator(graph, objectives, metric_refs(graph, spec), names, cache=cache)
    validator.dims = dict(dims)
    whole = whole or (lambda g, ns, b: [to_tensor(b[k], g.inputs[k].dtype) for k in ns])

    def chunks(arrays):
        return [(whole(graph, names, b), b)
                for b in batches(arrays, spec.batch, spec.seed, 0, shuffle=False)]
    n = len(next(iter(val_arrays.values())))
    sample = {k: a[:n] for k, a in (train_arrays or {}).items()}
    return validator, chunks(val_arrays), chunks(sample) if spec.metrics and sample else []
