"""dlgraph vs hand-written tinygrad vs PyTorch eager: training and inference speed.

    .venv/bin/python bench/run.py                    # everything; writes docs/benchmarks.md
    .venv/bin/python bench/run.py --quick            # smoke check (mlp, lstm; few steps)
    .venv/bin/python bench/run.py --only lstm,mlp    # a subset (printed; --out to write)

Every implementation of every workload runs in its own fresh worker process (this file
with ``--worker``), so time to first step is a true cold start: interpreter, imports,
spec load, graph build, compilation. The three workers of a workload stay alive side by
side; the parent starts them one after another (the others wait idle on a pipe), then
asks them for timed steps in rounds, rotating their order each round, so that a noisy
machine slows all three alike. Before timing, the parent checks that the three computed
the same loss on the first step from the same weights (dlgraph's initial weights, copied
into the peers) and the same batch.

Workers speak JSON lines on a private pipe (their stdout is sent to stderr, so library
prints cannot corrupt it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

IMPLS = ("dlgraph", "tinygrad", "torch")
PLUS = "dlgraph+"                # dlgraph with bench/proposals.py applied (--proposals)
TOL = 1e-4                       # relative, first-step losses
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"


# =========================================================================== worker


def worker(args) -> None:
    t_start = time.perf_counter()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                     # stray prints go to stderr
    sys.stdout = sys.stderr

    def send(**msg):
        proto.write(json.dumps(msg) + "\n")

    import resource

    import numpy as np

    if args.impl == "torch":
        import torch
        torch.set_num_threads(args.torch_threads)
    if args.impl == PLUS:
        import proposals
        proposals.apply(proposals.PROPOSALS)
    import peers
    from workloads import WORKLOADS
    wl = WORKLOADS[args.workload]
    data = np.load(args.payload)
    weights = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
    nb = int(data["n_batches"])
    bs = [{k: data[f"b{i}:{k}"] for k in wl.inputs} for i in range(nb)]

    peer = peers.build("dlgraph" if args.impl == PLUS else args.impl, wl, weights, bs[0])
    t_built = time.perf_counter()
    first = peer.train_step(bs[0])
    t_first = time.perf_counter()
    second = peer.train_step(bs[1 % nb])
    t_second = time.perf_counter()
    peer.train_step(bs[2 % nb])                       # the first JIT replay
    t_ready = time.perf_counter()
    send(ev="first", loss=first, loss2=second, built=t_built - t_start,
         first=t_first - t_start, second=t_second - t_first, ready=t_ready - t_start)

    i = 3
    for line in sys.stdin:
        cmd = json.loads(line)
        c = cmd["cmd"]
        if c == "quit":
            break
        if c in ("train", "infer"):
            fn = peer.train_step if c == "train" else peer.infer
            times, t_end = [], time.perf_counter() + cmd["seconds"]
            while len(times) < cmd["min"] or (time.perf_counter() < t_end
                                              and len(times) < cmd["max"]):
                b = bs[i % nb]
                i += 1
                t0 = time.perf_counter()
                fn(b)
                times.append(time.perf_counter() - t0)
            send(ev=c, times=times)
        elif c == "probe":
            out = {"ev": "probe"}
            if args.impl != "torch":
                from tinygrad.helpers import GlobalCounters
                GlobalCounters.reset()
                peer.train_step(bs[i % nb])
                out["train_kernels"] = GlobalCounters.kernel_count
                GlobalCounters.reset()
                peer.infer(bs[i % nb])
                out["infer_kernels"] = GlobalCounters.kernel_count
            out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            send(**out)


# =========================================================================== parent


class Worker:
    def __init__(self, impl: str, workload: str, payload: Path, opts):
        self.impl = impl
        self.t0 = time.perf_counter()
        r, w = os.pipe()
        env = dict(os.environ)
        if opts.cold_cache:
            env["CACHELEVEL"] = "0"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl,
               "--workload", workload, "--payload", str(payload),
               "--torch-threads", str(opts.torch_threads)]
        self.log = open(payload.parent / f"{workload}-{impl}.log", "w")
        # the worker's fd 1 becomes our pipe; its stderr goes to a log file
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=w, stderr=self.log,
                                     cwd=ROOT, env=env, text=True)
        os.close(w)
        self.out = os.fdopen(r)
        self.logpath = payload.parent / f"{workload}-{impl}.log"

    def recv(self) -> dict:
        line = self.out.readline()
        if not line:
            self.proc.wait()
            tail = self.logpath.read_text().strip().splitlines()[-15:]
            raise RuntimeError(f"the {self.impl} worker exited ({self.proc.returncode}):\n    "
                               + "\n    ".join(tail))
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.log.close()


def median(xs):
    s = sorted(xs)
    n = len(s)
    return (s[n // 2] + s[(n - 1) // 2]) / 2 if n else float("nan")


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def run_workload(name: str, opts, tmp: Path, rotation: int) -> dict:
    import numpy as np
    from workloads import WORKLOADS

    import dlgraph
    from dlgraph.engine.lower import init_param

    wl = WORKLOADS[name]
    res = {"name": name, "title": wl.title, "spec": str(wl.spec_path.relative_to(ROOT)),
           "impls": {}, "rounds": opts.rounds, "round_s": opts.round_s}
    missing = wl.missing_ops() if wl.needs else []
    if missing or not wl.spec_path.exists():
        res["skipped"] = (f"dlgraph has no op {', '.join(missing)} yet" if missing else
                          f"{res['spec']} does not exist")
        print(f"[{name}] skipped: {res['skipped']}", flush=True)
        return res
    src = wl.spec_source()
    g = dlgraph.load(src["source"], base=src["base"])
    weights = {k: init_param(p, 0) for k, p in g.params.items()}   # = init_params(g, seed=0)
    batches = wl.batches(8, seed=1)
    payload = tmp / f"{name}.npz"
    arrays = {f"w:{k}": v for k, v in weights.items()}
    for i, b in enumerate(batches):
        arrays.update({f"b{i}:{k}": v for k, v in b.items()})
    np.savez(payload, n_batches=len(batches), **arrays)
    res["params"] = int(sum(v.size for v in weights.values()))

    impls = IMPLS + ((PLUS,) if opts.proposals else ())
    k = rotation % len(impls)
    order = list(impls[k:] + impls[:k])
    workers: dict[str, Worker] = {}
    try:
        for impl in order:                        # cold starts, one at a time
            w = Worker(impl, name, payload, opts)
            workers[impl] = w
            m = w.recv()
            wall = time.perf_counter() - w.t0
            # the message comes after the third step: the parent's clock saw all three
            res["impls"][impl] = {"first_step_s": wall - (m["ready"] - m["first"]),
                                  "ready_s": wall,
                                  "build_s": m["built"], "capture_s": m["second"],
                                  "loss1": m["loss"], "loss2": m["loss2"]}
            print(f"[{name}] {impl:8s} first step after "
                  f"{res['impls'][impl]['first_step_s']:6.1f} s (capture "
                  f"{m['second']:.1f} s)  loss {m['loss']:.6f}", flush=True)
        l1 = {k: v["loss1"] for k, v in res["impls"].items()}
        l2 = {k: v["loss2"] for k, v in res["impls"].items()}
        res["loss_diff"] = max(rel(l1["dlgraph"], l1[k]) for k in impls[1:])
        res["loss2_diff"] = max(rel(l2["dlgraph"], l2[k]) for k in impls[1:])
        print(f"[{name}] first-step losses: " + "  ".join(f"{k} {v:.7f}" for k, v in l1.items())
              + f"  (max rel diff {res['loss_diff']:.1e})", flush=True)
        if res["loss_diff"] > TOL:
            res["failed"] = (f"first-step losses differ by {res['loss_diff']:.2e} relative "
                             f"(> {TOL:g}): " + ", ".join(f"{k} {v:.7f}" for k, v in l1.items()))
            print(f"[{name}] FAILED: {res['failed']}", flush=True)
            return res

        for impl in order:                        # inference warm-up (compile, capture)
            m = workers[impl].ask(cmd="infer", seconds=0, min=3, max=3)
            res["impls"][impl]["infer_first_s"] = m["times"][0]
        for kind in ("train", "infer"):
            times = {k: [] for k in impls}
            for r in range(opts.rounds):
                k = r % len(impls)
                rot = order[k:] + order[:k]
                for impl in (rot if r % 2 == 0 else rot[::-1]):
                    m = workers[impl].ask(cmd=kind, seconds=opts.round_s, min=opts.min_steps,
                                          max=2000)
                    times[impl] += m["times"]
            for impl in impls:
                res["impls"][impl][f"{kind}_ms"] = 1e3 * median(times[impl])
                res["impls"][impl][f"{kind}_n"] = len(times[impl])
        for impl in impls:
            m = workers[impl].ask(cmd="probe")
            res["impls"][impl].update({k: v for k, v in m.items() if k != "ev"})
        line = "  ".join(f"{k} {v['train_ms']:.2f}/{v['infer_ms']:.2f} ms"
                         for k, v in res["impls"].items())
        print(f"[{name}] train/infer: {line}", flush=True)
    except Exception as e:  # one workload's failure must not cost the others
        res["failed"] = f"{type(e).__name__}: {e}"
        print(f"[{name}] FAILED: {res['failed']}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    return res


# =========================================================================== report


def cpu_model(default: str = "unknown") -> str:
    """The CPU's model name from /proc/cpuinfo (bench/examples.py uses it too)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def machine() -> dict:
    import numpy
    import tinygrad
    cpu = cpu_model()
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "not installed"
    from importlib.metadata import version
    try:
        tgv = version("tinygrad")
    except Exception:
        tgv = getattr(tinygrad, "__version__", "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tinygrad": tgv, "torch": tv, "numpy": numpy.__version__,
            "os": f"{platform.system()} {platform.release()}",
            "load": os.getloadavg() if hasattr(os, "getloadavg") else None}


