"""One program for every sequence length: an LSTM-32 training step (batch 64, Adam) whose
length is symbolic (`x: [batch, time, 1]`, `dims: {time: {max: 1024}}`) against the same
network compiled for each fixed length.

    .venv/bin/python bench/lengths.py              # writes its section of docs/benchmarks.md
    .venv/bin/python bench/lengths.py --quick      # T = 16 and 64, printed only

Each variant runs in a fresh process with the program cache off, so its first step includes
the whole compile. The symbolic process trains at every length in turn: its first step at
a length it has not run yet shows whether anything was compiled for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_OUT, LENGTHS, machine, median, splice_scaling  # noqa: E402

BEGIN, END = LENGTHS
STEADY = 5


def spec(time_dim) -> dict:
    return {"dlgraph": 1, "name": "bench-lstm", "inputs": {
        "x": {"shape": ["batch", time_dim, 1]}, "y": {"shape": ["batch", 1]}},
        **({"dims": {"time": {"max": 1024}}} if time_dim == "time" else {}),
        "nodes": {"enc": {"op": "lstm", "in": "x", "hidden": 32},
                  "pred": {"op": "linear", "in": "enc.h", "out": 1},
                  "loss": {"op": "mse", "in": ["pred", "y"]}},
        "outputs": ["pred"],
        "train": {"batch": 64, "epochs": 1, "objective": "loss",
                  "optimizer": {"type": "adam", "lr": 0.01}}}


def worker(time_dim, lengths: list[int]) -> list[dict]:
    """Training steps at each length in one process: first step and steady median."""
    import numpy as np

    import dlgraph
    from dlgraph.engine.compile.device import use_device
    from dlgraph.engine.compile.interpret import init_params, input_dims, to_tensor
    from dlgraph.engine.train.step import PhaseStep
    t0 = time.perf_counter()
    use_device(None)
    g = dlgraph.load(spec(time_dim))
    step = PhaseStep(g, g.spec.train.all_phases()[0], init_params(g, 0), ["x", "y"])
    rng = np.random.default_rng(0)
    rows = []
    for t in lengths:
        x = rng.standard_normal((64, t, 1)).astype(np.float32)
        y = x.mean(1)
        step.dims = input_dims(g, {"x": x, "y": y})
        feeds = [to_tensor(x, "float32"), to_tensor(y, "float32")]
        s = time.perf_counter()
        step(feeds, None).item()
        first = time.perf_counter() - s
        times = []
        for _ in range(STEADY):
            s = time.perf_counter()
            step(feeds, None).item()
            times.append(time.perf_counter() - s)
        rows.append({"T": t, "first_s": first, "steady_ms": 1000 * median(times),
                     "since_start_s": time.perf_counter() - t0})
    return rows


def run_worker(time_dim, lengths) -> list[dict]:
    env = {**os.environ, "DLGRAPH_CACHE_DIR": "off"}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps([time_dim, lengths])],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def section(sym: list[dict], fixed: dict[int, dict], mach: dict, wall: float) -> str:
    lines = [BEGIN, "## One program for every sequence length", "",
             f"`.venv/bin/python bench/lengths.py`, {time.strftime('%Y-%m-%d')}, "
             f"{wall:.0f} s, load {mach['load'][0]:.2f} at the start; {mach['cpu']}, "
             f"{mach['cores']} cores, tinygrad {mach['tinygrad']}. LSTM-32 training step "
             "(batch 64, Adam), program cache off. *Symbolic*: `x: [batch, time, 1]` with "
             "`dims: {time: {max: 1024}}`, one process training at each length in turn; "
             "*fixed*: `x: [batch, T, 1]`, a fresh process per length.", "",
             "| T | symbolic: first step at this T | symbolic: steady | fixed: first step "
             "(fresh process) | fixed: steady | steady symbolic / fixed |",
             "|---|---|---|---|---|---|"]
    for row in sym:
        f = fixed.get(row["T"], {})
        ratio = f"{row['steady_ms'] / f['steady_ms']:.2f}x" if f else "—"
        lines.append(f"| {row['T']} | {row['first_s']:.2f} s | {row['steady_ms']:.1f} ms | "
                     f"{f.get('first_s', float('nan')):.1f} s | "
                     f"{f.get('steady_ms', float('nan')):.1f} ms | {ratio} |")
    lines += ["", f"The symbolic process compiled once, in its first step at T={sym[0]['T']}; "
              "each later first step at a new length is one step's run time (nothing "
              "compiled). Its steady step pays for the buffers sized for the longest length "
              "and for shapes that the kernels only know at run time.", END]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.worker:
        time_dim, lengths = json.loads(args.worker)
        print(json.dumps(worker(time_dim, lengths)))
        return
    lengths = [16, 64] if args.quick else [16, 64, 256, 1024]
    mach, t0 = machine(), time.perf_counter()
    sym = run_worker("time", lengths)
    for r in sym:
        print(f"symbolic T={r['T']}: first {r['first_s']:.2f} s, steady {r['steady_ms']:.1f} ms",
              flush=True)
    fixed = {}
    for t in lengths:
        fixed[t] = run_worker(t, [t])[0]
        print(f"fixed    T={t}: first {fixed[t]['first_s']:.2f} s, steady "
              f"{fixed[t]['steady_ms']:.1f} ms", flush=True)
    md = section(sym, fixed, mach, time.perf_counter() - t0)
    if args.quick:
        print(md)
        return
    text = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(splice_scaling(text, md, BEGIN, END))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
