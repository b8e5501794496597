"""Standardised features: mean 0 and std 1 per feature, with statistics of the training split.

A data source with ``standardize: true`` (or a list of its array names) has those arrays
standardised before training. The mean and standard deviation come from the training split
only, so no validation sample leaks into them; each feature (every position after the sample
axis) has its own, as scikit-learn's ``StandardScaler`` on the flattened rows, and a
constant feature (std 0) is only centred. A run saves them as ``standardize.json`` beside its
weights, and ``evaluate`` and ``predict`` apply them to the raw data they are given::

    data: {source: csv, path: patients.csv, x: [age, weight, pressure], y: sick,
           label: true, standardize: true}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dlgraph.engine.errors import DataError, Source, SpecError, suggest
from dlgraph.engine.io.data.base import Arrays, standardized

#: the file a run keeps its statistics in, beside weights.safetensors
STATS_FILE = "standardize.json"

#: graph input -> (mean, std), float64 arrays of one sample's shape
Stats = dict[str, tuple[np.ndarray, np.ndarray]]


def inputs_to_standardize(graph: Any, spec: Any) -> list[str]:
    """The graph inputs that the spec's data source asks to standardise (``feed:`` maps
    graph inputs to the source's array names); a name that feeds no input is an error."""
    names = standardized(spec.data) if spec.data is not None else []
    fed = {spec.feed.get(n, n): n for n in graph.inputs}
    for name in names:
        if name not in fed:
            raise SpecError(f"standardize names '{name}', which feeds no input of the graph",
                            source=Source(graph.source, graph.lines.get(
                                ("train", "data", "standardize"))),
                            help=suggest(name, fed) or f"the inputs are fed from: "
                                                       f"{', '.join(fed)}")
    return [fed[name] for name in names]


def fit(arrays: Arrays, inputs: list[str], where: Source | None = None) -> Stats:
    """Mean and std (population, float64) per feature of ``arrays[name]`` for each input."""
    stats: Stats = {}
    for name in inputs:
        a = arrays[name]
        if a.dtype.kind != "f":
            raise DataError(f"cannot standardize '{name}': it holds {a.dtype} values (class "
                            "labels or token ids)", source=where,
                            help="standardize only float features, e.g. `standardize: [x]`")
        a64 = a.astype(np.float64)
        mean, std = a64.mean(0), a64.std(0)
        stats[name] = (mean, np.where(std > 0, std, 1.0))
    return stats


def apply(arrays: Arrays, stats: Stats) -> Arrays:
    """``arrays`` with every input of ``stats`` standardised (float32); others as they are."""
    out = dict(arrays)
    for name, (mean, std) in stats.items():
        if name in out:
            out[name] = ((out[name].astype(np.float64) - mean) / std).astype(np.float32)
    return out


def to_json(stats: Stats, samples: int) -> bytes:
    """The statistics as the text of ``standardize.json``."""
    return (json.dumps({
        "about": f"mean and std per feature of the training split ({samples:,} samples); "
                 "inputs are fed as (x - mean) / std",
        "inputs": {k: {"shape": list(m.shape), "mean": m.tolist(), "std": s.tolist()}
                   for k, (m, s) in stats.items()}}, indent=1) + "\n").encode()


def stats_for(graph: Any, weights: str | Path) -> Stats:
    """The statistics a run saved beside ``weights`` (none when it standardised nothing);
    a DataError when the spec standardises but they are missing or do not fit the graph."""
    path = Path(weights).parent / STATS_FILE
    spec = graph.spec.train if graph.spec is not None else None
    wanted = inputs_to_standardize(graph, spec) if spec is not None else []
    if not path.is_file():
        if wanted:
            raise DataError(f"the spec standardizes {', '.join(wanted)}, but there is no "
                            f"{STATS_FILE} beside {weights}", source=Source(str(path)),
                            help="use the weights of a run of this spec (its run directory "
                                 "keeps the training split's mean and std)")
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["inputs"]
        stats = {k: (np.asarray(v["mean"], np.float64).reshape(v["shape"]),
                     np.asarray(v["std"], np.float64).reshape(v["shape"]))
                 for k, v in saved.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise DataError(f"{STATS_FILE} is damaged", source=Source(str(path)),
                        help="train the run again, or restore the file") from None
    for name, (mean, _) in stats.items():
        if name not in graph.inputs or name not in wanted and wanted:
            raise DataError(f"{STATS_FILE} standardizes '{name}', which is not an input "
                            "this spec standardizes", source=Source(str(path)),
                            help="were these weights trained from the same spec?")
        shape = graph.inputs[name].shape[1:]
        if len(shape) != mean.ndim or any(isinstance(d, int) and d != m
                                          for d, m in zip(shape, mean.shape, strict=False)):
            raise DataError(f"{STATS_FILE} has statistics of shape {list(mean.shape)} for "
                            f"'{name}', which takes samples of shape {list(shape)}",
                            source=Source(str(path)),
                            help="were these weights trained from the same spec?")
    return stats


__all__ = ["STATS_FILE", "Stats", "apply", "fit", "inputs_to_standardize", "stats_for",
           "to_json"]
