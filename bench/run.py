"""dlgraph vs hand-written tinygrad vs PyTorch eager: training and inference speed.

    .venv/bin/python bench/run.py                    # everything; writes docs/benchmarks.md
    .venv/bin/python bench/run.py --quick            # smoke check (mlp, lstm; few steps)
    .venv/bin/python bench/run.py --only lstm,mlp    # a subset (printed; --out to write)
    .venv/bin/python bench/run.py --scaling          # LSTM/GRU at T = 16..1024: its section
    .venv/bin/python bench/run.py --scaling --quick  # its smoke check (T = 16, 64)

Every implementation of every workload runs in its own fresh worker process (this file
with ``--worker``), so time to first step is a true cold start: interpreter, imports,
spec load, graph build, compilation. The three workers of a workload stay alive side by
side; the parent starts them one after another (the others wait idle on a pipe), then
asks them for timed steps in rounds, rotating their order each round, so that a noisy
machine slows all three alike. Before timing, the parent checks that the three computed
the same loss on the first step from the same weights (dlgraph's initial weights, copied
into the peers) and the same batch.

``--scaling`` runs one worker per implementation and sequence length instead, alone, each
under a time and memory budget (a worker over budget is killed and reported as such), and
writes only its own section of docs/benchmarks.md; a full run keeps that section.

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

    import numpy as np

    if args.impl == "torch":
        import torch
        torch.set_num_threads(args.torch_threads)
    import peers
    from workloads import workload
    wl = workload(args.workload)
    data = np.load(args.payload)
    weights = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
    nb = int(data["n_batches"])
    bs = [{k: data[f"b{i}:{k}"] for k in wl.inputs} for i in range(nb)]

    peer = peers.build(args.impl, wl, weights, bs[0])
    t_built = time.perf_counter()
    first = peer.train_step(bs[0])
    t_first = time.perf_counter()
    if args.early:                                    # --scaling times the first step alone
        send(ev="step1", loss=first, first=t_first - t_start)
    second = peer.train_step(bs[1 % nb])
    t_second = time.perf_counter()
    peer.train_step(bs[2 % nb])                       # the first JIT replay
    t_ready = time.perf_counter()
    send(ev="first", loss=first, loss2=second, built=t_built - t_start,
         first=t_first - t_start, second=t_second - t_first, ready=t_ready - t_start)

    serve(args, peer, bs, send)


def serve(args, peer, bs: list, send) -> None:
    """The worker's command loop: timed steps, memory and kernel counts, until quit."""
    import resource

    i, nb = 3, len(bs)
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
        elif c == "rss":
            send(ev="rss", maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        elif c == "probe":
            out = {"ev": "probe"}
            if args.impl != "torch":
                count = launches if args.impl == "dlgraph" else tinygrad_kernels
                b = bs[i % nb]
                out["train_kernels"] = count(lambda: peer.train_step(b))   # noqa: B023
                out["infer_kernels"] = count(lambda: peer.infer(b))        # noqa: B023
            out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            send(**out)


def tinygrad_kernels(fn) -> int:
    """Kernels tinygrad launched during ``fn()`` (its own counter)."""
    from tinygrad.helpers import GlobalCounters
    GlobalCounters.reset()
    fn()
    return GlobalCounters.kernel_count


def launches(fn) -> int:
    """Kernels dlgraph launched during ``fn()``: its replays call the kernels directly, past
    tinygrad's counter, and count them themselves."""
    from dlgraph.engine.compile.tinygrad_door import Replay
    Replay.timings = []
    try:
        fn()
        return len(Replay.timings)
    finally:
        Replay.timings = None


# =========================================================================== parent


class OverBudget(Exception):
    """A worker ran past its time or memory budget (and was killed)."""

    def __init__(self, what: str, peak_kib: int):
        super().__init__(what)
        self.what, self.peak_kib = what, peak_kib


class Worker:
    def __init__(self, impl: str, workload: str, payload: Path, opts, early: bool = False):
        self.impl = impl
        self.t0 = time.perf_counter()
        r, w = os.pipe()
        env = dict(os.environ)
        if opts.cold_cache:
            env["CACHELEVEL"] = "0"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl,
               "--workload", workload, "--payload", str(payload),
               "--torch-threads", str(opts.torch_threads)] + (["--early"] if early else [])
        self.log = open(payload.parent / f"{workload}-{impl}.log", "w")
        # the worker's fd 1 becomes our pipe; its stderr goes to a log file
        # a --scaling worker leads a process group of its own, so that killing it at its
        # budget also ends the compiler processes it started
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=w, stderr=self.log,
                                     cwd=ROOT, env=env, text=True, start_new_session=early)
        self.group = early
        os.close(w)
        self.fd, self.buf = r, b""
        self.logpath = payload.parent / f"{workload}-{impl}.log"

    def recv(self, timeout: float | None = None, mem_kib: int | None = None) -> dict:
        """The worker's next message. Past ``timeout`` seconds, or when its peak RSS passes
        ``mem_kib``, the worker is killed and OverBudget raised."""
        import select
        end = None if timeout is None else time.perf_counter() + timeout
        while b"\n" not in self.buf:
            left = None if end is None else end - time.perf_counter()
            peak = self.peak_kib()
            if (left is not None and left <= 0) or (mem_kib and peak > mem_kib):
                self.kill()
                raise OverBudget("time" if left is not None and left <= 0 else "memory", peak)
            ready, _, _ = select.select([self.fd], [], [], 0.5 if left is None
                                        else min(left, 0.5))
            if not ready:
                continue
            data = os.read(self.fd, 1 << 16)
            if not data:
                self.proc.wait()
                tail = self.logpath.read_text().strip().splitlines()[-15:]
                raise RuntimeError(f"the {self.impl} worker exited ({self.proc.returncode}):"
                                   "\n    " + "\n    ".join(tail))
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, timeout: float | None = None, mem_kib: int | None = None, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv(timeout, mem_kib)

    def peak_kib(self) -> int:
        """The worker's peak resident memory so far (VmHWM, the ru_maxrss it would report)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def kill(self):
        if self.proc.poll() is None:
            if self.group:
                import signal
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
            self.proc.wait()

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except Exception:
            self.kill()
        os.close(self.fd)
        self.log.close()


def median(xs):
    s = sorted(xs)
    n = len(s)
    return (s[n // 2] + s[(n - 1) // 2]) / 2 if n else float("nan")


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def make_payload(wl, tmp: Path, n_batches: int) -> tuple[Path, int]:
    """The workers' shared start: dlgraph's initial weights (``init_params(g, seed=0)``) and
    ``n_batches`` seeded batches, in one .npz; returns its path and the parameter count."""
    import numpy as np

    import dlgraph
    from dlgraph.engine.spec.init import init_param

    src = wl.spec_source()
    g = dlgraph.load(src["source"], base=src["base"])
    weights = {k: init_param(p, 0) for k, p in g.params.items()}   # = init_params(g, seed=0)
    payload = tmp / f"{wl.name}.npz"
    arrays = {f"w:{k}": v for k, v in weights.items()}
    for i, b in enumerate(wl.batches(n_batches, seed=1)):
        arrays.update({f"b{i}:{k}": v for k, v in b.items()})
    np.savez(payload, n_batches=n_batches, **arrays)
    return payload, int(sum(v.size for v in weights.values()))


def run_workload(name: str, opts, tmp: Path, rotation: int) -> dict:
    from workloads import WORKLOADS

    wl = WORKLOADS[name]
    res = {"name": name, "title": wl.title, "spec": str(wl.spec_path.relative_to(ROOT)),
           "impls": {}, "rounds": opts.rounds, "round_s": opts.round_s}
    missing = wl.missing_ops() if wl.needs else []
    if missing or not wl.spec_path.exists():
        res["skipped"] = (f"dlgraph has no op {', '.join(missing)} yet" if missing else
                          f"{res['spec']} does not exist")
        print(f"[{name}] skipped: {res['skipped']}", flush=True)
        return res
    payload, res["params"] = make_payload(wl, tmp, 8)

    impls = IMPLS
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


# =========================================================================== scaling


def scaling_cell(wl, impl: str, payload: Path, opts, first_only: bool = False) -> dict:
    """One implementation at one sequence length, alone in a fresh worker: time to the first
    step, median steady step, peak RSS. A budget passed is recorded and the worker killed."""
    mem = opts.mem_budget * 1024
    w = Worker(impl, wl.name, payload, opts, early=True)
    cell: dict = {}
    try:
        m = w.recv(opts.first_budget, mem)
        cell.update(first_step_s=time.perf_counter() - w.t0, loss1=m["loss"])
        if first_only:
            w.kill()
            return cell
        end = time.perf_counter() + opts.steady_budget
        m = w.recv(opts.steady_budget, mem)          # second (capture) and third step
        cell.update(ready_s=time.perf_counter() - w.t0, capture_s=m["second"])
        m = w.ask(end - time.perf_counter(), mem, cmd="train", seconds=0, min=opts.steps,
                  max=opts.steps)
        cell.update(steady_ms=1e3 * median(m["times"]), steady_n=len(m["times"]))
        cell["maxrss_kib"] = w.ask(60, None, cmd="rss")["maxrss_kib"]
    except OverBudget as e:
        cell.update(over="steady" if "first_step_s" in cell else "first", over_what=e.what,
                    killed_s=time.perf_counter() - w.t0, maxrss_kib=e.peak_kib)
    except Exception as e:  # one cell's failure must not cost the others
        cell["failed"] = f"{type(e).__name__}: {e}"
    finally:
        w.close()
    return cell


def run_scaling(opts, families, lengths, tmp: Path) -> tuple[list[dict], dict]:
    """The scaling table's rows, every family at every length, and the warm-up's first steps
    (each implementation once at the shortest length, untimed, unless --no-warm-up)."""
    from workloads import scaled

    results, warm = [], {}
    for fam in families:
        if opts.warm_up:
            wl = scaled(fam, lengths[0])
            payload, _ = make_payload(wl, tmp, 4)
            warm[fam] = {i: scaling_cell(wl, i, payload, opts, first_only=True) for i in IMPLS}
            print(f"[{wl.name}] warm-up, first steps: " + "  ".join(
                f"{i} {c['first_step_s']:.1f} s" if "first_step_s" in c else f"{i} —"
                for i, c in warm[fam].items()), flush=True)
        results += [scaling_row(scaled(fam, steps), k, opts, tmp)
                    for k, steps in enumerate(lengths)]
    return results, warm


def scaling_row(wl, rotation: int, opts, tmp: Path) -> dict:
    """One length of one family: the three implementations one after another, each alone on
    the machine, in an order that rotates with the length; their first-step losses compared."""
    payload, n_params = make_payload(wl, tmp, 4)
    res = {"name": wl.name, "family": wl.family, "steps": wl.seq, "params": n_params,
           "impls": {}}
    k = rotation % len(IMPLS)
    for impl in IMPLS[k:] + IMPLS[:k]:
        res["impls"][impl] = c = scaling_cell(wl, impl, payload, opts)
        print(f"[{wl.name}] {impl:8s} {scaling_cells(c, opts)}", flush=True)
    res["impls"] = {i: res["impls"][i] for i in IMPLS}
    losses = {i: c["loss1"] for i, c in res["impls"].items() if "loss1" in c}
    if "dlgraph" in losses and len(losses) > 1:
        res["loss_diff"] = max(rel(losses["dlgraph"], v) for v in losses.values())
        if res["loss_diff"] > TOL:
            res["failed"] = (f"first-step losses differ by {res['loss_diff']:.2e} relative: "
                             + ", ".join(f"{i} {v:.7f}" for i, v in losses.items()))
            print(f"[{wl.name}] FAILED: {res['failed']}", flush=True)
    return res


def scaling_cells(c: dict, opts) -> str:
    """First step, steady step and peak RSS of one cell as table cells."""
    if "failed" in c:
        return f"**failed**: {c['failed'].strip().splitlines()[-1].strip()} | — | —"
    rss = f"{c['maxrss_kib'] / 1024:,.0f}"
    if c.get("over_what") == "memory":
        budget = f"killed at {opts.mem_budget:,} MiB RSS"
        return (f"{budget} | — | ≥ {rss}" if c["over"] == "first" else
                f"{fmt_s(c['first_step_s'])} | {budget} | ≥ {rss}")
    if c.get("over") == "first":
        return f"> {opts.first_budget:g} | — | ≥ {rss}"
    if c.get("over") == "steady":
        return f"{fmt_s(c['first_step_s'])} | > budget | ≥ {rss}"
    return f"{fmt_s(c['first_step_s'])} | {fmt_ms(c['steady_ms'])} | {rss}"


def scaling_ratio(a: dict, b: dict, key: str) -> str:
    """a/b as ``1.23×``; for a first step that b never reached, ``< x×`` against the time
    it was killed at; else ``—``."""
    if key in a and key in b:
        return f"{a[key] / b[key]:.2f}×"
    if key == "first_step_s" and key in a and b.get("over") == "first":
        return f"< {a[key] / b['killed_s']:.2f}×"
    return "—"


def scaling_table(results: list[dict], opts) -> str:
    rows = ["| model | T | impl | first step (s) | steady step (ms, median) | peak RSS (MiB) |",
            "|---|---:|---|---:|---:|---:|"]
    ratios = ["| model | T | first-step loss max rel diff | first step dl/tg | first step "
              "dl/torch | first step dl vs T=" + str(results[0]["steps"] if results else "")
              + " | steady dl/tg | steady dl/torch | RSS dl/tg | RSS dl/torch |",
              "|---|---:|" + "---:|" * 8]
    first_of = {}
    for r in results:
        fam, t = r["family"].upper(), r["steps"]
        for impl, c in r["impls"].items():
            rows.append(f"| {fam}-32 | {t} | {impl} | {scaling_cells(c, opts)} |")
        d, g, p = (r["impls"][i] for i in IMPLS)
        first_of.setdefault(fam, d)
        rss = [{"rss": c["maxrss_kib"]} if "maxrss_kib" in c and "over" not in c else {}
               for c in (d, g, p)]
        ratios.append("| " + " | ".join([
            f"{fam}-32", str(t), f"{r['loss_diff']:.1e}" if "loss_diff" in r else "—",
            scaling_ratio(d, g, "first_step_s"), scaling_ratio(d, p, "first_step_s"),
            scaling_ratio(d, first_of[fam], "first_step_s"),
            scaling_ratio(d, g, "steady_ms"), scaling_ratio(d, p, "steady_ms"),
            scaling_ratio(rss[0], rss[1], "rss"), scaling_ratio(rss[0], rss[2], "rss")])
            + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(ratios) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def scaling_verdict(fam: str, rows: dict[int, dict]) -> str:
    """What the table says about issue 9's targets for one family, in a sentence or four."""
    ts = sorted(rows)
    lo, hi = ts[0], ts[-1]
    d = {t: rows[t]["dlgraph"] for t in ts}
    g = {t: rows[t]["tinygrad"] for t in ts}
    parts = []
    if "first_step_s" in d[lo] and "first_step_s" in d[hi] and hi > lo:
        x = d[hi]["first_step_s"] / d[lo]["first_step_s"]
        parts.append(f"start-up flat in T (first step at T={hi} within 1.5× of T={lo}): "
                     f"{x:.2f}×, " + (_met(x <= 1.5) if (lo, hi) == (16, 1024)
                                      else "T=16 to 1024 not measured in this run"))
    if lo == 16 and "steady_ms" in d[16] and "steady_ms" in g[16]:
        x = d[16]["steady_ms"] / g[16]["steady_ms"]
        parts.append(f"steady step at T=16 within 1.3× of the unrolled one (the hand-written "
                     f"tinygrad): {x:.2f}×, {_met(x <= 1.3)}")
    faster, slower, never = [], [], []
    for t in (t for t in ts if t >= 64):
        if "steady_ms" in d[t] and "steady_ms" in g[t]:
            (faster if d[t]["steady_ms"] < g[t]["steady_ms"] else slower).append(str(t))
        elif "steady_ms" in d[t] and "over" in g[t]:
            never.append(str(t))
    if faster or slower or never:
        notes = ([f"faster at T={', '.join(faster)}"] if faster else []) \
            + ([f"slower at T={', '.join(slower)}"] if slower else []) \
            + ([f"at T={', '.join(never)} the unrolled tinygrad did not reach a timed step "
                "within its budget"] if never else [])
        parts.append("steady step faster than unrolled from T=64 on: " + _met(not slower)
                     + f" ({'; '.join(notes)})")
    parts = [p for p in [*parts, _memory_verdict(fam, d, lo, hi)] if p]
    return f"**{fam.upper()}-32**: " + ("; ".join(parts) if parts else
                                         "too few cells finished to judge a target") + "."


