"""The training loop as a user meets it: run directories, resume, NaN, weights, schedules."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.spec.train import ScheduleSpec
from dlgraph.engine.train.checkpoint import load_tensors
from dlgraph.engine.train.loop import lr_at

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/specs/good/tiny_mlp.yaml"


def lines(run_dir, kind):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_run_directory_contents(tmp_path):
    res = dlgraph.train(dlgraph.load(TINY), out=tmp_path / "run", quiet=True)
    d = res.run_dir
    for name in ("spec.yaml", "metrics.jsonl", "checkpoint.safetensors", "weights.safetensors",
                 "curves.png"):
        assert (d / name).is_file(), name
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary file left; the one hidden file marks and locks the run directory
    assert not list(d.glob("*.tmp")) and [p.name for p in d.glob(".*")] == [".dlgraph-run"]
    epochs = lines(d, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert res.metrics["val_accuracy"] > 0.9            # xor is easy
    assert len(lines(d, "step")) == res.steps == 4 * 12
    # the resolved spec re-loads to the same graph
    again = dlgraph.load(d / "spec.yaml")
    assert list(again.nodes) == list(dlgraph.load(TINY).nodes)


def test_resume_gives_the_same_result_as_one_run(tmp_path):
    full = dlgraph.train(dlgraph.load(TINY), out=tmp_path / "full", quiet=True)
    dlgraph.train(dlgraph.load(TINY), out=tmp_path / "part", epochs=2, quiet=True)
    resumed = dlgraph.train(dlgraph.load(TINY), out=tmp_path / "part", resume=True, quiet=True)
    a, _ = load_tensors(full.run_dir / "weights.safetensors")
    b, _ = load_tensors(resumed.run_dir / "weights.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.metrics == full.metrics
    assert [e["epoch"] for e in lines(resumed.run_dir, "epoch")] == [1, 2, 3, 4]


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(dlgraph.TrainingError) as e:
        dlgraph.train(dlgraph.load(TINY), out=tmp_path / "none", resume=True, quiet=True)
    assert str(e.value).startswith("nothing to resume: ")


def test_nan_loss_names_step_and_node(tmp_path):
    spec = TINY.read_text().replace(
        "  loss: {op: cross_entropy, in: [logits, y]}",
        "  ce: {op: cross_entropy, in: [logits, y]}\n"
        "  logl: {op: log, in: logits}\n"        # log of negative logits: NaN
        "  penalty: {op: mean, in: logl}\n"
        "  loss: {op: add, in: [ce, penalty]}")
    path = tmp_path / "nan.yaml"
    path.write_text(spec)
    r = CliRunner().invoke(main, ["run", str(path), "--debug", "--quiet",
                                  "--out", str(tmp_path / "r")])
    assert r.exit_code == 1, r.output
    assert "error: the loss of phase 'train' became nan at step" in r.stderr
    assert "the first non-finite value is node 'logl'" in r.stderr
    assert "Traceback" not in r.output


def test_weights_run_inference(tmp_path):
    res = dlgraph.train(dlgraph.load(TINY), out=tmp_path / "r", quiet=True)
    x = np.array([[0, 0], [1, 1], [0, 1], [1, 0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    r = CliRunner().invoke(main, ["run", str(TINY), "--weights",
                                  str(res.run_dir / "weights.safetensors"),
                                  "--input", f"x={tmp_path / 'x.npy'}",
                                  "--output", str(tmp_path / "o.npz")])
    assert r.exit_code == 0, r.output
    logits = np.load(tmp_path / "o.npz")["logits"]
    assert list(logits.argmax(-1)) == [0, 0, 1, 1]      # xor


def test_weights_of_another_spec(tmp_path):
    bad = tmp_path / "w.safetensors"
    from dlgraph.engine.train.checkpoint import save_tensors
    save_tensors(bad, {"h.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(dlgraph.DataError) as e:
        dlgraph.compile(dlgraph.load(TINY), weights=bad)
    assert "lacks 3 parameter(s) of this graph: h.bias, logits.weight, logits.bias" in str(e.value)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    res = dlgraph.train(dlgraph.load(TINY), out=tmp_path / "r", epochs=1, quiet=True)
    w = res.run_dir / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(dlgraph.DataError, match="not a readable safetensors file"):
        dlgraph.compile(dlgraph.load(TINY), weights=w)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    from dlgraph.engine.train import checkpoint
    target = tmp_path / "c.safetensors"
    checkpoint.save_tensors(target, {"a": np.ones(3, np.float32)})
    before = target.read_bytes()

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "replace", boom)
    # the OSError becomes the located error every command prints (engine/io/outputs.py)
    with pytest.raises(dlgraph.DlgraphError, match="cannot write it: no space left"):
        checkpoint.save_tensors(target, {"a": np.zeros(3, np.float32)})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_target_not_met_exits_1(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(TINY.read_text().replace("validation: {split: 0.25}",
                                             "validation: {split: 0.25}\n  target: "
                                             "{metric: val_accuracy, above: 1.5}"))
    r = CliRunner().invoke(main, ["run", str(path), "--quiet", "--epochs", "1",
                                  "--out", str(tmp_path / "r")])
    assert r.exit_code == 1
    assert "target val_accuracy > 1.5: NOT met" in r.stdout


@pytest.mark.parametrize("stop", [True, False])
def test_a_target_stops_the_run_unless_told_to_check_only(tmp_path, stop):
    """xor reaches val_accuracy > 0.6 within a few epochs: by default the run stops there;
    with `stop: false` every epoch runs, and the end reports the last epoch against it."""
    path = tmp_path / "t.yaml"
    path.write_text(TINY.read_text().replace(
        "validation: {split: 0.25}", "validation: {split: 0.25}\n  target: {metric: "
        f"val_accuracy, above: 0.6, stop: {str(stop).lower()}}}"))
    said: list[str] = []
    res = dlgraph.train(dlgraph.load(path), out=tmp_path / "r", epochs=8, log=said.append)
    reached = [s for s in said if s.startswith("target val_accuracy > 0.6 reached at epoch")]
    assert len(reached) == 1 and res.target_met
    at = int(reached[0].split()[-1])
    epochs = [e["epoch"] for e in lines(res.run_dir, "epoch")]
    assert epochs == (list(range(1, at + 1)) if stop else list(range(1, 9)))
    assert res.metrics["val_accuracy"] > 0.6


@pytest.mark.parametrize("kind,step,expected", [
    ("step", 2500, 0.01), ("cosine", 0, 1.0), ("cosine", 5000, 0.5), ("cosine", 10000, 0.0),
    ("linear", 5000, 0.5)])
def test_schedules(kind, step, expected):
    s = ScheduleSpec(type=kind, step_size=1000, gamma=0.1)
    assert math.isclose(lr_at(s, 1.0, step, 10000), expected, abs_tol=1e-12)


def test_warmup():
    s = ScheduleSpec(type="constant", warmup=10)
    assert [lr_at(s, 1.0, i, 100) for i in (0, 4, 9, 10)] == [0.1, 0.5, 1.0, 1.0]


def test_random_ops_draw_fresh_values_every_step(tmp_path):
    """noise inside the jitted step: new samples each replay (a GAN collapses otherwise)."""
    path = tmp_path / "noise.yaml"
    path.write_text("""dlgraph: 1
