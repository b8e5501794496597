"""`dlgraph predict` throughput on a large file, side by side with PyTorch and onnxruntime
doing the same job: each a fresh process that reads the rows from an .npz file, runs the
model over them batch by batch and writes the outputs to an .npz file (import, load,
compute, save: what a user waits for).

- **dlgraph**: ``dlgraph predict SPEC --weights W --data rows.npz -o out.npz --batch B``, its
  program compiled by an earlier run (as after training: the program cache);
- **PyTorch**: the bench's peer model (bench/peers.py) with the same weights, ``no_grad``;
- **onnxruntime**: dlgraph's own ONNX export of the same model and weights.

The outputs of the three are compared (dlgraph's against PyTorch's, within 1e-4).

    .venv/bin/python bench/predict.py            # writes bench/last-predict.md

Run it alone on the machine; it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from startup import timed  # noqa: E402

ROWS = {"mlp": 60_000, "cnn": 6_000, "lstm": 60_000, "transformer": 30_000}

TORCH = """\
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(1)
from peers import TorchPeer
from workloads import workload
wl = workload(sys.argv[2])
w = np.load(sys.argv[3])
peer = TorchPeer(wl, {k: w[k] for k in w.files})
with np.load(sys.argv[4]) as f:
    rows = {k: f[k] for k in f.files}
n, b = len(next(iter(rows.values()))), int(sys.argv[6])
with torch.no_grad():
    out = np.concatenate([peer.infer({k: v[i:i + b] for k, v in rows.items()})
                          for i in range(0, n, b)])
np.savez(sys.argv[5], out=out)
"""

ORT = """\
import sys
import numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = so.inter_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
with np.load(sys.argv[2]) as f:
    rows = {k: f[k] for k in f.files}
names = [i.name for i in sess.get_inputs()]
n, b = len(rows[names[0]]), int(sys.argv[4])
out = np.concatenate([sess.run(None, {k: rows[k][i:i + b] for k in names})[0]
                      for i in range(0, n, b)])
np.savez(sys.argv[3], out=out)
"""


def workload_row(name: str, tmp: Path, runs: int) -> dict:
    from workloads import workload

    import dlgraph
    from dlgraph.engine.train.checkpoint import save_tensors
    wl = workload(name)
    src = wl.spec_source()
    g = dlgraph.load(src["source"], base=src.get("base"))
    model = dlgraph.compile(g, seed=0)
    weights = model.state_dict()
    rng = np.random.default_rng(0)
    rows = {k: np.ascontiguousarray(gen(rng, (ROWS[name], *shape)).astype(dtype))
            for k, (shape, dtype, gen) in wl.inputs.items() if k in model.input_names}
    data, wfile, wnpz = tmp / f"{name}-rows.npz", tmp / f"{name}.safetensors", tmp / f"{name}-w.npz"
    np.savez(data, **rows)
    save_tensors(wfile, weights)
    np.savez(wnpz, **weights)
    onnx = dlgraph.export(g, tmp / f"{name}.onnx", weights=weights)
    base = Path(src["base"]) if src.get("base") else ROOT
    spec = base / f".predict-{name}.yaml"          # beside the spec: its data paths
    spec.write_text(yaml.safe_dump(src["source"], sort_keys=False))
    b, env = wl.batch, {**os.environ, "PYTHONPATH": str(ROOT)}
    cmds = {
        "dlgraph": [sys.executable, "-m", "dlgraph.cli.main", "predict", str(spec), "--weights",
                    str(wfile), "--data", str(data), "-o", str(tmp / f"{name}-dl.npz"),
                    "--batch", str(b), "--quiet", "--force"],
        "torch": [sys.executable, "-c", TORCH, str(HERE), name, str(wnpz), str(data),
                  str(tmp / f"{name}-pt.npz"), str(b)],
        "onnxruntime": [sys.executable, "-c", ORT, str(onnx), str(data),
                        str(tmp / f"{name}-ort.npz"), str(b)]}
    try:
        timed(cmds["dlgraph"], env, ROOT)           # the program compiled once, then cached
        times = {k: [] for k in cmds}
        for _ in range(runs):
            for k, cmd in cmds.items():
                times[k].append(timed(cmd, env, ROOT)[0])
    finally:
        spec.unlink()
    out = model.outputs[0]
    dl = np.load(tmp / f"{name}-dl.npz")[out]
    pt = np.load(tmp / f"{name}-pt.npz")["out"]
    np.testing.assert_allclose(dl, pt.reshape(dl.shape), rtol=1e-4, atol=1e-4)
    return {"rows": ROWS[name], "batch": b, **{k: float(np.median(v)) for k, v in times.items()}}


def table(rows: dict) -> str:
    out = ["| workload | rows | batch | dlgraph s (rows/s) | PyTorch s (rows/s) | "
           "onnxruntime s (rows/s) | dl/PyTorch | dl/onnxruntime |", "|---" * 8 + "|"]
    for name, r in rows.items():
        cells = [f"{r[k]:.2f} ({r['rows'] / r[k]:,.0f})" for k in ("dlgraph", "torch",
                                                                     "onnxruntime")]
        out.append(f"| {name} | {r['rows']:,} | {r['batch']} | " + " | ".join(cells)
                   + f" | {r['dlgraph'] / r['torch']:.2f}× | "
                   f"{r['dlgraph'] / r['onnxruntime']:.2f}× |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=list(ROWS), help="workloads")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (median)")
    ap.add_argument("-o", default=str(HERE / "last-predict.md"), help="markdown out")
    args = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as t:
        rows = {}
        for name in args.only:
            rows[name] = workload_row(name, Path(t), args.runs)
            print(name, rows[name], flush=True)
    load1 = os.getloadavg()
    text = ("## Predict throughput\n\n"
            "`dlgraph predict` over a large .npz file against PyTorch (1 thread, `no_grad`) and "
            "onnxruntime (1 thread, dlgraph's ONNX export) doing the same job: seconds per "
            f"process, launch to exit, median of {args.runs} (bench/predict.py); load average "
            f"{load0[0]:.2f} before, {load1[0]:.2f} after.\n\n" + table(rows) + "\n")
    Path(args.o).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
