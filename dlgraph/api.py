"""The public API: thin functions over the engine.

>>> import dlgraph                                                    # doctest: +SKIP
>>> g = dlgraph.load("graphs/mlp.yaml")                               # doctest: +SKIP
>>> print(dlgraph.validate(g))                                        # doctest: +SKIP
>>> model = dlgraph.compile(g)                                        # doctest: +SKIP
>>> out = model(x=np.random.rand(8, 2).astype("float32"))            # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

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
    from dlgraph.engine.compile.lower import Model, use_device
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
    cluster; ``reduce``: the all-reduce, ``auto``, ``gloo`` or ``actor``).

    >>> res = dlgraph.train(g, data={"x": X, "y": y}, epochs=5)          # doctest: +SKIP
    """
    if options.get("workers"):      # data parallel on Ray Train (engine/train/parallel.py)
        from dlgraph.engine.train.parallel import train_workers
        options.pop("cache", None)
        return train_workers(graph, **options)
    for key in ("workers", "address", "reduce"):   # meaningful with workers only
        options.pop(key, None)
    from dlgraph.engine.train.loop import train as _train
    return _train(graph, **options)


def evaluate(graph: Graph, weights: str | Path, data=None, *, batch: int | None = None,
             device: str | None = None, quiet: bool = True):
    """Score trained ``weights``: an :class:`~dlgraph.engine.report.evaluate.Evaluation` with the
    spec's metrics (and per-class scores and a confusion matrix for a classifier, MSE, MAE
    and R² for a regression). ``data``: a .csv/.npy/.npz file, a data source (a name or a
    mapping with ``source``), or numpy arrays by name; default the spec's validation split.

    >>> print(dlgraph.evaluate(g, "runs/x/weights.safetensors").table())  # doctest: +SKIP
    """
    from dlgraph.engine.compile.lower import use_device
    from dlgraph.engine.report.evaluate import evaluate as _evaluate
    use_device(device)
    return _evaluate(graph, weights, data, batch=batch, quiet=quiet)


def predict(graph: Graph, weights: str | Path, data: str | Path, out: str | Path, *,
            batch: int | None = None, device: str | None = None, quiet: bool = True):
    """Write ``graph``'s outputs for every row of a .csv/.npy/.npz ``data`` file to ``out``
    (.csv or .npz), with class probabilities and the argmax for a classifier.

    >>> dlgraph.predict(g, "runs/x/weights.safetensors", "new.csv", "pred.csv")  # doctest: +SKIP
    """
    from dlgraph.engine.compile.lower import use_device
    from dlgraph.engine.report.predict import predict as _predict
    use_device(device)
    return _predict(graph, weights, data, out, batch=batch, quiet=quiet)


def render(graph: Graph, path: str | Path | None = None, **options) -> str:
    """The DOT text of a graph; written to ``path`` (.dot, .svg, .png, .pdf) when given."""
    from dlgraph.engine.report.render import render as _render
    return _render(graph, path, **options)


def schema() -> dict:
    """The JSON Schema of the spec format, generated from the same models that validate."""
    from dlgraph.engine.spec.models import spec_model
    s = spec_model().model_json_schema(by_alias=True)
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["title"] = "dlgraph spec, version 1"
    return s


def schema_json() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True)
