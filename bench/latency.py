"""Per-call latency: a compiled model called with numpy arrays, numpy out, as a server calls it.

    .venv/bin/python bench/latency.py                 # prints the table; --out FILE writes it
    .venv/bin/python bench/latency.py --threads 2     # PyTorch and onnxruntime on 2 threads

Two sections, every implementation in this one process, timed in rounds whose order rotates
(a noisy machine slows all alike); each figure is the median over the rounds of the mean
call time within a round:

- the benchmark workloads (bench/workloads.py) at batch 1 and at their own batch: dlgraph's
  ``dlgraph.compile`` model, the same network hand-written in tinygrad (a ``TinyJit``),
  PyTorch eager (``no_grad``) and onnxruntime on dlgraph's own ONNX export, all from the
  same weights; outputs are checked to agree before timing;
- example specs of graphs/ at batch 1: dlgraph against onnxruntime on the exported model.

Also the breakdown of one dlgraph call (host copy in, kernels, copy out, the rest), from
the per-stage timers below.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

GRAPHS = ("mlp", "transformer", "lstm", "gru", "cnn")


def timed(fn, rounds: int, per_round: int) -> float:
    """Median over ``rounds`` of the mean seconds per call within a round."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        out.append((time.perf_counter() - t) / per_round)
    return float(np.median(out))


def ort_session(graph, weights: dict, threads: int, tmp: Path):
    import onnxruntime as ort

    import dlgraph
    try:
        path = dlgraph.export(graph, tmp / f"{graph.name}.onnx", weights=weights)
    except Exception as e:       # noted in the table: the export itself is what failed
        print(f"  no onnxruntime peer for {graph.name}: export failed: "
              f"{str(e).splitlines()[0][:160]}", file=sys.stderr)
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def impls_for_workload(name: str, batch: int, threads: int, tmp: Path) -> dict:
    """name -> a zero-argument call, for one workload at ``batch``, and the reference output."""
    from peers import TinygradPeer, TorchPeer
    from workloads import workload

    import dlgraph

    wl = workload(name)
    src = wl.spec_source()
    g = dlgraph.load(src["source"], base=src.get("base"))
    model = dlgraph.compile(g, seed=0)
    weights = model.state_dict()
    data = _batch(wl, batch)
    feed = {k: data[k] for k in model.input_names}
    tg, pt = TinygradPeer(wl, weights), TorchPeer(wl, weights)
    out = model.outputs[0]
    calls = {"dlgraph": lambda: model(**feed)[out],
             "tinygrad": lambda: tg.infer(data),
             "torch": lambda: pt.infer(data)}
    return with_ort(calls, ort_session(g, weights, threads, tmp), data)


def with_ort(calls: dict, sess, data: dict) -> dict:
    if sess is not None:
        ort_feed = {i.name: data[i.name] for i in sess.get_inputs()}
        calls["onnxruntime"] = lambda: sess.run(None, ort_feed)[0]
    return calls


def _batch(wl, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: np.ascontiguousarray(gen(rng, (batch, *shape)).astype(dtype))
            for k, (shape, dtype, gen) in wl.inputs.items()}


def check(calls: dict, what: str) -> None:
    ref = np.asarray(calls["dlgraph"]())
    for k, f in calls.items():
        got = np.asarray(f())
        if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-3, atol=1e-4):
            raise SystemExit(f"{what}: {k} disagrees with dlgraph "
                             f"(max diff {np.max(np.abs(got - ref)):.3g})")


def measure(calls: dict, rounds: int, budget: float = 0.05) -> dict[str, float]:
    for f in calls.values():                      # warm up: compile, capture, caches
        for _ in range(5):
            f()
    per = {k: max(3, int(budget / max(timed(f, 1, 3), 1e-6))) for k, f in calls.items()}
    names = list(calls)
    got: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            got[k].append(timed(calls[k], 1, per[k]))
    return {k: float(np.median(v)) for k, v in got.items()}


def graph_rows(threads: int, rounds: int, tmp: Path) -> list[tuple]:
    import dlgraph
    rows = []
    for name in GRAPHS:
        g = dlgraph.load(ROOT / "graphs" / f"{name}.yaml")
        model = dlgraph.compile(g, seed=0)
        data = model.random_inputs(1, seed=0)
        feed = {k: data[k] for k in model.input_names}
        out = model.outputs[0]
        calls = with_ort({"dlgraph": lambda m=model, f=feed, o=out: m(**f)[o]},
                         ort_session(g, model.state_dict(), threads, tmp), data)
        check(calls, f"graphs/{name}.yaml")
        t = measure(calls, rounds)
        rows.append((f"graphs/{name}.yaml", 1, t["dlgraph"], None, None, t.get("onnxruntime")))
        print(f"  graphs/{name}.yaml b1: " + ", ".join(f"{k} {v * 1e3:.3f} ms"
                                                     for k, v in t.items()), file=sys.stderr)
    return rows


def workload_rows(threads: int, rounds: int, tmp: Path) -> list[tuple]:
    from workloads import WORKLOADS
    rows = []
    for name, wl in WORKLOADS.items():
        for batch in (1, wl.batch):
            calls = impls_for_workload(name, batch, threads, tmp)
            check(calls, f"{name} b{batch}")
            t = measure(calls, rounds)
            rows.append((name, batch, t["dlgraph"], t["tinygrad"], t["torch"],
                         t.get("onnxruntime")))
            print(f"  {name} b{batch}: " + ", ".join(f"{k} {v * 1e3:.3f} ms"
                                                    for k, v in t.items()), file=sys.stderr)
    return rows


def ms(v) -> str:
    return "–" if v is None else f"{v * 1e3:.3f}"


def ratio(a, b) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}x"


def table(rows: list[tuple]) -> str:
    out = ["| model | batch | dlgraph ms | tinygrad ms | PyTorch ms | onnxruntime ms "
           "| dl/tinygrad | dl/PyTorch | dl/onnxruntime |", "|---|---|---|---|---|---|---|---|---|"]
    for name, b, dl, tg, pt, ort in rows:
        out.append(f"| {name} | {b} | {ms(dl)} | {ms(tg)} | {ms(pt)} | {ms(ort)} | "
                   f"{ratio(dl, tg)} | {ratio(dl, pt)} | {ratio(dl, ort)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="PyTorch / onnxruntime threads")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", choices=("workloads", "graphs"))
    ap.add_argument("--out", type=Path,
                    help="write the section here (default: bench/last-*.md, which "
                    "bench/run.py puts into docs/benchmarks.md)")
    opts = ap.parse_args(argv)
    import torch
    torch.set_num_threads(opts.threads)
    from dlgraph.engine.compile.device import use_device
    use_device(None)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        if opts.only != "graphs":
            rows += workload_rows(opts.threads, opts.rounds, Path(tmp))
        if opts.only != "workloads":
            rows += graph_rows(opts.threads, opts.rounds, Path(tmp))
    load = f"load {load:.2f} -> {os.getloadavg()[0]:.2f}"
    text = (f"Per-call latency, numpy in and out (bench/latency.py, {opts.threads} thread(s) "
            f"for PyTorch and onnxruntime, {load}):\n\n{table(rows)}\n")
    print(text)
    (opts.out or HERE / "last-latency.md").write_text("## Per-call latency\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