def _memory_verdict(fam: str, d: dict, lo: int, hi: int) -> str:
    """Peak RSS growth from the shortest to the longest length against the bytes of the
    states a loop keeps ([batch, T + 1, 32] float32 each: h and c, or h)."""
    if hi == lo or any("maxrss_kib" not in d[t] or "over" in d[t] for t in (lo, hi)):
        return ""
    a, b = d[lo]["maxrss_kib"] / 1024, d[hi]["maxrss_kib"] / 1024
    n_states = 2 if fam == "lstm" else 1
    states = n_states * 64 * (hi - lo) * 32 * 4 / 2**20
    head = "peak memory grows with T only by the saved states: "
    seen = (f"peak RSS {a:.0f} MiB at T={lo}, {b:.0f} MiB at T={hi}, where the "
            f"{'h and c' if n_states == 2 else 'h'} buffers [64, T + 1, 32] float32 alone "
            f"grow by {states:.1f} MiB")
    if (lo, hi) != (16, 1024):
        return head + f"not judged: T=16 to 1024 not measured in this run ({seen})"
    x = (b - a) / states
    return head + (f"{_met(x <= SAVED_PER_STATE)} ({seen}: {x:.1f}×; read as met up to "
                   f"{SAVED_PER_STATE}×, a step keeping a few [64, 32] tensors per state)"
                   if b > a else f"met ({seen}; the RSS did not grow)")


