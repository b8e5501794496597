"""The training loop: epochs of steps, each epoch ended by validation, metric rows, a
checkpoint and the callbacks (early stopping, best checkpoint, reduce-on-plateau, TensorBoard),
until the epochs or steps run out, the target is met or a callback stops the run.

There is one loop, whatever takes the steps: a step object (engine/train/step.py) runs each
phase's update on a batch, in this process on one device or several (:func:`train`), or as
one of several Ray Train workers (engine/train/parallel.py). Everything a run produces goes
to its run directory (engine/train/rundir.py)::

    runs/<name>/<timestamp>/  spec.yaml  metrics.jsonl  checkpoint.safetensors
                              weights.safetensors  best.safetensors  curves.png
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tinygrad import Tensor

from dlgraph.engine.compile.interpret import init_params, input_dims
from dlgraph.engine.compile.tinygrad_door import read
from dlgraph.engine.errors import OutputError, Source, TrainingError
from dlgraph.engine.graph.autodiff import phase_graphs
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import batches
from dlgraph.engine.io.outputs import check_output, disk_error
from dlgraph.engine.report.summary import summarize
from dlgraph.engine.spec.checks import check_fits, without_init_from
from dlgraph.engine.spec.train import SCHEDULES
from dlgraph.engine.train.callbacks import make_callbacks
from dlgraph.engine.train.checkpoint import (
    apply_init_from,
    checkpoint_arrays,
    read_checkpoint,
    restore_checkpoint,
)
from dlgraph.engine.train.prepare import frozen, split_data, train_spec
from dlgraph.engine.train.progress import (
    Pace,
    count,
    epoch_steps,
    fmt,
    goal,
    header,
    loss_key,
    pace_text,
    progress_line,
)
from dlgraph.engine.train.rundir import (
    CHECKPOINT,
    METRICS,
    REPLACED,
    WEIGHTS,
    Files,
    RunFiles,
    claim_run_dir,
    draw_curves,
    run_dir_path,
    start_run_dir,
)
from dlgraph.engine.train.shard import data_parallel
from dlgraph.engine.train.step import LocalStep, Step, first_non_finite
from dlgraph.engine.train.validate import Validator, validation

#: seconds between progress lines within an epoch when stderr is not a terminal (no bar)
PROGRESS_EVERY = 10.0


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
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in self.metrics.items())
        aim = ""
        if self.target:
            aim = f"; target {self.target}: {'met' if self.target_met else 'NOT met'}"
        best = ""
        if self.best:
            best = (f"; best {self.best['metric']} {fmt(self.best['value'])} at epoch "
                    f"{self.best['epoch']} in {self.best['file']}")
        return (f"done: {shown}{aim}{best} — {count(self.epochs, 'epoch')}, "
                f"{count(self.steps, 'step')} in {self.seconds:.1f} s (first step after "
                f"{self.first_step_seconds:.1f} s); run dir {self.run_dir}")


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


@dataclass
class Run:
    """A training run once set up: what every epoch and step reads, and the counters (the
    callbacks read and set some: ``stop``, ``lr_scale``, ``best``)."""

    graph: Graph
    spec: Any                             # the TrainSpec
    step: Step                            # takes the steps (engine/train/step.py)
    runners: list                         # one per phase, made by the step
    params: dict[str, Tensor]
    names: list[str]                      # graph inputs, in feed order
    dims: dict[str, int]                  # of this process's part of a batch
    train_arrays: dict[str, np.ndarray]
    run_dir: Path
    files: Files                          # the run directory's files, by name
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
    train_chunks: list = field(default_factory=list)     # for the train_ metrics
    steps_done: int = 0
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    first_step: float | None = None
    stop: bool = False                    # set by a callback (early stopping)
    lr_scale: dict[str, float] = field(default_factory=dict)   # phase -> factor (plateau)
    best: dict | None = None              # what best.safetensors holds (BestCheckpoint)
    weights_meta: dict = field(default_factory=dict)   # more metadata for weights.safetensors
    saved: str | None = None              # the last checkpoint written: "epoch 2, step 148"
    stopped: str | None = None            # why the run stopped before its epochs ran out

    def out_of_steps(self) -> bool:
        return bool(self.max_steps and self.steps_done >= self.max_steps)


def train(graph: Graph, *, out=None, resume: bool = False, device: str | None = None,
          epochs: int | None = None, steps: int | None = None, quiet: bool = False,
          debug: bool = False, log=None, data: dict | None = None,
          init_from: str | Path | None = None, cache: bool = True,
          devices=None, started: float | None = None) -> TrainResult:
    """Train ``graph`` by its ``train:`` section in this process; see the module docstring.

    ``data``: numpy arrays by name (``{"x": X, "y": y}``) instead of the spec's data source,
    split and batched the same way. ``init_from``: a weights file whose parameters of the
    same name and shape seed this graph (as ``init_from:`` in the spec). ``cache``: keep
    compiled programs across processes (engine/compile/cache.py); False compiles afresh.
    ``devices``: data parallel on the devices of this machine (``["cpu:0", "cpu:1"]`` or
    ``"cuda:0,cuda:1"``): each batch split over them, the parameters replicated, the update
    the one a single device makes on the whole batch (engine/train/shard.py). ``started``:
    when the wait began on ``time.perf_counter``'s clock (the command's launch), for the
    times the run reports ("first step after"); default now.
    """
    t_start = time.perf_counter() if started is None else started
    echo = log or (lambda s: None if quiet else print(s, file=sys.stderr, flush=True))
    spec = train_spec(graph)
    if init_from is not None:               # it replaces the spec's own init_from file
        graph = without_init_from(graph)
    step = LocalStep(data_parallel(graph, spec.batch, device, devices), cache)
    Tensor.manual_seed(spec.seed)       # dropout and noise: the same run twice in a process
    graph = frozen(graph, spec.freeze)
    graphs = phase_graphs(graph)            # every phase reversed once, here
    summarize(graph, graphs)
    check_fits(graph, spec.batch)           # before a parameter is allocated
    train_arrays, val_arrays, note, stats = split_data(graph, spec, data)
    run_dir = run_dir_path(graph, out)
    check_board_dir(spec)
    lock = claim_run_dir(run_dir, resume, fresh=out is None)    # held until the run ends
    run_dir = lock.run_dir
    try:
        ckpt = (run_dir / CHECKPOINT).is_file()
        resumed = read_checkpoint(run_dir / CHECKPOINT, param_shapes(graph)) \
            if resume and ckpt else None
        run = new_run(graph, graphs, step, train_arrays, val_arrays, run_dir=run_dir,
                      files=RunFiles(run_dir), epochs=epochs, steps=steps, echo=echo,
                      quiet=quiet, debug=debug, t_start=t_start,
                      init_from=init_from or spec.init_from, resumed=resumed)
        if resumed is not None:
            refuse_finished(run, resumed[1], epochs or steps)
        moved = start_run_dir(run_dir, graph, run.history, stats,
                              len(train_arrays[run.names[0]]))
        if resume:
            echo(resume_line(run, resumed is not None, moved))
        echo(header(run, len(next(iter(val_arrays.values()))) if val_arrays else 0, note))
        return fit(run)
    finally:
        lock.release()


def resume_line(run: Run, resumed: bool, moved: int) -> str:
    """What ``--resume`` does: where the run goes on, and the rows of steps it takes again."""
    if not resumed:
        return f"{run.run_dir} has no checkpoint yet: starting the run from its first step"
    again = (f"; {count(moved, 'metric row')} after the checkpoint moved to {REPLACED} "
             "(those steps run again)") if moved else ""
    return f"resuming {run.run_dir} at epoch {run.start_epoch + 1}, step {run.steps_done}{again}"


def refuse_finished(run: Run, meta: dict, more: int | None) -> None:
    """A resumed run with nothing left to do (its epochs or steps all taken, or stopped by its
    target or early stopping and no more asked) is an error that says so."""
    done = run.start_epoch >= run.epochs or run.out_of_steps()
    if not (done or (meta.get("stopped") and not more)):
        return
    if not run.files.exists(WEIGHTS):   # the fault came as the run ended: end it now
        run.echo("its epochs are done; writing what the end of a run writes")
        run.epochs = run.start_epoch
        return
    why = f"; it stopped: {meta['stopped']}" if meta.get("stopped") else ""
    raise TrainingError(f"the run is finished: {run.start_epoch} of "
                        f"{count(run.epochs, 'epoch')}, {count(run.steps_done, 'step')}{why}; "
                        "nothing to resume", source=Source(str(run.run_dir)),
                        help="pass a higher --epochs (or --steps) to train it further, or "
                             "start a new run with another --out")


def check_board_dir(spec) -> None:
    """`--tensorboard DIR` (``log: {tensorboard: DIR}``) must be a folder dlgraph may write."""
    where = spec.log.tensorboard if spec.log is not None else False
    if isinstance(where, str | Path) and where:
        folder = Path(where)
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise OutputError("cannot write TensorBoard files there: it is a file, not a "
                              "folder", source=Source(str(folder)),
                              help="give --tensorboard a folder (new, or one of event files)")
        check_output(folder / "events.out.tfevents")


def param_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape: what a checkpoint of this graph must hold."""
    return {n: tuple(p.shape) for n, p in graph.params.items()}


