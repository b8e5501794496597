"""Start-up: how long a user waits for the first training step, as the edit-run loop meets it.

For each benchmark workload, in one run, each a fresh process of
``dlgraph run SPEC --steps 1``, timed from launch to the end of its first training step (as
the run reports it: "first step after", counted from the process's start) and to its exit
(then also the validation pass, the run's files and its curves):

* ``cold``: every cache empty, dlgraph's (programs, kernels) and tinygrad's own;
* ``again``: the same spec once more (the program cache);
* ``lr``, ``dropout``: the spec with only the learning rate (or a dropout probability)
  changed: runtime values, so the compiled program is loaded;
* ``width``: the first layer with ``out:`` or ``hidden:`` 8 wider: a new program, its
  other kernels from the kernel cache;
* ``evaluate``: ``dlgraph evaluate`` of the trained weights (the validation program);
* ``torch``: the anchor, PyTorch's first step of the same network in a fresh process
  (import, model, one step), the bench's peer (bench/peers.py).

A shared machine is noisy: the rows a process can meet again (the anchor, again, lr,
dropout, evaluate) are each the median of ``--repeat`` processes (3); cold and width happen
once by nature (a second would load what the first compiled).

Then the depth rows: MLPs of 25, 100 and 400 identical 32-wide linear+relu layers, every
cache empty, ``--steps 2``.

    python bench/startup.py                # writes bench/last-startup.md
    python bench/startup.py --only cnn     # one workload

Run it alone on the machine; it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run import make_payload  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

DLGRAPH = [sys.executable, "-m", "dlgraph.cli.main"]

TORCH_FIRST_STEP = """\
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(1)
import peers
from workloads import workload
wl = workload(sys.argv[2])
data = np.load(sys.argv[3])
weights = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
batch = {k: data[f"b0:{k}"] for k in wl.inputs}
peers.build("torch", wl, weights, batch).train_step(batch)
print(time.perf_counter() - t0)
"""


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    """Wall seconds of one process, launch to exit, and its output; raises on failure."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{r.stdout}\n{r.stderr}")
    return wall, r.stdout + r.stderr


def fresh_env(tmp: Path, tag: str) -> dict:
    """An environment whose dlgraph and tinygrad caches are new, empty folders."""
    d = tmp / f"cache-{tag}"
    d.mkdir()
    return {**os.environ, "DLGRAPH_CACHE_DIR": str(d / "dlgraph"),
            "CACHEDB": str(d / "tinygrad.db"), "PYTHONPATH": str(ROOT)}


def edited(spec: dict, what: str) -> dict | None:
    """The spec with one edit (None where it has nothing to edit)."""
    s = yaml.safe_load(yaml.safe_dump(spec))
    if what == "lr":
        s["train"]["optimizer"]["lr"] *= 0.5
        return s
    for node in s["nodes"].values():
        if what == "dropout" and node.get("op") == "dropout":
            node["p"] = round(node.get("p", 0.5) + 0.05, 3)
            return s
        for key in ("out", "hidden"):
            if what == "width" and isinstance(node.get(key), int) and node[key] > 1:
                node[key] += 8
                return s
    return None


def workload_rows(name: str, tmp: Path, repeat: int = 1) -> dict[str, float | None]:
    """One workload's row; the rows a process can meet again (the torch anchor, again, lr,
    dropout, evaluate) are the median of ``repeat`` processes (a shared machine is noisy);
    cold and width happen once by nature (the second would load what the first compiled)."""
    wl = WORKLOADS[name]
    src = wl.spec_source()
    spec = wl.spec_dict()
    spec["train"].pop("target", None)        # one step never meets it; exit 1 would follow
    base = Path(src["base"]) if src.get("base") else ROOT
    env = fresh_env(tmp, name)
    row: dict[str, float | None] = {}
    payload, _ = make_payload(wl, tmp, 1)
    row["torch"] = median([timed([sys.executable, "-c", TORCH_FIRST_STEP, str(HERE), name,
                                  str(payload)], {**os.environ}, ROOT)[0]
                           for _ in range(repeat)])

    def run(tag: str, s: dict | None, times: int = 1) -> float | None:
        if s is None:
            return None
        path = base / f".startup-{name}-{tag}.yaml"        # beside the spec: its data paths
        path.write_text(yaml.safe_dump(s, sort_keys=False))
        firsts, walls = [], []
        try:
            for i in range(times):
                wall, out = timed([*DLGRAPH, "run", str(path), "--steps", "1", "--quiet",
                                   "--out", str(tmp / f"{name}-{tag}-{i}")], env, ROOT)
                first = re.search(r"first step after ([0-9.]+) s", out)
                firsts.append(float(first.group(1)) if first else wall)
                walls.append(wall)
        finally:
            path.unlink()
        row[f"{tag}:exit"] = median(walls)
        return median(firsts)

    row["cold"] = run("cold", spec)
    row["again"] = run("again", spec, repeat)
    for what in ("lr", "dropout"):
        row[what] = run(what, edited(spec, what), repeat)
    row["width"] = run("width", edited(spec, "width"))
    path = base / f".startup-{name}-eval.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        row["evaluate"] = median([timed([*DLGRAPH, "evaluate", str(path), "--weights",
                                         str(tmp / f"{name}-again-0" / "weights.safetensors")],
                                        env, ROOT)[0] for _ in range(repeat)])
    finally:
        path.unlink()
    return row