SAVED_PER_STATE = 8   # a step's body saves its gates and activations, a few tensors per state


def scaling_section(results: list[dict], mach: dict, opts, run: dict) -> str:
    """The markdown section of a --scaling run; ``run`` holds its command, wall_s, date,
    load (before, after) and warm_up (family -> implementation -> cell)."""
    from workloads import SCALING_LENGTHS
    fams = list(dict.fromkeys(r["family"] for r in results))
    verdicts = [scaling_verdict(f, {r["steps"]: r["impls"] for r in results
                                    if r["family"] == f}) for f in fams]
    lengths = sorted({r["steps"] for r in results})
    smoke = [] if lengths == list(SCALING_LENGTHS) and set(fams) == {"lstm", "gru"} else [
        f"**A partial run** (T = {', '.join(map(str, lengths))}; {opts.steps} timed "
        f"step{'s' * (opts.steps > 1)}): not the table of issue 9, which "
        "`.venv/bin/python bench/run.py --scaling` measures.", ""]
    fmt_load = lambda la: ", ".join(f"{x:.1f}" for x in la or [])   # noqa: E731
    return "\n".join([
        SCALING_BEGIN, "## Sequence-length scaling of the recurrent layers", "", *smoke,
        f"Reproduce: `{run['command']}` (took {run['wall_s'] / 60:.1f} min on "
        f"{run['date']}). `--scaling --quick` is the smoke check (T = 16 and 64, two timed "
        "steps). The machine must be otherwise idle.", "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores; load average before the run "
        f"{fmt_load(run['load'][0])}, after {fmt_load(run['load'][1])}. tinygrad "
        f"{mach['tinygrad']}, torch {mach['torch']} ({opts.torch_threads} "
        f"thread{'s' if opts.torch_threads > 1 else ''}). On-disk kernel cache: "
        f"{'off (CACHELEVEL=0)' if opts.cold_cache else 'on'}.", "",
        scaling_table(results, opts), *scaling_method(opts, run.get("warm_up") or {}), "",
        "What the table shows, against issue 9's targets:", "",
        *[f"- {v}" for v in verdicts], "", SCALING_END, ""])


