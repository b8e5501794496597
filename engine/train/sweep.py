"""Hyperparameter sweeps on Ray Tune: every trial is one ordinary training run of a spec with
some fields overridden by dotted path (``train.optimizer.lr``, ``nodes.fc1.out``).

Every override is applied to the parsed spec and checked like a spec (loaded, shapes
inferred, training phases reversed) before Ray is started, so a bad path or value is one
located error. A sweep writes::

    runs/<name>-sweep/<timestamp>/  sweep.csv  curves.png  trial-000/ trial-001/ ...  ray/

where each ``trial-NNN/`` is an ordinary run directory (``spec.yaml`` with the overrides
applied and recorded in its ``doc``, ``trial.json`` with the overrides and the seed,
``metrics.jsonl``, weights), so ``dlgraph run trial-NNN/spec.yaml`` repeats a trial alone.
Ray is an optional dependency, imported only here, when a sweep runs.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dlgraph.engine.errors import DlgraphError, Source, SpecError, suggest
from dlgraph.engine.spec.parse import line_of, parse_text, read_spec_text
from dlgraph.engine.spec.read import validate_data
from dlgraph.engine.spec.sweep import PATH, RangeSpec, SweepSpec

#: trials of a random or optuna search when neither the spec nor --samples says
DEFAULT_SAMPLES = 8
RAY_MISSING = "sweeps run on Ray Tune, which is not installed: pip install 'dlgraph[ray]'"
OPTUNA_MISSING = "--search optuna needs Optuna, which is not installed: pip install optuna"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class Param:
    """One varied field: its dotted path, the values (or range) and where it was written."""

    path: str
    values: list | RangeSpec
    flag: bool = False                    # from --param (else from the spec's sweep: section)
    line: int | None = None

    def label(self, value: Any = None) -> str:
        """How errors name it: '--param train.optimizer.lr=abc' or 'sweep parameter ...'."""
        shown = self.values.text() if value is None and isinstance(self.values, RangeSpec) \
            else show(value)
        return f"--param {self.path}={shown}" if self.flag else \
            f"sweep parameter {self.path}: value {shown}"


@dataclass
class Plan:
    """A checked sweep, ready to run: the spec's data (without `sweep:`), the parameters,
    the search settings (the spec's `sweep:` section with the flags over it)."""

    file: str
    data: dict
    base: Path
    params: list[Param]
    sweep: SweepSpec
    metric: str
    mode: str
    out: Path
    device: str | None = None
    address: str | None = None
    logged: list[str] = field(default_factory=list)    # the values an epoch row carries

    @property
    def samples(self) -> int:
        return self.sweep.samples or (1 if self.sweep.search == "grid" else DEFAULT_SAMPLES)

    @property
    def seed_every(self) -> int:
        """A grid run several times takes the next seed each time (unless it varies
        train.seed itself): the grid's size, else 0."""
        if self.sweep.search != "grid" or self.samples == 1 or any(
                p.path == "train.seed" for p in self.params):
            return 0
        return len(grid(self.params))

    @property
    def trials(self) -> int:
        """How many trials the search makes (a grid: every combination, ``samples`` times)."""
        return self.samples * (len(grid(self.params)) if self.sweep.search == "grid" else 1)


def show(v: Any) -> str:
    """A value as it would be written on the command line: 0.01, adam, {type: cosine}."""
    if isinstance(v, str):
        return v
    return json.dumps(v) if not isinstance(v, dict | list) else \
        re.sub(r'"([^"]*)"', r"\1", json.dumps(v, separators=(", ", ": ")))


# ------------------------------------------------------------------------------ --param


def parse_param(text: str) -> Param:
    """A ``--param`` flag: ``PATH=V1,V2,...`` (YAML scalars), ``PATH=LOW:HIGH`` or
    ``PATH=log:LOW:HIGH`` (a range, for random and optuna search).

    >>> parse_param("train.optimizer.lr=0.1,0.01").values
    [0.1, 0.01]
    >>> parse_param("nodes.fc1.out=log:8:256").values.text()
    'log:8:256'
    """
    path, eq, rest = (s.strip() for s in text.partition("="))
    if not eq or not path or not rest:
        raise SpecError(f"--param '{text}' has no values",
                        help="write PATH=V1,V2,... or PATH=LOW:HIGH, e.g. "
                             "--param train.optimizer.lr=0.1,0.01")
    if not PATH.match(path):
        raise SpecError(f"--param {text}: '{path}' is not a dotted path",
                        help="name a field by its keys, e.g. train.optimizer.lr or "
                             "nodes.fc1.out")
    if path.split(".")[0] == "sweep":
        raise SpecError(f"--param {text}: a sweep cannot vary its own `sweep:` section",
                        help="set the search with the flags (--search, --samples, ...)")
    ends = rest.removeprefix("log:").split(":")
    if len(ends) == 2 and all(_NUMBER.fullmatch(e.strip()) for e in ends):
        raw = {"low": _scalar(ends[0], text), "high": _scalar(ends[1], text),
               "log": rest.startswith("log:")}
        try:
            return Param(path, RangeSpec.model_validate(raw), flag=True)
        except ValidationError as e:
            raise SpecError(f"--param {text}: {e.errors()[0]['msg'].removeprefix('Value error, ')}",
                            help="write LOW:HIGH with LOW < HIGH (log:LOW:HIGH needs LOW > 0)") \
                from None
    return Param(path, [_scalar(v, text) for v in split_values(rest)], flag=True)


def split_values(text: str) -> list[str]:
    """``a,b,[1,2],{x: 1, y: 2}`` -> the four values (commas inside brackets stay)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in [*out, cur]]


def _scalar(text: str, flag: str) -> Any:
    """A value read as YAML, the way the spec reads it (1e-3 is a number, adam a name)."""
    if not text.strip():
        raise SpecError(f"--param {flag}: an empty value", help="remove the extra comma")
    try:
        data, _ = parse_text(f"v: {text.strip()}\n", "--param")
    except SpecError as e:
        raise SpecError(f"--param {flag}: '{text.strip()}' is not a value: {e.message}",
                        help="quote a value holding ': ' or '#'") from None
    return data["v"]


# ------------------------------------------------------------------------------ overrides


def with_override(data: dict, path: str, value: Any) -> dict:
    """A copy of spec data with the field at a dotted path set to ``value``. Every key but
    the last must exist (the last may be a field left at its default); a list is indexed
    by position (``train.metrics.0.type``).

    >>> with_override({"train": {"optimizer": {"lr": 0.1}}}, "train.optimizer.lr", 0.01)
    {'train': {'optimizer': {'lr': 0.01}}}
    """
    out = copy.deepcopy(data)
    parts = path.split(".")
    here: Any = out
    for k, part in enumerate(parts):
        where = ".".join(parts[:k]) or "the top level of the spec"
        last = k == len(parts) - 1
        if isinstance(here, list):
            if not part.isdigit() or int(part) >= len(here):
                raise _no_key(f"'{where}' is a list of {len(here)}; '{part}' is not a "
                              f"position in it", f"use 0 to {len(here) - 1}")
            part = int(part)
        elif not isinstance(here, dict):
            raise _no_key(f"'{where}' is {show(here)}, which has no field '{part}'",
                          f"set '{where}' itself")
        elif part not in here and not last:
            raise _no_key(f"{where} has no '{part}'", suggest(part, here) or
                          f"it has: {', '.join(map(str, here)) or 'nothing'}; add "
                          f"'{part}' to the spec first, or set it whole as "
                          f"{'.'.join(parts[:k + 1])}={{...}}")
        if last:
            here[part] = value
        else:
            here = here[part]
    return out


def _no_key(message: str, help: str | None) -> SpecError:
    return SpecError(message, help=help)


def check_values(plan: Plan) -> None:
    """Each parameter's values (a range: both ends) applied alone to the spec and checked
    like a spec; for a grid, every combination too (up to :data:`MAX_CHECKED`)."""
    for p in plan.params:
        values = [p.values.low, p.values.high] if isinstance(p.values, RangeSpec) else p.values
        for v in values:
            check_trial(plan, {p.path: v}, p)
    if plan.sweep.search == "grid" and len(plan.params) > 1:
        combos = grid(plan.params)
        for combo in combos[:MAX_CHECKED]:
            check_trial(plan, combo, None)


#: grid combinations checked before a sweep starts (each is a load and a shape inference)
MAX_CHECKED = 64


def grid(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination of listed values, the last parameter varying fastest."""
    combos: list[dict[str, Any]] = [{}]
    for p in params:
        combos = [{**c, p.path: v} for c in combos for v in p.values]
    return combos


def check_trial(plan: Plan, overrides: dict[str, Any], param: Param | None):
    """The graph of one trial, loaded and summarised as `dlgraph validate` does; an error
    is re-raised naming the parameter (or the combination) it came from."""
    from dlgraph.engine.graph.build import load_graph
    from dlgraph.engine.report.summary import summarize
    try:
        data = plan.data
        for path, v in overrides.items():
            data = with_override(data, path, v)
        g = load_graph(data, base=plan.base)
        summarize(g)
        return g
    except DlgraphError as e:
        label = param.label(overrides[param.path]) if param else "the combination " + \
            ", ".join(f"{k}={show(v)}" for k, v in overrides.items())
        node = (f"node '{e.node}'" + (f" ({e.op})" if e.op else "") + ": ") if e.node else ""
        raise SpecError(f"{label}: {node}{e.message}", help=e.help,
                        source=Source(plan.file, param.line if param else None)) from None


# ------------------------------------------------------------------------------ the plan


def plan_sweep(spec: str | Path, flags: tuple[str, ...] | list[str] = (), *,
               out: str | Path | None = None, device: str | None = None,
               address: str | None = None, **settings) -> Plan:
    """Read a spec and its `sweep:` section, lay the flags over it and check everything a
    sweep needs before it starts. ``flags``: ``--param`` texts; ``settings``: fields of
    :class:`~.sweep_spec.SweepSpec` (``search``, ``samples``, ``metric``, ...; None: the
    spec's).

    >>> plan = plan_sweep("graphs/mlp.yaml", ["train.optimizer.lr=0.1,0.01"])  # doctest: +SKIP
    """
    file = str(spec)
    data, lines = parse_text(read_spec_text(Path(spec)), file)
    parsed = validate_data(data, lines, file, Path(spec).parent)
    if parsed.train is None:
        raise SpecError("this spec has no `train:` section; every trial of a sweep trains it",
                        source=Source(file), help="add a `train:` section")
    section = parsed.sweep or SweepSpec()
    params = {p: Param(p, v, line=line_of(lines, ("sweep", "parameters", p)))
              for p, v in section.parameters.items()}
    params.update({p.path: p for p in map(parse_param, flags)})
    merged = _merge(section, settings, Source(file))
    if not params:
        raise SpecError("nothing to sweep: no --param and no `sweep.parameters`",
                        source=Source(file), help="e.g. --param train.optimizer.lr=0.1,0.01")
    base = {k: v for k, v in data.items() if k != "sweep"}
    metric, mode = _ranking(parsed.train, merged, Source(file, line_of(lines, ("sweep",))))
    if out is not None and (Path(out) / "sweep.csv").exists():
        raise SpecError(f"{out} already holds a sweep (its sweep.csv)", source=Source(file),
                        help="pass a new --out folder, or remove that one")
    plan = Plan(file, base, Path(spec).parent, list(params.values()), merged, metric, mode,
                Path(out) if out else _sweep_dir(parsed.name), device, address)
    from dlgraph.engine.spec.checks import logged_names
    plan.logged = logged_names(parsed.train)
    _check_search(plan)
    check_values(plan)
    return plan


def _merge(section: SweepSpec, settings: dict, src: Source) -> SweepSpec:
    """The spec's `sweep:` settings with the flags (those not None) over them."""
    given = {k: v for k, v in settings.items() if v is not None}
    try:
        return SweepSpec.model_validate({**section.model_dump(exclude={"parameters"}),
                                         **given})
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(map(str, err["loc"])) or "sweep"
        raise SpecError(f"sweep setting '{name}': {err['msg'].removeprefix('Value error, ')}",
                        source=src, help="the settings are those of the `sweep:` section: "
                        + ", ".join(k for k in SweepSpec.model_fields if k != "parameters")) \
            from None


def _ranking(train, sweep: SweepSpec, src: Source) -> tuple[str, str]:
    """The metric trials are ranked by and whether lower or higher is better."""
    from dlgraph.engine.spec.checks import logged_names
    logged = logged_names(train)
    target = train.target
    metric = sweep.metric or (target.metric if target else
                              "val_loss" if "val_loss" in logged else logged[0])
    if metric not in logged:
        raise SpecError(f"sweep metric '{metric}' is never logged; logged: {', '.join(logged)}",
                        source=src, help=suggest(metric, logged) or "name a logged value")
    mode = sweep.mode or ("max" if target and target.metric == metric and target.above
                          is not None else "max" if "accuracy" in metric else "min")
    return metric, mode


def _check_search(plan: Plan) -> None:
    """What the search cannot do: a grid over a range, optuna over non-scalar values (or
    without optuna)."""
    if plan.sweep.search == "optuna":
        _need_optuna()
    for p in plan.params:
        if plan.sweep.search == "grid" and isinstance(p.values, RangeSpec):
            raise SpecError(f"{p.label()}: a grid needs listed values, not a range",
                            source=Source(plan.file, p.line),
                            help="use --search random or optuna, or list the values")
        if plan.sweep.search == "optuna" and isinstance(p.values, list) and any(
                isinstance(v, dict | list) for v in p.values):
            raise SpecError(f"{p.label(p.values[0])}: optuna chooses among plain values "
                            f"only (numbers, names, true/false)",
                            source=Source(plan.file, p.line), help="use --search grid or random")


def _sweep_dir(name: str) -> Path:
    """runs/<slug of the name>-sweep/<timestamp> (a new one if that exists)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip(".-")[:64] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d, k = Path("runs") / f"{slug}-sweep" / stamp, 1
    while d.exists():
        d, k = Path("runs") / f"{slug}-sweep" / f"{stamp}-{k}", k + 1
    return d


# ------------------------------------------------------------------------------ one trial


def trial_data(plan_data: dict, overrides: dict[str, Any], k: int, base: Path,
               sweep_dir: Path, seed_every: int = 0) -> tuple[dict, int]:
    """The spec data of trial ``k`` and its seed: the overrides applied, a relative data
    file made absolute (so the spec copy runs from anywhere), the trial noted in `doc`.
    ``seed_every``: a grid of that many trials run several times, each time with the next
    seed (trial k has the spec's seed + k // seed_every)."""
    data = plan_data
    for path, v in overrides.items():
        data = with_override(data, path, v)
    data = copy.deepcopy(data)
    train = data["train"]
    src = train.get("data")
    if isinstance(src, dict) and isinstance(src.get("path"), str) and \
            not Path(src["path"]).is_absolute():
        src["path"] = str((base / src["path"]).resolve())
    seed = train.get("seed", 0)
    if seed_every and k // seed_every:
        seed = train["seed"] = seed + k // seed_every
    note = (f"Trial {k} of the sweep in {sweep_dir}: " + ", ".join(
        f"{p}={show(v)}" for p, v in overrides.items()) + f"; seed {seed}.")
    data["doc"] = f"{data['doc'].rstrip()}\n{note}" if data.get("doc") else note
    return data, seed


def run_trial(config: dict, *, plan_data: dict, paths: list[str], base: str, sweep_dir: str,
              metric: str, device: str | None, seed_every: int = 0) -> None:
    """The function Ray Tune runs for each trial (in a worker process): one ordinary
    training run into ``<sweep_dir>/trial-NNN``, its final metrics reported to Tune."""
    from ray import tune

    from dlgraph.engine.graph.build import load_graph
    from dlgraph.engine.train.loop import train
    k = trial_number(tune.get_context().get_trial_name())
    run_dir = Path(sweep_dir) / f"trial-{k:03d}"
    overrides = {p: config[p] for p in paths}
    report: dict[str, Any] = {"trial": k, "run_dir": str(run_dir)}
    t0 = time.perf_counter()
    try:
        data, seed = trial_data(plan_data, overrides, k, Path(base), Path(sweep_dir),
                                seed_every)
        report["seed"] = seed
        run_dir.mkdir(parents=True, exist_ok=True)
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


def trial_number(name: str) -> int:
    """The number of a trial named by :class:`Numbering`: 'trial-003' -> 3 (-1: unknown)."""
    m = re.fullmatch(r"trial-(\d+)", str(name))
    return int(m.group(1)) if m else -1


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


def _need_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise DlgraphError(OPTUNA_MISSING) from None


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
    import logging
    _reachable(plan.address)
    try:
        ray.init(address=plan.address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {plan.address}" if plan.address else "a local Ray"
        raise DlgraphError(f"cannot start {where}: {str(e).splitlines()[0]}",
                           help="start the cluster with `ray start --head` and pass its "
                                "address (host:6379), or leave --address out") from None
    return True


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


# ------------------------------------------------------------------------------ results


@dataclass
class SweepResult:
    """What a sweep found: a row per trial (``trial``, ``status``, the parameters, the
    final metrics, ``epochs``, ``wall_s``, ``run_dir``), the best one, the files."""

    dir: Path
    params: list[str]
    metric: str
    mode: str
    rows: list[dict]
    seconds: float
    best: dict | None = None
    planned: int = 0                     # trials the search would make
    budget: float | None = None          # the time budget, seconds
    csv: Path | None = None
    picture: Path | None = None
    columns: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The results table, the best trial marked with '*', and the best named."""
        cols = [c for c in self.columns if c != "error"]
        cells = [[("*" if r is self.best else "") + _cell(r.get(c)) if c == "trial" else
                  _short(r[c]) if c == "run_dir" else _cell(r.get(c)) for c in cols]
                 for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        out = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
               for row in [cols, *cells]]
        out += [f"trial {r['trial']} failed: {r['error']}" for r in self.rows if r.get("error")]
        return "\n".join(out + [self.line()])

    def line(self) -> str:
        ok = sum(r["status"] == "ok" for r in self.rows)
        cut = self.planned - len(self.rows) + sum(r["status"] in ("stopped", "not started")
                                                   for r in self.rows)
        head = f"{len(self.rows)} trials ({ok} finished) in {self.seconds:.1f} s" + (
            f" (time budget of {self.budget:g} s reached: {cut} stopped or never started)"
            if cut > 0 and self.budget else "") + \
            f"; wrote {_short(self.csv)} and {_short(self.picture)}"
        if self.best is None:
            return f"{head}\nno trial reached a {self.metric}"
        b = self.best
        shown = ", ".join(f"{p}={show(b[p])}" for p in self.params)
        return (f"{head}\nbest: trial {b['trial']} ({shown}): {self.metric} "
                f"{_cell(b[self.metric])} ({self.mode} is best); run dir "
                f"{_short(b['run_dir'])}\n  re-run it alone: dlgraph run "
                f"{_short(b['run_dir'])}/spec.yaml")


def _short(path) -> str:
    """A path under the working folder as relative (runs/...), others as they are."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else show(v)


def collect(grid_result, plan: Plan, sweep_dir: Path, seconds: float) -> SweepResult:
    """The rows of a Tune ResultGrid, in trial order; the best by the plan's metric."""
    logged = plan.logged
    paths = [p.path for p in plan.params]
    rows = []
    for r in grid_result:
        m, config = r.metrics or {}, r.config or {}
        k = m.get("trial", trial_number(Path(str(getattr(r, "path", "") or "")).name))
        row = {"trial": k, "status": m.get("status", "failed" if r.error else "stopped"
                                           if config else "not started")}
        row.update({p: config.get(p) for p in paths})
        row["seed"] = m.get("seed")
        row.update({n: m.get(n, math.nan) for n in logged})
        row.update({"epochs": m.get("epochs"), "wall_s": m.get("wall_s"),
                    "run_dir": m.get("run_dir", str(sweep_dir / f"trial-{k:03d}")),
                    "error": m.get("error") or (str(r.error).splitlines()[0] if r.error
                                                else None)})
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    res = SweepResult(sweep_dir, paths, plan.metric, plan.mode, rows, seconds,
                      planned=plan.trials, budget=plan.sweep.time_budget,
                      columns=["trial", "status", *paths, "seed", *logged, "epochs", "wall_s",
                               "run_dir", "error"])
    done = [r for r in rows if r["status"] == "ok" and _finite(r.get(plan.metric))]
    if done:
        pick = min if plan.mode == "min" else max
        res.best = pick(done, key=lambda r: r[plan.metric])
    return res


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def write_csv(res: SweepResult) -> Path:
    """``sweep.csv``: one row per trial, the columns of the table (values as YAML writes
    them, a missing metric empty)."""
    path = res.dir / "sweep.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(res.columns)
        for r in res.rows:
            w.writerow(["" if r.get(c) is None or (isinstance(r.get(c), float) and
                                                   math.isnan(r[c]))
                        else r[c] if isinstance(r.get(c), int | float | str) else show(r[c])
                        for c in res.columns])
    return path


def plot_sweep(res: SweepResult, out: Path) -> Path:
    """The trials' curves of the sweep metric by epoch, one line each, the best in bold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from dlgraph.engine.report.plot import read_metrics
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in res.rows:
        path = Path(r["run_dir"]) / "metrics.jsonl"
        if not path.exists():
            continue
        pts = [(row["epoch"], row[res.metric]) for row in read_metrics(path)
               if row.get("kind") == "epoch" and _finite(row.get(res.metric))]
        if not pts:
            continue
        label = f"trial {r['trial']}: " + ", ".join(f"{p.rsplit('.', 1)[-1]}={show(r[p])}"
                                                    for p in res.params)
        best = r is res.best
        ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, lw=2.5 if best else 1.2,
                label=label + (" (best)" if best else ""), zorder=3 if best else 2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(res.metric)
    ax.set_title(f"{res.metric} of each trial ({res.mode} is best)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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


__all__ = ["Param", "Plan", "SweepResult", "check_values", "parse_param", "plan_sweep",
           "run_sweep", "search_space", "split_values", "trial_data", "with_override"]
