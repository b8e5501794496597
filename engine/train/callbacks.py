"""Small objects that hook the training loop's events (as Keras callbacks do): early stopping,
the best checkpoint, reduce-on-plateau, TensorBoard logging. The loop calls, on each callback
in order::

    on_train_begin(run)                  after set-up (a resumed run's history is in run.history)
    on_epoch_end(run, epoch, logs)       after each epoch's metrics and checkpoint
    on_train_end(run)                    before the final weights are written

A callback asks the loop to stop by setting ``run.stop``; it changes a phase's learning rate
through ``run.lr_scale[phase name]``; it reads and writes the run directory's files through
``run.files`` (engine/train/rundir.py), so that it works alike in one process and on Ray Train
workers, where every rank runs the callbacks on the same logs and only rank 0's writes land
(a ``lead_only`` callback runs on rank 0 alone). The spec fields that make them are in
spec/train.py (``early_stopping``, ``best_checkpoint``, ``schedule: {type: plateau}``,
``log: {tensorboard: true}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tinygrad import Tensor

from dlgraph.engine.compile.tinygrad_door import read
from dlgraph.engine.errors import DlgraphError, Source, SpecError
from dlgraph.engine.train.rundir import BEST, METRICS


class Callback:
    """Does nothing at every event; subclasses override what they need. ``lead_only``: it
    writes files of its own, so only the process that leads runs it."""

    lead_only = False

    def on_train_begin(self, run: Any) -> None:
        pass

    def on_epoch_end(self, run: Any, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, run: Any) -> None:
        pass


class Monitored(Callback):
    """A callback that watches one logged value: ``best`` so far, epochs ``wait``-ed since.

    >>> m = Monitored("val_accuracy", "auto", 0.0)
    >>> m.sign, m.improves(0.5), m.improves(0.4)
    (-1.0, True, False)
    """

    def __init__(self, metric: str, mode: str, min_delta: float, where: tuple = ()):
        self.metric, self.min_delta, self.where = metric, min_delta, where
        if mode == "auto":
            mode = "max" if "acc" in metric else "min"
        self.sign = 1.0 if mode == "min" else -1.0      # minimise sign * value
        self.best: float | None = None
        self.best_epoch = 0
        self.wait = 0

    def improves(self, value: float) -> bool:
        """Updates ``best``, ``wait``; True when ``value`` beats the best by ``min_delta``."""
        if self.best is None or self.sign * (value - self.best) < -self.min_delta:
            self.best, self.wait = value, 0
            return True
        self.wait += 1
        return False

    def value(self, run: Any, logs: dict[str, float]) -> float | None:
        """The watched value of this epoch; None on an epoch without validation. A name that
        is never logged is a located SpecError once the epoch has validation values."""
        if self.metric in logs:
            return logs[self.metric]
        if any(k.startswith("val_") for k in logs) or not run.validator:
            raise SpecError(f"'{self.metric}' is not logged; logged: {', '.join(logs)}",
                            source=Source(run.graph.source, run.graph.lines.get(self.where)),
                            help="watch one of the logged names")
        return None

    def on_train_begin(self, run: Any) -> None:
        for row in run.history:                          # a resumed run picks up its counters
            if self.metric in row:
                if self.improves(row[self.metric]):
                    self.best_epoch = row["epoch"]


class EarlyStopping(Monitored):
    """Stops when the watched value has not improved for ``patience`` epochs; with
    ``restore_best`` the run ends with the weights of its best epoch."""

    def __init__(self, spec):
        super().__init__(spec.metric, spec.mode, spec.min_delta, ("train", "early_stopping"))
        self.patience, self.restore_best = spec.patience, spec.restore_best
        self.weights: dict[str, np.ndarray] | None = None

    def on_train_begin(self, run):
        super().on_train_begin(run)
        best = run.files.load_tensors(BEST) if self.restore_best and self.best_epoch \
            else None                                                  # a resumed run
        if best is not None:
            arrays, meta = best
            if meta.get("epoch") == self.best_epoch and meta.get("metric") == self.metric:
                self.weights = arrays

    def on_epoch_end(self, run, epoch, logs):
        value = self.value(run, logs)
        if value is None:
            return
        if self.improves(value):
            self.best_epoch = epoch + 1
            if self.restore_best:
                self.weights = {k: read(v) for k, v in run.params.items()}
        elif self.wait >= self.patience:
            run.stop = True
            run.echo(f"early stopping at epoch {epoch + 1}: {self.metric} has not improved "
                     f"for {_epochs(self.wait)} (best {self.best:.4g} at epoch "
                     f"{self.best_epoch})")

    def on_train_end(self, run):
        if self.restore_best and self.weights is not None and self.wait > 0:
            for k, t in run.params.items():
                t.assign(Tensor(self.weights[k]).to(t.device)).realize()
            run.echo(f"restored the weights of epoch {self.best_epoch}")


class BestCheckpoint(Monitored):
    """Writes ``best.safetensors`` (the weights, with epoch and value) at every improvement.

    ``explicit``: the spec named the metric (in ``best_checkpoint`` or ``early_stopping``),
    so it must be logged; the default (``val_loss``)
    is skipped quietly where it is not (multi-phase runs log ``val_loss_<phase>``).
    """

    def __init__(self, metric: str, mode: str, min_delta: float, explicit: bool):
        super().__init__(metric, mode, min_delta, ("train", "best_checkpoint"))
        self.explicit = explicit

    def on_train_begin(self, run):
        super().on_train_begin(run)
        if self.best is not None and run.files.exists(BEST):
            self._tell(run)

    def on_epoch_end(self, run, epoch, logs):
        if not self.explicit and self.metric not in logs:
            return
        value = self.value(run, logs)
        if value is not None and self.improves(value):
            self.best_epoch = epoch + 1
            if run.files.writes:
                run.files.save_tensors(BEST, {k: read(v) for k, v in run.params.items()},
                                       {"spec": run.graph.name, "epoch": epoch + 1,
                                        "metric": self.metric, "value": value})
        if self.best is not None:
            self._tell(run)

    def _tell(self, run) -> None:
        run.best = {"file": BEST, "epoch": self.best_epoch,
                    "metric": self.metric, "value": self.best}


class ReduceOnPlateau(Monitored):
    """Multiplies a phase's learning rate by ``gamma`` when the watched value has not
    improved for ``patience`` epochs, down to ``min_lr``."""

    def __init__(self, phase):
        s = phase.schedule
        super().__init__(s.metric, s.mode, s.min_delta, ("train", "schedule"))
        self.phase, self.gamma, self.patience, self.min_lr = phase, s.gamma, s.patience, s.min_lr

    def on_train_begin(self, run):
        super().on_train_begin(run)
        run.lr_scale.setdefault(self.phase.name, 1.0)

    def on_epoch_end(self, run, epoch, logs):
        value = self.value(run, logs)
        if value is None or self.improves(value) or self.wait < self.patience:
            return
        base = self.phase.optimizer.lr
        scale = run.lr_scale[self.phase.name]
        new = max(scale * self.gamma, self.min_lr / base)
        if new < scale:
            run.lr_scale[self.phase.name] = new
            run.echo(f"{self.metric} has not improved for {_epochs(self.wait)}: lr of "
                     f"'{self.phase.name}' {base * scale:.3g} -> {base * new:.3g}")
        self.wait = 0


class TensorBoard(Callback):
    """Writes what ``metrics.jsonl`` records to TensorBoard event files (tensorboardX): each
    step's losses as ``step/<name>``, each epoch's losses and metrics as ``epoch/<name>``
    (both at the global step, with the rows' wall time), and each phase's learning rate as
    ``lr/<phase>``. The rows are read back from the file the loop writes, so the two never
    disagree; ``dir`` None is ``<run dir>/tensorboard`` (with Ray Train workers, on rank 0's
    machine)."""

    lead_only = True

    def __init__(self, dir: str | Path | None = None):
        try:
            import tensorboardX
        except ImportError:
            raise DlgraphError("TensorBoard logging needs the tensorboardX package",
                               help="pip install 'dlgraph[tensorboard]' (or tensorboardX)") \
                from None
        self._module, self.dir = tensorboardX, dir
        self.writer: Any = None
        self._offset = 0

    def on_train_begin(self, run):
        self.dir = Path(self.dir) if self.dir is not None else run.run_dir / "tensorboard"
        try:
            self.writer = self._module.SummaryWriter(logdir=str(self.dir), flush_secs=30)
        except OSError as e:
            raise DlgraphError(f"cannot write TensorBoard files to {self.dir}: "
                               f"{e.strerror or e}", help="give a folder you can write") \
                from None
        self._offset = run.files.size(METRICS)               # a resumed run: what is new

    def on_epoch_end(self, run, epoch, logs):
        for row in self._new_rows(run.files):
            kind, step = row.get("kind"), row.get("step", 0)
            for k, v in row.items():
                if k not in _NOT_SCALARS and isinstance(v, int | float):
                    self.writer.add_scalar(f"{kind}/{k}", v, step, walltime=row.get("time"))
        for r in getattr(run, "runners", ()):
            lr = getattr(getattr(r, "opt", None), "lr", None)
            if lr is not None:
                self.writer.add_scalar(f"lr/{r.phase.name}", float(lr.numpy().reshape(-1)[0]),
                                       run.steps_done)
        self.writer.flush()

    def on_train_end(self, run):
        if self.writer is not None:
            self.writer.close()
            run.echo(f"TensorBoard event files in {self.dir} (tensorboard --logdir {self.dir})")

    def _new_rows(self, files) -> list[dict]:
        data = files.read(METRICS, self._offset) or b""
        end = data.rfind(b"\n") + 1                       # a line still being written waits
        self._offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


_NOT_SCALARS = {"kind", "epoch", "step", "time", "seconds"}


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' * (n != 1)}"


def make_callbacks(spec, phases) -> list[Callback]:
    """The callbacks a ``train:`` section asks for, in the order they run."""
    out: list[Callback] = []
    for ph in phases:
        if ph.schedule is not None and ph.schedule.type == "plateau":
            out.append(ReduceOnPlateau(ph))
    b = spec.best_checkpoint or spec.early_stopping   # by default what early stopping watches
    out.append(BestCheckpoint(b.metric, b.mode, b.min_delta, True) if b is not None
               else BestCheckpoint("val_loss", "min", 0.0, False))
    if spec.early_stopping is not None:
        out.append(EarlyStopping(spec.early_stopping))
    tb = spec.log.tensorboard if spec.log is not None else False
    if tb is not False:
        out.append(TensorBoard(None if tb is True else tb))
    return out


__all__ = ["BestCheckpoint", "Callback", "EarlyStopping", "ReduceOnPlateau", "TensorBoard",
           "make_callbacks"]
