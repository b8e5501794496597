"""TensorBoard logging (`log: {tensorboard: ...}`, `dlgraph run --tensorboard [DIR]`): the
event files are read back record by record and compared with metrics.jsonl."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main

pytest.importorskip("tensorboardX")
from tensorboardX.proto.event_pb2 import Event  # noqa: E402

SPEC = """dlgraph: 1
name: tb
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  h: {op: linear, in: x, out: 8, activation: tanh}
  logits: {op: linear, in: h, out: 2}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 320}
  batch: 32
  epochs: 2
  objective: loss
  optimizer: {type: adam, lr: 0.01}
  schedule: {type: step, step_size: 5, gamma: 0.5}
  metrics: [{type: accuracy, in: [logits, y]}]
  validation: {split: 0.2}
"""


def read_events(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall time)] from every event file under ``folder``, parsed from
    the TFRecord framing (length, crc, data, crc) and the Event protocol buffer."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value, ev.wall_time))
    return out


def rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def test_event_file_holds_what_metrics_jsonl_holds(tmp_path):
    g = dlgraph.load(SPEC + "  log: {tensorboard: true}\n")
    res = dlgraph.train(g, out=tmp_path / "run", quiet=True)
    ev = read_events(tmp_path / "run" / "tensorboard")
    steps = rows(res.run_dir, "step")
    assert len(steps) == res.steps == 16                       # 256 training samples / 32 x 2
    assert [s for s, _, _ in ev["step/loss"]] == [r["step"] for r in steps]
    np.testing.assert_allclose([v for _, v, _ in ev["step/loss"]], [r["loss"] for r in steps],
                               rtol=1e-6)
    np.testing.assert_allclose([t for _, _, t in ev["step/loss"]], [r["time"] for r in steps])
    epochs = rows(res.run_dir, "epoch")
    for name in ("loss", "val_loss", "val_accuracy"):
        assert [s for s, _, _ in ev[f"epoch/{name}"]] == [r["step"] for r in epochs]
        np.testing.assert_allclose([v for _, v, _ in ev[f"epoch/{name}"]],
                                   [r[name] for r in epochs], rtol=1e-6)
    # the step schedule halves the rate every 5 steps: after steps 8 and 16 it is 0.01 / 2, / 8
    lrs = [v for _, v, _ in ev["lr/train"]]
    np.testing.assert_allclose(lrs, [0.01 * 0.5 ** (7 // 5), 0.01 * 0.5 ** (15 // 5)],
                               rtol=1e-6)


def test_cli_flag_writes_to_the_folder_given(tmp_path):
    spec = tmp_path / "tb.yaml"
    spec.write_text(SPEC)
    r = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "run"), "--quiet",
                                  "--steps", "3", "--tensorboard", str(tmp_path / "tb")])
    assert r.exit_code == 0, r.output
    ev = read_events(tmp_path / "tb")
    assert [s for s, _, _ in ev["step/loss"]] == [1, 2, 3]
    assert not (tmp_path / "run" / "tensorboard").exists()
    # without a folder: the run directory's tensorboard/
    r = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "run2"),
                                  "--quiet", "--steps", "2", "--tensorboard"])
    assert r.exit_code == 0, r.output
    assert [s for s, _, _ in read_events(tmp_path / "run2" / "tensorboard")["step/loss"]] == \
        [1, 2]


def test_missing_tensorboardx_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)        # import fails
    spec = tmp_path / "tb.yaml"
    spec.write_text(SPEC + "  log: {tensorboard: true}\n")
    r = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "run"), "--quiet",
                                  "--steps", "1"])
    assert r.exit_code == 1
    assert r.stderr == ("error: TensorBoard logging needs the tensorboardX package\n"
                        "  help: pip install 'dlgraph[tensorboard]' (or tensorboardX)\n")
