"""Train every example spec in graphs/ to completion, check it, and write docs/examples.md.

    .venv/bin/python bench/examples.py                   # every graphs/*.yaml; writes the doc
    .venv/bin/python bench/examples.py --only gan,cnn    # a subset (printed; --out to write)
    .venv/bin/python bench/examples.py --cold-cache      # without tinygrad's kernel cache

Each example trains in its own fresh Python process (this file with ``--worker``), so its
time to first step is a cold start of dlgraph: spec load, graph build, compiling every
kernel. After training, some families get checks of their own, run on the trained weights:

- gan: 4096 generated points: mean and covariance against the mixture's, and every mode
  covered (enough samples within 3 std of each centre);
- char_lm: perplexity exp(val_loss) against the unigram baseline exp(entropy of the
  character distribution of the text);
- autoencoder: validation MSE against the baseline of predicting the mean training image.

An example meets its goal when the spec's own ``target`` is met (if it has one), its family
check passes (if it has one), and it finished within the time budget (3 minutes).

Then every pipeline in graphs/pipelines/ runs with ``dlgraph pipeline run`` in a fresh
process and a fresh pipeline directory, twice: it meets its goal when every stage finished
the first time within :data:`PIPELINE_BUDGET_S`, and the second run found every stage up to
date (``--only pipelines/gan`` runs one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRAPHS = ROOT / "graphs"
DEFAULT_OUT = ROOT / "docs" / "examples.md"
BUDGET_S = 180.0
PIPELINES = GRAPHS / "pipelines"
PIPELINE_BUDGET_S = 60.0        # a pipeline example is kept small: well under a minute

#: how the table describes each network (an example not listed gets its ops)
NETWORK = {
    "mlp": "MLP 2-64-64-3, ReLU",
    "lstm": "LSTM 32 + linear",
    "custom_cell": "LSTM cell as a module, `scan` over time",
    "cnn": "conv 32 3x3, pool, conv 64 3x3, pool, conv 64 3x3, dense 64, dense 10",
    "rnn": "Elman RNN 32 (tanh) + linear",
    "gru": "GRU 32 + linear",
    "autoencoder": "dense 256-128-16-128-256, MSE",
    "gan": "G: 8-128-128-2, D: 2-128-128-1, two phases",
    "transformer": "embedding 64 + learned positions, 2 encoder blocks (4 heads), linear",
    "char_lm": "embedding 32, LSTM 128, linear 58",
    "adding_varlen": "LSTM 32 over 5-40 steps, padded and masked, symbolic length",
    "digits": "MLP 64-128-10, ReLU, standardised pixels (scikit-learn's 8x8 digits)",
    "denoising": "dense 256-128-32-128-256, input noise while training only",
    "transfer/pretrain": "autoencoder 256-128-16-128-256 (the encoder for the next row)",
    "transfer/classify": "the frozen encoder (init_from, freeze), dense 16-64-4",
}

#: examples in subfolders, run after the others in this order: a later one starts from the
#: weights of the earlier one named here, given as ``train(init_from=...)`` in place of the
#: run folder its spec reads (runs/ is the user's: an earlier run there is never replaced)
PIPELINE = {"transfer/pretrain": None, "transfer/classify": "transfer/pretrain"}

# GAN check tolerances (see graphs/gan.yaml's doc)
GAN_SAMPLES = 4096
GAN_MEAN_TOL = 0.15
GAN_COV_TOL = 0.3
GAN_MODE_SHARE = 0.25    # each mode needs this fraction of its fair share of samples
# char_lm: the perplexity must be below this fraction of the unigram baseline
LM_FRACTION = 0.5
# autoencoder: the validation MSE must be below this fraction of the mean-image baseline
AE_FRACTION = 1 / 3


# =========================================================================== checks


def _val_split(g, arrays):
    """The same train/validation split as dlgraph.train makes."""
    from dlgraph.engine.io.data import split
    spec = g.spec.train
    n = len(next(iter(arrays.values())))
    n_val = min(max(round(n * spec.validation.split / spec.batch), 1),
                n // spec.batch - 1) * spec.batch
    return split(arrays, n_val / n, spec.seed)


def check_gan(g, res) -> dict:
    """Generated points vs the Gaussian mixture the spec trains on."""
    import numpy as np

    import dlgraph
    from dlgraph.engine.io.data import gaussian_mixture_centers
    data = g.spec.train.data
    model = dlgraph.compile(g, weights=res.run_dir / "weights.safetensors")
    out = next(o for o in g.outputs if o.startswith("gen"))
    s = model(x=np.zeros((GAN_SAMPLES, 2), np.float32))[out].astype(np.float64)
    centers = gaussian_mixture_centers(data.modes, data.radius)
    true_cov = (data.radius ** 2 / 2 + data.std ** 2) * np.eye(2)   # ring + per-mode noise
    mean, cov = s.mean(0), np.cov(s.T)
    dist = np.linalg.norm(s[:, None, :] - centers[None], axis=-1)
    close = dist.min(1) < 3 * data.std
    counts = np.bincount(dist.argmin(1)[close], minlength=data.modes)
    need = GAN_MODE_SHARE * GAN_SAMPLES / data.modes
    mean_err, cov_err = float(np.abs(mean).max()), float(np.abs(cov - true_cov).max())
    covered = int((counts >= need).sum())
    ok = mean_err <= GAN_MEAN_TOL and cov_err <= GAN_COV_TOL and covered == data.modes
    return {
        "ok": bool(ok),
        "goal": f"mean within {GAN_MEAN_TOL}, cov within {GAN_COV_TOL} of "
                f"{true_cov[0, 0]:.2f} I, {data.modes}/{data.modes} modes",
        "reached": f"mean error {mean_err:.3f}, cov error {cov_err:.3f}, "
                   f"{covered}/{data.modes} modes; {close.mean():.0%} of samples within "
                   f"3 std of a centre",
        "details": {"mean": mean.round(4).tolist(), "cov": cov.round(4).tolist(),
                    "mode_counts": counts.tolist(), "mode_need": need,
                    "within_3std": float(close.mean())},
    }


def check_char_lm(g, res) -> dict:
    """Validation perplexity vs the unigram baseline of the text."""
    import numpy as np

    from dlgraph.engine.io.data.text import _tokenize
    _, ids, vocab = _tokenize(g.spec.train.data, g.base)
    p = np.bincount(ids, minlength=len(vocab)) / len(ids)
    p = p[p > 0]
    unigram = float(np.exp(-(p * np.log(p)).sum()))
    ppl = math.exp(res.metrics["val_loss"])
    return {
        "ok": ppl < LM_FRACTION * unigram,
        "goal": f"perplexity < {LM_FRACTION:g} x unigram ({unigram:.1f})",
        "reached": f"perplexity {ppl:.2f} (unigram {unigram:.1f}, {len(vocab)} symbols)",
        "details": {"perplexity": ppl, "unigram_perplexity": unigram},
    }


def check_autoencoder(g, res) -> dict:
    """Validation MSE vs predicting the mean training image for every input."""
    from dlgraph.engine.io.data import load_data
    arrays = load_data(g.spec.train.data, g.base, g.spec.train.seed)
    train, val = _val_split(g, arrays)
    x_tr, x_val = train["x"].astype("float64"), val["x"].astype("float64")
    baseline = float(((x_val - x_tr.mean(0)) ** 2).mean())
    mse = res.metrics["val_mse"]
    return {
        "ok": mse < AE_FRACTION * baseline,
        "goal": f"MSE < 1/{round(1 / AE_FRACTION)} of the mean-image baseline",
        "reached": f"val MSE {mse:.4f} vs mean-image baseline {baseline:.4f} "
                   f"({baseline / mse:.1f}x lower)",
        "details": {"val_mse": mse, "mean_baseline_mse": baseline},
    }


CHECKS = {"gan": check_gan, "char_lm": check_char_lm, "autoencoder": check_autoencoder}


# =========================================================================== worker


def worker(path: Path, out: Path, steps: int | None = None, init: Path | None = None) -> dict:
    """Train one spec to completion (quietly) and check it; returns the result row.
    With ``steps``, only that many steps (the start-up with a warm program cache); ``init``:
    the weights its spec's ``init_from:`` selects from, instead of the file the spec names."""
    t0 = time.perf_counter()
    import dlgraph
    g = dlgraph.load(path)
    init_from = None
    if init is not None:
        from dlgraph.engine.spec.train import InitFromSpec
        own = g.spec.train.init_from
        init_from = InitFromSpec(path=str(init), params=own.params, rename=own.rename)
    res = dlgraph.train(g, quiet=True, out=out, steps=steps, init_from=init_from)
    if steps:
        return {"first_step_s": res.first_step_seconds}
    row = {
        "spec": name_of(path),
        "name": g.name,
        "metrics": res.metrics,
        "target": res.target,
        "target_met": res.target_met,
        "epochs": res.epochs,
        "steps": res.steps,
        "train_s": res.seconds,
        "first_step_s": res.first_step_seconds,
        "ops": [n.op for n in g.spec.nodes.values()],
    }
    check = CHECKS.get(name_of(path))
    if check is not None:
        row["check"] = check(g, res)
    row["process_s"] = time.perf_counter() - t0
    return row


