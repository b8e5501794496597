"""Scoring a trained model: every metric of the spec, and for a classifier per-class
precision, recall, F1 and a confusion matrix, for a regression MSE, MAE and R².

The data is the spec's validation split by default (the same samples training validated
on), a data file read as the data sources read it, or another data source::

    dlgraph evaluate graphs/mlp.yaml --weights runs/mlp/<time>/weights.safetensors
    dlgraph evaluate graphs/mlp.yaml --weights W --data test.csv --json
    dlgraph evaluate graphs/mlp.yaml --weights W --data "{source: spirals, samples: 500}"

Data is given raw: when the run standardised inputs (``standardize:`` in its data source),
the mean and std it saved beside the weights (``standardize.json``) are applied here.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlgraph.engine.compile.cache import default_cache
from dlgraph.engine.compile.interpret import input_dims
from dlgraph.engine.compile.lower import lower
from dlgraph.engine.errors import DataError, Source, SpecError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import SOURCES, load_data, parse_data_spec, scaling
from dlgraph.engine.io.data.files import Csv, Npy
from dlgraph.engine.io.outputs import write_output
from dlgraph.engine.spec.train import METRICS
from dlgraph.engine.train.checkpoint import load_weights
from dlgraph.engine.train.prepare import data_arrays, split_data

FILE_SUFFIXES = (".csv", ".npy", ".npz")
_CLASSIFY = ("cross_entropy", "nll")
_REGRESS = ("mse", "l1", "huber")


@dataclass
class Evaluation:
    """What :func:`evaluate` found; ``table()`` for people, ``to_json()`` for programs."""

    name: str
    data: str                                  # where the samples came from
    samples: int
    metrics: dict[str, float]
    task: str | None = None                    # "classification", "regression" or None
    classes: list[dict] = field(default_factory=list)   # precision, recall, f1, support
    confusion: np.ndarray | None = None        # [true class, predicted class] counts

    def to_json(self) -> dict:
        out = {"spec": self.name, "data": self.data, "samples": self.samples,
               "metrics": self.metrics, "task": self.task}
        if self.task == "classification":
            out["classes"] = self.classes
            out["confusion"] = self.confusion.tolist()
        return out

    def table(self, max_classes: int = 20) -> str:
        lines = [f"evaluated {self.name} on {self.samples:,} samples ({self.data})"]
        lines += [f"  {k:<16} {v:.6g}" for k, v in self.metrics.items()]
        if self.task != "classification":
            return "\n".join(lines)
        lines += ["", f"  {'class':<8} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
        lines += [f"  {c['class']:<8} {c['precision']:>9.4f} {c['recall']:>9.4f} "
                  f"{c['f1']:>9.4f} {c['support']:>9,}" for c in self.classes]
        macro = {k: float(np.mean([c[k] for c in self.classes])) for k in
                 ("precision", "recall", "f1")}
        lines.append(f"  {'macro':<8} {macro['precision']:>9.4f} {macro['recall']:>9.4f} "
                     f"{macro['f1']:>9.4f} {self.samples:>9,}")
        k = len(self.classes)
        if k > max_classes:
            lines += ["", f"confusion matrix: {k} classes, too many to print; see --json or "
                          "-o cm.png"]
            return "\n".join(lines)
        width = max(5, len(f"{int(self.confusion.max()):,}") + 1)
        lines += ["", "confusion matrix (rows: true class, columns: predicted class):",
                  "  " + " " * 6 + "".join(f"{j:>{width}}" for j in range(k))]
        lines += ["  " + f"{i:<6}" + "".join(f"{int(v):>{width},}" for v in row)
                  for i, row in enumerate(self.confusion)]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ data


def read_file(graph: Graph, path: str | Path, targets: bool = True) -> dict[str, np.ndarray]:
    """Raw arrays from a .csv, .npy or .npz file, read as the spec's data source reads it:
    a CSV by the spec's csv columns (or every column as x, when the spec has no csv source),
    a .npy as ``x`` (or the spec's ``key``), a .npz by its names (or the spec's ``keys``).
    Without ``targets`` a CSV's y column is not read (files to predict on have none)."""
    path = Path(path)
    spec = graph.spec.train if graph.spec is not None else None
    src = spec.data if spec is not None else None
    if path.suffix == ".csv":
        if isinstance(src, Csv):
            cols = src.model_dump(exclude={"path", "seed"} | (set() if targets else
                                                              {"y", "label"}))
            source = Csv(path=str(path), **cols)
        else:
            source = Csv(path=str(path), x=_csv_columns(path))
    elif path.suffix in (".npy", ".npz"):
        fields = src.model_dump(include={"key", "keys"}) if isinstance(src, Npy) else {}
        if path.suffix == ".npy" and "key" not in fields:
            fields["key"] = next(iter(graph.inputs))
        source = Npy(path=str(path), **{k: v for k, v in fields.items()
                                        if not (k == "keys" and path.suffix == ".npy")})
    else:
        raise DataError(f"cannot read {path.name}: the data files are .csv, .npy and .npz",
                        source=Source(str(path)), help="save the array with np.save")
    return load_data(source, Path.cwd(), 0)


