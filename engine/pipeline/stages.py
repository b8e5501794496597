"""Each kind of stage run through the engine functions its command uses (`dlgraph run`,
`evaluate`, `predict`, `export`, `sweep`, `sample`), writing its artifacts into one folder.

A :class:`Job` is everything a stage needs, as plain picklable data, so that it runs the
same in this process, in a separate process or on a Ray worker; :func:`run_job` returns an
outcome (metrics, or the error as text) instead of raising a dlgraph error across a process
boundary.
"""

from __future__ import annotations

import io
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dlgraph.engine.errors import DlgraphError, TrainingError
from dlgraph.engine.graph.build import build
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.spec.parse import parse_text, read_spec_text
from dlgraph.engine.spec.read import validate_data
from dlgraph.engine.train.checkpoint import atomic_write


@dataclass
class Job:
    """One stage to run: its kind and options, its spec (data, or an artifact file with
    `set:` overrides), the files it reads by field, and the folder it writes."""

    name: str
    kind: str
    model: Any                             # the stage's model (engine/pipeline/spec.py)
    spec: tuple | None                     # (data, lines, file, base) of a spec file
    spec_artifact: str | None              # or a spec artifact's path
    inputs: dict[str, str]                 # field -> artifact file
    data: Any                              # evaluate/predict: a file path, a source, None
    work: str                              # the folder the artifacts go to
    outputs: dict[str, tuple[str, str]]
    params: list[str] = field(default_factory=lambda: ["*"])   # init_from selection
    rename: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    verbose: bool = False                  # a train's epoch lines, a sweep's progress

    def say(self, line: str) -> None:
        """A line of the stage's own progress on stderr, prefixed with its name."""
        if self.verbose:
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)


def load_job_graph(job: Job) -> Graph:
    if job.spec is not None:
        data, lines, file, base = job.spec
    else:
        from dlgraph.engine.train.sweep_plan import with_override
        p = Path(job.spec_artifact)
        data, lines = parse_text(read_spec_text(p), str(p))
        for dotted, value in getattr(job.model, "set", {}).items():
            data = with_override(data, dotted, value)
        file, base = str(p), p.parent
    g = build(validate_data(data, lines, file, Path(base)), lines, file, Path(base))
    g.base = Path(base)
    return g


def run_job(job: Job) -> dict:
    """Run one stage; ``{"metrics": ..., "seconds": ...}`` or ``{"error": text}``."""
    t0 = time.perf_counter()
    try:
        from dlgraph.engine.compile.device import use_device
        use_device(job.device)
        g = load_job_graph(job)
        metrics = RUNNERS[job.kind](job, g, Path(job.work))
        for art, (_, file) in job.outputs.items():
            if not (Path(job.work) / file).is_file():
                raise DlgraphError(f"the stage wrote no {file} (its artifact '{art}')")
        return {"metrics": metrics, "seconds": time.perf_counter() - t0}
    except DlgraphError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:          # a bug: keep its traceback in the manifest
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - t0}


def _json(path: Path, obj) -> None:
    import json
    atomic_write(path, (json.dumps(obj, indent=1, default=float) + "\n").encode())


def run_train(job: Job, g: Graph, work: Path) -> dict:
    from dlgraph.engine.spec.train import InitFromSpec
    from dlgraph.engine.train.loop import train
    m = job.model
    init = None
    if "init_from" in job.inputs:
        init = InitFromSpec(path=str(Path(job.inputs["init_from"]).resolve()),
                            params=job.params, rename=job.rename)
    res = train(g, out=work, quiet=True, epochs=m.epochs, steps=m.steps, init_from=init,
                log=job.say)
    spec = yaml.safe_load((work / "spec.yaml").read_text(encoding="utf-8"))
    src = (spec.get("train") or {}).get("data")
    if isinstance(src, dict) and isinstance(src.get("path"), str):   # readable from here
        src["path"] = str((Path(g.base) / src["path"]).resolve())
    atomic_write(work / "spec.yaml", yaml.safe_dump(spec, sort_keys=False).encode())
    out = {"metrics": res.metrics, "target": res.target, "target_met": res.target_met,
           "epochs": res.epochs, "steps": res.steps, "best": res.best}
    _json(work / "metrics.json", out)
    return {"metrics": res.metrics, "key": _key_metric(g.spec.train, res.metrics)}


