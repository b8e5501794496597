"""The public API: thin functions over the engine.

>>> import dlgraph                                                    # doctest: +SKIP
>>> g = dlgraph.load("graphs/mlp.yaml")                               # doctest: +SKIP
>>> print(dlgraph.validate(g))                                        # doctest: +SKIP
>>> model = dlgraph.compile(g)                                        # doctest: +SKIP
>>> out = model(x=np.random.rand(8, 2).astype("float32"))            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dlgraph.engine.graph.build import load_graph
from dlgraph.engine.graph.ir import Graph


def load(source: str | Path | dict, *, base: str | Path | None = None) -> Graph:
    """A validated, shape-inferred graph from a spec file path, a YAML/JSON string or a dict.

    ``base`` is where relative data paths start for a string or dict (default: cwd).
    """
    return load_graph(source, base=Path(base) if base else None)


def validate(source, backward: bool = False):
    """Load and check a spec (a Graph, a path, a YAML/JSON string or a dict) without running
    it: every training phase is reversed too. Returns its summary; ``backward`` describes
    the backward graphs (nodes by op, the parameters each phase differentiates).

    >>> print(dlgraph.validate("graphs/mlp.yaml", backward=True))       # doctest: +SKIP
    """
    from dlgraph.engine.report.summary import summarize
    g = source if isinstance(source, Graph) else load(source)
    return summarize(g, backward=backward)


def compile(graph: Graph, *, weights: str | Path | None = None, seed: int = 0,
            device: str | None = None, cache: bool = True):
    """A callable model on numpy arrays: ``model(x=...) -> {output: array}``.

    Parameters are initialised under ``seed``, or read from a safetensors ``weights`` file;
    a graph whose parameters (and one sample's activations) cannot fit in memory is refused.
    ``cache``: keep the compiled program across processes (see ``dlgraph run --no-cache``).
    """
    from dlgraph.engine.compile.cache import default_cache
    from dlgraph.engine.compile.device import use_device
    from dlgraph.engine.compile.model import Model
    from dlgraph.engine.spec.checks import check_fits
    check_fits(graph, 1)
    use_device(device)
    params = None
    if weights is not None:
        from dlgraph.engine.train.checkpoint import load_weights
        params = load_weights(graph, weights)
    return Model(graph, params, seed=seed, cache=default_cache() if cache else None)


def train(graph: Graph, **options):
    """Train a graph by its ``train:`` section; returns the :class:`TrainResult`.

    Options: ``out`` (run directory), ``resume``, ``device``, ``epochs``, ``steps``,
    ``quiet``, ``debug``, ``data`` (numpy arrays by name instead of the spec's data source,
    split and batched the same way), ``init_from`` (a weights file to start from),
    ``devices`` (split each batch over devices of this machine: ``["cpu:0", "cpu:1"]``),
    ``workers`` and ``address`` (data parallel on Ray Train workers, a local Ray or a
    cluster; ``reduce``: the all-reduce, ``auto``, ``gloo`` or ``actor``), ``tensorboard``
    (True, or a folder: as ``train: {log: {tensorboard: ...}}``; ``graph`` is left as it is).

    >>> res = dlgraph.train(g, data={"x": X, "y": y}, epochs=5)          # doctest: +SKIP
    """
    tensorboard = options.pop("tensorboard", None)
    if tensorboard is not None:
        graph = _with_tensorboard(graph, tensorboard)
    if options.get("workers"):      # data parallel on Ray Train (engine/train/parallel.py)
        from dlgraph.engine.train.parallel import train_workers
        options.pop("cache", None)
        return train_workers(graph, **options)
    for key in ("workers", "address", "reduce"):   # meaningful with workers only
        options.pop(key, None)
    from dlgraph.engine.train.loop import train as _train
    return _train(graph, **options)


def _with_tensorboard(graph: Graph, where: bool | str) -> Graph:
    """A copy of ``graph`` whose `train:` logs to TensorBoard at ``where`` (True: the run
    directory's ``tensorboard/``); the graph and its spec are not changed."""
    from dlgraph.engine.spec.train import LogSpec
    if graph.spec is None or graph.spec.train is None:
        return graph
    train_spec = graph.spec.train.model_copy(update={"log": LogSpec(tensorboard=where)})
    return dataclasses.replace(graph, spec=graph.spec.model_copy(update={"train": train_spec}))


def evaluate(graph: Graph, weights: str | Path, data=None, *, batch: int | None = None,
             device: str | None = None, quiet: bool = True):
    """Score trained ``weights``: an :class:`~dlgraph.engine.report.evaluate.Evaluation` with the
    spec's metrics (and per-class scores and a confusion matrix for a classifier, MSE, MAE
    and R² for a regression). ``data``: a .csv/.npy/.npz file, a data source (a name or a
    mapping with ``source``), or numpy arrays by name; default the spec's validation split.

    >>> print(dlgraph.evaluate(g, "runs/x/weights.safetensors").table())  # doctest: +SKIP
    """
    from dlgraph.engine.compile.device import use_device
    from dlgraph.engine.report.evaluate import evaluate as _evaluate
    use_device(device)
    return _evaluate(graph, weights, data, batch=batch, quiet=quiet)


def predict(graph: Graph, weights: str | Path, data: str | Path, out: str | Path, *,
            batch: int | None = None, device: str | None = None, quiet: bool = True,
            force: bool = False):
    """Write ``graph``'s outputs for every row of a .csv/.npy/.npz ``data`` file to ``out``
    (.csv or .npz), with class probabilities and the argmax for a classifier. A file at
    ``out`` is replaced only if dlgraph wrote it, or with ``force`` (as every output).

    >>> dlgraph.predict(g, "runs/x/weights.safetensors", "new.csv", "pred.csv")  # doctest: +SKIP
    """
    from dlgraph.engine.compile.device import use_device
    from dlgraph.engine.report.predict import predict as _predict
    use_device(device)
    return _predict(graph, weights, data, out, batch=batch, quiet=quiet, force=force)


def render(graph: Graph, path: str | Path | None = None, **options) -> str:
    """The DOT text of a graph; written to ``path`` (.dot, .svg, .png, .pdf) when given."""
    from dlgraph.engine.report.render import render as _render
    return _render(graph, path, **options)


def schema() -> dict:
    """The JSON Schema of the spec format, generated from the same models that validate
    (a spec, or a file of modules to include; see docs/schema.md)."""
    from dlgraph.engine.spec.models import json_schema
    return json_schema()


def schema_json() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True)


# ------------------------------------------------------------- running, reports and tools


def run_forward(graph: Graph, inputs: dict[str, Any] | None = None, *,
                weights: str | Path | None = None, batch: int = 4, seed: int = 0,
                device: str | None = None, cache: bool = True,
                where: str = "inputs=") -> dict[str, Any]:
    """Run ``graph`` forward once: ``{output name: numpy array}``.

    ``inputs``: numpy arrays by input name (checked against the inputs: names, dtypes, id
    ranges; with ``weights`` standardised as the run that wrote them did), or None for a
    seeded random batch of ``batch`` samples. ``where`` names the inputs in errors. A graph
    that cannot fit in memory at ``batch`` samples is refused before anything is built.

    >>> dlgraph.run_forward(g, {"x": X}, weights="runs/x/weights.safetensors")  # doctest: +SKIP
    {'y': array(...)}
    """
    from dlgraph.engine.spec.checks import check_fits
    check_fits(graph, batch)
    model = compile(graph, weights=weights, seed=seed, device=device, cache=cache)
    given = inputs is not None
    inputs = inputs if given else model.random_inputs(batch, seed)
    _check_inputs(graph, inputs, where)
    if given and weights is not None:   # raw data: the run's standardize.json applies
        from dlgraph.engine.io.data import scaling
        inputs = scaling.apply(inputs, scaling.stats_for(graph, weights))
    return model(**inputs)


def _check_inputs(graph: Graph, arrays: dict[str, Any], where: str) -> None:
    """Arrays must name graph inputs and fit them (no 1.7 silently read as 1)."""
    from dlgraph.engine.errors import DataError
    from dlgraph.engine.io.data.ids import check_feeds
    for name in arrays:
        if name not in graph.inputs:
            raise DataError(f"{where} names '{name}', which is not an input of the graph",
                            help=f"the inputs are: {', '.join(graph.inputs)}")
    check_feeds(graph, arrays, where)


def read_arrays(path: str | Path):
    """A .npy file's array or a .npz file's archive, every header's declared size checked
    against memory before anything is read (a located DataError otherwise)."""
    from dlgraph.engine.io.data.declared import read_npy_file
    return read_npy_file(Path(path))


def save_arrays(path: str | Path, arrays: dict[str, Any], force: bool = False) -> Path:
    """Write numpy arrays by name to an .npz file, atomically (readers see the old file or
    the whole new one); a file there is replaced only if dlgraph wrote it, or with
    ``force``. Returns the path.

    >>> dlgraph.api.save_arrays("out.npz", dlgraph.run_forward(g))     # doctest: +SKIP
    """
    import io

    import numpy as np

    from dlgraph.engine.io.outputs import write_output
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_output(path, buf.getvalue(), force=force)


def check_output(path: str | Path, *, force: bool = False) -> Path:
    """``path`` if a command may write it: nothing there, or a file dlgraph wrote and nobody
    changed since (or ``force``); else a located error saying what to do. Commands call it
    before their work, so a refusal costs nothing.

    >>> dlgraph.api.check_output("cm.png")                              # doctest: +SKIP
    """
    from dlgraph.engine.io.outputs import check_output as check
    return check(path, force=force)


def draw_confusion(evaluation, path: str | Path, force: bool = False) -> Path:
    """Draw a classifier's confusion matrix (of :func:`evaluate`) to a .png/.svg/.pdf.

    >>> dlgraph.draw_confusion(dlgraph.evaluate(g, "runs/x/weights.safetensors"), "cm.png")
    ... # doctest: +SKIP
    """
    from dlgraph.engine.report.evaluate import confusion_picture
    return confusion_picture(evaluation, path, force)


def generate_text(graph: Graph, weights: str | Path, *, prompt: str = "", length: int = 200,
                  temperature: float = 0.8, seed: int = 0, device: str | None = None) -> str:
    """Continue ``prompt`` by ``length`` tokens with a language model trained on a text
    source (``dlgraph sample``); the prompt comes first in the text returned.

    >>> dlgraph.generate_text(g, "runs/x/weights.safetensors", prompt="The ")  # doctest: +SKIP
    """
    from dlgraph.engine.report.sample import sample
    model = compile(graph, weights=weights, device=device)
    return sample(graph, model, prompt=prompt, length=length, temperature=temperature,
                  seed=seed)


def gradcheck(graph: Graph, *, batch: int = 4, seed: int = 0,
              device: str | None = None) -> list[tuple[str, float, int]]:
    """The derived gradients of every trainable parameter against central finite
    differences in float64: ``[(param, worst relative error, coordinates skipped at a
    kink)]``. Errors under about 1e-4 are agreement.

    >>> max(err for _, err, _ in dlgraph.gradcheck(g))                   # doctest: +SKIP
    3.1e-09
    """
    from dlgraph.engine.report.gradcheck import gradcheck as check
    from dlgraph.engine.spec.checks import check_fits
    check_fits(graph, batch)
    return check(graph, batch=batch, seed=seed, device=device)


def plot_curves(run_dirs: list[str | Path], path: str | Path = "curves.png",
                force: bool = False) -> Path:
    """Draw the training curves (``metrics.jsonl``) of one or more run directories into
    one picture (replacing a file there only if dlgraph wrote it, or with ``force``);
    returns its path.

    >>> dlgraph.plot_curves(["runs/mlp/20250101-120000"], "curves.png")  # doctest: +SKIP
    PosixPath('curves.png')
    """
    from dlgraph.engine.report.plot import plot_runs
    return plot_runs([Path(d) for d in run_dirs], Path(path), force)


def sweep(spec: str | Path, params: list[str] | tuple[str, ...] = (), *, echo=None,
          **settings):
    """Train the spec file once per combination of ``params`` (``"PATH=V1,V2"`` or a range
    ``"PATH=LOW:HIGH"``) or of its `sweep:` section, on Ray Tune; returns the
    :class:`SweepResult` (``.table()``, ``.best``) and writes ``sweep.csv``. ``settings``:
    ``out``, ``device``, ``address``, and the `sweep:` fields (``search``, ``samples``,
    ``metric``, ``mode``, ``concurrency``, ``cpus_per_trial``, ...; None: the spec's).
    ``echo`` receives progress lines (default: stderr).

    >>> dlgraph.sweep("graphs/mlp.yaml", ["train.optimizer.lr=0.1,0.01"])  # doctest: +SKIP
    """
    from dlgraph.engine.train.sweep import run_sweep
    from dlgraph.engine.train.sweep_plan import plan_sweep
    return run_sweep(plan_sweep(spec, params, **settings), echo=echo)


def tune(graph: Graph, *, beam: int = 2, batch: int | None = None, device: str | None = None,
         echo=print):
    """Search faster kernels for a spec once (tinygrad's BEAM search); later runs, evaluations
    and predictions of the spec at that batch size use them. Returns a ``TuneResult``.

    >>> dlgraph.tune(dlgraph.load("graphs/mlp.yaml"), beam=2).line()    # doctest: +SKIP
    """
    from dlgraph.engine.train.tune import tune as _tune
    return _tune(graph, beam=beam, batch=batch, device=device, echo=echo)


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    """The compiled-program cache: its folder, programs and bytes (or what was removed);
    ``root`` None when the cache is off, ``note`` then says why."""

    root: Path | None
    programs: int = 0
    bytes: int = 0
    note: str | None = None
    kernels: int = 0              # generated kernels kept in its folder kernels/
    kernel_bytes: int = 0


def cache_usage() -> CacheUsage:
    """Where compiled programs and generated kernels are kept between runs, how many and
    how big.

    >>> dlgraph.cache_usage().programs                                   # doctest: +SKIP
    12
    """
    store, note = _program_cache()
    if store is None:
        return CacheUsage(None, note=note)
    return CacheUsage(store.root, *store.usage(), None, *_kernel_store(store).usage())


def clear_cache() -> CacheUsage:
    """Remove every compiled program and kernel kept; returns what was removed.

    >>> dlgraph.clear_cache().bytes                                      # doctest: +SKIP
    1048576
    """
    store, note = _program_cache()
    if store is None:
        return CacheUsage(None, note=note)
    return CacheUsage(store.root, *store.clear(), None, *_kernel_store(store).clear())


def _kernel_store(programs):
    from dlgraph.engine.compile.cache import ProgramCache
    return ProgramCache(programs.root / "kernels", programs.warn)


def _program_cache():
    from dlgraph.engine.compile.cache import default_cache
    said: list[str] = []
    store = default_cache(said.append)
    return store, (said[0] if said else "the program cache is off (DLGRAPH_CACHE_DIR=off)")


@dataclasses.dataclass(frozen=True)
class OpField:
    """A field of an op: its spec name, whether a spec must give it, its default and doc."""

    name: str
    required: bool
    default: Any
    doc: str


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """An op as a spec uses it: family, primitive or composite, inputs and fields."""

    name: str
    family: str
    composite: bool
    doc: str
    inputs: str                 # its input names, e.g. "x" or "x, weight*"
    fields: tuple[OpField, ...]


def list_ops() -> list[OpInfo]:
    """Every op a spec can name, in registry order.

    >>> sorted({op.family for op in dlgraph.list_ops()})[:3]              # doctest: +SKIP
    ['activation', 'control', 'conv']
    """
    from dlgraph.ops import REGISTRY
    return [_op_info(d) for d in REGISTRY.values()]


def describe_op(name: str) -> OpInfo:
    """One op by name; an unknown name is an error that suggests the close match.

    >>> [f.name for f in dlgraph.describe_op("dense").fields]            # doctest: +SKIP
    ['out', 'bias', 'init', ...]
    """
    from dlgraph.engine.errors import DlgraphError, suggest
    from dlgraph.ops import REGISTRY
    if name not in REGISTRY:
        raise DlgraphError(f"unknown op '{name}'", help=suggest(name, REGISTRY)
                           or "`dlgraph ops` lists them")
    return _op_info(REGISTRY[name])


def _op_info(d) -> OpInfo:
    fields = tuple(OpField(f.alias or k, f.is_required(),
                           None if f.is_required() else f.get_default(call_default_factory=True),
                           f.description or "")
                   for k, f in d.fields().items())
    return OpInfo(d.name, d.family, d.composite, d.doc, d.signature(), fields)


# ------------------------------------------------------------------------------ pipelines


def _pipeline(path: str | Path, dir: str | Path | None):
    from dlgraph.engine.pipeline.plan import plan_pipeline
    from dlgraph.engine.pipeline.state import PipelineDir, default_dir
    plan = plan_pipeline(path)
    name = plan.pipeline.name
    return plan, PipelineDir(Path(dir) if dir else default_dir(name), name)


def validate_pipeline(path: str | Path):
    """Check a pipeline file before anything runs: every stage's spec, every artifact it
    consumes, the stage graph (no cycle), ``init_from`` parameters by name and shape,
    predictions against the next spec's inputs, evaluation data against the spec's inputs.
    Returns the checked plan (``.order``: the stages in run order).

    >>> dlgraph.validate_pipeline("graphs/pipelines/transfer.yaml").order  # doctest: +SKIP
    ['pretrain', 'classify', 'report', 'onnx']
    """
    from dlgraph.engine.pipeline.plan import plan_pipeline
    return plan_pipeline(path)


def run_pipeline(path: str | Path, *, dir: str | Path | None = None, jobs: int = 1,
                 address: str | None = None, force=(), device: str | None = None,
                 echo=None, verbose: bool = False):
    """Run a pipeline file's stages that are not up to date, ``jobs`` independent ones at
    once (in separate processes, or as Ray tasks with ``address``), in the pipeline
    directory ``dir`` (default runs/pipelines/<name>); ``force``: stages to re-run anyway.
    ``echo`` receives a line per stage started, skipped or ended (default: stderr);
    ``verbose``: each stage's own progress (epoch lines) on stderr too.
    Returns a ``PipelineResult``: ``.rows``, ``.table()``, ``.ok``, ``.artifact(ref)``.

    >>> res = dlgraph.run_pipeline("graphs/pipelines/transfer.yaml")    # doctest: +SKIP
    >>> res.artifact("classify.weights")                                 # doctest: +SKIP
    """
    from dlgraph.engine.pipeline.execute import run_plan
    plan, pdir = _pipeline(path, dir)
    return run_plan(plan, pdir, jobs=jobs, address=address, force=tuple(force), echo=echo,
                    device=device, verbose=verbose)


def pipeline_status(path: str | Path, *, dir: str | Path | None = None) -> dict:
    """Every stage's state, in run order: ``{stage: Status}`` with ``.state`` (up to date,
    stale, failed, interrupted, never run) and ``.why`` (e.g. 'input pretrain.weights
    changed').

    >>> {s: st.text() for s, st in dlgraph.pipeline_status(f).items()}  # doctest: +SKIP
    """
    from dlgraph.engine.pipeline.keys import pipeline_status as status
    plan, pdir = _pipeline(path, dir)
    return status(plan, pdir)


def render_pipeline(path: str | Path, output: str | Path | None = None, *,
                    dir: str | Path | None = None, force: bool = False) -> str:
    """The DOT text of a pipeline's stage graph, coloured by each stage's state, edges
    labelled with the artifacts; written to ``output`` (.dot, .svg, .png, .pdf) when given
    (a file there is replaced only if dlgraph wrote it, or with ``force``).

    >>> dlgraph.render_pipeline("graphs/pipelines/gan.yaml", "gan.svg")  # doctest: +SKIP
    """
    from dlgraph.engine.pipeline.draw import pipeline_dot, write_drawing
    from dlgraph.engine.pipeline.keys import pipeline_status as status
    plan, pdir = _pipeline(path, dir)
    text = pipeline_dot(plan, status(plan, pdir))
    if output is not None:
        write_drawing(text, Path(output), force)
    return text


def pipeline_artifact(path: str | Path, ref: str, *, dir: str | Path | None = None) -> Path:
    """The file of an artifact (``"classify.best"``) that a finished stage wrote.

    >>> w = dlgraph.pipeline_artifact("graphs/pipelines/transfer.yaml", "classify.best")
    ... # doctest: +SKIP
    """
    from dlgraph.engine.errors import DlgraphError, suggest
    plan, pdir = _pipeline(path, dir)
    stage, _, art = ref.partition(".")
    if stage not in plan.outputs or art not in plan.outputs[stage]:
        known = [f"{s}.{a}" for s in plan.order for a in plan.outputs[s]]
        raise DlgraphError(f"no artifact '{ref}' in pipeline '{plan.pipeline.name}'",
                           help=suggest(ref, known) or "artifacts: " + ", ".join(known))
    entry = pdir.entry(stage)
    if not entry or entry.get("state") != "done":
        raise DlgraphError(f"stage '{stage}' has not finished in {pdir.root}",
                           help="run the pipeline first (`dlgraph pipeline run`)")
    return pdir.root / entry["artifacts"][art]["file"]