def _csv_columns(path: Path) -> list[str]:
    from dlgraph.engine.io.data.base import check_regular
    check_regular(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError("the CSV file is empty", source=Source(str(path)))
    return [c.strip() for c in header]


def evaluation_data(graph: Graph, data: str | Path | None = None):
    """(arrays by graph input, what they are): the validation split by default, a data file,
    a data source given by name or as a YAML/JSON mapping, or numpy arrays by name."""
    spec = _train(graph)
    if data is None:
        _, val, _, _ = split_data(graph, spec, standardize=False)   # raw, as files are
        if not val:
            raise SpecError("the spec keeps no validation split to evaluate on",
                            source=Source(graph.source, graph.lines.get(("train",
                                                                         "validation"))),
                            help="pass --data FILE (a .csv, .npy or .npz) or a data source")
        return val, "the validation split of the spec's data"
    if isinstance(data, dict) and "source" not in data:      # arrays by name
        return data_arrays(graph, spec, data), "the arrays given"
    text = str(data)
    if isinstance(data, dict):
        text = json.dumps(data)
    if Path(text).suffix in FILE_SUFFIXES:
        return data_arrays(graph, spec, read_file(graph, text), where=text), text
    from dlgraph.engine.spec.parse import parse_value
    try:
        obj = parse_value(text, "--data")            # as a spec reads it: 010 is 10
    except SpecError:
        obj = None
    if isinstance(obj, str) and obj in SOURCES:
        obj = {"source": obj}
    if not isinstance(obj, dict):
        raise DataError(f"--data '{text}' is neither a data file (.csv, .npy, .npz) nor a "
                        "data source", help="give a file, a source name or a mapping "
                                            "({source: spirals, samples: 500}); sources: "
                                            + ", ".join(SOURCES))
    source = parse_data_spec(obj)
    arrays = load_data(source, graph.base or Path.cwd(), spec.seed + 1)
    return data_arrays(graph, spec, arrays, where=f"the '{source.source}' data"), \
        f"the '{source.source}' source"


def _train(graph: Graph):
    spec = graph.spec.train if graph.spec is not None else None
    if spec is None:
        raise SpecError("this spec has no `train:` section: nothing says what to score",
                        source=Source(graph.source),
                        help="add a `train:` section with its objective and metrics")
    return spec


# ------------------------------------------------------------------------------ scoring


def task_of(graph: Graph) -> tuple[str, str, str] | None:
    """(task, prediction node, target): from the first accuracy or error metric of the spec,
    else from its first classification or regression loss on a graph input."""
    spec = _train(graph)
    for kinds, task in ((("accuracy",), "classification"), (("mse", "mae", "rmse"),
                                                            "regression")):
        for m in spec.metrics:
            if m.type in kinds:
                return task, m.in_[0], m.in_[1]
    for nd in graph.spec.nodes.values():
        if nd.op in _CLASSIFY + _REGRESS and len(nd.in_) > 1 and nd.in_[1] in graph.inputs:
            return ("classification" if nd.op in _CLASSIFY else "regression",
                    nd.in_[0], nd.in_[1])
    return None


def run_batches(graph: Graph, params, arrays: dict[str, np.ndarray], wanted: list[str],
                batch: int, desc: str, quiet: bool = False) -> tuple[dict[str, list], list[int]]:
    """(node id or graph input -> its value per batch, for ``wanted``; the batch sizes): in
    eval mode, compiled, with a progress bar. The last, shorter batch is run as it is."""
    from tqdm import tqdm

    from dlgraph.engine.io.data import batches
    wanted = list(dict.fromkeys(wanted))
    computed = [t for t in wanted if t not in graph.inputs]
    # the program cache: right after training, validation compiled the same program
    program = lower(graph, computed, params=params, cache=default_cache(lambda s: None))
    got: dict[str, list] = {w: [] for w in wanted}
    sizes: list[int] = []
    n = len(next(iter(arrays.values())))
    for b in tqdm(batches(arrays, min(batch, n), 0, 0, shuffle=False, drop_last=False),
                  total=-(-n // min(batch, n)), desc=desc, leave=False, unit="batch",
                  disable=True if quiet else None, file=sys.stderr):
        outs = program.arrays({k: b[k] for k in program.input_names}, input_dims(graph, b))
        sizes.append(len(next(iter(b.values()))))
        for nid, o in zip(computed, outs, strict=True):
            got[nid].append(o)
        for w in wanted:
            if w in graph.inputs:
                got[w].append(b[w])
    return got, sizes


def evaluate(graph: Graph, weights: str | Path, data: str | Path | None = None, *,
             batch: int | None = None, quiet: bool = False) -> Evaluation:
    """Score ``graph`` with trained ``weights`` (see the module docstring).

    >>> ev = evaluate(dlgraph.load("graphs/mlp.yaml"), "runs/.../weights.safetensors")
    ...                                                               # doctest: +SKIP
    >>> print(ev.table())                                             # doctest: +SKIP
    """
    spec = _train(graph)
    params = load_weights(graph, weights)
    stats = scaling.stats_for(graph, weights)
    arrays, where = evaluation_data(graph, data)
    arrays = scaling.apply(arrays, stats)       # the training split's mean and std
    phases = spec.all_phases()
    losses = {("loss" if len(phases) == 1 else f"loss_{p.name}"): graph.resolve(p.objective)
              for p in phases}
    metrics = [(m.name or m.type, m.type, [graph.resolve(r) for r in m.in_])
               for m in spec.metrics]
    task = task_of(graph)
    pair = (graph.resolve(task[1]), graph.resolve(task[2])) if task else ()
    wanted = list(losses.values()) + [r for m in metrics for r in m[2]] + list(pair)
    got, sizes = run_batches(graph, params, arrays, wanted, batch or spec.batch, "evaluating",
                             quiet)
    n = sum(sizes)
    out = {k: float(np.average([float(np.asarray(v).reshape(-1)[0]) for v in got[nid]],
                               weights=sizes)) for k, nid in losses.items()}
    for name, kind, refs in metrics:
        out[name] = METRICS[kind].over([got[r] for r in refs], sizes)
    ev = Evaluation(str(graph.name), where, n, out, task[0] if task else None)
    if task:
        p, t = np.concatenate(got[pair[0]]), np.concatenate(got[pair[1]])
        if task[0] == "classification":
            ev.classes, ev.confusion = classification_report(p, t)
        else:
            ev.metrics.update(regression_report(p, t))
    return ev


def classification_report(logits: np.ndarray, labels: np.ndarray):
    """(per class: precision, recall, f1, support; the confusion matrix) of the argmax of
    ``logits`` [..., C] against int ``labels`` [...]; labels outside 0..C-1 (an
    ``ignore_index``) are left out. A class never predicted has precision 0 (as
    scikit-learn's ``zero_division=0``)."""
    k = logits.shape[-1]
    pred, true = logits.argmax(-1).reshape(-1), labels.reshape(-1).astype(np.int64)
    keep = (true >= 0) & (true < k)
    pred, true = pred[keep], true[keep]
    cm = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall),
                      0.0)
    rows = [{"class": c, "precision": float(precision[c]), "recall": float(recall[c]),
             "f1": float(f1[c]), "support": int(support[c])} for c in range(k)]
    return rows, cm


