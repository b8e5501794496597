"""Running a sweep on Ray Tune: every trial is one ordinary training run of a spec with
some fields overridden by dotted path (``train.optimizer.lr``, ``nodes.fc1.out``).

The plan (every override checked like a spec before Ray is started) is made by
:mod:`~dlgraph.engine.train.sweep_plan`; this module starts Ray, runs the trials and hands
their results to :mod:`~dlgraph.engine.train.sweep_report`. A sweep writes::

    runs/<name>-sweep/<timestamp>/  sweep.csv  curves.png  trial-000/ trial-001/ ...  ray/

where each ``trial-NNN/`` is an ordinary run directory (``spec.yaml`` with the overrides
applied and recorded in its ``doc``, ``trial.json`` with the overrides and the seed,
``metrics.jsonl``, weights), so ``dlgraph run trial-NNN/spec.yaml`` repeats a trial alone.
Ray is an optional dependency, imported only here, when a sweep runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.spec.sweep import RangeSpec
from dlgraph.engine.train.parallel import start_ray
from dlgraph.engine.train.sweep_plan import Plan, trial_data, trial_number
from dlgraph.engine.train.sweep_report import SweepResult, collect, plot_sweep, write_csv

RAY_MISSING = "sweeps run on Ray Tune, which is not installed: pip install 'dlgraph[ray]'"


# ------------------------------------------------------------------------------ one trial


def run_trial(config: dict, *, plan_data: dict, paths: list[str], base: str, sweep_dir: str,
              metric: str, device: str | None, seed_every: int = 0) -> None:
    """The function Ray Tune runs for each trial (in a worker process): one ordinary
    training run into ``<sweep_dir>/trial-NNN``, its final metrics reported to Tune."""
    from ray import tune

    from dlgraph.engine.graph.build import load_graph
    from dlgraph.engine.train.loop import train
    from dlgraph.engine.train.rundir import new_run_dir
    k = trial_number(tune.get_context().get_trial_name())
    run_dir = Path(sweep_dir) / f"trial-{k:03d}"
    overrides = {p: config[p] for p in paths}
    report: dict[str, Any] = {"trial": k, "run_dir": str(run_dir)}
    t0 = time.perf_counter()
    try:
        data, seed = trial_data(plan_data, overrides, k, Path(base), Path(sweep_dir),
                                seed_every)
        report["seed"] = seed
        new_run_dir(run_dir)                 # marked as dlgraph's before trial.json goes in
        (run_dir / "trial.json").write_text(json.dumps(
            {"trial": k, "overrides": overrides, "seed": seed, "sweep": sweep_dir}, indent=2))
        res = train(load_graph(data, base=Path(base)), out=run_dir, quiet=True, device=device)
    except DlgraphError as e:
        report.update({"status": "failed", "error": str(e).splitlines()[0], metric: math.nan,
                       "wall_s": time.perf_counter() - t0})
    else:
        report.update({**res.metrics, "status": "ok", "epochs": res.epochs,
                       "steps": res.steps, "wall_s": res.seconds})
    tune.report(report)


@dataclass(frozen=True)
class Numbering:
    """Names Tune's trials trial-000, trial-001, ... in the order the search makes them,
    from the count that starts each trial's experiment tag ('3_lr=0.1'): 0-based for grid
    and random search, 1-based for a search algorithm such as Optuna."""

    first: int = 0

    def __call__(self, trial) -> str:
        count = str(trial.experiment_tag).split("_", 1)[0]
        return f"trial-{int(count) - self.first:03d}" if count.isdigit() else \
            f"trial-{trial.trial_id}"


# ------------------------------------------------------------------------------ Ray Tune


def import_ray():
    """``(ray, tune)``, or one line saying how to install them."""
    try:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # no experiment box on stdout
        import ray
        from ray import tune
    except ImportError:
        raise DlgraphError(RAY_MISSING) from None
    except Exception as e:  # noqa: BLE001 (a broken Ray install fails on import in many ways)
        raise DlgraphError(f"Ray is installed but cannot be imported: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}"[:300],
                           help="reinstall it: pip install --force-reinstall "
                                "'dlgraph[ray]'") from None
    return ray, tune


def search_space(plan: Plan, tune) -> dict[str, Any]:
    """Tune's param_space: grid_search over listed values, or choice / (log)uniform /
    (log)randint for a random or optuna search."""
    space: dict[str, Any] = {}
    for p in plan.params:
        v = p.values
        if isinstance(v, RangeSpec):
            if v.whole:
                space[p.path] = (tune.lograndint if v.log else tune.randint)(v.low, v.high + 1)
            else:
                space[p.path] = (tune.loguniform if v.log else tune.uniform)(v.low, v.high)
        else:
            space[p.path] = tune.grid_search(v) if plan.sweep.search == "grid" \
                else tune.choice(v)
    return space


def _searcher(plan: Plan):
    """Tune's search algorithm, seeded by the spec's seed so that a sweep draws the same
    trials again: its default generator for grid and random, Optuna's TPE for optuna."""
    seed = plan.data["train"].get("seed", 0)
    if plan.sweep.search != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator
        return BasicVariantGenerator(random_state=seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(metric=plan.metric, mode=plan.mode, seed=seed)


def _start_ray(ray, plan: Plan) -> bool:
    """Connect to ``plan.address``, or start a local Ray sized to the machine; True when
    this call started it (and so shuts it down after). A Ray already running is used."""
    if ray.is_initialized():
        return False
    _reachable(plan.address)
    return start_ray(ray, plan.address)


def _reachable(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that takes no connection is one clear error now,
    not minutes of Ray retrying."""
    import socket
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address or "")
    if not m:
        return                                   # no address, or 'auto' / 'local'
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
    except OSError as e:
        raise DlgraphError(f"cannot reach the Ray cluster at {address}: "
                           f"{e.strerror or e.__class__.__name__}",
                           help="start it with `ray start --head` on that machine (it prints "
                                "the address), or leave --address out for a local Ray") \
            from None


def _progress(tune, echo, metric: str):
    """A Tune callback printing one line as each trial ends."""
    class Progress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("status") == "ok":
                echo(f"trial {result['trial']}: {metric} {result.get(metric, math.nan):.4g} "
                     f"after {result['epochs']} epochs in {result['wall_s']:.1f} s")
            else:
                echo(f"trial {result.get('trial')}: failed: {result.get('error')}")
    return Progress()


def _tuner(plan: Plan, tune, sweep_dir: Path, echo):
    s = plan.sweep
    fn = tune.with_parameters(run_trial, plan_data=plan.data, paths=[p.path for p in
                              plan.params], base=str(plan.base.resolve()),
                              sweep_dir=str(sweep_dir), metric=plan.metric, device=plan.device,
                              seed_every=plan.seed_every)
    resources = {"cpu": s.cpus_per_trial, **({"gpu": s.gpus_per_trial} if s.gpus_per_trial
                                              else {})}
    numbering = Numbering(first=1 if plan.sweep.search == "optuna" else 0)
    return tune.Tuner(
        tune.with_resources(fn, resources), param_space=search_space(plan, tune),
        tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode,
                                    num_samples=plan.samples, search_alg=_searcher(plan),
                                    max_concurrent_trials=s.concurrency,
                                    time_budget_s=s.time_budget,
                                    trial_name_creator=numbering,
                                    trial_dirname_creator=numbering),
        run_config=tune.RunConfig(name="ray", storage_path=str(sweep_dir), verbose=0,
                                  callbacks=[_progress(tune, echo, plan.metric)]))


def run_sweep(plan: Plan, echo=None) -> SweepResult:
    """Run a checked plan on Ray Tune (a Ray already running in this process is used);
    write ``sweep.csv`` and ``curves.png`` into the sweep directory."""
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    ray, tune = import_ray()
    sweep_dir = plan.out.resolve()
    started = _start_ray(ray, plan)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        echo(f"sweeping {len(plan.params)} parameter{'s' * (len(plan.params) > 1)} of "
             f"{plan.file} ({plan.sweep.search}, {plan.trials} trial"
             f"{'s' * (plan.trials > 1)}), ranking by {plan.metric} ({plan.mode}); Ray has "
             f"{ray.cluster_resources().get('CPU', 0):g} CPUs; sweep dir {sweep_dir}")
        t0 = time.perf_counter()
        results = _tuner(plan, tune, sweep_dir, echo).fit()
    finally:
        if started:
            ray.shutdown()
    res = collect(results, plan, sweep_dir, time.perf_counter() - t0)
    res.csv = write_csv(res)
    try:
        res.picture = plot_sweep(res, sweep_dir / "curves.png")
    except Exception as e:  # a picture must never cost a finished sweep
        echo(f"warning: could not draw the trials' curves: {e}")
    return res


__all__ = ["RAY_MISSING", "Numbering", "import_ray", "run_sweep", "run_trial",
           "search_space"]
