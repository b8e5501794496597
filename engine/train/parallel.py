"""Data-parallel training across processes and machines on Ray Train.

``dlgraph run SPEC --workers N [--address ADDR]`` starts N Ray Train workers (one per machine
or GPU), each running the same compiled dlgraph step on its slice of every global batch.
The step is split in two: the loss and the gradients (one program from the reversed graph,
:class:`GradStep`), then an all-reduce that averages the gradients over the workers, then
the optimizer update (a second compiled program fed with the averaged gradients). Every
worker starts from the same parameters (the spec's seed) and applies the same averaged
update, so all ranks hold the same weights after every step. The driver owns the run
directory: rank 0 sends it the metric rows and the final weights, every rank a digest of
its weights (checked to be equal).

The all-reduce (measured on 2 workers of one 2-core machine, docs/scale.md):

- ``gloo``: torch.distributed's gloo ring, set up by Ray Train's ``TorchConfig``; 0.95 ms
  for 10k floats, 30 ms for 1M. Needs PyTorch in every worker and open ports between them.
- ``actor``: a Ray actor gathers every rank's gradients through the object store and hands
  back their mean; 12 ms for 10k floats, 56 ms for 1M. Needs nothing but Ray, but all the
  traffic goes through one process, so it grows with the workers.

``auto`` (the default) takes gloo when PyTorch imports, else the actor. Ray is an optional
dependency, imported only here, when ``--workers`` is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from tinygrad import Context, Tensor, TinyJit
from tinygrad.nn.state import get_state_dict

from dlgraph.engine.compile.lower import bind, init_params, lower, to_tensor, use_device
from dlgraph.engine.errors import DlgraphError, Source, SpecError, TrainingError
from dlgraph.engine.graph.autodiff import phase_graphs, phase_params
from dlgraph.engine.graph.build import load_graph
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data import batches, scaling
from dlgraph.engine.report.summary import summarize
from dlgraph.engine.spec.train import OPTIMIZERS
from dlgraph.engine.train.checkpoint import atomic_write, save_tensors
from dlgraph.engine.train.loop import (
    TrainResult,
    Validator,
    _count,
    _goal,
    _metric_refs,
    _run_dir,
    _start_run_dir,
    frozen,
    lr_at,
    optimizer_step,
    set_lr,
    split_data,
)

RAY_MISSING = ("--workers trains on Ray Train, which is not installed: "
               "pip install 'dlgraph[ray]'")
REDUCERS = ("auto", "gloo", "actor")


class GradStep:
    """One phase for data parallel: its loss and gradients as one compiled program (no
    update), and the optimizer update as a second one fed with (averaged) gradients."""

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
        self._update = TinyJit(self._apply)
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


# ---------------------------------------------------------------------- the all-reduce


class Board:
    """The run's meeting point (a Ray actor): the actor all-reduce, and what the workers
    hand to the driver (rank 0's metric rows and weights, every rank's weight digest)."""

    def __init__(self, world: int):
        self.world = world
        self.parts: dict[int, dict[int, np.ndarray]] = {}
        self.ready: dict[int, asyncio.Event] = {}
        self.means: dict[int, np.ndarray] = {}
        self.left: dict[int, int] = {}
        self.posts: dict[str, list] = {}

    async def allreduce(self, step: int, rank: int, part: np.ndarray) -> np.ndarray:
        """The mean of every rank's ``part`` for ``step``, summed in rank order."""
        parts = self.parts.setdefault(step, {})
        ready = self.ready.setdefault(step, asyncio.Event())
        parts[rank] = part
        if len(parts) == self.world:
            total = parts[0].astype(np.float64)
            for r in range(1, self.world):
                total += parts[r]
            self.means[step] = (total / self.world).astype(np.float32)
            self.left[step] = self.world
            del self.parts[step]
            ready.set()
        await ready.wait()
        mean = self.means[step]
        self.left[step] -= 1
        if not self.left[step]:
            del self.means[step], self.ready[step], self.left[step]
        return mean

    def post(self, key: str, value) -> None:
        self.posts.setdefault(key, []).append(value)

    def taken(self) -> dict[str, list]:
        return self.posts


def _reducer(kind: str, board, rank: int, world: int):
    """``mean(part)`` over the workers: gloo (torch.distributed) or the board actor."""
    import ray
    if kind == "gloo":
        import torch
        import torch.distributed as dist

        def mean(part: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.array(part, np.float32))
            dist.all_reduce(t)
            return (t / world).numpy()
        return mean
    step = iter(range(1 << 62))
    return lambda part: ray.get(board.allreduce.remote(next(step), rank, part))


