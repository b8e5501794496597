"""Where the time goes: one implementation of one workload, taken apart.

    .venv/bin/python bench/analyze.py lstm dlgraph        # or tinygrad; any workload

Prints, for a fresh process: the time to build the model, the first training step (split
into tinygrad's scheduling, kernel compilation and the rest), the JIT capture (second step)
and a replayed step; the number of distinct kernels compiled and the kernels launched per
replayed step. The findings are summarised in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed(module, name, bucket):
    """Wrap module.name to add its wall time to bucket[name]."""
    f = getattr(module, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            bucket[name] = bucket.get(name, 0.0) + time.perf_counter() - t0
    setattr(module, name, wrapper)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload")
    ap.add_argument("impl", choices=("dlgraph", "tinygrad", "torch"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    t_start = time.perf_counter()

    import numpy as np
    import peers
    import tinygrad.engine.realize as realize
    import tinygrad.schedule as schedule
    import tinygrad.tensor as tensor
    from tinygrad.helpers import GlobalCounters
    from workloads import WORKLOADS

    import dlgraph
    from dlgraph.engine.spec.init import init_param

    bucket: dict[str, float] = {}
    timed(realize, "lower_and_compile", bucket)          # codegen + clang, in a process pool
    timed(tensor, "create_linear_with_vars", bucket)     # scheduling (kernel graph)
    del schedule

    wl = WORKLOADS[opts.workload]
    src = wl.spec_source()
    g = dlgraph.load(src["source"], base=src["base"])
    w = {k: init_param(p, 0) for k, p in g.params.items()}
    bs = wl.batches(4, seed=1)
    out: dict = {"workload": opts.workload, "impl": opts.impl, "experiments": opts.experiment}
    t0 = time.perf_counter()
    out["imports_s"] = t0 - t_start
    peer = peers.build(opts.impl, wl, w, bs[0])
    t1 = time.perf_counter()
    out["build_s"] = t1 - t0
    n0 = len(realize.to_program_cache)
    bucket.clear()
    out["loss1"] = peer.train_step(bs[0])
    t2 = time.perf_counter()
    out["first_step_s"] = t2 - t1
    out["first_step_schedule_s"] = bucket.get("create_linear_with_vars", 0.0)
    out["first_step_compile_s"] = bucket.get("lower_and_compile", 0.0)
    out["kernels_compiled"] = len(realize.to_program_cache) - n0
    bucket.clear()
    peer.train_step(bs[1])
    t3 = time.perf_counter()
    out["capture_s"] = t3 - t2
    out["capture_schedule_s"] = bucket.get("create_linear_with_vars", 0.0)
    GlobalCounters.reset()
    peer.train_step(bs[2])
    out["kernels_per_step"] = GlobalCounters.kernel_count
    times = []
    for i in range(opts.steps):
        t = time.perf_counter()
        peer.train_step(bs[i % 4])
        times.append(time.perf_counter() - t)
    out["step_ms"] = 1e3 * float(np.median(times))
    t = time.perf_counter()
    peer.infer(bs[0])
    out["infer_first_s"] = time.perf_counter() - t
    peer.infer(bs[0])
    GlobalCounters.reset()
    peer.infer(bs[0])
    out["infer_kernels"] = GlobalCounters.kernel_count
    it = []
    for i in range(max(3, opts.steps // 4)):
        t = time.perf_counter()
        peer.infer(bs[i % 4])
        it.append(time.perf_counter() - t)
    out["infer_ms"] = 1e3 * float(np.median(it))
    if opts.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")


if __name__ == "__main__":
    main()