def regression_report(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MSE, MAE and R² in float64; R² per output column, averaged (scikit-learn's
    ``r2_score`` default)."""
    p = pred.astype(np.float64).reshape(len(pred), -1)
    t = target.astype(np.float64).reshape(len(target), -1)
    if p.shape != t.shape:
        raise DataError(f"predictions {list(pred.shape)} and targets {list(target.shape)} "
                        "do not line up", help="the metric's `in:` must name a prediction "
                                               "and a target of the same shape")
    ss_res = ((t - p) ** 2).sum(0)
    ss_tot = ((t - t.mean(0)) ** 2).sum(0)
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1),
                  np.where(ss_res == 0, 1.0, 0.0))
    return {"mse": float(((t - p) ** 2).mean()), "mae": float(np.abs(t - p).mean()),
            "r2": float(r2.mean())}


def confusion_picture(ev: Evaluation, path: str | Path, force: bool = False) -> Path:
    """Draw the confusion matrix (counts in the cells up to 30 classes) to ``path`` (a file
    there is replaced only if dlgraph wrote it, or with ``force``)."""
    if ev.task != "classification":
        raise DataError("-o draws a confusion matrix, and this model is not a classifier",
                        help="a classifier has an accuracy metric or a cross_entropy loss")
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise DataError(f"cannot draw {path.name}: pictures are .png, .svg or .pdf",
                        source=Source(str(path)), help="name it cm.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm, k = ev.confusion, len(ev.confusion)
    fig, ax = plt.subplots(figsize=(max(4, k * 0.45 + 2), max(3.5, k * 0.45 + 1.5)))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"{ev.name}: {ev.samples:,} samples")
    if k <= 30:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lower().lstrip("."), bbox_inches="tight", dpi=120)
    plt.close(fig)
    return write_output(path, buf.getvalue(), force=force)


__all__ = ["Evaluation", "classification_report", "confusion_picture", "evaluate",
           "read_file", "regression_report"]