def pick_reducer(kind: str) -> str:
    """``auto`` -> gloo when PyTorch imports, else the actor; gloo without it is an error."""
    if kind not in REDUCERS:
        raise DlgraphError(f"unknown all-reduce '{kind}'", help=f"one of {', '.join(REDUCERS)}")
    if kind == "actor":
        return kind
    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        if kind == "gloo":
            raise DlgraphError("the gloo all-reduce needs PyTorch: pip install torch",
                               help="or use the actor all-reduce (reduce='actor')") from None
        return "actor"
    return "gloo"


# -------------------------------------------------------------------------- the workers

NAMESPACE = "dlgraph"


def _worker(config: dict) -> None:
    """The training loop of one Ray Train worker."""
    import ray
    import ray.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    board = ray.get_actor(config["board"], namespace=NAMESPACE)
    try:
        _Worker(config, rank, world, board).run()
    except DlgraphError as e:
        board.post.remote("error", str(e))
        raise


class _Worker:
    """One rank: the graph, its parameters and steps, its slice of every global batch."""

    def __init__(self, config: dict, rank: int, world: int, board):
        import ray
        use_device(config["device"])
        self.rank, self.world, self.board, self.config = rank, world, board, config
        graph = load_graph(config["spec"], base=Path(config["base"]))
        self.spec = spec = graph.spec.train
        self.graph = graph = frozen(graph, spec.freeze)
        Tensor.manual_seed(spec.seed)
        graphs = phase_graphs(graph)
        self.params = init_params(graph, spec.seed)
        self.names = list(graph.inputs)
        arrays = ray.get(config["data"])
        self.train, self.val = arrays["train"], arrays["val"]
        self.local = spec.batch // world
        dims = bind(graph, {k: v[:self.local] for k, v in self.train.items()}, "data for")
        self.steps = [GradStep(graph, ph, self.params, self.names, graphs[ph.name])
                      for ph in spec.all_phases()]
        for st in self.steps:
            st.dims = dims
        self.mean = _reducer(config["reduce"], board, rank, world)
        self.validator = self._validator() if rank == 0 and self.val else None
        self.done, self.per_epoch = 0, len(self.train[self.names[0]]) // spec.batch
        self.total = min(config["epochs"] * self.per_epoch,
                         config["steps"] or config["epochs"] * self.per_epoch)

    def _validator(self) -> Validator:
        g, spec = self.graph, self.spec
        phases = spec.all_phases()
        objectives = {("loss" if len(phases) == 1 else f"loss_{p.name}"): g.resolve(
            p.objective) for p in phases}
        v = Validator(g, objectives, _metric_refs(g, spec), self.names)
        v.dims = bind(g, {k: a[:spec.batch] for k, a in self.val.items()}, "data for")
        self.val_chunks = [([to_tensor(b[k], g.inputs[k].dtype) for k in self.names], b)
                           for b in batches(self.val, spec.batch, spec.seed, 0, shuffle=False)]
        return v

    def run(self) -> None:
        t0 = time.perf_counter()
        for epoch in range(self.config["epochs"]):
            last = self._epoch(epoch, t0)
            stop = self.rank == 0 and (self._target_met(last) or self._out_of_steps())
            if self.mean(np.array([float(stop)], np.float32))[0] > 0:   # every rank stops
                break
        digest = hashlib.sha256()
        for k in sorted(self.params):
            digest.update(k.encode() + self.params[k].numpy().tobytes())
        self.board.post.remote("digest", (self.rank, digest.hexdigest()))
        if self.rank == 0:
            self.board.post.remote("weights", {k: v.numpy() for k, v in self.params.items()})

    def _out_of_steps(self) -> bool:
        return bool(self.config["steps"] and self.done >= self.config["steps"])

    def _target_met(self, last: dict) -> bool:
        t = self.spec.target
        return bool(t and t.metric in last and t.met(last[t.metric]))

    def _epoch(self, epoch: int, t0: float) -> dict[str, float]:
        spec, lb, r = self.spec, self.local, self.rank
        losses: dict[str, list[float]] = {st.phase.name: [] for st in self.steps}
        for batch in batches(self.train, spec.batch, spec.seed, epoch):
            mine = {k: v[r * lb:(r + 1) * lb] for k, v in batch.items()}
            feeds = [to_tensor(mine[k], self.graph.inputs[k].dtype) for k in self.names]
            for st in self.steps:
                for _ in range(st.phase.repeat):
                    losses[st.phase.name].append(self._step(st, feeds, epoch))
            self.done += 1
            if self.rank == 0 and self.done == 1:
                self.board.post.remote("first", time.time())
            if self.rank == 0:
                self.board.post.remote("row", {"kind": "step", "epoch": epoch + 1,
                                               "step": self.done, "time": round(time.time(), 3),
                                               **{self._key(k): v[-1]
                                                  for k, v in losses.items()}})
            if self._out_of_steps():
                break
        last = {self._key(k): float(np.mean(v)) for k, v in losses.items() if v}
        every = spec.validation.every
        if self.validator and ((epoch + 1) % every == 0 or epoch + 1 == self.config["epochs"]
                               or self._out_of_steps()):
            last.update(self.validator(self.params, self.val_chunks))
        if self.rank == 0:
            self.board.post.remote("row", {"kind": "epoch", "epoch": epoch + 1,
                                           "step": self.done,
                                           "seconds": round(time.perf_counter() - t0, 3),
                                           "time": round(time.time(), 3), **last})
        return last

    def _step(self, st: GradStep, feeds: list[Tensor], epoch: int) -> float:
        """One phase on this rank's slice: gradients, their mean over the ranks, the update;
        returns the loss of the global batch (the mean of the slices' losses)."""
        ph = st.phase
        lr = lr_at(ph.schedule, ph.optimizer.lr, self.done, self.total) if ph.schedule \
            else None
        mean = self.mean(st.grads(feeds))
        if not math.isfinite(mean[0]):
            raise TrainingError(f"the loss of phase '{ph.name}' became {mean[0]} at step "
                                f"{self.done + 1} (epoch {epoch + 1})",
                                help="lower the learning rate, or add `clip:`")
        st.update(mean[1:], lr)
        return float(mean[0])

    def _key(self, phase: str) -> str:
        return "loss" if len(self.steps) == 1 else f"loss_{phase}"