def scaling_method(opts, warm: dict) -> list[str]:
    """The bullet points under the scaling table: what each column measures."""
    done = [f"{f.upper()} " + ", ".join(f"{i} {c['first_step_s']:.1f} s" if "first_step_s"
                                         in c else f"{i} —" for i, c in cells.items())
            for f, cells in warm.items()]
    return [
        "- The graphs/lstm.yaml and bench/specs/gru.yaml workloads (hidden 32, batch 64, Adam "
        "0.01, sine-like windows) with the sequence length T written over the spec. dlgraph "
        "runs the recurrence as one `loop` node (the cell compiled once, called per step); "
        "the hand-written tinygrad unrolls it (T cells, as in the table above); PyTorch runs "
        "`nn.LSTM`/`nn.GRU`.",
        f"- Each cell is one fresh worker process, alone: **first step** is the wall time "
        f"from its start to the end of its first training step (budget {opts.first_budget:g} "
        f"s); **steady step** the median of {opts.steps} timed steps after the third "
        f"(budget {opts.steady_budget:g} s for steps 2 to the last); **peak RSS** the "
        f"worker's `ru_maxrss` (budget {opts.mem_budget:,} MiB). A worker over a budget is "
        "killed: \"> budget\", and its RSS so far as \"≥\". dlgraph's first step at T "
        "against its first step at the shortest T shows whether start-up is flat in T.",
        ("- Warm-up: before the table, each implementation ran once to its first step at the "
         "shortest T, untimed, so that the first row finds tinygrad's kernel cache warm, as "
         "a user's second run does (those first steps: " + "; ".join(done) + ")."
         if done else "- No warm-up (`--no-warm-up`): the first row may include compiling "
         "kernels that tinygrad's cache did not hold yet."),
        "- The three start from the same weights and batch; their first-step losses agree "
        f"within {TOL:g} relative or the row fails."]


