"""Training curves from the ``metrics.jsonl`` of one or more runs, drawn with matplotlib.

Each line of ``metrics.jsonl`` is one JSON object with ``epoch`` and ``step`` and metric
values: ``"kind": "step"`` lines hold per-step training losses, ``"kind": "epoch"`` lines
per-epoch summaries (``loss``, ``val_loss``, ``val_accuracy``, ``loss_generator``...).
Every numeric key is plotted; one subplot per metric family, with a metric's training and
validation values (``loss`` and ``val_loss``) on the same axes, against ``step`` (or
``epoch`` where lines have no step).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dlgraph.engine.errors import DataError, Source
from dlgraph.engine.io.outputs import check_output, write_output

SKIP = {"epoch", "step", "kind", "seconds", "time", "elapsed", "timestamp", "wall"}
HELP = "each line of metrics.jsonl is one JSON object, as `dlgraph run` writes it when training"


@dataclass
class Series:
    """One curve: a metric of one run, from step lines or from epoch lines."""

    run: str
    key: str
    kind: str                                # step | epoch
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a malformed line is a :class:`DataError` naming it.

    A last line cut short (a run still writing, or killed mid-line) is skipped.

    >>> read_metrics("runs/mlp-spirals/20250101-120000/metrics.jsonl")[0]  # doctest: +SKIP
    {'kind': 'step', 'epoch': 1, 'step': 1, 'loss': 1.09}
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such file", source=Source(str(path)),
                        help="train first: `dlgraph run SPEC` writes metrics.jsonl into its "
                             "run directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read it: {getattr(e, 'strerror', None) or e}",
                        source=Source(str(path))) from None
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break                                  # a line still being written
            raise DataError(f"not valid JSON: {e.msg} (column {e.colno})",
                            source=Source(str(path), i), help=HELP) from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {_json_type(row)}",
                            source=Source(str(path), i), help=HELP)
        rows.append((i, row))
    if not rows:
        raise DataError("no metrics: the file is empty", source=Source(str(path)),
                        help="the run wrote no step yet; plot it after its first step")
    return [r for _, r in rows]


def _json_type(v) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _metrics_file(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.suffix == ".jsonl" else p / "metrics.jsonl"


def load_series(run_dirs: list[Path]) -> tuple[list[Series], str]:
    """Every curve of every run, and the x axis they share (``step`` or ``epoch``)."""
    series: dict[tuple[str, str, str], Series] = {}
    use_steps = True
    per_run = []
    for run_dir in run_dirs:
        path = _metrics_file(run_dir)
        rows = read_metrics(path)
        per_run.append((path, rows))
        use_steps &= all(isinstance(r.get("step"), int | float) for r in rows)
    xkey = "step" if use_steps else "epoch"
    names = _run_names([p for p, _ in per_run])
    for (path, rows), name in zip(per_run, names, strict=True):
        found = False
        for i, row in enumerate(rows):
            x = row.get(xkey, i + 1)
            if not _number(x):
                continue
            kind = "step" if row.get("kind") == "step" else "epoch"
            for key, value in row.items():
                if key in SKIP or not _number(value):
                    continue
                s = series.setdefault((name, key, kind), Series(name, key, kind))
                s.xs.append(float(x))
                s.ys.append(float(value))
                found = True
        if not found:
            raise DataError("no numeric metrics to plot", source=Source(str(path)), help=HELP)
    return list(series.values()), xkey


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _run_names(paths: list[Path]) -> list[str]:
    """Short, distinct names for runs: the run folder, with parents added until distinct."""
    dirs = [p.parent.resolve() for p in paths]
    for depth in range(1, 6):
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def family(key: str) -> str:
    """The subplot a metric goes to: ``val_loss`` and ``loss_generator`` go to ``loss``.

    >>> family("val_accuracy"), family("loss_discriminator")
    ('accuracy', 'loss')
    """
    for prefix in ("val_", "train_", "test_"):
        key = key.removeprefix(prefix)
    return "loss" if key.startswith("loss_") else key


def plot_runs(run_dirs: list[Path], out: Path, force: bool = False) -> Path:
    """Draw the curves of runs into one PNG (or any format matplotlib writes); returns ``out``.
    A file already at ``out`` is replaced only if dlgraph wrote it, or with ``force``.

    >>> plot_runs([Path("runs/mlp-spirals/20250101-120000")], Path("curves.png"))  # doctest: +SKIP
    PosixPath('curves.png')
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise DataError("no run to plot", help="name one or more run directories")
    check_output(out, force=force)
    series, xkey = load_series([Path(d) for d in run_dirs])
    fams = list(dict.fromkeys(family(s.key) for s in series))
    runs = list(dict.fromkeys(s.run for s in series))
    cols = min(len(fams), 3)
    rows = math.ceil(len(fams) / cols)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    with plt.style.context("default"):
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
        keys_in = {f: list(dict.fromkeys(s.key for s in series if family(s.key) == f))
                   for f in fams}
        for ax, fam in zip(axes.flat, fams, strict=False):
            _draw_family(ax, fam, series, runs, keys_in[fam], colors, xkey)
        for ax in list(axes.flat)[len(fams):]:
            ax.set_visible(False)
        title = runs[0] if len(runs) == 1 else f"{len(runs)} runs"
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
        fig.tight_layout()
        out, buf = Path(out), io.BytesIO()
        try:
            fig.savefig(buf, dpi=120, format=out.suffix.lstrip(".").lower() or "png")
        except ValueError as e:
            raise DataError(f"cannot write the plot: {e}", source=Source(str(out))) from None
        finally:
            plt.close(fig)
    return write_output(out, buf.getvalue(), force=force)


def _draw_family(ax, fam: str, series: list[Series], runs: list[str], keys: list[str],
                 colors: list[str], xkey: str) -> None:
    """One subplot: every curve of one metric family (``loss``: loss, val_loss, loss_gen...)."""
    for s in series:
        if family(s.key) != fam:
            continue
        if len(runs) > 1:
            color = colors[runs.index(s.run) % len(colors)]
            label = f"{s.run}: {s.key}"
        else:
            color = colors[keys.index(s.key) % len(colors)]
            label = s.key
        val = s.key.startswith(("val_", "test_"))
        if s.kind == "step":
            # several runs: the epoch curves name them; per-step noise needs no entry
            ax.plot(s.xs, s.ys, color=color, lw=0.8, alpha=0.35,
                    label=f"{label} (per step)" if len(runs) == 1 else "_nolegend_")
        else:
            ax.plot(s.xs, s.ys, color=color, lw=1.8, ls="--" if val else "-",
                    marker="o" if len(s.xs) <= 30 else None, ms=3.5,
                    label=label + (" (epoch mean)" if _has_steps(series, s) else ""))
    ax.set_title(fam, fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel(xkey)
    ys = [y for s in series if family(s.key) == fam for y in s.ys if math.isfinite(y)]
    if fam == "loss" and ys and min(ys) > 0 and max(ys) / min(ys) > 100:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False)


def _has_steps(series: list[Series], s: Series) -> bool:
    return any(o.kind == "step" and o.run == s.run and o.key == s.key for o in series)


def plot_run(run_dir: str | Path) -> Path:
    """Draw one run's curves into ``run_dir/curves.png``; returns that path."""
    run_dir = Path(run_dir)
    folder = run_dir.parent if run_dir.suffix == ".jsonl" else run_dir
    return plot_runs([run_dir], folder / "curves.png", force=True)   # the run's own file


__all__ = ["plot_runs", "plot_run", "read_metrics", "load_series", "family"]