name: noise
inputs:
  x: {shape: [batch, 2]}
nodes:
  n: {op: noise, in: x, shape: [4]}
  w: {op: param, shape: [4], init: ones}
  nw: {op: mul, in: [n, w]}
  loss: {op: mean, in: nw}
outputs: [loss]
train:
  data: {source: xor, samples: 256}
  batch: 32
  epochs: 1
  steps: 4
  objective: loss
  optimizer: {type: sgd, lr: 1.0e-30}
  validation: {split: 0}
""")
    res = dlgraph.train(dlgraph.load(path), out=tmp_path / "r", quiet=True)
    losses = [r["loss"] for r in lines(res.run_dir, "step")]
    assert len(losses) == 4 and len(set(losses)) == 4, losses


def test_metrics_on_any_node_and_on_the_training_split(tmp_path):
    """`mean` logs any node (a loss term, a layer's activations); every metric is logged for
    the validation split (val_) and for as many training samples (train_), in eval mode.
    Checked: the mean of the objective node is the validation loss, and evaluate's values
    are numpy float64's forward over the trained weights."""
    path = tmp_path / "m.yaml"
    path.write_text(TINY.read_text().replace(
        "    - {type: accuracy, in: [logits, y]}",
        "    - {type: accuracy, in: [logits, y]}\n    - {type: mean, in: h, name: h_mean}\n"
        "    - {type: mean, in: loss, name: ce}"))
    res = dlgraph.train(dlgraph.load(path), out=tmp_path / "r", epochs=2, quiet=True)
    row = lines(res.run_dir, "epoch")[-1]
    for name in ("accuracy", "h_mean", "ce"):
        assert f"val_{name}" in row and f"train_{name}" in row, row
    assert row["val_ce"] == pytest.approx(row["val_loss"], rel=1e-6)
    assert row["train_ce"] != row["val_ce"] and 0 <= row["train_accuracy"] <= 1

    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    g = dlgraph.load(path)
    ev = dlgraph.evaluate(g, res.run_dir / "weights.safetensors", tmp_path / "d.npz")
    w = load_tensors(res.run_dir / "weights.safetensors")[0]
    h = np.tanh(x.astype(np.float64) @ w["h.weight"].T.astype(np.float64) + w["h.bias"])
    logits = h @ w["logits.weight"].T + w["logits.bias"]
    z = logits - logits.max(1, keepdims=True)
    ce = -(z[np.arange(50), y] - np.log(np.exp(z).sum(1))).mean()
    assert ev.metrics["h_mean"] == pytest.approx(h.mean(), abs=1e-5)
    assert ev.metrics["ce"] == pytest.approx(ce, rel=1e-4)
    assert ev.metrics["accuracy"] == pytest.approx((logits.argmax(1) == y).mean())


def test_a_metric_with_the_wrong_number_of_inputs_is_located(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(TINY.read_text().replace(
        "    - {type: accuracy, in: [logits, y]}", "    - {type: mean, in: [logits, y]}"))
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 1
    assert f"{path}:19:" in r.output and "a mean metric takes one node in `in:`, got 2" in \
        r.output, r.output


@pytest.mark.parametrize("optimizer", [
    "{type: rmsprop, lr: 0.01, momentum: 0.5, centered: true, weight_decay: 0.001}",
    "{type: adagrad, lr: 0.2, initial_accumulator_value: 0.1}"])
def test_rmsprop_and_adagrad_train_and_resume_as_one_run(tmp_path, optimizer):
    text = TINY.read_text().replace("{type: sgd, lr: 0.5, momentum: 0.9}", optimizer)
    full = dlgraph.train(dlgraph.load(text), out=tmp_path / "full", quiet=True)
    assert full.metrics["val_accuracy"] > 0.9
    # the optimizer's state (squared-gradient averages, momentum) goes into the checkpoint
    dlgraph.train(dlgraph.load(text), out=tmp_path / "part", epochs=2, quiet=True)
    resumed = dlgraph.train(dlgraph.load(text), out=tmp_path / "part", resume=True, quiet=True)
    a, _ = load_tensors(full.run_dir / "weights.safetensors")
    b, _ = load_tensors(resumed.run_dir / "weights.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name, fields", [
    ("rmsprop", {"momentum": 0.9, "centered": True, "weight_decay": 0.01, "alpha": 0.9}),
    ("adagrad", {"weight_decay": 0.05, "initial_accumulator_value": 0.5, "eps": 1e-6})])
def test_rmsprop_and_adagrad_options_step_like_torch(name, fields):
    import torch
    from tinygrad import Context, Tensor

    from dlgraph.engine.spec.train import OPTIMIZERS
    rec = OPTIMIZERS[name]
    spec = rec.model.model_validate({"type": name, "lr": 0.05, **fields})
    w = Tensor([1.0, -2.0, 0.5, 3.0])
    opt = rec(params=[w], spec=spec)
    ref = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    ropt = getattr(torch.optim, rec.torch)([ref], **rec.torch_args(spec))
    for step in range(5):
        g = np.array([0.5, -1.0, 2.0, -0.1]) * (step - 2)
        w.grad = Tensor(g.astype(np.float32))
        with Context(TRAINING=1):
            Tensor.realize(*opt.schedule_step())
        ref.grad = torch.tensor(g)
        ropt.step()
    np.testing.assert_allclose(w.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
