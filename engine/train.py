"""The training loop: one TinyJit step per phase (forward, backward, update), validation,
metrics, checkpoints, resume.

The step's gradients come from the reversed graph (:mod:`.autodiff`); tinygrad's
optimizers apply them. Everything a run produces goes to its run directory::

    runs/<name>/<timestamp>/  spec.yaml  metrics.jsonl  checkpoint.safetensors
                              weights.safetensors  curves.png
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tinygrad import Context, Tensor
from tinygrad.nn.state import get_state_dict

from .autodiff import phase_graphs, phase_params, training_graph
from .checkpoint import atomic_write, load_tensors, save_tensors
from .data import batches, load_data, split
from .errors import DataError, GraphError, Source, SpecError, TrainingError
from .ir import Graph
from .lower import Ctx, Evaluator, bind, init_params, lower, to_tensor, use_device
from .summary import summarize
from .train_spec import METRICS, OPTIMIZERS, SCHEDULES


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

    def line(self) -> str:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in self.metrics.items())
        goal = ""
        if self.target:
            goal = f"; target {self.target}: {'met' if self.target_met else 'NOT met'}"
        return (f"done: {shown}{goal} — {self.epochs} epochs, {self.steps:,} steps in "
                f"{self.seconds:.1f} s (first step after {self.first_step_seconds:.1f} s); "
                f"run dir {self.run_dir}")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def lr_at(schedule, base: float, step: int, total: int) -> float:
    """The learning rate of a schedule at a step (0-based) of ``total``.

    >>> from dlgraph.engine.train_spec import ScheduleSpec
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
                 training: Graph | None = None):
        self.phase = phase
        self.graph = training or training_graph(graph, phase)
        self.names = phase_params(graph, phase)
        self.tensors = [params[n] for n in self.names]
        self.opt = OPTIMIZERS[phase.optimizer.type](self.tensors, phase.optimizer)
        self.input_names = input_names
        self.params = params
        self.dims: dict[str, int] = {}
        # the optimizer's zero-filled state is realised now so that it is not captured
        Tensor.realize(*get_state_dict(self.opt).values())
        self.program = lower(self.graph, [self.graph.objective]
                             + [self.graph.grads[n] for n in self.names], params=params,
                             training=True, finish=self._update)

    def _update(self, loss: Tensor, *grads: Tensor) -> list[Tensor]:
        """The optimizer step, inside the last compiled stage."""
        if self.phase.clip:
            norm = Tensor.stack(*[(g * g).sum() for g in grads]).sum().sqrt()
            scale = (self.phase.clip / (norm + 1e-6)).minimum(1.0)
            grads = tuple(g * scale for g in grads)
        for t, g in zip(self.tensors, grads, strict=True):
            t.grad = g
        return [loss, *self.opt.schedule_step()]

    def __call__(self, inputs: list[Tensor], lr: float | None) -> Tensor:
        if lr is not None:
            self.opt.lr.assign(Tensor([lr], dtype=self.opt.lr.dtype)).realize()
        with Context(TRAINING=1):
            return self.program(dict(zip(self.input_names, inputs, strict=True)), self.dims)[0]


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