# =========================================================================== parent


def run_pipeline_example(path: Path, tmp: Path) -> dict:
    """`dlgraph pipeline run` twice in fresh processes: every stage done, then up to date."""
    name = path.relative_to(GRAPHS).with_suffix("").as_posix()
    env = dict(os.environ, DLGRAPH_CACHE_DIR=str(tmp / "programs" / name.replace("/", "-")))
    cmd = [sys.executable, "-m", "dlgraph.cli.main", "pipeline", "run", str(path), "--dir",
           str(tmp / name.replace("/", "-"))]
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        runs.append((p, time.perf_counter() - t0))
    (first, wall), (second, again) = runs
    rows = [line.split() for line in first.stdout.splitlines()[1:-1]]
    states = [line.split()[2:5] for line in second.stdout.splitlines()[1:-1]]
    row = {"pipeline": name, "stages": len(rows), "wall_s": wall, "again_s": again,
           "table": "\n".join(first.stdout.strip().splitlines()[:-1] +
                               [first.stdout.strip().splitlines()[-1].rsplit(";", 1)[0]])
           if first.stdout.strip() else ""}
    if first.returncode or second.returncode:
        row["error"] = ((first.stderr or second.stderr).strip().splitlines() or ["?"])[-1]
    row["ok"] = "error" not in row and all(r[2] == "done" for r in rows) and \
        all(s[:3] == ["up", "to", "date"] for s in states) and wall <= PIPELINE_BUDGET_S
    return row