SCALING_BEGIN = "<!-- scaling: written by bench/run.py --scaling; begin -->"
SCALING_END = "<!-- scaling: end -->"
LENGTHS = ("<!-- lengths: written by bench/lengths.py; begin -->", "<!-- lengths: end -->")


def scaling_block(text: str, begin: str = SCALING_BEGIN, end: str = SCALING_END) -> str | None:
    """The scaling section of a report (or another between ``begin`` and ``end``), markers
    included, or None."""
    if begin not in text or end not in text:
        return None
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end


def splice_scaling(text: str, section: str | None, begin: str = SCALING_BEGIN,
                   end: str = SCALING_END) -> str:
    """``text`` with its scaling section (or another between ``begin`` and ``end``) replaced
    by ``section`` (appended where it has none; removed where ``section`` is None)."""
    old = scaling_block(text, begin, end)
    if old is not None:
        a, b = text.split(old, 1)
        text = a.rstrip("\n") + ("\n\n" + b.lstrip("\n") if b.strip() else "\n")
    return text.rstrip("\n") + "\n\n" + section.strip() + "\n" if section else text


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
    cols = ["workload", "first-step loss (dlgraph / tinygrad / torch)", "max rel diff",
            "2nd step", "train dl/tg", "train dl/torch", "infer dl/tg", "infer dl/torch",
            "first step dl/tg", "first step dl/torch"]
    ratios = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in results:
        if "skipped" in r:
            rows.append(f"| {r['name']} | — | skipped: {r['skipped']} | | | | | |")
            continue
        if "failed" in r and not all("train_ms" in v for v in r["impls"].values()):
            rows.append(f"| {r['name']} | — | **FAILED**: {r['failed']} | | | | | |")
            continue
        for impl in [i for i in IMPLS if i in r["impls"]]:
            v = r["impls"][impl]
            k = v.get("train_kernels")
            ki = v.get("infer_kernels")
            rows.append(f"| {r['name']} | {impl} | {fmt_ms(v['train_ms'])} | "
                        f"{fmt_ms(v['infer_ms'])} | {fmt_s(v['first_step_s'])} | "
                        f"{fmt_s(v['ready_s'])} | {v['maxrss_kib'] / 1024:.0f} | "
                        + (f"{k} / {ki}" if k is not None else "—") + " |")
        d, t, p = (r["impls"][k] for k in IMPLS)

        def x(a, b, key, bold=False):
            v = f"{a[key] / b[key]:.2f}×"
            return f"**{v}**" if bold else v
        cells = [r["name"], f"{d['loss1']:.6f} / {t['loss1']:.6f} / {p['loss1']:.6f}",
                 f"{r['loss_diff']:.1e}", f"{r['loss2_diff']:.1e}",
                 x(d, t, "train_ms", True), x(d, p, "train_ms"), x(d, t, "infer_ms"),
                 x(d, p, "infer_ms"), x(d, t, "first_step_s"), x(d, p, "first_step_s")]
        ratios.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(ratios) + "\n"


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
        "forward, backward, optimizer update, loss read back) over "
        f"{rounds} per implementation (at least {opts.min_steps} steps a round), in "
        "rotating order. **inference**: the same for the forward pass of one batch (dlgraph: "
        "`dlgraph.compile(g)(x=...)`; tinygrad: a `TinyJit` forward; torch: `no_grad`).",
        "- **first step**: wall time from starting a fresh Python process to the end of the "
        "first training step (imports, spec load and graph build, compiling every kernel, "
        "running them). **steady after**: to the end of the third step: TinyJit runs the "
        "first call, captures on the second and replays from the third on.",
        "- **peak RSS**: `ru_maxrss` of the worker process at the end of its run.",
        "- **kernels/step**: kernels launched by one replayed training step / one inference "
        "call (tinygrad's `GlobalCounters.kernel_count`; dlgraph's replays launch kernels "
        "directly and count them themselves).",
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
    # bench/breakdown.py, latency.py, predict.py, startup.py
    for extra in ("last-breakdown.md", "last-latency.md", "last-predict.md", "last-startup.md"):
        if (HERE / extra).exists():
            lines += [(HERE / extra).read_text().strip(), ""]
    if notes.exists():
        lines.append(notes.read_text().strip() + "\n")
    return "\n".join(lines)


