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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tinygrad import Context, Tensor, TinyJit
from tinygrad.nn import optim
from tinygrad.nn.state import get_state_dict

from .autodiff import phase_graphs, phase_params, training_graph
from .checkpoint import atomic_write, load_tensors, save_tensors
from .data import batches, load_data, split
from .errors import DataError, GraphError, Source, SpecError, TrainingError
from .ir import Graph
from .lower import Ctx, Evaluator, bind, init_params, to_tensor, use_device
from .summary import summarize


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


OPTIMIZERS = {
    "sgd": lambda ps, o: optim.SGD(ps, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay),
    "adam": lambda ps, o: optim.Adam(ps, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps),
    "adamw": lambda ps, o: optim.AdamW(ps, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay),
    "lamb": lambda ps, o: optim.LAMB(ps, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                     weight_decay=o.weight_decay),
}


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
    span = max(total - schedule.warmup, 1)
    if schedule.type == "step":
        return base * schedule.gamma ** (t // schedule.step_size)
    if schedule.type == "cosine":
        return schedule.min_lr + (base - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi *
                                                                                min(t / span, 1)))
    if schedule.type == "linear":
        return base + (schedule.min_lr - base) * min(t / span, 1)
    return base


class PhaseStep:
    """One phase: its training graph, optimizer and jitted step."""

    def __init__(self, graph: Graph, phase, params: dict[str, Tensor], input_names: list[str],
                 training: Graph | None = None):
        self.phase = phase
        self.graph = training or training_graph(graph, phase)
        self.names = phase_params(graph, phase)
        self.tensors = [params[n] for n in self.names]
        self.opt = OPTIMIZERS[phase.optimizer.type](self.tensors, phase.optimizer)
        self.input_names = input_names
        self.evaluator = Evaluator(self.graph, [self.graph.objective]
                                   + [self.graph.grads[n] for n in self.names])
        self.params = params
        self.dims: dict[str, int] = {}
        # capture on the first call (TinyJit's default schedules the step twice); the
        # optimizer's zero-filled state is realised now so that it is not captured
        Tensor.realize(*get_state_dict(self.opt).values())
        # ... and tinygrad's random state must exist before the capture: created inside
        # it, every replay would start from the same seed (the same noise/dropout each step)
        Tensor.rand(1).realize()
        self.jit = TinyJit(self._step)
        self.jit.cnt = 1

    def _step(self, *inputs: Tensor) -> Tensor:
        ctx = Ctx(training=True, dims=self.dims)
        loss, *grads = self.evaluator(ctx, dict(zip(self.input_names, inputs, strict=True)),
                                      self.params)
        if self.phase.clip:
            norm = Tensor.stack(*[(g * g).sum() for g in grads]).sum().sqrt()
            scale = (self.phase.clip / (norm + 1e-6)).minimum(1.0)
            grads = [g * scale for g in grads]
        for t, g in zip(self.tensors, grads, strict=True):
            t.grad = g
        Tensor.realize(loss, *self.opt.schedule_step(), *ctx.updates)
        return loss

    def __call__(self, inputs: list[Tensor], lr: float | None) -> Tensor:
        if lr is not None:
            self.opt.lr.assign(Tensor([lr], dtype=self.opt.lr.dtype)).realize()
        with Context(TRAINING=1):
            return self.jit(*inputs)


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
    if kind == "accuracy":
        return float((pred.argmax(-1) == target).mean())
    d = pred.astype(np.float64) - target
    if kind == "mse":
        return float((d * d).mean())
    if kind == "rmse":
        return float(np.sqrt((d * d).mean()))
    return float(np.abs(d).mean())  # mae


