"""Data-parallel training across processes and machines on Ray Train.

``dlgraph run SPEC --workers N [--address ADDR]`` starts N Ray Train workers (one per machine
or GPU). Each runs the training loop of one process (engine/train/loop.py) with a
:class:`~.step.ReducedStep`: its slice of every global batch, the loss and gradients (one
program from the reversed graph), an all-reduce that averages the gradients over the workers,
then the optimizer update (a second compiled program fed with the averaged gradients). Every
worker starts from the same parameters (the spec's seed) and applies the same averaged
update, so all ranks hold the same weights after every step. At the end of each epoch rank 0
validates and hands its logs to every rank, so the callbacks (early stopping, the best
checkpoint, reduce-on-plateau) take the same decisions everywhere.

What is here is only what differs from one process: the set-up of Ray and of each worker,
and the driver's side of the messages. The all-reduce and the board (engine/train/board.py):
the driver owns the run directory, and a board actor placed on the driver's machine writes
there what rank 0 writes (metric rows, checkpoints, the best checkpoint, the weights), reads
back what a resumed run needs, and keeps the lines rank 0 says (the driver prints them at the
end) and every rank's digest of its weights (checked to be equal). Ray is an optional
dependency, imported only when ``--workers`` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

from tinygrad import Tensor

from dlgraph.engine.compile.device import use_device
from dlgraph.engine.errors import DlgraphError, Source, TrainingError
from dlgraph.engine.graph.autodiff import phase_graphs
from dlgraph.engine.graph.build import load_graph
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.report.summary import summarize
from dlgraph.engine.spec.checks import check_batch_statistics
from dlgraph.engine.train.board import (
    ActorReducer,
    Board,
    BoardFiles,
    GlooReducer,
    pick_reducer,
)
from dlgraph.engine.train.checkpoint import atomic_write, load_tensors, read_checkpoint
from dlgraph.engine.train.loop import TrainResult, fit, new_run, param_shapes
from dlgraph.engine.train.prepare import frozen, split_data, train_spec
from dlgraph.engine.train.progress import count, goal
from dlgraph.engine.train.rundir import (
    CHECKPOINT,
    METRICS,
    WEIGHTS,
    claim_run_dir,
    draw_curves,
    run_dir_path,
    start_run_dir,
)
from dlgraph.engine.train.step import ReducedStep

RAY_MISSING = ("--workers trains on Ray Train, which is not installed: "
               "pip install 'dlgraph[ray]'")


# -------------------------------------------------------------------------- the workers

NAMESPACE = "dlgraph"


def _worker(config: dict) -> None:
    """One Ray Train worker: the training loop with a reduced step."""
    import ray
    import ray.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    board = ray.get_actor(config["board"], namespace=NAMESPACE)
    try:
        _train_rank(config, rank, world, board)
    except DlgraphError as e:
        board.post.remote("error", str(e))
        raise


def _train_rank(config: dict, rank: int, world: int, board) -> None:
    """Rank ``rank``'s run: the same graph, parameters and loop as one process; rank 0's
    writes and lines go to the board, every rank's weight digest too, and rank 0's result."""
    import ray
    t_start, wall = time.perf_counter(), time.time()
    use_device(config["device"])
    graph = load_graph(config["spec"], base=Path(config["base"]))
    spec = graph.spec.train
    graph = frozen(graph, spec.freeze)
    Tensor.manual_seed(spec.seed)
    arrays = ray.get(config["data"])
    files = BoardFiles(board, writes=rank == 0)
    reducer = GlooReducer(world) if config["reduce"] == "gloo" else ActorReducer(board, rank)
    run = new_run(graph, phase_graphs(graph), ReducedStep(reducer, rank, world),
                  arrays["train"], arrays["val"], run_dir=Path(config["run_dir"]),
                  files=files, epochs=config["epochs"], steps=config["steps"],
                  echo=files.say if rank == 0 else lambda s: None, quiet=True, debug=False,
                  t_start=t_start, resumed=ray.get(config["resumed"]))
    run.weights_meta = {"workers": world}
    res = fit(run)
    digest = hashlib.sha256()
    for k in sorted(run.params):
        digest.update(k.encode() + run.params[k].numpy().tobytes())
    board.post.remote("digest", (rank, digest.hexdigest()))
    if rank == 0:
        board.post.remote("result", {
            "metrics": res.metrics, "met": res.target_met, "epochs": res.epochs,
            "steps": res.steps, "history": res.history, "best": res.best,
            "first": wall + res.first_step_seconds})


# ---------------------------------------------------------------------------- the driver


def train_workers(graph: Graph, *, workers: int, address: str | None = None, out=None,
                  resume: bool = False, epochs: int | None = None, steps: int | None = None,
                  quiet: bool = False, log=None, data: dict | None = None,
                  device: str | None = None, reduce: str = "auto", **others) -> TrainResult:
    """Train ``graph`` data-parallel on ``workers`` Ray Train workers (see the module doc);
    the run directory is an ordinary one (spec, metrics, checkpoints, weights, curves), and
    ``resume`` continues one as in one process.

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
    run_dir = run_dir_path(graph, out)
    lock = claim_run_dir(run_dir, resume)   # noqa: F841 (held, by flock, while this runs)
    resumed = read_checkpoint(run_dir / CHECKPOINT, param_shapes(g)) if resume else None
    n_train = len(next(iter(train_arrays.values())))
    start_run_dir(run_dir, graph, resumed[1]["history"] if resumed else [], stats, n_train)
    epochs = epochs or spec.epochs
    if resumed:
        echo(f"resuming {run_dir} at epoch {resumed[1]['epoch'] + 1}, step "
             f"{resumed[1]['step']}")
    echo(f"training {graph.name} on {workers} Ray Train workers ({kind} all-reduce): "
         f"{n_train:,} training samples{note}, batch "
         f"{spec.batch} ({spec.batch // workers} per worker), up to {count(epochs, 'epoch')}")
    started = start_ray(ray, address)
    try:
        if address is None:
            _check_resources(ray, workers, _gpu(device))
        posts = _fit(ray, trainer_cls, run_dir, workers, kind, {
            "spec": graph.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            "base": str(Path(graph.base or Path.cwd()).resolve()), "device": device,
            "data": ray.put({"train": train_arrays, "val": val_arrays}),
            "resumed": ray.put(resumed), "run_dir": str(run_dir.resolve()),
            "epochs": epochs, "steps": steps or spec.steps, "reduce": kind})
    finally:
        if started:
            ray.shutdown()
    return _finish(graph, spec, run_dir, posts, workers, kind, (t_start, wall), echo)


