"""Predictions over a data file: the graph's outputs for every row, in batches, written at once.

A classifier's output (the prediction of its accuracy metric, or the logits of its
cross-entropy loss) also gets its class probabilities (softmax) and the argmax::

    dlgraph predict graphs/mlp.yaml --weights W --data new.csv -o pred.csv
    pred.csv:  logits_class,logits_p0,logits_p1,logits_p2      (one row per sample)
    pred.npz:  logits [N, 3], logits_prob [N, 3], logits_class [N]

The file is written in one piece (engine/io/outputs.py) after every batch has run, so an
error leaves no half-written file behind; a file already there is replaced only if dlgraph
wrote it (or with ``force``), which is checked before anything runs. The rows are read
raw; a run's ``standardize.json`` (beside its weights) standardises them as training did.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlgraph.engine.compile.interpret import input_dims
from dlgraph.engine.errors import DataError, Source
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import scaling
from dlgraph.engine.io.data.ids import check_feeds
from dlgraph.engine.io.outputs import check_output, write_output
from dlgraph.engine.report.evaluate import read_file, run_batches, task_of
from dlgraph.engine.train.checkpoint import load_weights

OUT_SUFFIXES = (".csv", ".npz")


@dataclass
class Prediction:
    path: Path
    rows: int
    arrays: dict[str, np.ndarray]      # what was written, by name

    def line(self) -> str:
        shown = ", ".join(f"{k} {list(v.shape)}" for k, v in self.arrays.items())
        return f"wrote {self.path}: {self.rows:,} rows ({shown})"


def _inputs_for(graph: Graph, arrays: dict[str, np.ndarray], path: Path) -> dict:
    """The file's arrays by the graph inputs the outputs need (by name, through ``feed:``,
    or the one array of the file for the one input)."""
    targets = [graph.outputs[o] for o in graph.outputs]
    needed = [n for n in graph.inputs if n in graph.ancestors(targets) or n in targets]
    spec = graph.spec.train if graph.spec is not None else None
    feed = spec.feed if spec is not None else {}
    out = {}
    for name in needed:
        key = feed.get(name, name)
        if key not in arrays and len(needed) == 1 and len(arrays) == 1:
            key = next(iter(arrays))
        if key not in arrays:
            raise DataError(f"the file has no array '{key}' for input '{name}'; it gives: "
                            f"{', '.join(arrays)}", source=Source(str(path)),
                            help="name the arrays after the graph's inputs (np.savez(f, "
                                 f"{name}=...)), or map them with `feed:`")
        out[name] = arrays[key]
    check_feeds(graph, out, str(path))
    input_dims(graph, out, where=f"{path.name}: input")
    return out


def predict(graph: Graph, weights: str | Path, data: str | Path, out: str | Path, *,
            batch: int | None = None, quiet: bool = False, force: bool = False) -> Prediction:
    """Run ``graph`` with trained ``weights`` over the rows of ``data`` (.csv, .npy, .npz)
    and write its outputs to ``out`` (.csv or .npz); see the module docstring.

    >>> predict(dlgraph.load("graphs/mlp.yaml"), "runs/.../weights.safetensors",
    ...         "new.csv", "pred.csv")                               # doctest: +SKIP
    """
    data, out = Path(data), Path(out)
    if out.suffix not in OUT_SUFFIXES:
        raise DataError(f"cannot write {out.name}: predictions are written as .csv or .npz",
                        source=Source(str(out)), help="name the output file pred.csv or "
                                                      "pred.npz")
    check_output(out, force=force)
    if out.suffix == ".csv":            # refused before any work, not after the last batch
        for name, nid in graph.outputs.items():
            t = graph[nid].type
            if t.rank > 2:
                raise DataError(f"output '{name}' is {t} per batch: a CSV holds one row of "
                                "features per sample", source=Source(str(out)),
                                help="write the predictions to a .npz instead")
    params = load_weights(graph, weights)
    stats = scaling.stats_for(graph, weights)   # the training split's mean and std
    fed = scaling.apply(_inputs_for(graph, read_file(graph, data, targets=False), data), stats)
    n = len(next(iter(fed.values())))
    spec = graph.spec.train if graph.spec is not None else None
    wanted = list(graph.outputs.values())
    got, _ = run_batches(graph, params, fed, wanted, batch or (spec.batch if spec else 64),
                         "predicting", quiet)
    task = task_of(graph) if spec is not None else None
    classifier = graph.resolve(task[1]) if task and task[0] == "classification" else None
    arrays: dict[str, np.ndarray] = {}
    for name, nid in graph.outputs.items():
        a = np.concatenate(got[nid])
        arrays[name] = a
        if nid == classifier:
            z = a.astype(np.float64) - a.max(-1, keepdims=True)
            p = np.exp(z)
            arrays[f"{name}_prob"] = (p / p.sum(-1, keepdims=True)).astype(np.float32)
            arrays[f"{name}_class"] = a.argmax(-1).astype(np.int32)
    write_output(out, _csv(arrays, out) if out.suffix == ".csv" else _npz(arrays), force=force)
    return Prediction(out, n, arrays)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _csv(arrays: dict[str, np.ndarray], out: Path) -> bytes:
    """One row per sample: a class column, then probabilities p0.. (classifiers); other
    outputs one column per feature (``name`` alone for one)."""
    columns: list[tuple[str, np.ndarray]] = []
    names = list(arrays)
    for name in sorted(names, key=lambda k: (not k.endswith("_class"), names.index(k))):
        a = arrays[name]
        if f"{name}_prob" in arrays:          # the raw logits: the probabilities stand in
            continue
        if a.ndim > 2:
            raise DataError(f"output '{name}' is {list(a.shape)} per batch: a CSV holds one "
                            "row of features per sample", source=Source(str(out)),
                            help="write the predictions to a .npz instead")
        if a.ndim < 2:
            columns.append((name, a))
        else:
            stem = name.removesuffix("_prob") + "_p" if name.endswith("_prob") else name + "_"
            columns += [(f"{stem}{j}", a[:, j]) for j in range(a.shape[1])] \
                if a.shape[1] != 1 or name.endswith("_prob") else [(name, a[:, 0])]
    lines = [",".join(c for c, _ in columns)]
    fmt = [(lambda v: str(int(v))) if v.dtype.kind in "iu" else (lambda v: f"{v:.7g}")
           for _, v in columns]
    for i in range(len(columns[0][1])):
        lines.append(",".join(f(v[i]) for f, (_, v) in zip(fmt, columns, strict=True)))
    return ("\n".join(lines) + "\n").encode()


__all__ = ["Prediction", "predict"]