def missing_data(path: Path) -> str | None:
    """Why a pipeline cannot run here: a data file one of its specs reads is missing."""
    import dlgraph
    try:
        dlgraph.validate_pipeline(path)
    except dlgraph.DlgraphError as e:
        if "does not exist" in str(e):
            return str(e).splitlines()[0]
    return None


def run_pipelines(paths: list[Path], tmp: Path) -> list[dict]:
    rows = []
    for path in paths:
        missing = missing_data(path)
        if missing:                                  # e.g. scripts/export_digits.py
            print(f"{name_of(path)}: skipped, {missing}", file=sys.stderr, flush=True)
            continue
        print(f"{name_of(path)} ...", file=sys.stderr, flush=True)
        row = run_pipeline_example(path, tmp)
        rows.append(row)
        print(f"  {'met' if row['ok'] else 'NOT met'}: {row['stages']} stages in "
              f"{row['wall_s']:.0f} s, again in {row['again_s']:.1f} s"
              + (f"; error: {row['error']}" if "error" in row else ""),
              file=sys.stderr, flush=True)
    return rows


def pipeline_report(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [f"## Pipelines: {sum(r['ok'] for r in rows)} of {len(rows)} met", "",
             "Each pipeline of `graphs/pipelines/` run by `dlgraph pipeline run` in a fresh "
             "process and pipeline directory, then again: met when every stage finished "
             f"within {PIPELINE_BUDGET_S:.0f} s and the second run found every stage up to "
             "date.", "",
             "| pipeline | stages | first run | second run | met? |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `graphs/{r['pipeline']}.yaml` | {r['stages']} | {r['wall_s']:.1f} s "
                     f"| {r['again_s']:.1f} s | {'yes' if r['ok'] else 'no'} |")
    for r in rows:
        lines += ["", f"`graphs/{r['pipeline']}.yaml`:", "", "```", r["table"]
                  or r.get("error", "?"), "```"]
    return "\n".join(lines + [""])


def machine() -> dict:
    from run import cpu_model  # bench/run.py, beside this script
    cpu = cpu_model(platform.processor() or platform.machine())
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} "
            f"{platform.release()}", "python": platform.python_version(),
            "load": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_one(path: Path, opts, tmp: Path, again: bool = False) -> dict:
    """One example in a fresh process; ``again``: one step more, with the program cache
    the first run filled (an empty cache directory per example, so that no example starts
    from programs another one compiled)."""
    env = dict(os.environ, DLGRAPH_CACHE_DIR=str(tmp / "programs" / path.stem))
    if opts.cold_cache:
        env["CACHELEVEL"] = "0"
    stem = name_of(path).replace("/", "-") + "-again" * again
    result = tmp / f"{stem}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path),
           "--run-dir", str(tmp / stem), "--result", str(result)]
    if PIPELINE.get(name_of(path)):                     # the earlier example's weights
        cmd += ["--init", str(tmp / PIPELINE[name_of(path)].replace("/", "-")
                              / "weights.safetensors")]
    cmd += ["--steps", "1"] if again else []
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=opts.timeout)
        err = None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired:
        err = f"timed out after {opts.timeout:.0f} s"
    wall = time.perf_counter() - t0
    if err is not None or not result.exists():
        return {"spec": name_of(path), "error": err or "no result", "wall_s": wall}
    row = json.loads(result.read_text())
    row["wall_s"] = wall
    return row


