"""How a training step is taken: the step objects the training loop drives, and the compiled
phase steps they are made of.

The loop (engine/train/loop.py) is one loop whatever runs the step; it asks a step object::

    lead                          does this process validate, write the run's files and speak?
    part(batch) -> batch          this process's share of a global batch (arrays by input)
    place(tensors) -> tensors     the tensors on this process's devices
    build(graph, graphs, params, names, dims, echo, quiet) -> runners
                                  one runner per phase (``.phase``, ``.opt``, ``.graph``)
    take(runner, feeds, lr) -> float
                                  one phase's update on the global batch; its loss
    share(logs) -> logs           the epoch's logs as the lead process has them

:class:`LocalStep`: this process, on one device or with each batch split over several
(engine/train/shard.py); each phase is one compiled program that ends with the update
(:class:`PhaseStep`). :class:`ReducedStep`: one of several processes (Ray Train workers,
engine/train/parallel.py) that each take their slice of a batch; a phase's step is the
gradients (:class:`GradStep`), their mean over the processes (the all-reduce the step is given)
and the update.
"""

from __future__ import annotations

import math

import numpy as np
from tinygrad import Context, Tensor
from tinygrad.nn.state import get_state_dict

from dlgraph.engine.compile import tinygrad_door as door
from dlgraph.engine.compile.cache import default_cache
from dlgraph.engine.compile.interpret import Ctx, Interpreter, to_tensor
from dlgraph.engine.compile.lower import lower
from dlgraph.engine.compile.tinygrad_door import jit
from dlgraph.engine.graph.autodiff import phase_params, training_graph
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.spec.train import OPTIMIZERS
from dlgraph.engine.train.shard import replicate, split_batch
from dlgraph.engine.types import NUMPY_DTYPES

# ------------------------------------------------------------------------- phase steps


def optimizer_step(phase, opt, tensors: list[Tensor], grads, clip=None) -> list[Tensor]:
    """The update of ``tensors`` by ``grads`` (clipped to the global norm ``phase.clip``,
    read from the buffer ``clip`` where given), lazy: the tensors to realise."""
    if phase.clip:
        norm = Tensor.stack(*[(g * g).sum() for g in grads]).sum().sqrt()
        scale = ((phase.clip if clip is None else clip) / (norm + 1e-6)).minimum(1.0)
        grads = [g * scale for g in grads]
    for t, g in zip(tensors, grads, strict=True):
        t.grad = g
    return opt.schedule_step()


def set_lr(opt, lr: float | None) -> None:
    """Set the optimizer's rate (None: leave it); with data parallel it lives on every
    device."""
    if lr is None:
        return
    # straight into its buffer (an assign is a scheduled kernel: ~1 ms a step)
    if not door.write(opt.lr, np.array([lr], dtype=door.numpy_dtype(opt.lr.dtype))):
        opt.lr.assign(Tensor([lr], dtype=opt.lr.dtype).to(opt.lr.device)).realize()


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
        # the clip norm is read from a buffer too: a new value reuses the compiled step
        self.clip = Tensor([float(phase.clip)], device=self.opt.device) if phase.clip else None
        if self.clip is not None:
            state["clip"] = self.clip
        Tensor.realize(*state.values())
        kind = OPTIMIZERS[phase.optimizer.type]
        self.program = lower(self.graph, [self.graph.objective]
                             + [self.graph.grads[n] for n in self.names], params=params,
                             training=True, finish=self._update, cache=cache, state=state,
                             tag=[kind.key(phase.optimizer), bool(phase.clip), self.names])

    def _update(self, loss: Tensor, *grads: Tensor) -> list[Tensor]:
        """The optimizer step, inside the last compiled stage."""
        return [loss, *optimizer_step(self.phase, self.opt, self.tensors, grads, self.clip)]

    def __call__(self, inputs: list[Tensor], lr: float | None) -> Tensor:
        set_lr(self.opt, lr)
        with Context(TRAINING=1):
            return self.program(dict(zip(self.input_names, inputs, strict=True)), self.dims)[0]


class GradStep:
    """One phase split around an all-reduce: its loss and gradients as one compiled program
    (no update), and the optimizer update as a second one fed with (averaged) gradients."""

    def __init__(self, graph: Graph, phase, params: dict, input_names: list[str], training):
        self.phase, self.graph, self.input_names = phase, training, input_names
        self.names = phase_params(graph, phase)
        self.tensors = [params[n] for n in self.names]
        self.sizes = [math.prod(t.shape) for t in self.tensors]
        self.opt = OPTIMIZERS[phase.optimizer.type](self.tensors, phase.optimizer)
        Tensor.realize(*get_state_dict(self.opt).values())   # not captured by the update
        self.program = lower(training, [training.objective]
                             + [training.grads[n] for n in self.names], params=params,
                             training=True)
        self._update = jit(self._apply, capture_now=False)
        self.dims: dict[str, int] = {}

    def grads(self, inputs: list[Tensor]) -> np.ndarray:
        """The loss and every gradient of this shard, flat: ``[loss, *grads]``."""
        with Context(TRAINING=1):
            outs = self.program(dict(zip(self.input_names, inputs, strict=True)), self.dims)
        return np.concatenate([o.numpy().reshape(-1).astype(np.float32) for o in outs])

    def update(self, grads: np.ndarray, lr: float | None) -> None:
        """Apply the optimizer to flat (averaged) gradients."""
        set_lr(self.opt, lr)
        with Context(TRAINING=1):
            self._update(Tensor(np.ascontiguousarray(grads, np.float32)).realize())

    def _apply(self, flat: Tensor) -> None:
        grads, at = [], 0
        for t, n in zip(self.tensors, self.sizes, strict=True):
            grads.append(flat[at:at + n].reshape(t.shape))
            at += n
        Tensor.realize(*optimizer_step(self.phase, self.opt, self.tensors, grads))