def fmt_ms(v):
    return "—" if v is None else (f"{v:.3g}" if v < 100 else f"{v:,.0f}")


def fmt_s(v):
    return f"{v:.1f}"


def table(results: list[dict]) -> str:
    rows = ["| workload | impl | train step (ms, median) | inference (ms/batch) | first step (s) "
            "| steady after (s) | peak RSS (MiB) | kernels/step |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    plus = any(PLUS in r.get("impls", {}) for r in results)
    cols = ["workload", "first-step loss (dlgraph / tinygrad / torch)", "max rel diff",
            "2nd step", "train dl/tg", "train dl/torch"] + (["train dl+/tg"] if plus else []) \
        + ["infer dl/tg", "infer dl/torch", "first step dl/tg", "first step dl/torch"] \
        + (["first step dl+/tg", "steady after dl+/tg"] if plus else [])
    ratios = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in results:
        if "skipped" in r:
            rows.append(f"| {r['name']} | — | skipped: {r['skipped']} | | | | | |")
            continue
        if "failed" in r and not all("train_ms" in v for v in r["impls"].values()):
            rows.append(f"| {r['name']} | — | **FAILED**: {r['failed']} | | | | | |")
            continue
        for impl in [i for i in IMPLS + (PLUS,) if i in r["impls"]]:
            v = r["impls"][impl]
            k = v.get("train_kernels")
            ki = v.get("infer_kernels")
            rows.append(f"| {r['name']} | {impl} | {fmt_ms(v['train_ms'])} | "
                        f"{fmt_ms(v['infer_ms'])} | {fmt_s(v['first_step_s'])} | "
                        f"{fmt_s(v['ready_s'])} | {v['maxrss_kib'] / 1024:.0f} | "
                        + (f"{k} / {ki}" if k is not None else "—") + " |")
        d, t, p = (r["impls"][k] for k in IMPLS)
        q = r["impls"].get(PLUS)

        def x(a, b, key, bold=False):
            v = f"{a[key] / b[key]:.2f}×"
            return f"**{v}**" if bold else v
        cells = [r["name"], f"{d['loss1']:.6f} / {t['loss1']:.6f} / {p['loss1']:.6f}",
                 f"{r['loss_diff']:.1e}", f"{r['loss2_diff']:.1e}",
                 x(d, t, "train_ms", True), x(d, p, "train_ms")]
        if plus:
            cells.append(x(q, t, "train_ms", True) if q else "—")
        cells += [x(d, t, "infer_ms"), x(d, p, "infer_ms"), x(d, t, "first_step_s"),
                  x(d, p, "first_step_s")]
        if plus:
            cells += [x(q, t, "first_step_s"), x(q, t, "ready_s")] if q else ["—", "—"]
        ratios.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(ratios) + "\n"


def _proposals():
    import proposals
    return proposals.PROPOSALS


def report(results, mach, opts, wall: float, command: str) -> str:
    notes = HERE / "NOTES.md"
    rounds = " or ".join(sorted({f"{r['rounds']} rounds of about {r['round_s']:g} s"
                                 for r in results if "rounds" in r})) or "no rounds"
    lines = [
        "# Benchmarks: dlgraph vs hand-written tinygrad vs PyTorch",
        "",
        "<!-- generated by bench/run.py; the analysis below the results comes from "
        "bench/NOTES.md -->",
        "",
        f"Reproduce: `{command}` (took {wall / 60:.1f} min here). "
        "`--quick` is a smoke check, `--only lstm,mlp` a subset.",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['os']}; load average at the "
        f"end {', '.join(f'{x:.1f}' for x in mach['load'] or [])} (a shared machine: "
        "other jobs ran during the run). "
        f"Python {mach['python']}, tinygrad {mach['tinygrad']}, torch {mach['torch']} "
        f"({opts.torch_threads} thread{'s' if opts.torch_threads > 1 else ''}), "
        f"numpy {mach['numpy']}. tinygrad device: CPU (clang). "
        f"On-disk kernel cache: {'off (CACHELEVEL=0)' if opts.cold_cache else 'on'}.",
        "",
        "## Results",
        "",
        table(results),
        "- **train step**: median wall time of one training step (host batch to tensor, "
        "forward, backward, optimizer update, loss `.item()`) over "
        f"{rounds} per implementation (at least {opts.min_steps} steps a round), in "
        "rotating order. **inference**: the same for the forward pass of one batch (dlgraph: "
        "`dlgraph.compile(g)(x=...)`; tinygrad: a `TinyJit` forward; torch: `no_grad`).",
        "- **first step**: wall time from starting a fresh Python process to the end of the "
        "first training step (imports, spec load and graph build, compiling every kernel, "
        "running them). **steady after**: to the end of the third step: TinyJit runs the "
        "first call, captures on the second and replays from the third on.",
        "- **peak RSS**: `ru_maxrss` of the worker process at the end of its run.",
        *(["- **dlgraph+** (`--proposals`): dlgraph with the changes proposed under "
           "\"What mattered\" applied inside its worker process by monkeypatching "
           "(bench/proposals.py: " + ", ".join(f"`{p}`" for p in _proposals()) + "); "
           "dlgraph's own files are unchanged. With `capture-first` the second step is "
           "already a replay."]
          if any(PLUS in r.get("impls", {}) for r in results) else []),
        "- **kernels/step**: kernels launched by one replayed training step / one inference "
        "call (tinygrad's `GlobalCounters.kernel_count`).",
        "- The first-step losses come from the same weights (dlgraph's `init_params(seed=0)`, "
        "copied into the peers by name for the transformer, by declaration order for the "
        "others, every shape checked) and the same batch; a relative "
        f"difference above {TOL:g} fails the workload. **2nd step**: the largest relative "
        "difference of the second step's loss, after one optimizer update (so it checks "
        "the gradients and the optimizer too).",
        "- tinygrad keeps compiled kernels in `~/.cache/tinygrad/cache.db` across processes; "
        "it helps dlgraph and the hand-written tinygrad alike (both compile many of the same "
        "kernels), so their first-step times are warm-cache figures unless the run used "
        "`--cold-cache`. The cache saves the C compiler's work, not tinygrad's Python-side "
        "scheduling and code generation, which are most of a cold start (see point 8 "
        "below).",
        "",
    ]
    if notes.exists():
        lines.append(notes.read_text().strip() + "\n")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated workloads (mlp, cnn, lstm, gru, "
                                   "transformer)")
    ap.add_argument("--quick", action="store_true", help="smoke check: few steps; "
                    "mlp and lstm unless --only")
    ap.add_argument("--rounds", type=int, help="timing rounds per implementation")
    ap.add_argument("--round-s", type=float, help="seconds of steps per round")
    ap.add_argument("--min-steps", type=int, help="steps per round at least")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="PyTorch intra-op threads (default 1, see the report)")
    ap.add_argument("--budget", type=float, default=840,
                    help="seconds the whole run should take; timing rounds shrink when "
                         "cold starts ran long")
    ap.add_argument("--proposals", action="store_true",
                    help="add dlgraph+ (dlgraph with bench/proposals.py applied) to the rounds")
    ap.add_argument("--cold-cache", action="store_true",
                    help="workers run with tinygrad's on-disk kernel cache off")
    ap.add_argument("--out", help=f"markdown report (default: {DEFAULT_OUT.relative_to(ROOT)} "
                                  "for a full run, none otherwise)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--from-json", help="no run: render the report (with the current "
                    "bench/NOTES.md) from the raw results of an earlier run")
    # worker mode
    ap.add_argument("--worker", choices=IMPLS + (PLUS,), help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.worker:
        opts.impl = opts.worker
        return worker(opts)

    if opts.from_json:
        raw = json.loads(Path(opts.from_json).read_text())
        for k, v in raw["opts"].items():
            setattr(opts, k, v)
        md = report(raw["results"], raw["machine"], opts, raw["wall_s"], raw["command"])
        out = Path(opts.out) if opts.out else DEFAULT_OUT
        out.write_text(md)
        print(f"wrote {out}")
        return 0

    from workloads import WORKLOADS
    names = opts.only.split(",") if opts.only else (["mlp", "lstm"] if opts.quick
                                                    else list(WORKLOADS))
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    opts.rounds = opts.rounds or (2 if opts.quick else 6)
    opts.round_s = opts.round_s or (0.1 if opts.quick else 0.6)
    opts.min_steps = opts.min_steps or (2 if opts.quick else 3)
    full = not opts.only and not opts.quick
    out = Path(opts.out) if opts.out else (DEFAULT_OUT if full else None)
    if full and not opts.json:
        opts.json = str(HERE / "last-run.json")   # lets --from-json re-render the report

    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="dlgraph-bench-") as tmp:
        for k, name in enumerate(names):
            # behind schedule (a loaded machine): fewer, shorter timing rounds
            left = opts.budget - (time.perf_counter() - t0)
            share = left / (len(names) - k)
            if not opts.quick and share < 150 and opts.rounds > 3:
                opts.rounds, opts.round_s = 3, min(opts.round_s, 0.3)
                print(f"(behind the {opts.budget:.0f} s budget: {opts.rounds} rounds of "
                      f"{opts.round_s} s from here on)", flush=True)
            results.append(run_workload(name, opts, Path(tmp), k))
    wall = time.perf_counter() - t0
    command = ".venv/bin/python bench/run.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    mach = machine()
    md = report(results, mach, opts, wall, command)
    print()
    print(table(results))
    print(f"total wall time {wall:.0f} s")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
        print(f"wrote {out}")
    if opts.json:
        keep = ("rounds", "round_s", "min_steps", "torch_threads", "cold_cache", "quick",
                "proposals")
        Path(opts.json).write_text(json.dumps(
            {"results": results, "wall_s": wall, "machine": mach, "command": command,
             "opts": {k: getattr(opts, k) for k in keep}}, indent=1))
    failed = [r["name"] for r in results if "failed" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