def name_of(spec: Path) -> str:
    """'mlp' for graphs/mlp.yaml, 'transfer/classify' for graphs/transfer/classify.yaml."""
    return spec.resolve().relative_to(GRAPHS).with_suffix("").as_posix()


def dlgraph_data_path(spec: Path) -> Path | None:
    """The data file a spec reads (None for a built-in source)."""
    import yaml
    data = (yaml.safe_load(spec.read_text(encoding="utf-8")).get("train") or {}).get("data")
    return spec.parent / data["path"] if isinstance(data, dict) and "path" in data else None


def met(row: dict) -> bool:
    if "error" in row:
        return False
    ok = row["target_met"] is not False and row["train_s"] <= BUDGET_S
    if row["target"] is None and "check" not in row:
        ok = False                          # nothing says what it should reach
    return ok and row.get("check", {}).get("ok", True)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def table(rows: list[dict]) -> str:
    lines = ["| spec | network | target | reached | met? | wall time | first step | "
             "first step, cached |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"`graphs/{r['spec']}.yaml`"
        net = NETWORK.get(r["spec"]) or ", ".join(dict.fromkeys(r.get("ops", [])))
        if "error" in r:
            lines.append(f"| {name} | {net} | | error: {r['error']} | no | "
                         f"{r['wall_s']:.0f} s | | |")
            continue
        goals, reached = [], []
        if r["target"]:
            goals.append(f"{r['target']}")
            metric = r["target"].split()[0]
            if metric in r["metrics"]:
                reached.append(f"{metric} {_fmt(r['metrics'][metric])}")
        if "check" in r:
            goals.append(r["check"]["goal"])
            reached.append(r["check"]["reached"])
        reached.append(f"({r['epochs']} epoch{'s' * (r['epochs'] != 1)}, {r['steps']:,} steps)")
        lines.append(f"| {name} | {net} | {'; '.join(goals)} | {'; '.join(reached)} | "
                     f"{'yes' if met(r) else '**no**'} | {r['train_s']:.0f} s | "
                     f"{r['first_step_s']:.1f} s | {_cached(r)} |")
    return "\n".join(lines) + "\n"


def _cached(row: dict) -> str:
    v = row.get("first_step_cached_s")
    return "" if v is None else f"{v:.1f} s"


def report(rows: list[dict], mach: dict, opts, wall: float, command: str) -> str:
    n_met = sum(met(r) for r in rows)
    return "\n".join([
        "# Examples: what each spec in graphs/ learns, and how fast",
        "",
        "<!-- generated by bench/examples.py -->",
        "",
        "Every spec in `graphs/` is runnable as is, on a built-in offline data source, and "
        "reaches the target its `doc` states. The comments in each spec's `train.data` show "
        "the one-line change that reads real files instead (CIFAR-10 batches, MNIST IDX "
        "files, a text file, CSV or NumPy arrays).",
        "",
        f"Reproduce: `{command}` (took {wall / 60:.1f} min here). Each example trains in a "
        "fresh process with `dlgraph.train` and stops early once its target is met.",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['os']}, Python "
        f"{mach['python']}; tinygrad device: CPU. On-disk kernel cache: "
        f"{'off (CACHELEVEL=0)' if opts.cold_cache else 'on'}. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in mach['load'] or [])} (a shared machine: other jobs "
        "ran alongside, so times are upper bounds).",
        "",
        f"## Results: {n_met} of {len(rows)} met",
        "",
        table(rows),
        "- **target**: the spec's `train.target` (validation metrics, computed after each "
        "epoch on the held-out split) and, for some families, a check of the trained model "
        "made by `bench/examples.py` (below).",
        "- **met?**: the target and the check are met, within the budget of "
        f"{BUDGET_S / 60:.0f} minutes of training wall time.",
        "- **wall time**: `dlgraph.train` from start to finish: data generation, graph "
        "reversal, compiling, training, validation, checkpoints. **first step**: from the "
        "start of `dlgraph.train` to the end of the first training step in a fresh process "
        "(tinygrad's kernel cache warm, the program cache empty): most of it compiling. "
        "**first step, cached**: the same in a second fresh process with one step, the "
        "compiled programs loaded from the program cache the first run filled.",
        "",
        "## Family checks",
        "",
        f"- **gan**: {GAN_SAMPLES} points drawn from the trained generator "
        "(`dlgraph.compile(g, weights=run_dir / 'weights.safetensors')`, output `gen_out`). "
        f"Their mean must be within {GAN_MEAN_TOL} of (0, 0) and their covariance within "
        f"{GAN_COV_TOL} (every entry) of the mixture's, (radius^2 / 2 + std^2) I. A mode is "
        "covered when at least "
        f"{GAN_MODE_SHARE:.0%} of its fair share of the samples lies within 3 std of its "
        "centre; every mode must be covered.",
        "- **char_lm**: perplexity = exp(validation loss in nats per character); the unigram "
        "baseline is exp(entropy of the character frequencies of the whole text), the "
        f"perplexity of a model that ignores context. It must be under {LM_FRACTION:g} x "
        "the baseline. Validation windows come from the same text as training windows.",
        "- **autoencoder**: the baseline predicts the mean training image for every input; "
        "its validation MSE is measured on the same split. The autoencoder's validation MSE "
        f"must be under 1/{round(1 / AE_FRACTION)} of it.",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated spec names (paths under graphs/ without "
                    ".yaml), e.g. gan,cnn,transfer/pretrain")
    ap.add_argument("--out", type=Path, help=f"markdown file to write (default: "
                    f"{DEFAULT_OUT.relative_to(ROOT)} when running every example)")
    ap.add_argument("--cold-cache", action="store_true",
                    help="CACHELEVEL=0: compile every kernel anew in each example")
    ap.add_argument("--timeout", type=float, default=900.0, help="per example, seconds")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--init", type=Path, help=argparse.SUPPRESS)
    opts = ap.parse_args()

    if opts.worker:
        row = worker(opts.worker, opts.run_dir, opts.steps, opts.init)
        opts.result.write_text(json.dumps(row))
        return 0

    paths = sorted(GRAPHS.glob("*.yaml")) + [GRAPHS / f"{n}.yaml" for n in PIPELINE]
    pipelines = sorted(PIPELINES.glob("*.yaml"))
    if opts.only:
        wanted = opts.only.split(",")
        unknown = set(wanted) - {name_of(p) for p in paths + pipelines}
        if unknown:
            ap.error(f"no such example: {', '.join(sorted(unknown))}")
        paths = [p for p in paths if name_of(p) in wanted]
        pipelines = [p for p in pipelines if name_of(p) in wanted]
    out = opts.out or (None if opts.only else DEFAULT_OUT)
    command = " ".join(["python", "bench/examples.py"] + sys.argv[1:])
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlgraph-examples-") as tmp:
        for path in paths:
            data = dlgraph_data_path(path)
            if data is not None and not data.exists():     # e.g. scripts/export_digits.py
                print(f"{name_of(path)}: skipped, {data.relative_to(ROOT)} is missing (the spec's "
                      "doc names the script that makes it)", file=sys.stderr, flush=True)
                continue
            print(f"{name_of(path)} ...", file=sys.stderr, flush=True)
            row = run_one(path, opts, Path(tmp))
            if "error" not in row:
                again = run_one(path, opts, Path(tmp), again=True)
                row["first_step_cached_s"] = again.get("first_step_s")
            rows.append(row)
            if "error" in row:
                print(f"  error: {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"  {'met' if met(row) else 'NOT met'}: "
                      + ", ".join(f"{k} {_fmt(v)}" for k, v in row["metrics"].items())
                      + (f"; {row['check']['reached']}" if "check" in row else "")
                      + f"; {row['train_s']:.0f} s (first step {row['first_step_s']:.1f} s, "
                      f"cached {_cached(row) or '?'})",
                      file=sys.stderr, flush=True)
        pipe_rows = run_pipelines(pipelines, Path(tmp))
    text = pipeline_report(pipe_rows)
    if rows or not pipe_rows:
        text = report(rows, machine(), opts, time.perf_counter() - t0, command) + "\n" + text
    if out is not None:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return 0 if all(met(r) for r in rows) and all(r["ok"] for r in pipe_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
