"""Running a pipeline: stages in the order of the stage graph, each skipped when up to
date, independent ones at once (``jobs``) in separate processes or on Ray (``address``).

A stage writes into a fresh ``stages/.<stage>.partial`` folder that becomes
``stages/<stage>`` only when it succeeded, so an interrupted or failed stage never leaves
half an artifact where a later stage would read it. The manifest records each stage as
running before it starts and done or failed after: an interrupted pipeline resumes at the
stages that did not finish; a failed stage stops its dependents and keeps what completed.
"""

from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from dlgraph.engine.errors import DlgraphError, suggest
from dlgraph.engine.pipeline.keys import artifact_path, changed, key_of, stage_parts
from dlgraph.engine.pipeline.plan import Plan
from dlgraph.engine.pipeline.stages import Job, run_job
from dlgraph.engine.pipeline.state import PipelineDir, file_hash, now


@dataclass
class Row:
    """A stage's line in the final table."""

    stage: str
    kind: str
    state: str                     # done, up to date, failed, skipped
    seconds: float | None = None
    metric: str = ""
    error: str | None = None


@dataclass
class PipelineResult:
    """What `pipeline run` did: a row per stage in run order, the pipeline directory."""

    name: str
    dir: Path
    rows: list[Row] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)   # "stage.artifact" -> file

    @property
    def ok(self) -> bool:
        return all(r.state in ("done", "up to date") for r in self.rows)

    def artifact(self, ref: str) -> Path:
        """The file of an artifact (``"classify.best"``)."""
        if ref not in self.artifacts:
            raise DlgraphError(f"no artifact '{ref}' in this run of '{self.name}'",
                               help=suggest(ref, self.artifacts) or "artifacts: "
                               + ", ".join(self.artifacts))
        return self.artifacts[ref]

    def table(self) -> str:
        head = ("stage", "kind", "state", "time", "key metric")
        cells = [(r.stage, r.kind, r.state, "" if r.seconds is None else f"{r.seconds:.1f} s",
                  r.metric) for r in self.rows]
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip()
                 for c in [head, *cells]]
        n_done = sum(r.state == "done" for r in self.rows)
        lines.append(f"{len(self.rows)} stage{'s' * (len(self.rows) != 1)}: {n_done} run, "
                     f"{sum(r.state == 'up to date' for r in self.rows)} up to date, "
                     f"{sum(r.state == 'failed' for r in self.rows)} failed, "
                     f"{sum(r.state == 'skipped' for r in self.rows)} skipped; {self.dir}")
        return "\n".join(lines)


class InProcess:
    """Stages one after another in this process."""

    def submit(self, job: Job) -> Future:
        f: Future = Future()
        f.set_result(run_job(job))
        return f

    def wait(self, handles: list) -> list:
        return list(handles)

    def result(self, handle) -> dict:
        return handle.result()

    def close(self) -> None:
        pass