# ---------------------------------------------------------------------------- the driver


def train_workers(graph: Graph, *, workers: int, address: str | None = None, out=None,
                  epochs: int | None = None, steps: int | None = None, quiet: bool = False,
                  log=None, data: dict | None = None, device: str | None = None,
                  reduce: str = "auto", **others) -> TrainResult:
    """Train ``graph`` data-parallel on ``workers`` Ray Train workers (see the module doc);
    the run directory is an ordinary one (spec, metrics, weights, curves).

    >>> res = dlgraph.train(g, workers=2)                               # doctest: +SKIP
    """
    t_start, wall = time.perf_counter(), time.time()
    echo = log or (lambda s: None if quiet else print(s, file=sys.stderr, flush=True))
    spec = _check_request(graph, workers, others)
    ray, trainer_cls = _import_ray()
    kind = pick_reducer(reduce)
    g = frozen(graph, spec.freeze)
    summarize(g, phase_graphs(g))                 # every check before Ray starts
    train_arrays, val_arrays, note, stats = split_data(graph, spec, data)
    run_dir = _run_dir(graph, out)
    from types import SimpleNamespace
    _start_run_dir(SimpleNamespace(run_dir=run_dir, graph=graph, history=[]))
    if stats:
        atomic_write(run_dir / scaling.STATS_FILE,
                     scaling.to_json(stats, len(next(iter(train_arrays.values())))))
    epochs = epochs or spec.epochs
    echo(f"training {graph.name} on {workers} Ray Train workers ({kind} all-reduce): "
         f"{len(next(iter(train_arrays.values()))):,} training samples{note}, batch "
         f"{spec.batch} ({spec.batch // workers} per worker), up to {_count(epochs, 'epoch')}")
    started = _start_ray(ray, address)
    try:
        if address is None:
            _check_resources(ray, workers, _gpu(device))
        posts = _fit(ray, trainer_cls, run_dir, workers, kind, {
            "spec": graph.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            "base": str(Path(graph.base or Path.cwd()).resolve()), "device": device,
            "data": ray.put({"train": train_arrays, "val": val_arrays}),
            "epochs": epochs, "steps": steps or spec.steps, "reduce": kind})
    finally:
        if started:
            ray.shutdown()
    posts["started"] = [wall]
    return _finish(graph, spec, run_dir, posts, workers, kind, t_start, echo)


def _check_request(graph: Graph, workers: int, others: dict):
    spec = graph.spec.train if graph.spec is not None else None
    if spec is None:
        raise SpecError("this spec has no `train:` section", source=Source(graph.source),
                        help="`dlgraph run` without one runs the forward pass only")
    for flag in ("resume", "init_from", "devices", "debug"):
        if others.get(flag):
            raise DlgraphError(f"--workers does not combine with --{flag.replace('_', '-')}",
                               help=f"run without --workers to use --{flag.replace('_', '-')}")
    if spec.batch % workers:
        n = workers
        raise TrainingError(f"batch {spec.batch} does not divide over {n} workers",
                            source=Source(graph.source, graph.lines.get(("train", "batch"))),
                            help=f"use a batch that is a multiple of {n}, or fewer workers")
    return spec