def _key_metric(spec, metrics: dict) -> str | None:
    """The value a run is judged by: its target's metric, else its first validation
    metric, else the validation loss, else the first value logged."""
    named = [f"val_{m.name or m.type}" for m in spec.metrics]
    for key in ([spec.target.metric] if spec.target else []) + named + ["val_loss"]:
        if key in metrics:
            return key
    return next(iter(metrics), None)


def run_evaluate(job: Job, g: Graph, work: Path) -> dict:
    from dlgraph.engine.report.evaluate import evaluate
    data = job.inputs.get("data", job.data)
    ev = evaluate(g, job.inputs["weights"], data, batch=job.model.batch, quiet=True)
    work.mkdir(parents=True, exist_ok=True)
    _json(work / "metrics.json", ev.to_json())
    key = "accuracy" if "accuracy" in ev.metrics else next(iter(ev.metrics), None)
    return {"metrics": ev.metrics, "key": key}


def run_predict(job: Job, g: Graph, work: Path) -> dict:
    from dlgraph.engine.report.predict import predict
    data = job.inputs.get("data", job.data)
    res = predict(g, job.inputs["weights"], data, work / "predictions.npz",
                  batch=job.model.batch, quiet=True)
    return {"metrics": {"rows": res.rows}, "key": "rows"}


def run_export(job: Job, g: Graph, work: Path) -> dict:
    from dlgraph.engine.io.onnx.formats import export  # not the package: its export.py shadows it
    m = job.model
    work.mkdir(parents=True, exist_ok=True)
    export(g, work / "model.onnx", weights=job.inputs.get("weights"), opset=m.opset,
           seed=m.seed)
    return {"metrics": {}, "key": None}


def run_sweep(job: Job, g: Graph, work: Path) -> dict:
    from dlgraph.engine.train.sweep import run_sweep as sweep
    from dlgraph.engine.train.sweep_plan import plan_sweep
    m = job.model
    plan = plan_sweep(Path(job.spec[2]), m.params, out=work / "sweep", search=m.search,
                      samples=m.samples, metric=m.metric, mode=m.mode,
                      concurrency=m.concurrency, cpus_per_trial=m.cpus_per_trial,
                      device=job.device)
    res = sweep(plan, echo=job.say)
    if res.best is None:
        raise TrainingError(f"no trial of the sweep reached a {res.metric}",
                            help="see the trials in " + str(res.csv))
    best = Path(res.best["run_dir"])
    shutil.copyfile(best / "weights.safetensors", work / "best.safetensors")
    final = str(work.parent / job.name)      # what the partial folder becomes
    for src, dst in ((best / "spec.yaml", "spec.yaml"), (res.csv, "sweep.csv")):
        text = Path(src).read_text(encoding="utf-8").replace(str(work), final)
        atomic_write(work / dst, text.encode())
    std = best / "standardize.json"          # the trial's scaling goes with its weights
    if std.is_file():
        shutil.copyfile(std, work / std.name)
    chosen = {p: res.best[p] for p in res.params}
    _json(work / "metrics.json", {"metric": res.metric, "mode": res.mode,
                                  "value": res.best[res.metric], "trial": res.best["trial"],
                                  "params": chosen})
    return {"metrics": {res.metric: res.best[res.metric]}, "key": res.metric}


def run_sample(job: Job, g: Graph, work: Path) -> dict:
    from dlgraph.engine.compile.cache import default_cache
    from dlgraph.engine.compile.model import Model
    from dlgraph.engine.train.checkpoint import load_weights
    m = job.model
    model = Model(g, load_weights(g, job.inputs["weights"]), seed=m.seed, cache=default_cache())
    work.mkdir(parents=True, exist_ok=True)
    if job.outputs["samples"][0] == "text":
        from dlgraph.engine.report.sample import sample
        text = sample(g, model, prompt=m.prompt, length=m.length, temperature=m.temperature,
                      seed=m.seed)
        atomic_write(work / "samples.txt", text.encode())
        return {"metrics": {"characters": len(text)}, "key": None}
    from tinygrad import Tensor
    Tensor.manual_seed(m.seed)               # the noise a generator draws
    outs = model(**model.random_inputs(m.count, m.seed))
    keep = {k: v for k, v in outs.items() if not m.outputs or k in m.outputs}
    buf = io.BytesIO()
    np.savez(buf, **keep)
    atomic_write(work / "samples.npz", buf.getvalue())
    return {"metrics": {"rows": m.count}, "key": None}


RUNNERS = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict,
           "export": run_export, "sweep": run_sweep, "sample": run_sample}


__all__ = ["Job", "RUNNERS", "load_job_graph", "run_job"]
