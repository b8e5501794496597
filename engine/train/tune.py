"""`dlgraph tune`: search better kernels for a spec once, keep them for every later run.

tinygrad's BEAM search tries several ways to write each kernel (tiling, unrolling, vector
widths) and times them on this machine; it keeps the winners in its own on-disk cache, keyed
by the kernel. Tuning compiles the spec's inference program and every training phase at the
spec's batch size with the search on, and records in the program cache folder
(``tuned.json``) that this spec was tuned: later runs, evaluations and predictions of the
spec at that batch size compile with the same BEAM width, which finds every kernel's winner
in tinygrad's cache instead of searching again. Other batch sizes make other kernels and
compile as usual (they would otherwise search at run time). The record is keyed by the
spec's inputs, nodes and modules, not its ``train:`` section: a changed learning rate keeps
its tuned kernels. ``BEAM_TIMEOUT_SEC`` (tinygrad's, default 10) bounds each candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dlgraph.engine.compile.cache import default_cache, remember_tuning, tuned_key
from dlgraph.engine.compile.device import use_device
from dlgraph.engine.compile.interpret import init_params, input_dims
from dlgraph.engine.compile.model import Model
from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.graph.autodiff import phase_graphs
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.spec.init import random_inputs
from dlgraph.engine.train.prepare import frozen
from dlgraph.engine.train.step import LocalStep

MAX_BEAM = 8


@dataclass(frozen=True)
class TuneResult:
    beam: int
    dims: dict[str, int]
    seconds: float
    programs: list[str]          # what was tuned: "inference", "training step 'train'", ...

    def line(self) -> str:
        at = ", ".join(f"{k}={v}" for k, v in self.dims.items()) or "its fixed shapes"
        return (f"tuned {' and '.join(self.programs)} with BEAM={self.beam} at {at} in "
                f"{self.seconds:.0f} s; later runs at these sizes use the tuned kernels")


def tune(graph: Graph, *, beam: int = 2, batch: int | None = None, device: str | None = None,
         echo=print) -> TuneResult:
    """Search the kernels of ``graph``'s inference program and training steps (BEAM
    ``beam``) at ``batch`` (default: the spec's training batch) and record the tuning.

    >>> dlgraph.tune(dlgraph.load("graphs/mlp.yaml"), beam=2).line()    # doctest: +SKIP
    """
    if not 1 <= beam <= MAX_BEAM:
        raise DlgraphError(f"BEAM width {beam} is out of range",
                           help=f"choose 1 to {MAX_BEAM} (2 is a good start)")
    store = default_cache(lambda s: echo(f"warning: {s}"))
    if store is None:
        raise DlgraphError("dlgraph tune records its tuning in the program cache, which is off",
                           help="unset DLGRAPH_CACHE_DIR=off, or point it at a folder")
    use_device(device)
    spec = graph.spec.train if graph.spec is not None else None
    batch = batch or (spec.batch if spec is not None else 1)
    arrays = random_inputs(graph, batch, seed=0)
    dims = input_dims(graph, arrays)
    key = tuned_key(graph)
    if key is None:
        raise DlgraphError("only a graph loaded from a spec can be tuned")
    remember_tuning(store, key, beam, dims)
    t0, done = time.perf_counter(), []
    try:
        _tune_inference(graph, arrays, store, echo)
        done.append("inference")
        if spec is not None:
            done += _tune_training(graph, arrays, echo)
    except BaseException:
        remember_tuning(store, key, None, dims)     # half a tuning would search at run time
        raise
    return TuneResult(beam, dims, time.perf_counter() - t0, done)


def _tune_inference(graph: Graph, arrays: dict, store, echo) -> None:
    model = Model(graph, cache=store, progress=echo)
    model(**{k: arrays[k] for k in model.input_names})


def _tune_training(graph: Graph, arrays: dict, echo) -> list[str]:
    """Every phase's step built and taken once, as a run builds it (``LocalStep``)."""
    spec = graph.spec.train
    graph = frozen(graph, spec.freeze)
    names, local = list(graph.inputs), LocalStep()
    runners = local.build(graph, phase_graphs(graph), init_params(graph, spec.seed), names,
                          input_dims(graph, arrays), echo, quiet=False)
    feeds = local.whole(graph, names, arrays)
    for r in runners:
        local.take(r, feeds, None)
    return [f"training step '{r.phase.name}'" for r in runners]