def reproduce(args: list[str]) -> str:
    """The command line of a run as the report shows it: where it wrote its files is left
    out (those are the reader's choice, and may be private paths)."""
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--out", "--json"):
            skip = True
        elif not a.startswith(("--out=", "--json=")):
            keep.append(a)
    return " ".join([".venv/bin/python bench/run.py", *keep])


def write_report(out: Path, md: str) -> None:
    """Write the main report, keeping the sections other runs wrote (--scaling, and
    bench/lengths.py's)."""
    text = out.read_text() if out.exists() else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    md = splice_scaling(md, scaling_block(text))
    out.write_text(splice_scaling(md, scaling_block(text, *LENGTHS), *LENGTHS))
    print(f"wrote {out}")


def scaling_options(ap, opts) -> tuple[list[str], list[int]]:
    """The families and lengths of a --scaling run, its defaults filled in."""
    from workloads import SCALING_FAMILIES, SCALING_LENGTHS, SCALING_QUICK_LENGTHS
    fams = opts.only.split(",") if opts.only else list(SCALING_FAMILIES)
    bad = [f for f in fams if f not in SCALING_FAMILIES]
    if bad:
        ap.error(f"--scaling runs {', '.join(SCALING_FAMILIES)}, not {', '.join(bad)}")
    try:
        lengths = [int(x) for x in opts.lengths.split(",")] if opts.lengths else \
            list(SCALING_QUICK_LENGTHS if opts.quick else SCALING_LENGTHS)
    except ValueError:
        ap.error(f"--lengths takes comma-separated integers, not {opts.lengths!r}")
    if any(t < 1 for t in lengths):
        ap.error("--lengths must be positive")
    opts.steps = opts.steps or (2 if opts.quick else 5)
    return fams, lengths


