"""The report of a finished sweep: a row per trial read back from Ray Tune's results,
the best trial by the plan's metric, the results table, ``sweep.csv`` and ``curves.png``
(each trial's metric by epoch, the best in bold)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from dlgraph.engine.train.sweep_plan import Plan, show, trial_number


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


__all__ = ["SweepResult", "collect", "plot_sweep", "write_csv"]
