"""C kernels compiled by one run of the C compiler and cut apart (engine/compile/together.py):
each piece runs where it is loaded and computes what the kernel compiled alone computes; a
kernel that cannot be cut out is left to be compiled alone; a training run whose kernels
were compiled together gives, bit for bit, the weights of one whose kernels were not."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_in_new_process

from dlgraph.engine.compile import together

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64")
                                or shutil.which("clang") is None,
                                reason="x86-64 with clang only")

CLANG = ["clang", "-c", "-x", "c", "-O2", "-fPIC", "-ffreestanding", "-fno-math-errno",
         "-nostdlib", "-fno-ident", "--target=x86_64-none-unknown-elf", "-march=native",
         "-", "-o", "-"]

SCALE = """typedef float float4 __attribute__((aligned(16),ext_vector_type(4)));
void E_16(float* restrict data0, float* restrict data1) {
  for (int i = 0; i < 16; i++) { data0[i] = data1[i] * 1.7f + 0.3f; }
}"""
CLAMP = """void E_16(float* restrict data0, float* restrict data1) {
  for (int i = 0; i < 16; i++) {
    float v = data1[i]; data0[i] = v < -0.5f ? -0.5f : v > 2.25f ? 2.25f : v;
  }
}"""
EXTERNAL = """float helper(float);
void E_16(float* restrict data0, float* restrict data1) {
  for (int i = 0; i < 16; i++) { data0[i] = helper(data1[i]); }
}"""


def _run(code: bytes, x: np.ndarray) -> np.ndarray:
    """Runs a piece of machine code ``void f(float *out, float *in)`` from fresh memory."""
    mem = mmap.mmap(-1, max(len(code), 1), prot=mmap.PROT_READ | mmap.PROT_WRITE |
                    mmap.PROT_EXEC)
    mem.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(addr)
    out = np.zeros_like(x)
    fn(out.ctypes.data, x.ctypes.data)
    del fn
    return out


def test_each_piece_runs_where_it_is_loaded_and_computes_its_kernel():
    x = np.linspace(-2, 3, 16, dtype=np.float32)
    scale, clamp = together.compile_together(CLANG, [SCALE, CLAMP])   # both named E_16
    assert scale is not None and clamp is not None
    want = x.astype(np.float64) * np.float32(1.7) + np.float32(0.3)     # fused or not
    np.testing.assert_allclose(_run(scale, x), want, rtol=2e-7, atol=1e-7)
    np.testing.assert_array_equal(_run(clamp, x), np.clip(x, -0.5, 2.25))


def test_a_kernel_calling_outside_is_left_to_compile_alone_and_an_error_leaves_all():
    pieces = together.compile_together(CLANG, [SCALE, EXTERNAL, CLAMP])
    assert pieces[0] is not None and pieces[1] is None and pieces[2] is not None
    assert together.compile_together(CLANG, [SCALE, "void broken( {"]) == [None, None]
    assert together.compile_together(CLANG, [SCALE, "int x;"])[1] is None   # no function


SPEC = """\
dlgraph: 1
name: together
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  h1: {op: linear, in: x, out: 37, activation: tanh}
  h2: {op: linear, in: h1, out: 29, activation: relu}
  logits: {op: linear, in: h2, out: 2}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 96}
  batch: 24
  objective: loss
  optimizer: {type: adam, lr: 0.01}
"""


def _train(spec, where, together_: str) -> dict[str, np.ndarray]:
    """Three steps in a new process with every cache new: its weights."""
    run_in_new_process(spec, where / "run", where / "c", "--steps", "3",
                       env={"CACHEDB": str(where / "tinygrad.db"),
                            "DLGRAPH_COMPILE_TOGETHER": together_})
    from dlgraph.engine.train.checkpoint import load_tensors
    return load_tensors(where / "run" / "weights.safetensors")[0]


def test_training_compiled_together_gives_the_weights_of_kernels_compiled_apart(tmp_path):
    spec = tmp_path / "mlp.yaml"
    spec.write_text(SPEC)
    a = _train(spec, tmp_path / "together", "1")
    b = _train(spec, tmp_path / "apart", "0")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


COUNTED = """
import sys
import numpy as np
import dlgraph
from dlgraph.engine.compile import together
runs, real = [], together.compile_together
def counting(command, sources):
    pieces = real(command, sources)
    runs.append(sum(p is not None for p in pieces))
    return pieces
together.compile_together = counting
model = dlgraph.compile(dlgraph.load(sys.argv[1]), seed=1, cache=False)
x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
np.save(sys.argv[2], model(x=x)["logits"])
for k, v in model.params.items():
    np.save(f"{sys.argv[2]}.{k}.npy", v.numpy())
print(runs)
"""


def test_a_new_program_runs_the_c_compiler_once_for_its_kernels(tmp_path):
    """A process with tinygrad's compiled-code database empty, generating every kernel itself
    (no second process): the program's kernels come out of one run of the C compiler (the
    pieces counted), and the model computes numpy's numbers."""
    spec = tmp_path / "mlp.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out.npy"
    r = subprocess.run([sys.executable, "-c", COUNTED, str(spec), str(out)], capture_output=True,
                       text=True, timeout=600, env={**os.environ,
                                                    "CACHEDB": str(tmp_path / "tinygrad.db"),
                                                    "DLGRAPH_CACHE_DIR": str(tmp_path / "c"),
                                                    "DLGRAPH_COMPILE_HELPER": "0"})
    assert r.returncode == 0, r.stderr
    runs = [int(n) for n in r.stdout.strip().splitlines()[-1].strip("[]").split(",") if n]
    assert runs and max(runs) >= 2, r.stdout      # several kernels cut out of one object
    w = {k: np.load(f"{out}.{k}.npy").astype(np.float64)
         for k in ("h1.weight", "h1.bias", "h2.weight", "h2.bias", "logits.weight",
                   "logits.bias")}
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    h = np.tanh(x @ w["h1.weight"].T + w["h1.bias"])
    h = np.maximum(h @ w["h2.weight"].T + w["h2.bias"], 0)
    np.testing.assert_allclose(np.load(out), h @ w["logits.weight"].T + w["logits.bias"],
                               rtol=1e-4, atol=1e-5)
