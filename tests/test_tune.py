"""`dlgraph tune` as a user meets it: one search, recorded; later runs of the spec at that
batch size compile with the tuned kernels (found in tinygrad's cache, not searched again)
and compute what an untuned run computes; other sizes compile as usual."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.train.checkpoint import load_tensors

SPEC = """\
dlgraph: 1
name: tune-mlp
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  h: {op: linear, in: x, out: 8, activation: relu}
  logits: {op: linear, in: h, out: 2}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 64}
  batch: 16
  epochs: 1
  objective: loss
  optimizer: {type: sgd, lr: 0.1}
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DLGRAPH_CACHE_DIR", str(d))
    return d


def _run(spec, out, cache_dir):
    r = subprocess.run([sys.executable, "-m", "dlgraph.cli.main", "run", str(spec), "--out",
                        str(out), "--steps", "3"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DLGRAPH_CACHE_DIR": str(cache_dir)})
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_a_tuned_spec_runs_with_its_tuned_kernels(tmp_path, cache_dir):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    r = CliRunner().invoke(main, ["tune", str(spec), "--beam", "1"])
    assert r.exit_code == 0, r.output
    assert re.search(r"tuned inference and training step 'train' with BEAM=1 at batch=16 in "
                     r"\d+ s; later runs at these sizes use the tuned kernels", r.output)
    tuned = json.loads((cache_dir / "tuned.json").read_text())
    assert list(tuned.values()) == [{"beam": 1, "dims": {"batch": 16}}]
    # another learning rate is a runtime value: the tuned program itself is loaded, no kernel
    # searched or generated again
    other = tmp_path / "other.yaml"
    other.write_text(SPEC.replace("lr: 0.1", "lr: 0.05"))
    said = _run(other, tmp_path / "tuned", cache_dir)
    assert re.search(r"loaded the training step: .* from the program cache", said), said
    assert "generated" not in said and "BEAM" not in said, said
    _run(other, tmp_path / "plain", tmp_path / "untuned-cache")
    a, b = (load_tensors(tmp_path / r / "weights.safetensors")[0] for r in ("tuned", "plain"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_other_batch_sizes_compile_untuned(tmp_path, cache_dir):
    from dlgraph.engine.compile.cache import default_cache, remember_tuning, tuned_key
    g = dlgraph.load(SPEC)
    remember_tuning(default_cache(), tuned_key(g), 2, {"batch": 16})
    m = dlgraph.compile(g)
    prog = m._program
    assert prog.beam({"batch": 16}) == 2 and prog.beam({"batch": 5}) == 0
    assert m(x=np.zeros((5, 2), np.float32))["logits"].shape == (5, 2)   # no search at 5
    edited = dlgraph.load(SPEC.replace("out: 8", "out: 9"))
    assert dlgraph.compile(edited)._program.beam({"batch": 16}) == 0     # another network


def test_tune_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    g = dlgraph.load(SPEC)
    with pytest.raises(dlgraph.DlgraphError, match="BEAM width 9 is out of range"):
        dlgraph.tune(g, beam=9)
    monkeypatch.setenv("DLGRAPH_CACHE_DIR", "off")
    with pytest.raises(dlgraph.DlgraphError, match="records its tuning in the program cache"):
        dlgraph.tune(g, beam=1)
