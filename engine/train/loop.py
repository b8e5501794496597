"""The training loop: one TinyJit step per phase (forward, backward, update), validation,
metrics, checkpoints, resume.

The step's gradients come from the reversed graph (:mod:`.autodiff`); tinygrad's
optimizers apply them. Everything a run produces goes to its run directory::

    runs/<name>/<timestamp>/  spec.yaml  metrics.jsonl  checkpoint.safetensors
                              weights.safetensors  curves.png
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tinygrad import Context, Tensor
from tinygrad.nn.state import get_state_dict

from dlgraph.engine.compile.cache import default_cache
from dlgraph.engine.compile.lower import Ctx, Evaluator, bind, init_params, lower, to_tensor
from dlgraph.engine.errors import DataError, Source, SpecError, TrainingError, suggest
from dlgraph.engine.graph.autodiff import phase_graphs, phase_params, training_graph
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import batches, load_data, scaling, split
from dlgraph.engine.io.data.base import check_finite, check_lengths, standard_dtype
from dlgraph.engine.io.data.ids import check_feeds
from dlgraph.engine.io.data.scaling import inputs_to_standardize
from dlgraph.engine.report.summary import summarize
from dlgraph.engine.spec.checks import check_fits
from dlgraph.engine.spec.train import METRICS, OPTIMIZERS, SCHEDULES
from dlgraph.engine.train.callbacks import make_callbacks
from dlgraph.engine.train.checkpoint import (
    atomic_write,
    load_tensors,
    read_checkpoint,
    save_tensors,
)
from dlgraph.engine.train.shard import data_parallel, replicate, split_batch


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]            # the last validation metrics (and train loss)
    target: str | None                   # e.g. "val_mse < 0.01"
    target_met: bool | None
    epochs: int
    steps: int
    seconds: float
    first_step_seconds: float
    history: list[dict] = field(default_factory=list)
    params: dict[str, Tensor] = field(default_factory=dict, repr=False)  # the trained tensors
    best: dict | None = None             # best.safetensors: file, epoch, metric, value

    def line(self) -> str:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in self.metrics.items())
        goal = ""
        if self.target:
            goal = f"; target {self.target}: {'met' if self.target_met else 'NOT met'}"
        best = ""
        if self.best:
            best = (f"; best {self.best['metric']} {_fmt(self.best['value'])} at epoch "
                    f"{self.best['epoch']} in {self.best['file']}")
        return (f"done: {shown}{goal}{best} — {_count(self.epochs, 'epoch')}, "
                f"{_count(self.steps, 'step')} in {self.seconds:.1f} s (first step after "
                f"{self.first_step_seconds:.1f} s); run dir {self.run_dir}")


def _count(n: int, what: str) -> str:
    """'1 epoch', '2 epochs', '1,000 steps'."""
    return f"{n:,} {what}{'s' * (n != 1)}"


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def lr_at(schedule, base: float, step: int, total: int) -> float:
    """The learning rate of a schedule at a step (0-based) of ``total``.

    >>> from dlgraph.engine.spec.train import ScheduleSpec
    >>> lr_at(ScheduleSpec(type="step", step_size=10, gamma=0.5), 1.0, 25, 100)
    0.25
    """
    if schedule is None:
        return base
    if step < schedule.warmup:
        return base * (step + 1) / schedule.warmup
    t = step - schedule.warmup
    return SCHEDULES[schedule.type].lr(schedule, base, t, max(total - schedule.warmup, 1))


class PhaseStep:
    """One phase: its training graph, optimizer and compiled step (see :func:`lower`)."""

    def __init__(self, graph: Graph, phase, params: dict[str, Tensor], input_names: list[str],
                 training: Graph | None = None, cache=None):
        self.phase = phase
        self.graph = training or training_graph(graph, phase)
        self.names = phase_params(graph, phase)
        self.tensors = [params[n] for n in self.names]
        self.opt = OPTIMIZERS[phase.optimizer.type](self.tensors, phase.optimizer)
        self.input_names = input_names
        self.params = params
        self.dims: dict[str, int] = {}
        # the optimizer's zero-filled state is realised now so that it is not captured
        state = {k: v for k, v in get_state_dict(self.opt).items() if not k.startswith("params.")}
        Tensor.realize(*state.values())
        self.program = lower(self.graph, [self.graph.objective]
                             + [self.graph.grads[n] for n in self.names], params=params,
                             training=True, finish=self._update, cache=cache, state=state,
                             tag=[phase.optimizer, phase.clip, self.names])

    def _update(self, loss: Tensor, *grads: Tensor) -> list[Tensor]:
        """The optimizer step, inside the last compiled stage."""
        return [loss, *optimizer_step(self.phase, self.opt, self.tensors, grads)]

    def __call__(self, inputs: list[Tensor], lr: float | None) -> Tensor:
        set_lr(self.opt, lr)
        with Context(TRAINING=1):
            return self.program(dict(zip(self.input_names, inputs, strict=True)), self.dims)[0]


def optimizer_step(phase, opt, tensors: list[Tensor], grads) -> list[Tensor]:
    """The update of ``tensors`` by ``grads`` (clipped to the global norm ``phase.clip``),
    lazy: the tensors to realise."""
    if phase.clip:
        norm = Tensor.stack(*[(g * g).sum() for g in grads]).sum().sqrt()
        scale = (phase.clip / (norm + 1e-6)).minimum(1.0)
        grads = [g * scale for g in grads]
    for t, g in zip(tensors, grads, strict=True):
        t.grad = g
    return opt.schedule_step()


def set_lr(opt, lr: float | None) -> None:
    """Set the optimizer's rate (None: leave it); with data parallel it lives on every
    device."""
    if lr is not None:
        opt.lr.assign(Tensor([lr], dtype=opt.lr.dtype).to(opt.lr.device)).realize()


def _run_dir(graph: Graph, out: str | Path | None) -> Path:
    """``out``, or runs/<slug of the graph's name>/<timestamp>: the name is reduced to letters,
    digits, '-', '_' and inner dots, so 'name: ../../x' or '/etc' stays under runs/."""
    if out is not None:
        out = Path(out)
        for parent in (out, *out.parents):
            if parent.exists() and not parent.is_dir():
                raise TrainingError(f"cannot make the run directory {out}: {parent} is a file",
                                    help="pass --out a folder path")
        return out
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(graph.name)).strip(".-")[:64] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = Path("runs") / slug / stamp
    k = 1
    while d.exists():
        d = Path("runs") / slug / f"{stamp}-{k}"
        k += 1
    return d


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


def _metric_refs(graph: Graph, spec) -> list[tuple[str, str, str, str]]:
    """(name, type, prediction node, target node) per metric (checked by
    :func:`~.checks.check_training` when the graph was summarised)."""
    return [(m.name or m.type, m.type, graph.resolve(m.in_[0]), graph.resolve(m.in_[1]))
            for m in spec.metrics]


def metric_value(kind: str, pred: np.ndarray, target: np.ndarray) -> float:
    """A validation metric of the table (:data:`~.train_spec.METRICS`) over all batches."""
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

    def __call__(self, params, chunks: list[tuple[list[Tensor], dict[str, np.ndarray]]]):
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


def first_non_finite(graph: Graph, params, inputs: dict[str, Tensor], dims) -> str | None:
    """The first node (schedule order) whose output has a NaN or Inf (for --debug)."""
    ev = Evaluator(graph, [n for n in graph.nodes if graph[n].role == "forward"])
    outs = ev(Ctx(True, dims), inputs, params)
    for nid, t in zip(ev.targets, outs, strict=True):
        if not np.isfinite(t.numpy()).all():
            return nid
    return None


@dataclass
class _Run:
    """A training run once set up: what every epoch and step reads, and the counters."""

    graph: Graph
    spec: Any                             # the TrainSpec
    runners: list[PhaseStep]
    params: dict[str, Tensor]
    names: list[str]                      # graph inputs, in feed order
    dims: dict[str, int]
    train_arrays: dict[str, np.ndarray]
    run_dir: Path
    epochs: int
    max_steps: int | None
    per_epoch: int
    total: int                            # steps the schedules span
    goal: str | None
    echo: Callable[[str], None]
    quiet: bool
    debug: bool
    t_start: float
    validator: Validator | None = None
    val_chunks: list = field(default_factory=list)
    steps_done: int = 0
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    first_step: float | None = None
    stop: bool = False                    # set by a callback (early stopping)
    lr_scale: dict[str, float] = field(default_factory=dict)   # phase -> factor (plateau)
    best: dict | None = None              # what best.safetensors holds (BestCheckpoint)
    devices: tuple[str, ...] = ()         # data parallel: the devices a batch is split over

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    def out_of_steps(self) -> bool:
        return bool(self.max_steps and self.steps_done >= self.max_steps)


def train(graph: Graph, *, out=None, resume: bool = False, device: str | None = None,
          epochs: int | None = None, steps: int | None = None, quiet: bool = False,
          debug: bool = False, log=None, data: dict | None = None,
          init_from: str | Path | None = None, cache: bool = True,
          devices=None) -> TrainResult:
    """Train ``graph`` by its ``train:`` section; see the module docstring for outputs.

    ``data``: numpy arrays by name (``{"x": X, "y": y}``) instead of the spec's data source,
    split and batched the same way. ``init_from``: a weights file whose parameters of the
    same name and shape seed this graph (as ``init_from:`` in the spec). ``cache``: keep
    compiled programs across processes (engine/compile/cache.py); False compiles afresh.
    ``devices``: data parallel on the devices of this machine (``["cpu:0", "cpu:1"]`` or
    ``"cuda:0,cuda:1"``): each batch split over them, the parameters replicated, the update
    the one a single device makes on the whole batch (engine/train/shard.py).
    """
    t_start = time.perf_counter()
    echo = log or (lambda s: None if quiet else print(s, file=sys.stderr, flush=True))
    run = _set_up(graph, out=out, resume=resume, device=device, epochs=epochs, steps=steps,
                  quiet=quiet, debug=debug, echo=echo, t_start=t_start, data=data,
                  init_from=init_from, cache=cache, devices=devices)
    callbacks = make_callbacks(run.spec, run.spec.all_phases())
    for cb in callbacks:
        cb.on_train_begin(run)
    met, last, epoch = None, {}, run.start_epoch
    with open(run.run_dir / "metrics.jsonl", "a") as mf:
        for epoch in range(run.start_epoch, run.epochs):
            last = _epoch(run, epoch, mf)
            met, stop = _end_of_epoch(run, epoch, last, met)
            for cb in callbacks:
                cb.on_epoch_end(run, epoch, last)
            if stop or run.stop:
                break
    return _finish(run, epoch, last, met, callbacks)


# ------------------------------------------------------------------------------ set-up


def _set_up(graph: Graph, *, out, resume: bool, device, epochs, steps, quiet: bool,
            debug: bool, echo, t_start: float, data=None, init_from=None,
            cache: bool = True, devices=None) -> _Run:
    """Everything before the first step: checks, data, parameters, phases, run directory."""
    spec = graph.spec.train if graph.spec is not None else None
    if spec is None:
        raise SpecError("this spec has no `train:` section", source=Source(graph.source),
                        help="`dlgraph run` without one runs the forward pass only")
    devs = data_parallel(graph, spec.batch, device, devices)
    Tensor.manual_seed(spec.seed)       # dropout and noise: the same run twice in a process
    graph = frozen(graph, spec.freeze)
    graphs = phase_graphs(graph)            # every phase reversed once, here
    summarize(graph, graphs)
    check_fits(graph, spec.batch)           # before a parameter is allocated
    phases = spec.all_phases()
    epochs = epochs or spec.epochs
    metrics = _metric_refs(graph, spec)
    train_arrays, val_arrays, note, stats = split_data(graph, spec, data)
    names = list(graph.inputs)
    dims = bind(graph, {k: v[:spec.batch] for k, v in train_arrays.items()}, where="data for")
    run_dir = _run_dir(graph, out)
    params = init_params(graph, spec.seed)
    if not resume and (init_from or spec.init_from):
        _init_from(graph, params, init_from or spec.init_from, echo)
    replicate(params.values(), devs)         # data parallel: a copy on every device
    store = default_cache(lambda s: echo(f"warning: {s}")) if cache and not devs else None
    runners = [PhaseStep(graph, ph, params, names, graphs[ph.name], store) for ph in phases]
    for r in runners:
        r.dims = dims
        r.program.progress = None if quiet else echo
        r.program.label = f"the training step of '{r.phase.name}'" if len(runners) > 1 \
            else "the training step"
    per_epoch = len(train_arrays[names[0]]) // spec.batch
    max_steps = steps or spec.steps
    if max_steps:                            # an epoch count that --steps can reach
        epochs = min(epochs, -(-max_steps // per_epoch))
    run = _Run(graph, spec, runners, params, names, dims, train_arrays, run_dir,
               epochs, max_steps, per_epoch,
               min(epochs * per_epoch, max_steps or epochs * per_epoch), _goal(spec.target),
               echo, quiet, debug, t_start, devices=devs)
    if resume:
        run.steps_done, run.start_epoch, run.history = _restore(run.ckpt, params, runners)
        echo(f"resuming {run.run_dir} at epoch {run.start_epoch + 1}, step {run.steps_done}")
    _start_run_dir(run)
    if stats:                                # evaluate and predict apply them to raw data
        atomic_write(run.run_dir / scaling.STATS_FILE,
                     scaling.to_json(stats, len(train_arrays[names[0]])))
    if val_arrays:
        _set_up_validation(run, phases, metrics, val_arrays)
        run.val_chunks = [(split_batch(ts, devs), b) for ts, b in run.val_chunks]
    echo(_header(run, len(next(iter(val_arrays.values()))) if val_arrays else 0, note))
    return run


def _header(run: _Run, n_val: int, note: str) -> str:
    """'training x: 1,029 training + 384 validation samples (...), batch 32, ...'."""
    n_train = len(run.train_arrays[run.names[0]])
    samples = f"{n_train:,} training + {n_val:,} validation samples" if n_val else \
        f"{n_train:,} training samples (no validation)"
    if note:
        samples += f" ({note.removeprefix('; ')})"
    length = f"{_count(run.max_steps, 'step')} ({_count(run.epochs, 'epoch')})" \
        if run.max_steps and run.max_steps < run.epochs * run.per_epoch \
        else _count(run.epochs, "epoch")
    return (f"training {run.graph.name}: {samples}, batch {run.spec.batch}, "
            f"{_count(run.per_epoch, 'step')} per epoch, up to {length}"
            + (f", target {run.goal}" if run.goal else ""))


def frozen(graph: Graph, patterns: list[str]) -> Graph:
    """``graph`` with the parameters that match ``patterns`` untrainable (a copy)."""
    if not patterns:
        return graph
    hit = [n for n in graph.params if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not hit:
        raise SpecError(f"freeze: no parameter matches {patterns}",
                        source=Source(graph.source, graph.lines.get(("train", "freeze"))),
                        help="parameter names: " + ", ".join(list(graph.params)[:12]))
    out = copy.copy(graph)
    out.params = {n: dataclasses.replace(p, trainable=False) if n in hit else p
                  for n, p in graph.params.items()}
    return out


def _init_from(graph: Graph, params: dict[str, Tensor], spec, echo) -> None:
    """Copy the parameters that ``spec`` (a path, or an InitFromSpec) selects from a weights
    file; names mapped by ``rename``, shapes checked; at least one must be found."""
    from dlgraph.engine.spec.train import InitFromSpec
    path = Path(spec.path if isinstance(spec, InitFromSpec) else spec)
    if isinstance(spec, InitFromSpec):          # the spec's path starts at the spec's folder
        path = Path(graph.base or Path.cwd()) / path
    else:
        spec = InitFromSpec(path=str(spec))
    arrays, _ = load_tensors(path)
    if not any(k in arrays for k in params):        # a run's checkpoint: param.<name>
        arrays = {k.removeprefix("param."): v for k, v in arrays.items()} or arrays
    copied = []
    for name, t in params.items():
        if not any(fnmatch.fnmatchcase(name, p) for p in spec.params):
            continue
        theirs = name
        for mine, other in spec.rename.items():
            if name.startswith(mine + "."):
                theirs = other + name[len(mine):]
        if theirs not in arrays:
            continue
        if tuple(arrays[theirs].shape) != tuple(t.shape):
            raise DataError(f"parameter '{theirs}' has shape {list(arrays[theirs].shape)} in "
                            f"the file, '{name}' has {list(t.shape)} here",
                            source=Source(str(path)),
                            help="leave it out of init_from.params, or map it with rename")
        t.assign(Tensor(arrays[theirs].astype(np.float32))).realize()
        copied.append(name)
    if not copied:
        raise DataError(f"no parameter of this graph is in the file; it holds: "
                        f"{', '.join(list(arrays)[:8])}", source=Source(str(path)),
                        help="map renamed scopes with init_from.rename, e.g. {enc: encoder}")
    echo(f"initialised {_count(len(copied), 'parameter')} from {os.path.normpath(path)}")


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


def _goal(target) -> str | None:
    """The target as shown in logs, e.g. ``val_mse < 0.01``."""
    if not target:
        return None
    return f"{target.metric} {'<' if target.below is not None else '>'} " \
           f"{target.below if target.below is not None else target.above}"


def _start_run_dir(run: _Run) -> None:
    """The run directory with the spec and the metrics so far (none, or a resumed run's)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run.run_dir / "spec.yaml", yaml.safe_dump(
        run.graph.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        sort_keys=False).encode())
    atomic_write(run.run_dir / "metrics.jsonl",
                 "".join(json.dumps(h) + "\n" for h in run.history).encode())