def depth_spec(layers: int) -> dict:
    nodes = {"l0": {"op": "linear", "in": "x", "out": 32, "activation": "relu"}}
    for i in range(1, layers):
        nodes[f"l{i}"] = {"op": "linear", "in": f"l{i - 1}", "out": 32, "activation": "relu"}
    nodes["logits"] = {"op": "linear", "in": f"l{layers - 1}", "out": 3}
    nodes["loss"] = {"op": "cross_entropy", "in": ["logits", "y"]}
    return {"dlgraph": 1, "name": f"deep{layers}",
            "inputs": {"x": {"shape": ["batch", 2]}, "y": {"shape": ["batch"], "dtype": "int32"}},
            "nodes": nodes, "outputs": ["logits"],
            "train": {"data": {"source": "spirals", "samples": 512, "classes": 3},
                      "batch": 64, "epochs": 1, "objective": "loss",
                      "optimizer": {"type": "adam", "lr": 0.001}}}


def depth_rows(tmp: Path, sizes=(25, 100, 400)) -> dict[int, float]:
    out = {}
    for n in sizes:
        path = tmp / f"deep{n}.yaml"
        path.write_text(yaml.safe_dump(depth_spec(n), sort_keys=False))
        out[n], _ = timed([*DLGRAPH, "run", str(path), "--steps", "2", "--quiet", "--out",
                           str(tmp / f"deep{n}")], fresh_env(tmp, f"deep{n}"), ROOT)
    return out


COLUMNS = ("torch", "cold", "again", "lr", "dropout", "width", "evaluate")


def table(rows: dict[str, dict], depth: dict[int, float]) -> str:
    def cell(r, k):
        v = r.get(k)
        if v is None:
            return "—"
        if k == "torch":
            return f"{v:.1f} s"
        done = f" · {r[k + ':exit']:.1f} s" if k + ":exit" in r else ""
        return f"{v:.1f} s ({v / r['torch']:.2f}×){done}"
    lines = ["| workload | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r, k) for k in COLUMNS) + " |"
              for name, r in rows.items()]
    if depth:
        ks = sorted(depth)
        lines += ["", "| MLP depth (every cache empty, --steps 2) | "
                  + " | ".join(f"{k} layers" for k in ks) + " |", "|---" * (len(ks) + 1) + "|",
                  "| first two steps, process wall | "
                  + " | ".join(f"{depth[k]:.1f} s" for k in ks) + " |"]
        if len(ks) == 3:
            a, b, c = (depth[k] for k in ks)
            lines.append(f"\n{ks[1]} / {ks[0]} layers: {b / a:.2f}×; {ks[2]} / {ks[1]} layers: "
                         f"{c / b:.2f}×")
    return "\n".join(lines)


def compile_modules() -> None:
    """dlgraph's modules byte-compiled, as an installed package's are (and PyTorch's): the
    editable install's are not, and a start then compiles about 80 of them (`make bytecode`)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "dlgraph", "engine", "ops", "cli"],
                   cwd=ROOT, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=list(WORKLOADS), help="workloads")
    ap.add_argument("--no-depth", action="store_true", help="skip the depth rows")
    ap.add_argument("--repeat", type=int, default=3,
                    help="processes behind each row a process can meet again (median)")
    ap.add_argument("-o", default=str(HERE / "last-startup.md"), help="markdown out")
    args = ap.parse_args()
    compile_modules()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        rows = {}
        for name in args.only:
            rows[name] = workload_rows(name, tmp, args.repeat)
            print(name, {k: (round(v, 2) if v else v) for k, v in rows[name].items()},
                  flush=True)
        depth = {} if args.no_depth else depth_rows(tmp)
    load1 = os.getloadavg()
    text = ("## Start-up\n\n"
            "Start-up, seconds from launch to the end of the first training step of "
            "`dlgraph run SPEC --steps 1` (as the run reports it), then · to its exit "
            "(validation, the run's files, curves); evaluate: launch to exit (×: against "
            "PyTorch's first step in a fresh process, import included, 1 thread); torch, "
            f"again, lr, dropout and evaluate: the median of {args.repeat} processes; load "
            f"average "
            f"{load0[0]:.2f} before, {load1[0]:.2f} after.\n\n" + table(rows, depth) + "\n")
    Path(args.o).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