def feed_arrays(graph: Graph, spec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Graph input name -> data array, by name or through ``feed:``."""
    out = {}
    for name in graph.inputs:
        key = spec.feed.get(name, name)
        if key not in arrays:
            raise DataError(f"the data source '{spec.data.source}' has no array '{key}' for "
                            f"input '{name}'; it gives: {', '.join(arrays)}",
                            source=Source(graph.source, graph.lines.get(("train", "data"))),
                            help=f"map it with `feed: {{{name}: <one of {', '.join(arrays)}>}}`")
        out[name] = arrays[key]
    return out


def _metric_refs(graph: Graph, spec) -> list[tuple[str, str, str, str]]:
    """(name, type, prediction node, target node) per metric; refs checked."""
    out = []
    for k, m in enumerate(spec.metrics):
        for ref in m.in_:
            if ref not in graph.aliases and ref not in graph.inputs:
                raise SpecError(f"metric '{m.name or m.type}': '{ref}' is not a node or input",
                                source=Source(graph.source,
                                              graph.lines.get(("train", "metrics", k))))
        out.append((m.name or m.type, m.type, graph.resolve(m.in_[0]), graph.resolve(m.in_[1])))
    return out


def metric_value(kind: str, pred: np.ndarray, target: np.ndarray) -> float:
    """A validation metric of the table (:data:`~.train_spec.METRICS`) over all batches."""
    return METRICS[kind].compute(pred, target)


class Validator:
    """Evaluates objectives and metrics on the validation set, in eval mode, compiled.

    Values that are graph inputs (metric targets) are taken from the data, not the program.
    """

    def __init__(self, graph: Graph, objectives: dict[str, str], metrics, names: list[str]):
        self.objectives, self.metrics, self.names = objectives, metrics, names
        wanted = list(objectives.values()) + [n for m in metrics for n in m[2:]]
        self.computed = [t for t in dict.fromkeys(wanted) if t not in graph.inputs]
        self.graph = graph
        self.dims: dict[str, int] = {}
        self.program = None

    def __call__(self, params, chunks: list[tuple[list[Tensor], dict[str, np.ndarray]]]):
        if self.program is None:
            self.program = lower(self.graph, self.computed, params=params)
        got: dict[str, list[np.ndarray]] = {}
        for tensors, arrays in chunks:
            outs = self.program(dict(zip(self.names, tensors, strict=True)), self.dims)
            for nid, o in zip(self.computed, outs, strict=True):
                got.setdefault(nid, []).append(o.numpy())
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

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    def out_of_steps(self) -> bool:
        return bool(self.max_steps and self.steps_done >= self.max_steps)


def train(graph: Graph, *, out=None, resume: bool = False, device: str | None = None,
          epochs: int | None = None, steps: int | None = None, quiet: bool = False,
          debug: bool = False, log=None) -> TrainResult:
    """Train ``graph`` by its ``train:`` section; see the module docstring for outputs."""
    t_start = time.perf_counter()
    echo = log or (lambda s: None if quiet else print(s, file=sys.stderr, flush=True))
    run = _set_up(graph, out=out, resume=resume, device=device, epochs=epochs, steps=steps,
                  quiet=quiet, debug=debug, echo=echo, t_start=t_start)
    met, last, epoch = None, {}, run.start_epoch
    with open(run.run_dir / "metrics.jsonl", "a") as mf:
        for epoch in range(run.start_epoch, run.epochs):
            last = _epoch(run, epoch, mf)
            met, stop = _end_of_epoch(run, epoch, last, met)
            if stop:
                break
    return _finish(run, epoch, last, met)


# ------------------------------------------------------------------------------ set-up


def _set_up(graph: Graph, *, out, resume: bool, device, epochs, steps, quiet: bool,
            debug: bool, echo, t_start: float) -> _Run:
    """Everything before the first step: checks, data, parameters, phases, run directory."""
    spec = graph.spec.train if graph.spec is not None else None
    if spec is None:
        raise SpecError("this spec has no `train:` section", source=Source(graph.source),
                        help="`dlgraph run` without one runs the forward pass only")
    use_device(device)
    graphs = phase_graphs(graph)            # every phase reversed once, here
    summarize(graph, graphs)
    phases = spec.all_phases()
    epochs = epochs or spec.epochs
    metrics = _metric_refs(graph, spec)
    train_arrays, val_arrays, n, n_val = _split_data(graph, spec)
    names = list(graph.inputs)
    dims = bind(graph, {k: v[:spec.batch] for k, v in train_arrays.items()}, where="data for")
    run_dir = _run_dir(graph, out)
    params = init_params(graph, spec.seed)
    runners = [PhaseStep(graph, ph, params, names, graphs[ph.name]) for ph in phases]
    for r in runners:
        r.dims = dims
        r.program.progress = None if quiet else echo
        r.program.label = f"the training step of '{r.phase.name}'" if len(runners) > 1 \
            else "the training step"
    per_epoch = len(train_arrays[names[0]]) // spec.batch
    max_steps = steps or spec.steps
    run = _Run(graph, spec, runners, params, names, dims, train_arrays, run_dir,
               epochs, max_steps, per_epoch,
               min(epochs * per_epoch, max_steps or epochs * per_epoch), _goal(spec.target),
               echo, quiet, debug, t_start)
    if resume:
        run.steps_done, run.start_epoch, run.history = _restore(run.ckpt, params, runners)
        echo(f"resuming {run.run_dir} at epoch {run.start_epoch + 1}, step {run.steps_done}")
    _start_run_dir(run)
    if val_arrays:
        _set_up_validation(run, phases, metrics, val_arrays)
    echo(f"training {graph.name}: {n - n_val:,} samples ({n_val:,} for validation), "
         f"batch {spec.batch}, {per_epoch} steps per epoch, up to {epochs} epochs"
         + (f", target {run.goal}" if run.goal else ""))
    return run


def _split_data(graph: Graph, spec):
    """(train arrays, validation arrays, samples, validation samples): whole batches each."""
    arrays = feed_arrays(graph, spec, load_data(spec.data, graph.base or Path.cwd(), spec.seed))
    n = len(next(iter(arrays.values())))
    frac = spec.validation.split
    n_val = min(max(round(n * frac / spec.batch), 1), n // spec.batch - 1) * spec.batch \
        if frac > 0 else 0
    train_arrays, val_arrays = split(arrays, n_val / n, spec.seed) if n_val else (arrays, {})
    return train_arrays, val_arrays, n, n_val


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
    run.validator = Validator(graph, objectives, metrics, names)
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
    for batch in bar:
        _step(run, batch, epoch, losses)
        row = {"kind": "step", "epoch": epoch + 1, "step": run.steps_done}
        row.update({_loss_key(k, run.runners): v[-1] for k, v in losses.items()})
        mf.write(json.dumps(row) + "\n")
        if not run.quiet:
            bar.set_postfix_str(" ".join(f"{_loss_key(k, run.runners)} {v[-1]:.4g}"
                                         for k, v in losses.items()))
        if run.out_of_steps():
            break
    last = {_loss_key(k, run.runners): float(np.mean(v)) for k, v in losses.items() if v}
    if run.validator and ((epoch + 1) % run.spec.validation.every == 0
                          or epoch + 1 == run.epochs or run.out_of_steps()):
        last.update(run.validator(run.params, run.val_chunks))
    row = {"kind": "epoch", "epoch": epoch + 1, "step": run.steps_done,
           "seconds": round(time.perf_counter() - run.t_start, 3), **last}
    run.history.append(row)
    mf.write(json.dumps(row) + "\n")
    mf.flush()
    run.echo(f"epoch {epoch + 1:>3}/{run.epochs}  " + "  ".join(
        f"{k} {_fmt(v)}" for k, v in last.items()) + f"  ({time.perf_counter() - t0:.1f} s)")
    return last


def _step(run: _Run, batch: dict[str, np.ndarray], epoch: int, losses) -> None:
    """One training step: every phase, ``repeat`` times each, on one batch."""
    feeds = [to_tensor(batch[k], run.graph.inputs[k].dtype) for k in run.names]
    for r in run.runners:
        for _ in range(r.phase.repeat):
            lr = lr_at(r.phase.schedule, r.phase.optimizer.lr, run.steps_done, run.total) \
                if r.phase.schedule else None
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
    target = run.spec.target
    if target and target.metric in last:
        met = target.met(last[target.metric])
        if met:
            run.echo(f"target {run.goal} reached at epoch {epoch + 1}")
            return met, True
    elif target and epoch == run.start_epoch:
        raise SpecError(f"target metric '{target.metric}' is not logged; logged: "
                        f"{', '.join(last)}",
                        source=Source(run.graph.source, run.graph.lines.get(("train",
                                                                             "target"))))
    return met, run.out_of_steps()


def _finish(run: _Run, epoch: int, last: dict[str, float], met) -> TrainResult:
    """The last checkpoint, the weights and the curves; the result."""
    _checkpoint(run.ckpt, run.params, run.runners, epoch + 1, run.steps_done, run.history)
    save_tensors(run.run_dir / "weights.safetensors",
                 {k: v.numpy() for k, v in run.params.items()},
                 {"spec": run.graph.name, "epochs": epoch + 1, "steps": run.steps_done})
    try:
        from .plot import plot_run
        plot_run(run.run_dir)
    except Exception as e:  # a picture must never cost a finished run
        run.echo(f"warning: could not draw the training curves: {e}")
    return TrainResult(run.run_dir, last, run.goal, met, epoch + 1, run.steps_done,
                       time.perf_counter() - run.t_start, run.first_step or 0.0, run.history,
                       run.params)


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
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist",
                            help="give --out the run directory of an earlier run")
    arrays, meta = load_tensors(path)
    for k, t in params.items():
        if f"param.{k}" not in arrays:
            raise GraphError(f"the checkpoint {path} has no parameter '{k}'",
                             help="resume with the spec the run was started with")
        t.assign(Tensor(arrays[f"param.{k}"])).realize()
    for r in runners:
        for k, v in get_state_dict(r.opt).items():
            key = f"optim.{r.phase.name}.{k}"
            if key in arrays:
                v.assign(Tensor(arrays[key]).cast(v.dtype).reshape(v.shape)).realize()
    return int(meta["step"]), int(meta["epoch"]), list(meta.get("history", []))