class Processes(InProcess):
    """Stages in separate (spawned) processes, ``jobs`` at a time."""

    def __init__(self, jobs: int):
        import multiprocessing
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: Job) -> Future:
        return self.pool.submit(run_job, job)

    def wait(self, handles: list) -> list:
        return list(wait(handles, return_when=FIRST_COMPLETED).done)

    def result(self, handle) -> dict:
        try:
            return handle.result()
        except Exception as e:           # the process died (killed, out of memory)
            return {"error": f"the stage's process ended: {e or type(e).__name__}",
                    "seconds": 0.0}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class OnRay(InProcess):
    """Stages as Ray tasks on a cluster (or a local Ray), one CPU each. The pipeline
    directory must be on a file system the workers share."""

    def __init__(self, address: str):
        import logging

        from dlgraph.engine.train.sweep import import_ray
        self.ray = import_ray()[0]
        self.started = not self.ray.is_initialized()
        if self.started:
            try:
                self.ray.init(address=address, include_dashboard=False, log_to_driver=False,
                              logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise DlgraphError(f"cannot reach the Ray cluster at {address}: "
                                   f"{str(e).splitlines()[0]}",
                                   help="start it with `ray start --head` and pass its "
                                        "address, or 'local' for a Ray on this machine") \
                    from None
        self.task = self.ray.remote(num_cpus=1)(run_job)

    def submit(self, job: Job):
        return self.task.remote(job)

    def wait(self, handles: list) -> list:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except Exception as e:           # the worker died, or the task could not start
            return {"error": f"the stage's Ray task ended: {str(e).splitlines()[0]}",
                    "seconds": 0.0}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_job(plan: Plan, pdir: PipelineDir, name: str, device: str | None,
             verbose: bool = False) -> Job:
    """A stage's Job: its spec, the files of its inputs, its partial folder."""
    sd = plan.stage(name)
    refs = plan.refs[name]
    inputs = {fld: str(artifact_path(plan, pdir, p, a).resolve()) for fld, (p, a) in
              refs.items()}
    src = plan.specs[name]
    spec = None if "spec" in refs else (src.data, src.lines, src.file,
                                        str(src.base.resolve()))
    data = getattr(sd.model, "data", None)
    if isinstance(data, str) and "data" not in refs:
        data = str(plan.path(data).resolve())
    job = Job(name, sd.kind, sd.model, spec, inputs.pop("spec", None), inputs, data,
              str((pdir.root / "stages" / f".{name}.partial").resolve()),
              plan.outputs[name], device=device, verbose=verbose)
    if sd.kind == "train" and "init_from" in refs:
        from dlgraph.engine.pipeline.edges import init_selection
        job.params, job.rename = init_selection(plan, sd)
    return job


class Scheduler:
    """Starts each stage when its producers are done (or up to date), skips those whose
    key and artifacts are as recorded, records every outcome in the manifest."""

    def __init__(self, plan: Plan, pdir: PipelineDir, pool, jobs: int, force: set[str],
                 echo, device: str | None, verbose: bool = False):
        self.plan, self.pdir, self.pool, self.jobs = plan, pdir, pool, jobs
        self.force, self.echo, self.device, self.verbose = force, echo, device, verbose
        self.state: dict[str, str] = {}
        self.rows: dict[str, Row] = {}
        self.running: dict = {}            # handle -> (stage, parts)

    def run(self) -> list[Row]:
        pending = list(self.plan.order)
        while pending or self.running:
            pending = self._start_ready(pending)
            if self.running:
                for handle in self.pool.wait(list(self.running)):
                    name, parts = self.running.pop(handle)
                    self._finish(name, parts, self.pool.result(handle))
        return [self.rows[n] for n in self.plan.order]

    def _start_ready(self, pending: list[str]) -> list[str]:
        """Start (or skip) every stage whose producers are settled, while slots are free."""
        moved = True
        while moved:
            moved = False
            for name in list(pending):
                ups = [self.state.get(p) for p in self.plan.dag.predecessors(name)]
                if any(s in ("failed", "skipped") for s in ups):
                    bad = next(p for p in self.plan.dag.predecessors(name)
                               if self.state.get(p) in ("failed", "skipped"))
                    self._settle(name, "skipped", Row(name, self.plan.stage(name).kind,
                                                      "skipped",
                                                      error=f"'{bad}' {self.state[bad]}"))
                elif all(s in ("done", "up to date") for s in ups) and \
                        len(self.running) < self.jobs:
                    self._start(name)
                else:
                    continue
                pending.remove(name)
                moved = True
        return pending

    def _settle(self, name: str, state: str, row: Row) -> None:
        self.state[name], self.rows[name] = state, row
        word = {"skipped": f"skipped: {row.error}", "up to date": "up to date"}.get(state)
        if word:
            self.echo(f"[{name}] {word}")

    def _start(self, name: str) -> None:
        sd = self.plan.stage(name)
        parts = stage_parts(self.plan, self.pdir, name)
        entry = self.pdir.entry(name)
        if name not in self.force and entry and entry.get("state") == "done" and \
                entry.get("key") == key_of(parts) and _intact(self.pdir, entry):
            self._settle(name, "up to date", Row(name, sd.kind, "up to date",
                                                 metric=entry.get("key_metric", "")))
            return
        before = {"failed": "it failed before", "running": "it did not finish"}
        why = "forced" if name in self.force else "never run" if entry is None else \
            (changed(entry.get("parts", {}), parts) or before.get(entry.get("state"),
                                                                  "an artifact changed"))
        work = self.pdir.root / "stages" / f".{name}.partial"
        _remove(work)                                 # ours: a stage that did not finish
        self.pdir.record(name, {"state": "running", "key": key_of(parts), "parts": parts,
                                "started": now()})
        self.echo(f"[{name}] running {sd.kind} {sd.spec_field} ({why})")
        job = make_job(self.plan, self.pdir, name, self.device, self.verbose)
        self.running[self.pool.submit(job)] = (name, parts)

    def _finish(self, name: str, parts: dict, out: dict) -> None:
        sd = self.plan.stage(name)
        entry = {"state": "failed", "key": key_of(parts), "parts": parts,
                 "started": self.pdir.entry(name).get("started"), "finished": now(),
                 "seconds": round(out["seconds"], 3)}
        if "error" in out:
            entry.update(error=out["error"], traceback=out.get("traceback"))
            self.pdir.record(name, entry)
            self.echo(f"[{name}] failed after {out['seconds']:.1f} s: {out['error']}")
            self._settle(name, "failed", Row(name, sd.kind, "failed", out["seconds"],
                                             error=out["error"]))
            return
        final = self.pdir.stage_dir(name)
        _remove(final)                                # the stage's previous artifacts
        final.parent.mkdir(parents=True, exist_ok=True)
        (self.pdir.root / "stages" / f".{name}.partial").rename(final)
        m = out["metrics"]
        key = m.get("key")
        shown = f"{key} {m['metrics'][key]:.4g}" if key and isinstance(
            m["metrics"].get(key), int | float) else ""
        entry.update(state="done", metrics=m["metrics"], key_metric=shown,
                     artifacts={a: {"file": str((final / f).relative_to(self.pdir.root)),
                                    "sha256": file_hash(final / f)}
                                for a, (_, f) in self.plan.outputs[name].items()})
        self.pdir.record(name, entry)
        self.echo(f"[{name}] done in {out['seconds']:.1f} s" + (f": {shown}" if shown else ""))
        self._settle(name, "done", Row(name, sd.kind, "done", out["seconds"], shown))


def _remove(path: Path) -> None:
    """A folder of the pipeline directory gone; a link there is removed, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _intact(pdir: PipelineDir, entry: dict) -> bool:
    from dlgraph.engine.pipeline.keys import artifacts_changed
    return artifacts_changed(pdir, entry) is None


def run_plan(plan: Plan, pdir: PipelineDir, *, jobs: int = 1, address: str | None = None,
             force=(), echo=None, device: str | None = None,
             verbose: bool = False) -> PipelineResult:
    """Run a checked plan in its directory; see the module docstring. ``echo`` receives a
    line as each stage starts, is skipped or ends; ``verbose``: the stages' own progress
    (a train's epoch lines) on stderr too."""
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    for name in force:
        if name not in plan.pipeline.stages:
            raise DlgraphError(f"--force {name}: no such stage",
                               help=suggest(name, plan.pipeline.stages) or "the stages are: "
                               + ", ".join(plan.pipeline.stages))
    pdir.check_writable()
    pool = OnRay(address) if address else Processes(jobs) if jobs > 1 else InProcess()
    t0 = time.perf_counter()
    try:
        with pdir.lock():
            pdir.save()                                  # the folder is ours from now on
            rows = Scheduler(plan, pdir, pool, max(jobs, 1), set(force), echo, device,
                             verbose).run()
    finally:
        pool.close()
    res = PipelineResult(plan.pipeline.name, pdir.root, rows)
    for name in plan.order:
        entry = pdir.entry(name) or {}
        if entry.get("state") == "done":
            for art, rec in entry["artifacts"].items():
                res.artifacts[f"{name}.{art}"] = pdir.root / rec["file"]
    echo(f"pipeline {plan.pipeline.name}: {time.perf_counter() - t0:.1f} s")
    return res


__all__ = ["PipelineResult", "Row", "run_plan"]
