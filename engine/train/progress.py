"""What a training run says: counts and values as shown, the target, the header line, the
progress line within an epoch, and the key each phase's loss is logged under."""

from __future__ import annotations

import time


def count(n: int, what: str) -> str:
    """'1 epoch', '2 epochs', '1,000 steps'.

    >>> count(1, "epoch"), count(1000, "step")
    ('1 epoch', '1,000 steps')
    """
    return f"{n:,} {what}{'s' * (n != 1)}"


def fmt(v: float) -> str:
    """A logged value as shown: 4 significant digits, scientific below 1e-3."""
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def goal(target) -> str | None:
    """The target as shown in logs, e.g. ``val_mse < 0.01``."""
    if not target:
        return None
    return f"{target.metric} {'<' if target.below is not None else '>'} " \
           f"{target.below if target.below is not None else target.above}"


def loss_key(phase: str, runners) -> str:
    """The name a phase's loss is logged under: ``loss``, or ``loss_<phase>`` with several."""
    return "loss" if len(runners) == 1 else f"loss_{phase}"


def header(run, n_val: int, note: str) -> str:
    """'training x: 1,029 training + 384 validation samples (...), batch 32, ...'."""
    n_train = len(run.train_arrays[run.names[0]])
    samples = f"{n_train:,} training + {n_val:,} validation samples" if n_val else \
        f"{n_train:,} training samples (no validation)"
    if note:
        samples += f" ({note.removeprefix('; ')})"
    length = f"{count(run.max_steps, 'step')} ({count(run.epochs, 'epoch')})" \
        if run.max_steps and run.max_steps < run.epochs * run.per_epoch \
        else count(run.epochs, "epoch")
    return (f"training {run.graph.name}: {samples}, batch {run.spec.batch}, "
            f"{count(run.per_epoch, 'step')} per epoch, up to {length}"
            + (f", target {run.goal}" if run.goal else ""))


class Pace:
    """Steps per second from the steady steps of an epoch: its first step is not counted
    (in a fresh run it waits for the compile, and would make the ETA of a 37 s epoch read
    98 min)."""

    def __init__(self):
        self.n, self.first, self.last = 0, 0.0, 0.0

    def tick(self) -> None:
        """A step is done."""
        self.last = time.perf_counter()
        self.n += 1
        if self.n == 1:
            self.first = self.last

    @property
    def rate(self) -> float | None:
        """Steady steps per second, or None before two steps."""
        dt = self.last - self.first
        return (self.n - 1) / dt if self.n > 1 and dt > 0 else None


def pace_text(run, pace: Pace, done: int, total: int) -> str:
    """'3.2 steps/s, 410 samples/s, ETA 1 min 58 s' ('ETA …' until two steps are done)."""
    rate = pace.rate
    if rate is None:
        return "ETA …"
    eta = (total - done) / rate
    when = f"{int(eta // 60)} min {int(eta % 60)} s" if eta >= 60 else f"{eta:.0f} s"
    return f"{rate:.3g} steps/s, {rate * run.spec.batch:,.0f} samples/s, ETA {when}"


def epoch_steps(run, done: int) -> int:
    """The steps this epoch will take (fewer in the last epoch of a run with --steps)."""
    return min(run.per_epoch, (run.max_steps or run.per_epoch * run.epochs)
               - run.steps_done + done)


def progress_line(run, epoch: int, done: int, pace: Pace, losses) -> str:
    """'epoch 1/4  step 120/500  loss 0.53  3.2 steps/s, 410 samples/s, ETA 1 min 58 s'."""
    total = epoch_steps(run, done)
    shown = "  ".join(f"{loss_key(k, run.runners)} {fmt(v[-1])}" for k, v in losses.items()
                      if v)
    return (f"epoch {epoch + 1}/{run.epochs}  step {done}/{total}  {shown}  "
            f"{pace_text(run, pace, done, total)}")