def _import_ray():
    """``(ray, DataParallelTrainer)``, or one line saying how to install them."""
    try:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        import ray
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:
        raise DlgraphError(RAY_MISSING) from None
    return ray, DataParallelTrainer


def _start_ray(ray, address: str | None) -> bool:
    """Join ``address`` or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    import logging
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise DlgraphError(f"cannot start {where}: {str(e).splitlines()[0]}",
                           help="start the cluster with `ray start --head` and pass its "
                                "address (host:6379), or leave --address out") from None
    return True


def _gpu(device: str | None) -> bool:
    return (device or "").lower() in ("cuda", "nv", "amd")


def _check_resources(ray, workers: int, gpu: bool) -> None:
    """A local Ray must hold one CPU (or GPU) per worker: Ray Train would wait forever."""
    kind = "GPU" if gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if have < workers:
        raise DlgraphError(f"this machine's Ray has {have} {kind}{'s' * (have != 1)}; "
                           f"{workers} workers need one each",
                           help=f"use --workers {have} or fewer, or join a larger cluster with "
                                "--address" if have else "join a cluster with --address")


def _fit(ray, trainer_cls, run_dir: Path, workers: int, kind: str, config: dict) -> dict:
    """Run the workers; returns what they posted on the board."""
    from ray.train import RunConfig, ScalingConfig
    name = f"dlgraph-{uuid.uuid4().hex[:12]}"
    board = ray.remote(Board).options(name=name, namespace=NAMESPACE, num_cpus=0,
                                      max_concurrency=max(8, 4 * workers)).remote(workers)
    config["board"] = name
    more = {}
    if kind == "gloo":
        from ray.train.torch import TorchConfig
        more["backend_config"] = TorchConfig(backend="gloo")
    trainer = trainer_cls(_worker, train_loop_config=config,
                          scaling_config=ScalingConfig(num_workers=workers,
                                                       use_gpu=_gpu(config["device"])),
                          run_config=RunConfig(name="train",
                                               storage_path=str((run_dir / "ray").resolve())),
                          **more)
    try:
        trainer.fit()
    except Exception as e:   # a worker's error, wrapped by Ray: say the worker's own words
        posts = ray.get(board.taken.remote())
        said = posts.get("error", [f"{type(e).__name__}: {str(e).splitlines()[0]}"])[0]
        raise TrainingError(f"a Ray Train worker failed: {said}",
                            help="the same spec trains in one process without --workers; "
                                 f"the workers' logs are under {run_dir / 'ray'}") from None
    finally:
        posts = ray.get(board.taken.remote())
        ray.kill(board)
    return posts


def _finish(graph: Graph, spec, run_dir: Path, posts: dict, workers: int, kind: str,
            t_start: float, echo) -> TrainResult:
    """The run directory from rank 0's rows and weights; the ranks' weights checked equal."""
    rows = posts.get("row", [])
    digests = dict(posts.get("digest", []))
    if len(digests) != workers or len(set(digests.values())) != 1:
        versions = len(set(digests.values()))
        raise TrainingError(f"the workers' weights differ after training ({versions} versions "
                            f"over {len(digests)} of {workers} ranks)",
                            help="a bug in dlgraph: please report it with the spec")
    weights = posts["weights"][0]
    atomic_write(run_dir / "workers.json", json.dumps(
        {"workers": workers, "allreduce": kind,
         "weights_sha256": [digests[r] for r in sorted(digests)]}, indent=1).encode())
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    history = [r for r in rows if r["kind"] == "epoch"]
    last = {k: v for k, v in (history[-1] if history else {}).items()
            if k not in ("kind", "epoch", "step", "seconds", "time")}
    n_steps = rows[-1]["step"] if rows else 0
    save_tensors(run_dir / "weights.safetensors", weights,
                 {"spec": graph.name, "epochs": len(history), "steps": n_steps,
                  "workers": workers})
    try:
        from dlgraph.engine.report.plot import plot_run
        plot_run(run_dir)
    except Exception as e:  # a picture must never cost a finished run
        echo(f"warning: could not draw the training curves: {e}")
    wall = posts["started"][0]
    t = spec.target
    met = t.met(last[t.metric]) if t and t.metric in last else None
    echo(f"{workers} workers ({kind} all-reduce): the same weights on every rank")
    return TrainResult(run_dir, last, _goal(t), met, len(history), n_steps,
                       time.perf_counter() - t_start,
                       posts.get("first", [wall])[0] - wall, history,
                       {k: Tensor(v) for k, v in weights.items()})