def main_scaling(ap, opts, argv) -> int:
    """--scaling: the sequence-length table, written as its section of docs/benchmarks.md."""
    fams, lengths = scaling_options(ap, opts)
    full = not (opts.only or opts.quick or opts.lengths)
    out = Path(opts.out) if opts.out else (DEFAULT_OUT if full else None)
    if full and not opts.json:
        opts.json = str(HERE / "last-scaling.json")   # lets --from-json re-render it
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlgraph-scaling-") as tmp:
        results, warm = run_scaling(opts, fams, lengths, Path(tmp))
    wall = time.perf_counter() - t0
    load = (load0, os.getloadavg())
    command = reproduce(argv if argv is not None else sys.argv[1:])
    mach = machine()
    run = {"command": command, "wall_s": wall, "load": load, "warm_up": warm,
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    section = scaling_section(results, mach, opts, run)
    print()
    print(section)
    print(f"total wall time {wall:.0f} s")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(splice_scaling(out.read_text() if out.exists() else "", section))
        print(f"wrote {out}")
    return _finish(opts, results, {"mode": "scaling", "results": results, "machine": mach,
                                   "run": run},
                   ("steps", "first_budget", "steady_budget", "mem_budget", "torch_threads",
                    "cold_cache", "quick", "warm_up"))


def _finish(opts, results, payload: dict, keep: tuple) -> int:
    """Write the raw results (--json) with the options that shaped them; 1 if any failed."""
    if opts.json:
        Path(opts.json).write_text(json.dumps(
            {**payload, "opts": {k: getattr(opts, k) for k in keep}}, indent=1))
    failed = [r["name"] for r in results if "failed" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def from_json(opts) -> int:
    """--from-json: re-render the report (or the scaling section) of an earlier run."""
    raw = json.loads(Path(opts.from_json).read_text())
    for k, v in raw["opts"].items():
        setattr(opts, k, v)
    out = Path(opts.out) if opts.out else DEFAULT_OUT
    if raw.get("mode") == "scaling":
        section = scaling_section(raw["results"], raw["machine"], opts, raw["run"])
        out.write_text(splice_scaling(out.read_text() if out.exists() else "", section))
        print(f"wrote {out}")
        return 0
    write_report(out, report(raw["results"], raw["machine"], opts, raw["wall_s"],
                             raw["command"]))
    return 0


def parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--cold-cache", action="store_true",
                    help="workers run with tinygrad's on-disk kernel cache off")
    ap.add_argument("--scaling", action="store_true",
                    help="the sequence-length table instead: lstm and gru (--only to pick) at "
                         "T = 16, 64, 256, 1024 (--quick: 16, 64), one worker per cell")
    ap.add_argument("--lengths", help="--scaling: comma-separated sequence lengths")
    ap.add_argument("--steps", type=int, help="--scaling: timed steps per cell (default 5, "
                                              "--quick 2)")
    ap.add_argument("--first-budget", type=float, default=240,
                    help="--scaling: seconds a worker may take to its first step")
    ap.add_argument("--steady-budget", type=float, default=180,
                    help="--scaling: seconds for the steps after the first, timed ones included")
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                    help="--scaling: skip the untimed first step of each implementation at the "
                         "shortest length that warms tinygrad's kernel cache before the table")
    ap.add_argument("--mem-budget", type=int, default=8192,
                    help="--scaling: MiB of peak RSS a worker may reach")
    ap.add_argument("--out", help=f"markdown report (default: {DEFAULT_OUT.relative_to(ROOT)} "
                                  "for a full run, none otherwise)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--from-json", help="no run: render the report (with the current "
                    "bench/NOTES.md) from the raw results of an earlier run")
    # worker mode
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    ap.add_argument("--early", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    ap = parser()
    opts = ap.parse_args(argv)
    if opts.worker:
        opts.impl = opts.worker
        return worker(opts)

    if opts.from_json:
        return from_json(opts)
    if opts.scaling:
        return main_scaling(ap, opts, argv)

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
    command = reproduce(argv if argv is not None else sys.argv[1:])
    mach = machine()
    md = report(results, mach, opts, wall, command)
    print()
    print(table(results))
    print(f"total wall time {wall:.0f} s")
    if out:
        write_report(out, md)
    return _finish(opts, results, {"results": results, "wall_s": wall, "machine": mach,
                                   "command": command},
                   ("rounds", "round_s", "min_steps", "torch_threads", "cold_cache", "quick"))


if __name__ == "__main__":
    sys.exit(main())