def _set_up_validation(run: _Run, phases, metrics, val_arrays) -> None:
    graph, spec, names = run.graph, run.spec, run.names
    objectives = {("loss" if len(phases) == 1 else f"loss_{p.name}"): graph.resolve(
        p.objective) for p in phases}
    run.validator = Validator(graph, objectives, metrics, names,
                              cache=run.runners[0].program.cache)
    run.validator.dims = dict(run.dims)
    run.val_chunks = [([to_tensor(b[k], graph.inputs[k].dtype) for k in names], b)
                      for b in batches(val_arrays, spec.batch, spec.seed, 0, shuffle=False)]


# ------------------------------------------------------------------------ epoch and step


def _epoch(run: _Run, epoch: int, mf) -> dict[str, float]:
    """One pass over the training batches; returns the epoch's mean losses (and validation
    metrics when it is an epoch to validate)."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    losses: dict[str, list[float]] = {r.phase.name: [] for r in run.runners}
    bar = tqdm(batches(run.train_arrays, run.spec.batch, run.spec.seed, epoch),
               total=run.per_epoch, desc=f"epoch {epoch + 1}/{run.epochs}", leave=False,
               disable=True if run.quiet else None, file=sys.stderr, unit="step")
    said = time.perf_counter()
    for k, batch in enumerate(bar):
        _step(run, batch, epoch, losses)
        row = {"kind": "step", "epoch": epoch + 1, "step": run.steps_done,
               "time": round(time.time(), 3)}
        row.update({_loss_key(k, run.runners): v[-1] for k, v in losses.items()})
        mf.write(json.dumps(row) + "\n")
        if not run.quiet:
            bar.set_postfix_str(" ".join(f"{_loss_key(k, run.runners)} {v[-1]:.4g}"
                                         for k, v in losses.items()))
            if bar.disable and time.perf_counter() - said >= PROGRESS_EVERY:
                said = time.perf_counter()
                run.echo(_progress(run, epoch, k + 1, t0, losses))
        if run.out_of_steps():
            break
    last = {_loss_key(k, run.runners): float(np.mean(v)) for k, v in losses.items() if v}
    if run.validator and ((epoch + 1) % run.spec.validation.every == 0
                          or epoch + 1 == run.epochs or run.out_of_steps()):
        last.update(run.validator(run.params, run.val_chunks))
    row = {"kind": "epoch", "epoch": epoch + 1, "step": run.steps_done,
           "seconds": round(time.perf_counter() - run.t_start, 3),
           "time": round(time.time(), 3), **last}
    run.history.append(row)
    mf.write(json.dumps(row) + "\n")
    mf.flush()
    run.echo(f"epoch {epoch + 1:>3}/{run.epochs}  " + "  ".join(
        f"{k} {_fmt(v)}" for k, v in last.items()) + f"  ({time.perf_counter() - t0:.1f} s)")
    return last


#: seconds between progress lines within an epoch when stderr is not a terminal (no bar)
PROGRESS_EVERY = 10.0


def _progress(run: _Run, epoch: int, done: int, t0: float, losses) -> str:
    """'epoch 1/4  step 120/500  loss 0.53  3.2 steps/s  ETA 1 min 58 s'."""
    dt = time.perf_counter() - t0
    rate = done / dt if dt > 0 else 0.0
    total = min(run.per_epoch, (run.max_steps or run.per_epoch * run.epochs)
                - run.steps_done + done)
    eta = (total - done) / rate if rate else 0.0
    shown = "  ".join(f"{_loss_key(k, run.runners)} {_fmt(v[-1])}" for k, v in losses.items()
                      if v)
    when = f"{int(eta // 60)} min {int(eta % 60)} s" if eta >= 60 else f"{eta:.0f} s"
    return (f"epoch {epoch + 1}/{run.epochs}  step {done}/{total}  {shown}  "
            f"{rate:.3g} steps/s  ETA {when}")


def _step(run: _Run, batch: dict[str, np.ndarray], epoch: int, losses) -> None:
    """One training step: every phase, ``repeat`` times each, on one batch."""
    feeds = split_batch([to_tensor(batch[k], run.graph.inputs[k].dtype) for k in run.names],
                        run.devices)
    for r in run.runners:
        for _ in range(r.phase.repeat):
            lr = lr_at(r.phase.schedule, r.phase.optimizer.lr, run.steps_done, run.total) \
                * run.lr_scale.get(r.phase.name, 1.0) if r.phase.schedule else None
            value = r(feeds, lr).item()
            if not math.isfinite(value):
                raise _diverged(run, r, feeds, value, epoch)
            losses[r.phase.name].append(value)
    if run.first_step is None:
        run.first_step = time.perf_counter() - run.t_start
    run.steps_done += 1


def _diverged(run: _Run, r: PhaseStep, feeds, value: float, epoch: int) -> TrainingError:
    where = ""
    if run.debug:
        bad = first_non_finite(r.graph, run.params, dict(zip(run.names, feeds, strict=True)),
                               run.dims)
        where = f"; the first non-finite value is node '{bad}'" if bad else ""
    return TrainingError(f"the loss of phase '{r.phase.name}' became {value} at step "
                         f"{run.steps_done + 1} (epoch {epoch + 1}){where}",
                         help="lower the learning rate, add `clip:`, or run with --debug to "
                              "find the node")


def _end_of_epoch(run: _Run, epoch: int, last: dict[str, float], met):
    """Checkpoint and check the target; returns (target met?, stop now?)."""
    if (epoch + 1) % run.spec.checkpoint_every == 0 or epoch + 1 == run.epochs:
        _checkpoint(run.ckpt, run.params, run.runners, epoch + 1, run.steps_done, run.history)
    target = run.spec.target          # its metric is known to be logged: checks.py
    if target and target.metric in last:
        met = target.met(last[target.metric])
        if met:
            run.echo(f"target {run.goal} reached at epoch {epoch + 1}")
            return met, True
    return met, run.out_of_steps()


def _finish(run: _Run, epoch: int, last: dict[str, float], met, callbacks=()) -> TrainResult:
    """The last checkpoint (the state to resume from), the callbacks' last word (e.g. the
    best epoch's weights restored), the weights and the curves; the result."""
    _checkpoint(run.ckpt, run.params, run.runners, epoch + 1, run.steps_done, run.history)
    for cb in callbacks:
        cb.on_train_end(run)
    save_tensors(run.run_dir / "weights.safetensors",
                 {k: v.numpy() for k, v in run.params.items()},
                 {"spec": run.graph.name, "epochs": epoch + 1, "steps": run.steps_done})
    try:
        from dlgraph.engine.report.plot import plot_run
        plot_run(run.run_dir)
    except Exception as e:  # a picture must never cost a finished run
        run.echo(f"warning: could not draw the training curves: {e}")
    return TrainResult(run.run_dir, last, run.goal, met, epoch + 1, run.steps_done,
                       time.perf_counter() - run.t_start, run.first_step or 0.0, run.history,
                       run.params, run.best)