def first_non_finite(graph: Graph, params, inputs: dict[str, Tensor], dims) -> str | None:
    """The first node (schedule order) whose output has a NaN or Inf (for --debug)."""
    ev = Interpreter(graph, [n for n in graph.nodes if graph[n].role == "forward"])
    inputs = {k: to_tensor(v, graph.inputs[k].dtype) if isinstance(v, np.ndarray) else v
              for k, v in inputs.items()}
    outs = ev(Ctx(True, dims), inputs, params)
    for nid, t in zip(ev.targets, outs, strict=True):
        if not np.isfinite(t.numpy()).all():
            return nid
    return None


# -------------------------------------------------------------------------- step objects


class Step:
    """The step object's interface (see the module docstring), with the one-process answers
    to what only several processes change: the whole batch, the logs as they are."""

    lead = True

    def part(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch

    def place(self, tensors: list[Tensor]) -> list[Tensor]:
        return tensors

    def feeds(self, graph: Graph, names: list[str], batch: dict[str, np.ndarray]):
        """What a step takes for a global batch: this process's part, placed."""
        return self.whole(graph, names, self.part(batch))

    def whole(self, graph: Graph, names: list[str], batch: dict[str, np.ndarray]):
        """What a program of this process takes for all of ``batch``: tensors on its devices
        (validation takes whole batches)."""
        return self.place([to_tensor(batch[k], graph.inputs[k].dtype) for k in names])

    def build(self, graph: Graph, graphs: dict, params: dict, names: list[str],
              dims: dict[str, int], echo, quiet: bool) -> list:
        raise NotImplementedError

    def take(self, runner, feeds: list[Tensor], lr: float | None) -> float:
        raise NotImplementedError

    def share(self, logs: dict[str, float]) -> dict[str, float]:
        return logs


class LocalStep(Step):
    """Steps in this process: on one device, or (``devices``) with the parameters replicated
    and each batch split over the devices of this machine. ``cache``: keep the compiled
    programs across processes (one device only)."""

    def __init__(self, devices: tuple[str, ...] = (), cache: bool = True):
        self.devices, self.cache = devices, cache

    def place(self, tensors):
        return split_batch(tensors, self.devices)

    def whole(self, graph, names, batch):
        """On one device, the arrays themselves: the program copies them into buffers it
        keeps and replays its kernels on them (engine/compile/lower.py)."""
        if self.devices:
            return super().whole(graph, names, batch)
        return [np.ascontiguousarray(batch[k], NUMPY_DTYPES[graph.inputs[k].dtype])
                for k in names]

    def build(self, graph, graphs, params, names, dims, echo, quiet):
        replicate(params.values(), self.devices)     # data parallel: a copy on every device
        store = default_cache(lambda s: echo(f"warning: {s}")) \
            if self.cache and not self.devices else None
        phases = graph.spec.train.all_phases()
        runners = [PhaseStep(graph, ph, params, names, graphs[ph.name], store) for ph in phases]
        for r in runners:
            r.dims = dims
            r.program.progress = None if quiet else echo
            r.program.label = f"the training step of '{r.phase.name}'" if len(runners) > 1 \
                else "the training step"
        return runners

    def take(self, runner, feeds, lr):
        return float(door.read(runner(feeds, lr)).reshape(-1)[0])


class ReducedStep(Step):
    """Rank ``rank`` of ``world`` processes, each with a slice of every global batch: a
    phase's gradients, their mean over the processes (``reducer.mean``), then the update, so
    that every process applies the same update. ``reducer.broadcast`` hands every process
    rank 0's value; rank 0 leads."""

    def __init__(self, reducer, rank: int, world: int):
        self.reducer, self.rank, self.world = reducer, rank, world
        self.lead = rank == 0

    def part(self, batch):
        n = len(next(iter(batch.values()))) // self.world
        return {k: v[self.rank * n:(self.rank + 1) * n] for k, v in batch.items()}

    def build(self, graph, graphs, params, names, dims, echo, quiet):
        runners = [GradStep(graph, ph, params, names, graphs[ph.name])
                   for ph in graph.spec.train.all_phases()]
        for r in runners:
            r.dims = dims
        return runners

    def take(self, runner, feeds, lr):
        mean = self.reducer.mean(runner.grads(feeds))
        if math.isfinite(mean[0]):                   # a diverged step is not applied
            runner.update(mean[1:], lr)
        return float(mean[0])

    def share(self, logs):
        return self.reducer.broadcast(logs)