def _check_request(graph: Graph, workers: int, others: dict):
    spec = train_spec(graph)
    for flag in ("init_from", "devices", "debug"):
        if others.get(flag):
            raise DlgraphError(f"--workers does not combine with --{flag.replace('_', '-')}",
                               help=f"run without --workers to use --{flag.replace('_', '-')}")
    if spec.batch % workers:
        n = workers
        raise TrainingError(f"batch {spec.batch} does not divide over {n} workers",
                            source=Source(graph.source, graph.lines.get(("train", "batch"))),
                            help=f"use a batch that is a multiple of {n}, or fewer workers")
    check_batch_statistics(graph, spec.batch // workers, f" per worker ({spec.batch} over "
                                                         f"{workers} workers)")
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
    except Exception as e:  # noqa: BLE001 (a broken Ray install fails on import in many ways)
        raise DlgraphError(f"Ray is installed but cannot be imported: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}"[:300],
                           help="reinstall it: pip install --force-reinstall "
                                "'dlgraph[ray]'") from None
    return ray, DataParallelTrainer


def start_ray(ray, address: str | None) -> bool:
    """Join ``address`` or start a local Ray; True when this call started it (and so shuts
    it down after). Whatever Ray raises while starting (a refused connection, a timeout, a
    full /tmp, a missing binary, its own exception classes) is one line, not a traceback."""
    if ray.is_initialized():
        return False
    import logging
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    except Exception as e:  # noqa: BLE001 (Ray's start-up raises many unrelated classes)
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise DlgraphError(f"cannot start {where}: {type(e).__name__}"
                           + (f": {first[:300]}" if first else ""),
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
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    name = f"dlgraph-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(Board).options(name=name, namespace=NAMESPACE, num_cpus=0,
                                      max_concurrency=max(8, 4 * workers),
                                      scheduling_strategy=here).remote(workers,
                                                                       config["run_dir"])
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
            started: tuple[float, float], echo) -> TrainResult:
    """Rank 0's lines, the ranks' weights checked equal, workers.json and the curves; the
    result as rank 0 gave it, with the weights it wrote."""
    for line in posts.get("said", []):
        echo(line)
    digests = dict(posts.get("digest", []))
    if len(digests) != workers or len(set(digests.values())) != 1:
        versions = len(set(digests.values()))
        raise TrainingError(f"the workers' weights differ after training ({versions} versions "
                            f"over {len(digests)} of {workers} ranks)",
                            help="a bug in dlgraph: please report it with the spec")
    atomic_write(run_dir / "workers.json", json.dumps(
        {"workers": workers, "allreduce": kind,
         "weights_sha256": [digests[r] for r in sorted(digests)]}, indent=1).encode())
    if not (run_dir / METRICS).is_file():
        raise TrainingError(f"the workers wrote no {METRICS} to {run_dir}",
                            help="a bug in dlgraph: please report it with the spec")
    draw_curves(run_dir, echo)
    weights, _ = load_tensors(run_dir / WEIGHTS)
    res = posts["result"][0]
    echo(f"{workers} workers ({kind} all-reduce): the same weights on every rank")
    t_start, wall = started
    return TrainResult(run_dir, res["metrics"], goal(spec.target), res["met"], res["epochs"],
                       res["steps"], time.perf_counter() - t_start, res["first"] - wall,
                       res["history"], {k: Tensor(v) for k, v in weights.items()},
                       res["best"])