class Validator:
    """Evaluates objectives and metrics on the validation set, in eval mode, jitted.

    Values that are graph inputs (metric targets) are taken from the data, not the JIT:
    a replayed JIT hands back the buffers it captured, not this call's inputs.
    """

    def __init__(self, graph: Graph, objectives: dict[str, str], metrics, names: list[str]):
        self.objectives, self.metrics, self.names = objectives, metrics, names
        wanted = list(objectives.values()) + [n for m in metrics for n in m[2:]]
        self.computed = [t for t in dict.fromkeys(wanted) if t not in graph.inputs]
        self.evaluator = Evaluator(graph, self.computed)
        self.dims: dict[str, int] = {}
        self.params: dict[str, Tensor] = {}
        self.jit = TinyJit(lambda *xs: [t.realize() for t in self.evaluator(
            Ctx(False, self.dims), dict(zip(self.names, xs, strict=True)), self.params)])

    def __call__(self, params, chunks: list[tuple[list[Tensor], dict[str, np.ndarray]]]):
        self.params = params
        got: dict[str, list[np.ndarray]] = {}
        for tensors, arrays in chunks:
            for nid, o in zip(self.computed, self.jit(*tensors), strict=True):
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


def train(graph: Graph, *, out=None, resume: bool = False, device: str | None = None,
          epochs: int | None = None, steps: int | None = None, quiet: bool = False,
          debug: bool = False, log=None) -> TrainResult:
    """Train ``graph`` by its ``train:`` section; see the module docstring for outputs."""
    t_start = time.perf_counter()
    spec = graph.spec.train if graph.spec is not None else None
    if spec is None:
        raise SpecError("this spec has no `train:` section", source=Source(graph.source),
                        help="`dlgraph run` without one runs the forward pass only")
    echo = log or (lambda s: None if quiet else print(s, file=sys.stderr, flush=True))
    use_device(device)
    graphs = phase_graphs(graph)            # every phase reversed once, here
    summarize(graph, graphs)
    phases = spec.all_phases()
    epochs = epochs or spec.epochs
    max_steps = steps or spec.steps
    metrics = _metric_refs(graph, spec)

    arrays = feed_arrays(graph, spec, load_data(spec.data, graph.base or Path.cwd(), spec.seed))
    n = len(next(iter(arrays.values())))
    frac = spec.validation.split
    n_val = min(max(round(n * frac / spec.batch), 1), n // spec.batch - 1) * spec.batch \
        if frac > 0 else 0
    train_arrays, val_arrays = split(arrays, n_val / n, spec.seed) if n_val else (arrays, {})
    names = list(graph.inputs)
    dims = bind(graph, {k: v[:spec.batch] for k, v in train_arrays.items()}, where="data for")

    run_dir = _run_dir(graph, out)
    ckpt = run_dir / "checkpoint.safetensors"
    params = init_params(graph, spec.seed)
    steps_done, start_epoch, history = 0, 0, []
    runners = [PhaseStep(graph, ph, params, names, graphs[ph.name]) for ph in phases]
    for r in runners:
        r.dims = dims
    if resume:
        steps_done, start_epoch, history = _restore(ckpt, params, runners)
        echo(f"resuming {run_dir} at epoch {start_epoch + 1}, step {steps_done}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "spec.yaml", yaml.safe_dump(
        graph.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        sort_keys=False).encode())
    mlog = run_dir / "metrics.jsonl"
    atomic_write(mlog, "".join(json.dumps(h) + "\n" for h in history).encode())

    validator = None
    if val_arrays:
        objectives = {("loss" if len(phases) == 1 else f"loss_{p.name}"): graph.resolve(
            p.objective) for p in phases}
        validator = Validator(graph, objectives, metrics, names)
        validator.dims = dict(dims)
        val_chunks = [([to_tensor(b[k], graph.inputs[k].dtype) for k in names], b)
                      for b in batches(val_arrays, spec.batch, spec.seed, 0, shuffle=False)]

    per_epoch = len(train_arrays[names[0]]) // spec.batch
    total = min(epochs * per_epoch, max_steps or epochs * per_epoch)
    target = spec.target
    goal = f"{target.metric} {'<' if target.below is not None else '>'} " \
           f"{target.below if target.below is not None else target.above}" if target else None
    met, last, first_step, epoch = None, {}, None, start_epoch
    echo(f"training {graph.name}: {n - n_val:,} samples ({n_val:,} for validation), "
         f"batch {spec.batch}, {per_epoch} steps per epoch, up to {epochs} epochs"
         + (f", target {goal}" if goal else ""))
    from tqdm import tqdm
    with open(mlog, "a") as mf:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            losses = {r.phase.name: [] for r in runners}
            bar = tqdm(batches(train_arrays, spec.batch, spec.seed, epoch), total=per_epoch,
                       desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                       disable=True if quiet else None,
                       file=sys.stderr, unit="step")
            for batch in bar:
                feeds = [to_tensor(batch[k], graph.inputs[k].dtype) for k in names]
                for r in runners:
                    for _ in range(r.phase.repeat):
                        lr = lr_at(r.phase.schedule, r.phase.optimizer.lr, steps_done, total) \
                            if r.phase.schedule else None
                        value = r(feeds, lr).item()
                        if not math.isfinite(value):
                            where = ""
                            if debug:
                                bad = first_non_finite(r.graph, params,
                                                       dict(zip(names, feeds, strict=True)), dims)
                                where = f"; the first non-finite value is node '{bad}'" \
                                    if bad else ""
                            raise TrainingError(
                                f"the loss of phase '{r.phase.name}' became {value} at step "
                                f"{steps_done + 1} (epoch {epoch + 1}){where}",
                                help="lower the learning rate, add `clip:`, or run with "
                                     "--debug to find the node")
                        losses[r.phase.name].append(value)
                if first_step is None:
                    first_step = time.perf_counter() - t_start
                steps_done += 1
                row = {"kind": "step", "epoch": epoch + 1, "step": steps_done}
                row.update({_loss_key(k, runners): v[-1] for k, v in losses.items()})
                mf.write(json.dumps(row) + "\n")
                if not quiet:
                    bar.set_postfix_str(" ".join(f"{_loss_key(k, runners)} {v[-1]:.4g}"
                                                 for k, v in losses.items()))
                if max_steps and steps_done >= max_steps:
                    break
            last = {_loss_key(k, runners): float(np.mean(v)) for k, v in losses.items() if v}
            if validator and ((epoch + 1) % spec.validation.every == 0 or epoch + 1 == epochs
                              or (max_steps and steps_done >= max_steps)):
                last.update(validator(params, val_chunks))
            row = {"kind": "epoch", "epoch": epoch + 1, "step": steps_done,
                   "seconds": round(time.perf_counter() - t_start, 3), **last}
            history.append(row)
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            echo(f"epoch {epoch + 1:>3}/{epochs}  " + "  ".join(
                f"{k} {_fmt(v)}" for k, v in last.items())
                + f"  ({time.perf_counter() - t0:.1f} s)")
            if (epoch + 1) % spec.checkpoint_every == 0 or epoch + 1 == epochs:
                _checkpoint(ckpt, params, runners, epoch + 1, steps_done, history)
            if target and target.metric in last:
                met = target.met(last[target.metric])
                if met:
                    echo(f"target {goal} reached at epoch {epoch + 1}")
                    break
            elif target and target.metric not in last and epoch == start_epoch:
                raise SpecError(f"target metric '{target.metric}' is not logged; logged: "
                                f"{', '.join(last)}",
                                source=Source(graph.source, graph.lines.get(("train",
                                                                             "target"))))
            if max_steps and steps_done >= max_steps:
                break
    _checkpoint(ckpt, params, runners, epoch + 1, steps_done, history)
    save_tensors(run_dir / "weights.safetensors", {k: v.numpy() for k, v in params.items()},
                 {"spec": graph.name, "epochs": epoch + 1, "steps": steps_done})
    try:
        from .plot import plot_run
        plot_run(run_dir)
    except Exception as e:  # a picture must never cost a finished run
        echo(f"warning: could not draw the training curves: {e}")
    return TrainResult(run_dir, last, goal, met, epoch + 1, steps_done,
                       time.perf_counter() - t_start, first_step or 0.0, history, params)


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
