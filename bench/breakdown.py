"""Where a call's milliseconds go: kernels, and everything else (dispatch and host work).

    .venv/bin/python bench/breakdown.py              # every workload; prints a markdown table
    .venv/bin/python bench/breakdown.py --only mlp,lstm

For each workload of bench/workloads.py, in this one process, at the workload's batch and at
batch 1 for inference:

- **before**: the call as dlgraph made it before the lean replay, kept here to measure
  against: fresh input tensors (``Tensor(array)``), tinygrad's ``TinyJit`` call per stage,
  ``Tensor.numpy()`` for the outputs (the program's own path for tensors);
- **now**: numpy arrays copied into the program's kept buffers, every stage replayed by
  calling its kernels directly, outputs copied from their buffers;
- **now** and **kernels** come from the same calls, every kernel launch timed one by one
  inside the replay (``door.Replay.timings``; a launch includes its ctypes call, about a
  microsecond); **rest**: now minus kernels: copies in and out, input checks, the
  per-stage Python.

The training step is the spec's phase step with its optimizer update (PhaseStep), the loss
read back every step as the training loop does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def per_call(fn, n: int | None = None, budget: float = 1.0, rounds: int = 5) -> float:
    """Median over rounds of the mean seconds per call (about ``budget`` seconds in all)."""
    for _ in range(3):
        fn()
    if n is None:
        t = time.perf_counter()
        fn()
        n = max(3, int(budget / rounds / max(time.perf_counter() - t, 1e-6)))
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n)
    return float(np.median(out))


def with_kernels(fn, rounds: int = 5, budget: float = 1.0) -> tuple[float, float, int]:
    """(seconds per call, of which in kernel launches, launches per call): both from the same
    calls, with every launch timed (``door.Replay.timings``); medians over rounds."""
    from dlgraph.engine.compile.tinygrad_door import Replay
    fn()
    t = time.perf_counter()
    fn()
    n = max(3, int(budget / rounds / max(time.perf_counter() - t, 1e-6)))
    totals, kernels, count = [], [], 0
    try:
        for _ in range(rounds):
            Replay.timings = []
            t = time.perf_counter()
            for _ in range(n):
                fn()
            totals.append((time.perf_counter() - t) / n)
            kernels.append(sum(Replay.timings) / n)
            count = len(Replay.timings) // n
    finally:
        Replay.timings = None
    return float(np.median(totals)), float(np.median(kernels)), count


def _batch(wl, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: np.ascontiguousarray(gen(rng, (batch, *shape)).astype(dtype))
            for k, (shape, dtype, gen) in wl.inputs.items()}


def inference_rows(name: str, wl, g, batch: int) -> dict:
    from tinygrad import Tensor

    import dlgraph
    from dlgraph.engine.compile.interpret import input_dims
    model = dlgraph.compile(g, seed=0)
    data = _batch(wl, batch)
    feed = {k: data[k] for k in model.input_names}
    prog, dims = model._program, input_dims(g, feed)

    def before():
        ts = {k: Tensor(v.copy()).realize() for k, v in feed.items()}
        return [o.numpy() for o in prog(ts, dims)]

    now = lambda: model(**feed)               # noqa: E731
    return row(f"{name} inference b{batch}", before, now)


def training_row(name: str, wl, g) -> dict:
    from dlgraph.engine.compile.interpret import init_params, input_dims, to_tensor
    from dlgraph.engine.train.step import PhaseStep
    data = _batch(wl, wl.batch)
    names = list(g.inputs)
    st = PhaseStep(g, g.spec.train.all_phases()[0], init_params(g, 0), names)
    st.dims = input_dims(g, data)
    from dlgraph.engine.compile.tinygrad_door import read

    def before():
        return st([to_tensor(data[k], g.inputs[k].dtype) for k in names], None).item()

    def now():
        return float(read(st([data[k] for k in names], None)).reshape(-1)[0])
    return row(f"{name} train b{wl.batch}", before, now)


def row(what: str, before, now) -> dict:
    b = per_call(before)
    n, k, count = with_kernels(now)
    r = {"what": what, "before": b, "now": n, "kernels": k, "count": count, "rest": n - k}
    print(f"  {what}: before {b * 1e3:.3f} ms, now {n * 1e3:.3f} ms, kernels "
          f"{k * 1e3:.3f} ms ({count}), rest {(n - k) * 1e3:.3f} ms", file=sys.stderr)
    return r


def table(rows: list[dict]) -> str:
    out = ["| call | before ms | now ms | before/now | kernels ms (launches) | rest ms "
           "| kernels share |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['what']} | {r['before'] * 1e3:.3f} | {r['now'] * 1e3:.3f} | "
                   f"{r['before'] / r['now']:.1f}x | {r['kernels'] * 1e3:.3f} ({r['count']}) | "
                   f"{r['rest'] * 1e3:.3f} | {r['kernels'] / r['now']:.0%} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="workloads, comma-separated")
    ap.add_argument("--out", type=Path,
                    help="write the section here (default: bench/last-*.md, which "
                    "bench/run.py puts into docs/benchmarks.md)")
    opts = ap.parse_args(argv)
    from workloads import WORKLOADS

    import dlgraph
    from dlgraph.engine.compile.device import use_device
    use_device(None)
    load = os.getloadavg()[0]
    rows = []
    for name, wl in WORKLOADS.items():
        if opts.only and name not in opts.only.split(","):
            continue
        src = wl.spec_source()
        g = dlgraph.load(src["source"], base=src.get("base"))
        rows.append(training_row(name, wl, g))
        for b in (wl.batch, 1):
            rows.append(inference_rows(name, wl, g, b))
    text = (f"Where the time goes (bench/breakdown.py, load {load:.2f} -> "
            f"{os.getloadavg()[0]:.2f}):\n\n{table(rows)}\n")
    print(text)
    (opts.out or HERE / "last-breakdown.md").write_text("## Where the time goes\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
