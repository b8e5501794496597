"""What a run trains on: the graph with the parameters ``freeze`` names made untrainable, and
the samples by graph input (from the spec's data source or in-memory arrays), split into
training and validation (stratified when asked) and standardised by the training split."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dlgraph.engine.errors import DataError, Source, SpecError, suggest
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import load_data, scaling, split
from dlgraph.engine.io.data.base import check_finite, check_lengths, standard_dtype
from dlgraph.engine.io.data.ids import check_feeds
from dlgraph.engine.io.data.scaling import inputs_to_standardize
from dlgraph.engine.spec.checks import frozen_names


def frozen(graph: Graph, patterns: list[str]) -> Graph:
    """``graph`` with the parameters that match ``patterns`` untrainable (a copy)."""
    if not patterns:
        return graph
    hit = frozen_names(graph, patterns)         # what `validate` checks, the same way
    out = copy.copy(graph)
    out.params = {n: dataclasses.replace(p, trainable=False) if n in hit else p
                  for n, p in graph.params.items()}
    return out


def feed_arrays(graph: Graph, spec, arrays: dict[str, np.ndarray],
                what: str | None = None) -> dict[str, np.ndarray]:
    """Graph input name -> data array, by name or through ``feed:``."""
    what = what or f"the data source '{spec.data.source}'"
    out = {}
    for name in graph.inputs:
        key = spec.feed.get(name, name)
        if key not in arrays:
            raise DataError(f"{what} has no array '{key}' for input '{name}'; it gives: "
                            f"{', '.join(arrays)}",
                            source=Source(graph.source, graph.lines.get(("train", "data"))),
                            help=f"map it with `feed: {{{name}: <one of {', '.join(arrays)}>}}`")
        out[name] = arrays[key]
    return out


def data_arrays(graph: Graph, spec, data: dict | None = None,
                where: str = "data=") -> dict[str, np.ndarray]:
    """The samples a run trains on, by graph input: from the spec's data source, or from
    in-memory ``data`` (name -> numpy array, checked as a file source's arrays are); label
    and id ranges checked against the graph. ``where`` names in-memory data in errors."""
    if data is None:
        if spec.data is None:
            raise SpecError("the `train:` section has no `data:`", source=Source(
                graph.source, graph.lines.get(("train",))),
                help="add `data: {source: ...}`, or pass arrays: dlgraph.train(g, data={...})")
        where = getattr(spec.data, "path", None) or f"the '{spec.data.source}' data"
        arrays = load_data(spec.data, graph.base or Path.cwd(), spec.seed)
        fed = feed_arrays(graph, spec, arrays)
    else:
        if not isinstance(data, Mapping):
            raise DataError(f"data= takes numpy arrays by name, not a {type(data).__name__}",
                            help='pass data={"x": X, "y": y}')
        arrays = {k: standard_dtype(np.asarray(v)) for k, v in data.items()}
        check_lengths(arrays, where)
        check_finite(arrays, where)
        fed = feed_arrays(graph, spec, arrays, "the data= arrays" if where == "data=" else
                          where)
    check_feeds(graph, fed, where)
    return fed


def split_data(graph: Graph, spec, data: dict | None = None, standardize: bool = True):
    """(train arrays, validation arrays, how the split was made, standardisation stats):
    the validation set is a whole number of batches, as the validation step runs whole
    batches; ``validation.stratify`` keeps each class's share in both. Inputs the data
    source standardises get the mean and std of the training split (``standardize=False``:
    the raw arrays, and no stats)."""
    arrays = data_arrays(graph, spec, data)
    n = len(next(iter(arrays.values())))
    frac = spec.validation.split
    names = inputs_to_standardize(graph, spec) if standardize else []
    where = Source(graph.source, graph.lines.get(("train", "data", "standardize")))
    if frac <= 0:
        stats = scaling.fit(arrays, names, where)
        return scaling.apply(arrays, stats), {}, "", stats
    if n < 2 * spec.batch:
        raise DataError(f"{n:,} samples cannot make a training batch and a validation batch "
                        f"of {spec.batch}", source=Source(graph.source,
                                                          graph.lines.get(("train", "batch"))),
                        help="use more samples, a smaller batch, or `validation: {split: 0}`")
    n_val = min(max(round(n * frac / spec.batch), 1), n // spec.batch - 1) * spec.batch
    note = "" if n_val == round(n * frac) else \
        f"; split {frac:g} × {n:,} = {n * frac:,.6g}, rounded to {n_val // spec.batch} whole " \
        f"batch{'es' * (n_val != spec.batch)} of {spec.batch}"
    labels = _stratify_labels(graph, spec, arrays)
    note += f"; stratified by {spec.validation.stratify}" if labels is not None else ""
    train_arrays, val_arrays = split(arrays, n_val / n, spec.seed, labels)
    stats = scaling.fit(train_arrays, names, where)
    return scaling.apply(train_arrays, stats), scaling.apply(val_arrays, stats), note, stats


def _stratify_labels(graph: Graph, spec, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The class labels ``validation.stratify`` names (one integer per sample), or None."""
    name = spec.validation.stratify
    if name is None:
        return None
    where = Source(graph.source, graph.lines.get(("train", "validation", "stratify")))
    if name not in arrays:
        raise SpecError(f"validation.stratify names '{name}', which is not an input of the "
                        "graph", source=where,
                        help=suggest(name, arrays) or f"inputs: {', '.join(arrays)}")
    a = arrays[name]
    if a.dtype.kind not in "iu" or a.size != len(a):
        raise DataError(f"validation.stratify needs one integer class label per sample; "
                        f"'{name}' is {a.dtype} of shape {list(a.shape)}", source=where,
                        help="name the input that holds the class labels (e.g. y)")
    return a



def train_spec(graph: Graph):
    """The graph's ``train:`` section, or a located SpecError when it has none."""
    spec = graph.spec.train if graph.spec is not None else None
    if spec is None:
        raise SpecError("this spec has no `train:` section", source=Source(graph.source),
                        help="`dlgraph run` without one runs the forward pass only")
    return spec