def _loss_key(phase: str, runners) -> str:
    return "loss" if len(runners) == 1 else f"loss_{phase}"


def _checkpoint(path: Path, params, runners, epoch: int, step: int, history) -> None:
    tensors = {f"param.{k}": v.numpy() for k, v in params.items()}
    for r in runners:
        for k, v in get_state_dict(r.opt).items():
            if not k.startswith("params."):
                tensors[f"optim.{r.phase.name}.{k}"] = v.numpy()
    save_tensors(path, tensors, {"epoch": epoch, "step": step, "history": history})


def _restore(path: Path, params, runners) -> tuple[int, int, list]:
    """Parameters and optimizer state from a run's checkpoint; a damaged file, or one of
    another spec (a missing or other-shaped parameter), is a located TrainingError."""
    arrays, meta = read_checkpoint(path, {k: tuple(t.shape) for k, t in params.items()})
    for k, t in params.items():
        t.assign(Tensor(arrays[f"param.{k}"].astype(np.float32)).to(t.device)).realize()
    for r in runners:
        for k, v in get_state_dict(r.opt).items():
            key = f"optim.{r.phase.name}.{k}"
            if key in arrays:
                if arrays[key].size != math.prod(v.shape):
                    raise TrainingError(f"optimizer state '{key}' has shape "
                                        f"{list(arrays[key].shape)} in the checkpoint, "
                                        f"{list(v.shape)} here", source=Source(str(path)),
                                        help="resume with the spec the run was started with")
                v.assign(Tensor(arrays[key]).cast(v.dtype).reshape(v.shape).to(v.device)
                         ).realize()
    return meta["step"], meta["epoch"], list(meta["history"])
