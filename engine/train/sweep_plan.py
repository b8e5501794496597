"""Planning a sweep: what its trials are, checked before anything runs.

Reads the ``--param`` flags and the spec's `sweep:` section into a :class:`Plan` (the
parameters, the search, how many trials, the metric they are ranked by, the sweep
directory), applies each override to the spec by dotted path and checks every value (and
every grid combination) like a spec, so a bad path or value is one located error before
Ray starts. :func:`trial_data` makes the spec data of one trial (its overrides, its seed).
Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import time
from collections.abc import Iterator
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
        return grid_size(self.params)

    @property
    def trials(self) -> int:
        """How many trials the search makes (a grid: every combination, ``samples`` times)."""
        return self.samples * (grid_size(self.params) if self.sweep.search == "grid" else 1)


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
        for combo in itertools.islice(grid(plan.params), MAX_CHECKED):
            check_trial(plan, combo, None)


#: grid combinations checked before a sweep starts (each is a load and a shape inference)
MAX_CHECKED = 64


def grid(params: list[Param]) -> Iterator[dict[str, Any]]:
    """Every combination of listed values, the last parameter varying fastest, one at a
    time (a grid of 10^9 combinations is counted by :func:`grid_size`, never built)."""
    for values in itertools.product(*(p.values for p in params)):
        yield {p.path: v for p, v in zip(params, values, strict=True)}


def grid_size(params: list[Param]) -> int:
    """How many combinations :func:`grid` makes."""
    return math.prod(len(p.values) for p in params if isinstance(p.values, list))


def check_count(plan: Plan, lines: dict) -> None:
    """Refuse a sweep of more trials than ``max_trials`` (a typo in --samples, or a grid of
    many long lists), with the figure, before anything is built or Ray is started."""
    limit = plan.sweep.max_trials
    if plan.trials > limit:
        grid_text = " × ".join(str(len(p.values)) for p in plan.params
                               if isinstance(p.values, list))
        how = (f"a grid of {grid_text} values" + (f", run {plan.samples:,} times"
                                                  if plan.samples > 1 else "")
               if plan.sweep.search == "grid" else f"{plan.sweep.search} search")
        raise SpecError(f"this sweep would run {plan.trials:,} trials ({how}); at most "
                        f"{limit:,} are run", source=Source(plan.file, line_of(lines, (
                            "sweep", "samples")) or line_of(lines, ("sweep",))),
                        help="vary fewer values or lower --samples; raise the bound with "
                             "--max-trials N (or `sweep: {max_trials: N}`)")


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
    spec/sweep.py's SweepSpec (``search``, ``samples``, ``metric``, ...; None: the
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
    if out is not None and (any(p.is_file() for p in Path(out).parents) or Path(out).exists()
                            and (not Path(out).is_dir() or any(Path(out).iterdir()))):
        raise SpecError(f"{out} is not a new or empty folder; a sweep never writes among "
                        "files dlgraph did not write", source=Source(file),
                        help="pass a new --out folder")
    plan = Plan(file, base, Path(spec).parent, list(params.values()), merged, metric, mode,
                Path(out) if out else _sweep_dir(parsed.name), device, address)
    from dlgraph.engine.spec.checks import logged_names
    plan.logged = logged_names(parsed.train)
    _check_search(plan)
    check_count(plan, lines)
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


def _need_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise DlgraphError(OPTUNA_MISSING) from None


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


def trial_number(name: str) -> int:
    """The number of a trial named by
    :class:`~dlgraph.engine.train.sweep.Numbering`: 'trial-003' -> 3 (-1: unknown)."""
    m = re.fullmatch(r"trial-(\d+)", str(name))
    return int(m.group(1)) if m else -1


__all__ = ["DEFAULT_SAMPLES", "MAX_CHECKED", "OPTUNA_MISSING", "Param", "Plan",
           "check_count", "check_trial", "check_values", "grid", "grid_size", "parse_param",
           "plan_sweep", "show", "split_values", "trial_data", "trial_number",
           "with_override"]