# ------------------------------------------------------------------------------ set-up


def new_run(graph: Graph, graphs: dict, step: Step, train_arrays: dict, val_arrays: dict, *,
            run_dir: Path, files: Files, epochs: int | None, steps: int | None, echo,
            quiet: bool, debug: bool, t_start: float, init_from=None,
            resumed: tuple[dict, dict] | None = None) -> Run:
    """A run set up in this process, ready for :func:`fit`: the parameters (the spec's seed;
    then copied from ``init_from``, or restored from ``resumed``, a checkpoint's (arrays,
    metadata)), each phase's runner made by ``step``, and the validation set."""
    spec = graph.spec.train
    names = list(graph.inputs)
    first = {k: v[:spec.batch] for k, v in train_arrays.items()}
    whole = input_dims(graph, first, where="data for")
    mine = step.part(first)
    dims = whole if mine is first else input_dims(graph, mine, where="data for")
    params = init_params(graph, spec.seed)
    if resumed is None and init_from:
        apply_init_from(graph, params, init_from, echo)
    runners = step.build(graph, graphs, params, names, dims, echo, quiet)
    per_epoch = len(train_arrays[names[0]]) // spec.batch
    epochs, max_steps = epochs or spec.epochs, steps or spec.steps
    if max_steps:                            # an epoch count that --steps can reach
        epochs = min(epochs, -(-max_steps // per_epoch))
    run = Run(graph, spec, step, runners, params, names, dims, train_arrays, run_dir, files,
              epochs, max_steps, per_epoch,
              min(epochs * per_epoch, max_steps or epochs * per_epoch), goal(spec.target),
              echo, quiet, debug, t_start)
    if resumed is not None:
        run.steps_done, run.start_epoch, run.history = restore_checkpoint(
            *resumed, params, runners, run_dir / CHECKPOINT)
    if val_arrays:
        run.validator, run.val_chunks, run.train_chunks = validation(
            graph, spec, names, val_arrays, whole, runners[0].program.cache, step.whole,
            train_arrays)
    return run


# -------------------------------------------------------------------------- the loop


def fit(run: Run) -> TrainResult:
    """The loop (see the module docstring) over a run set up by :func:`new_run`; then the
    last checkpoint, the callbacks' last word and the weights. Callbacks that write files of
    their own run where the step leads. A file the disk refuses (full, read-only, gone) ends
    the run with an error that says how to go on from the last complete checkpoint."""
    try:
        return fit_epochs(run)
    except OutputError as e:
        raise resumable(run, e) from None
    except OSError as e:            # a file written by a library (TensorBoard's event files)
        raise resumable(run, disk_error(e.filename or run.run_dir, e)) from None


def ended(run: Run) -> tuple[bool | None, dict[str, float], int]:
    """(target met, last values, 0-based epoch) as the run stands before its next epoch: for
    a resumed run with no epoch left to take, what its last epoch row says."""
    if not run.history:
        return None, {}, run.start_epoch
    last = {k: v for k, v in run.history[-1].items()
            if k not in ("kind", "epoch", "step", "seconds", "time")}
    target = run.spec.target
    met = target.met(last[target.metric]) if target and target.metric in last else None
    return met, last, run.start_epoch - 1


def fit_epochs(run: Run) -> TrainResult:
    callbacks = [cb for cb in make_callbacks(run.spec, run.spec.all_phases())
                 if run.step.lead or not cb.lead_only]
    for cb in callbacks:
        cb.on_train_begin(run)
    met, last, epoch = ended(run)
    try:
        for epoch in range(run.start_epoch, run.epochs):
            last = run_epoch(run, epoch)
            met, stop = end_of_epoch(run, epoch, last, met)
            for cb in callbacks:
                cb.on_epoch_end(run, epoch, last)
            if stop or run.stop:
                run.stopped = f"its target {run.goal} was met" if met else \
                    "early stopping" if run.stop else None
                break
    finally:
        run.files.close()
    return finish(run, epoch, last, met, callbacks)


def resumable(run: Run, e: OutputError) -> OutputError:
    """``e`` (a file the disk refused) with what to do next: fix the disk, then ``--resume``
    from the last complete checkpoint, which the atomic writes kept whole."""
    if not run.run_dir.is_dir():
        e.help = "keep the run directory while a run writes it; its files went with it, " \
                 "so start the run again"
    elif getattr(e, "fix", None):
        where = (f"it goes on from the last complete checkpoint ({run.saved})" if run.saved
                 else "no checkpoint was written yet, so it starts over")
        e.help = f"{e.fix}, then run again with --resume --out {run.run_dir}: {where}"
    return e


def run_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training batches; returns the epoch's mean losses (and validation
    metrics when it is an epoch to validate), as the lead process has them."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    losses: dict[str, list[float]] = {r.phase.name: [] for r in run.runners}
    # the rate and ETA are ours (steady steps: progress.Pace), not tqdm's
    bar = tqdm(batches(run.train_arrays, run.spec.batch, run.spec.seed, epoch),
               total=run.per_epoch, desc=f"epoch {epoch + 1}/{run.epochs}", leave=False,
               disable=True if run.quiet else None, file=sys.stderr, unit="step",
               bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {postfix}")
    said, pace = time.perf_counter(), Pace()
    for k, batch in enumerate(bar):
        take_step(run, batch, epoch, losses)
        pace.tick()
        row = {"kind": "step", "epoch": epoch + 1, "step": run.steps_done,
               "time": round(time.time(), 3)}
        row.update({loss_key(k, run.runners): v[-1] for k, v in losses.items()})
        run.files.append(METRICS, json.dumps(row) + "\n")
        if not run.quiet:
            bar.set_postfix_str(" ".join(f"{loss_key(k, run.runners)} {v[-1]:.4g}"
                                         for k, v in losses.items())
                                + "  " + pace_text(run, pace, k + 1, epoch_steps(run, k + 1)))
            if bar.disable and time.perf_counter() - said >= PROGRESS_EVERY:
                said = time.perf_counter()
                run.echo(progress_line(run, epoch, k + 1, pace, losses))
        if run.out_of_steps():
            break
    return close_epoch(run, epoch, losses, t0)


def close_epoch(run: Run, epoch: int, losses: dict[str, list[float]],
                t0: float) -> dict[str, float]:
    """The epoch's mean losses and, on an epoch to validate, the validation values (computed
    where the step leads, shared with every process); its row in metrics.jsonl."""
    last = {loss_key(k, run.runners): float(np.mean(v)) for k, v in losses.items() if v}
    if run.validator and run.step.lead and ((epoch + 1) % run.spec.validation.every == 0
                                            or epoch + 1 == run.epochs or run.out_of_steps()):
        last.update(run.validator(run.params, run.val_chunks))
        if run.train_chunks:
            last.update(run.validator(run.params, run.train_chunks, "train_", losses=False))
    last = run.step.share(last)
    row = {"kind": "epoch", "epoch": epoch + 1, "step": run.steps_done,
           "seconds": round(time.perf_counter() - run.t_start, 3),
           "time": round(time.time(), 3), **last}
    run.history.append(row)
    run.files.append(METRICS, json.dumps(row) + "\n")
    run.files.flush()
    run.echo(f"epoch {epoch + 1:>3}/{run.epochs}  " + "  ".join(
        f"{k} {fmt(v)}" for k, v in last.items()) + f"  ({time.perf_counter() - t0:.1f} s)")
    return last


def take_step(run: Run, batch: dict[str, np.ndarray], epoch: int, losses) -> None:
    """One training step: every phase, ``repeat`` times each, on one batch."""
    feeds = run.step.feeds(run.graph, run.names, batch)
    for r in run.runners:
        for _ in range(r.phase.repeat):
            lr = lr_at(r.phase.schedule, r.phase.optimizer.lr, run.steps_done, run.total) \
                * run.lr_scale.get(r.phase.name, 1.0) if r.phase.schedule else None
            value = run.step.take(r, feeds, lr)
            if not math.isfinite(value):
                raise diverged(run, r, feeds, value, epoch)
            losses[r.phase.name].append(value)
    if run.first_step is None:
        run.first_step = time.perf_counter() - run.t_start
    run.steps_done += 1


def diverged(run: Run, r, feeds, value: float, epoch: int) -> TrainingError:
    """The error of a non-finite loss; with ``debug``, naming the first non-finite node."""
    where = ""
    if run.debug:
        bad = first_non_finite(r.graph, run.params, dict(zip(run.names, feeds, strict=True)),
                               run.dims)
        where = f"; the first non-finite value is node '{bad}'" if bad else ""
    return TrainingError(f"the loss of phase '{r.phase.name}' became {value} at step "
                         f"{run.steps_done + 1} (epoch {epoch + 1}){where}",
                         help="lower the learning rate, add `clip:`, or run with --debug to "
                              "find the node")


def end_of_epoch(run: Run, epoch: int, last: dict[str, float], met):
    """Checkpoint and check the target; returns (target met?, stop now?)."""
    if (epoch + 1) % run.spec.checkpoint_every == 0 or epoch + 1 == run.epochs:
        save_checkpoint(run, epoch)
    target = run.spec.target          # its metric is known to be logged: checks.py
    if target and target.metric in last:
        was, met = met, target.met(last[target.metric])
        if met and not was:
            run.echo(f"target {run.goal} reached at epoch {epoch + 1}")
        if met and target.stop:
            return met, True
    return met, run.out_of_steps()


def save_checkpoint(run: Run, epoch: int) -> None:
    """checkpoint.safetensors: the state to resume from after ``epoch`` (0-based); it says
    why the run stopped early, if it did (a resumed run then has nothing left to do)."""
    if run.files.writes:
        stopped = {"stopped": run.stopped} if run.stopped else {}
        run.files.save_tensors(CHECKPOINT, checkpoint_arrays(run.params, run.runners),
                               {"epoch": epoch + 1, "step": run.steps_done,
                                "history": run.history, **stopped})
    run.saved = f"epoch {epoch + 1}, step {run.steps_done}"


def finish(run: Run, epoch: int, last: dict[str, float], met, callbacks=()) -> TrainResult:
    """The last checkpoint (the state to resume from), the callbacks' last word (e.g. the
    best epoch's weights restored), the weights and the curves; the result."""
    save_checkpoint(run, epoch)
    for cb in callbacks:
        cb.on_train_end(run)
    if run.files.writes:
        run.files.save_tensors(WEIGHTS, {k: read(v) for k, v in run.params.items()},
                               {"spec": run.graph.name, "epochs": epoch + 1,
                                "steps": run.steps_done, **run.weights_meta})
    run.files.close()
    if run.files.local:
        draw_curves(run.run_dir, run.echo)
    return TrainResult(run.run_dir, last, run.goal, met, epoch + 1, run.steps_done,
                       time.perf_counter() - run.t_start, run.first_step or 0.0, run.history,
                       run.params, run.best)
