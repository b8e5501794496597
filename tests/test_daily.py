"""Daily use, as a user meets it: early stopping, the best checkpoint, reduce-on-plateau,
in-memory data, transfer (init_from, freeze), evaluate, predict, honest headers, resume and
data checks that name the file."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.graph.ir import Param
from dlgraph.engine.spec.init import init_param, random_inputs
from dlgraph.engine.train.checkpoint import load_tensors, save_tensors

SPEC = """\
dlgraph: 1
name: daily
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  h: {op: linear, in: x, out: 16, activation: tanh}
  logits: {op: linear, in: h, out: 2}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: xor, samples: 300}
  batch: 32
  epochs: 3
  objective: loss
  optimizer: {type: sgd, lr: 0.5, momentum: 0.9}
  metrics:
    - {type: accuracy, in: [logits, y]}
  validation: {split: 0.25}
"""


def spec_file(tmp_path: Path, name: str = "daily.yaml", text: str = SPEC, **train) -> Path:
    """SPEC with ``train`` fields replaced or added (None removes one)."""
    doc = yaml.safe_load(text)
    for k, v in train.items():
        if v is None:
            doc["train"].pop(k, None)
        else:
            doc["train"][k] = v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def weights(path: Path) -> dict[str, np.ndarray]:
    return load_tensors(path)[0]


def epoch_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


# ---------------------------------------------------------------- callbacks


def test_early_stopping_restores_the_best_epoch(tmp_path):
    # val_loss falls every epoch, so watched with mode max epoch 1 stays the best: with
    # patience 1 the run stops after epoch 2 and ends with epoch 1's weights
    p = spec_file(tmp_path, epochs=10, early_stopping={"metric": "val_loss", "mode": "max",
                                                       "patience": 1})
    said: list[str] = []
    res = dlgraph.train(dlgraph.load(p), out=tmp_path / "run", log=said.append)
    one = dlgraph.train(dlgraph.load(spec_file(tmp_path, "one.yaml", epochs=1)),
                        out=tmp_path / "one", quiet=True)
    assert res.epochs == 2 and [r["epoch"] for r in epoch_rows(res.run_dir)] == [1, 2]
    assert any(s.startswith("early stopping at epoch 2: val_loss has not improved for "
                            "1 epoch (best ") for s in said)
    assert "restored the weights of epoch 1" in said
    final, best, ref = (weights(res.run_dir / "weights.safetensors"),
                        weights(res.run_dir / "best.safetensors"),
                        weights(one.run_dir / "weights.safetensors"))
    for k in ref:
        np.testing.assert_array_equal(final[k], ref[k], err_msg=k)
        np.testing.assert_array_equal(best[k], ref[k], err_msg=k)
    assert res.best == {"file": "best.safetensors", "epoch": 1, "metric": "val_loss",
                        "value": epoch_rows(res.run_dir)[0]["val_loss"]}
    assert "best val_loss " in res.line() and " at epoch 1 in best.safetensors" in res.line()
    assert load_tensors(res.run_dir / "best.safetensors")[1]["epoch"] == 1


def test_best_checkpoint_is_the_epoch_with_the_lowest_val_loss(tmp_path):
    res = dlgraph.train(dlgraph.load(spec_file(tmp_path)), out=tmp_path / "run", quiet=True)
    rows = epoch_rows(res.run_dir)
    best = min(rows, key=lambda r: r["val_loss"])
    assert res.best["epoch"] == best["epoch"] and res.best["value"] == best["val_loss"]
    assert load_tensors(res.run_dir / "best.safetensors")[1]["value"] == best["val_loss"]


def test_plateau_schedule_cuts_the_learning_rate(tmp_path):
    p = spec_file(tmp_path, epochs=4, schedule={"type": "plateau", "metric": "val_loss",
                                                "mode": "max", "patience": 1, "gamma": 0.5,
                                                "min_lr": 0.2})
    said: list[str] = []
    dlgraph.train(dlgraph.load(p), out=tmp_path / "run", log=said.append)
    cuts = [s for s in said if "lr of 'train'" in s]
    assert cuts == ["val_loss has not improved for 1 epoch: lr of 'train' 0.5 -> 0.25",
                    "val_loss has not improved for 1 epoch: lr of 'train' 0.25 -> 0.2"]


def test_plateau_cut_trains_as_the_same_cut_on_a_step_schedule(tmp_path):
    # epoch 2 does not beat epoch 1 (mode max on a falling loss): the cut comes after
    # epoch 2, i.e. at step 14 of 7-step epochs, as a step schedule of step_size 14 makes it
    plateau = dlgraph.train(dlgraph.load(spec_file(tmp_path, "a.yaml", epochs=3, schedule={
        "type": "plateau", "metric": "val_loss", "mode": "max", "patience": 1,
        "gamma": 0.5})), out=tmp_path / "a", quiet=True)
    step = dlgraph.train(dlgraph.load(spec_file(tmp_path, "b.yaml", epochs=3, schedule={
        "type": "step", "step_size": 14, "gamma": 0.5})), out=tmp_path / "b", quiet=True)
    a, b = (weights(r.run_dir / "weights.safetensors") for r in (plateau, step))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_watching_a_name_that_is_not_logged_is_located(tmp_path):
    p = spec_file(tmp_path, early_stopping={"metric": "val_acc"})
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 1, r.output
    assert f"{p}:" in r.output and "'val_acc', which is never logged; logged: loss, " \
        "val_loss, val_accuracy, train_accuracy" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- data and transfer


def test_in_memory_data_trains_as_the_same_arrays_in_a_file(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    from_file = dlgraph.train(dlgraph.load(spec_file(tmp_path, data={
        "source": "npy", "path": "d.npz"})), out=tmp_path / "a", quiet=True)
    g = dlgraph.load(spec_file(tmp_path, "mem.yaml", data=None))
    in_memory = dlgraph.train(g, data={"x": x, "y": y}, out=tmp_path / "b", quiet=True)
    a, b = (weights(r.run_dir / "weights.safetensors") for r in (from_file, in_memory))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert in_memory.metrics == from_file.metrics
    with pytest.raises(dlgraph.DataError, match="the data= arrays has no array 'y'"):
        dlgraph.train(g, data={"x": x}, out=tmp_path / "c", quiet=True)
    with pytest.raises(dlgraph.SpecError, match="no `data:`"):
        dlgraph.train(g, out=tmp_path / "d", quiet=True)
    with pytest.raises(dlgraph.DataError, match="data= takes numpy arrays by name, not a "
                                                "ndarray"):
        dlgraph.train(g, data=x, out=tmp_path / "e", quiet=True)
    w = in_memory.run_dir / "weights.safetensors"
    np.savez(tmp_path / "part.npz", x=x[:40], y=y[:40])
    by_arrays = dlgraph.evaluate(g, w, {"x": x[:40], "y": y[:40]})
    by_file = dlgraph.evaluate(g, w, str(tmp_path / "part.npz"))
    assert by_arrays.samples == 40 and by_arrays.metrics == by_file.metrics
    np.testing.assert_array_equal(by_arrays.confusion, by_file.confusion)


def test_init_from_and_freeze(tmp_path):
    first = dlgraph.train(dlgraph.load(spec_file(tmp_path, epochs=1)), out=tmp_path / "a",
                          quiet=True)
    src = first.run_dir / "weights.safetensors"
    renamed = SPEC.replace("  h: {", "  enc: {").replace("in: h,", "in: enc,")
    p = spec_file(tmp_path, "b.yaml", renamed, epochs=1, seed=7, freeze=["enc.*"],
                  init_from={"path": str(src), "params": ["enc.*"], "rename": {"enc": "h"}})
    said: list[str] = []
    second = dlgraph.train(dlgraph.load(p), out=tmp_path / "b", log=said.append)
    a, b = weights(src), weights(second.run_dir / "weights.safetensors")
    np.testing.assert_array_equal(b["enc.weight"], a["h.weight"])    # copied, then frozen
    np.testing.assert_array_equal(b["enc.bias"], a["h.bias"])
    fresh = init_param(Param("logits.weight", "", (2, 16), "glorot_uniform", 16, 2), 7)
    assert not np.allclose(b["logits.weight"], fresh)                 # trained
    assert f"initialised 2 parameters from {src}" in said
    bad = spec_file(tmp_path, "c.yaml", renamed, init_from={"path": str(src),
                                                            "params": ["enc.*"]})
    r = CliRunner().invoke(main, ["run", str(bad), "--out", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 1 and f"error: {bad}:" in r.output and \
        f"init_from: no parameter of this graph is in {src}" in r.output and \
        "help: map renamed scopes" in r.output


def test_training_labels_out_of_range_name_the_file(tmp_path):
    x = np.zeros((128, 2), np.float32)
    y = np.zeros(128, np.int64)
    y[70] = 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    p = spec_file(tmp_path, data={"source": "npy", "path": "d.npz"})
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 1, r.output
    assert "error: d.npz: row 70 of 'y' holds the label 5, but node 'loss' (cross_entropy) " \
        "takes labels 0 to 1" in r.output and "Traceback" not in r.output


def test_negative_seeds_work(tmp_path):
    p = Param("w", "w", (3,), "normal", 3, 3)
    assert not np.array_equal(init_param(p, -1), init_param(p, 1))
    g = dlgraph.load(spec_file(tmp_path, seed=-3, epochs=1))
    assert random_inputs(g, 2, -5)["x"].shape == (2, 2)
    assert dlgraph.train(g, out=tmp_path / "r", quiet=True).epochs == 1


# ---------------------------------------------------------------- resume and wording


def test_resume_from_another_spec_or_a_damaged_checkpoint(tmp_path):
    dlgraph.train(dlgraph.load(spec_file(tmp_path, epochs=1)), out=tmp_path / "r", quiet=True)
    ckpt = tmp_path / "r" / "checkpoint.safetensors"
    wider = spec_file(tmp_path, "wide.yaml", SPEC.replace("out: 16", "out: 8"))
    r = CliRunner().invoke(main, ["run", str(wider), "--out", str(tmp_path / "r"), "--resume"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: {ckpt}: parameter 'h.weight' has shape [16, 2] in the checkpoint, " \
        "[8, 2] in the graph" in r.output
    arrays, meta = load_tensors(ckpt)
    save_tensors(ckpt, arrays, {**meta, "step": "two"})
    r = CliRunner().invoke(main, ["run", str(spec_file(tmp_path)), "--out",
                                  str(tmp_path / "r"), "--resume"])
    assert r.exit_code == 1 and f"error: {ckpt}: the checkpoint's metadata has no valid " \
        "'step'" in r.output


def test_header_and_final_line_say_what_happens(tmp_path):
    r = CliRunner().invoke(main, ["run", str(spec_file(tmp_path)), "--out",
                                  str(tmp_path / "r"), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "training daily: 236 training + 64 validation samples (split 0.25 × 300 = 75, " \
        "rounded to 2 whole batches of 32), batch 32, 7 steps per epoch, up to 2 steps " \
        "(1 epoch)" in r.output
    assert "— 1 epoch, 2 steps in " in r.output
    rows = [json.loads(x) for x in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(row["time"], float) and row["time"] > 1.7e9 for row in rows)
    assert [row["step"] for row in rows] == [1, 2, 2]


def test_progress_lines_without_a_terminal(tmp_path, monkeypatch):
    import dlgraph.engine.train.loop as train_module
    monkeypatch.setattr(train_module, "PROGRESS_EVERY", 0.0)
    said: list[str] = []
    dlgraph.train(dlgraph.load(spec_file(tmp_path, epochs=1)), out=tmp_path / "r",
                  log=said.append)
    steps = [s for s in said if s.startswith("epoch 1/1  step ")]
    assert [s.split()[3] for s in steps] == [f"{k}/7" for k in range(1, 8)]
    assert steps[0].endswith("  ETA …") and "loss " in steps[0]
    assert all(re.search(r"loss \S+  \S+ steps/s, [\d,]+ samples/s, ETA \d+ s$", s)
               for s in steps[1:]), steps


def test_the_eta_counts_steady_steps_not_the_compile(monkeypatch):
    """A first step that waits 30 s for its compile, then steps of 0.1 s: 98 steps left
    is about 10 s, not 98 x 15 s."""
    from types import SimpleNamespace

    from dlgraph.engine.train import progress
    clock = iter([30.0, 30.1, 30.2])     # the first step ends after its 30 s compile
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    pace = progress.Pace()
    run = SimpleNamespace(spec=SimpleNamespace(batch=32))
    pace.tick()
    assert progress.pace_text(run, pace, 1, 100) == "ETA …"
    pace.tick()
    pace.tick()
    assert progress.pace_text(run, pace, 3, 100) == "10 steps/s, 320 samples/s, ETA 10 s"



# ---------------------------------------------------------------- evaluate and predict

SPIRALS = SPEC.replace("out: 2}", "out: 3}").replace(
    "{source: xor, samples: 300}", "{source: spirals, samples: 400, classes: 3}")

REGRESSION = """\
dlgraph: 1
name: reg
inputs:
  x: {shape: [batch, 3]}
  y: {shape: [batch, 2]}
nodes:
  pred: {op: linear, in: x, out: 2}
  loss: {op: mse, in: [pred, y]}
outputs: [pred]
train:
  data: {source: npy, path: reg.npz}
  batch: 16
  epochs: 2
  objective: loss
  optimizer: {type: sgd, lr: 0.05}
  metrics:
    - {type: mae, in: [pred, y]}
"""


def mlp_logits(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The spec's MLP in numpy float64, from the saved weights ([out, in], as PyTorch)."""
    h = np.tanh(x.astype(np.float64) @ w["h.weight"].T + w["h.bias"])
    return h @ w["logits.weight"].T + w["logits.bias"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 3-class spirals MLP trained one epoch (so its mistakes are many), and 100 samples
    of held-out data in a .npz."""
    d = tmp_path_factory.mktemp("clf")
    p = spec_file(d, text=SPIRALS, epochs=1)
    res = dlgraph.train(dlgraph.load(p), out=d / "run", quiet=True)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (100, 2)).astype(np.float32)
    y = rng.integers(0, 3, 100)
    np.savez(d / "test.npz", x=x, y=y)
    return p, res.run_dir / "weights.safetensors", d / "test.npz", x, y


def test_evaluate_a_classifier_against_scikit_learn(classifier):
    from sklearn.metrics import accuracy_score, confusion_matrix, log_loss
    from sklearn.metrics import precision_recall_fscore_support as prfs
    p, w, data, x, y = classifier
    ev = dlgraph.evaluate(dlgraph.load(p), w, data)
    logits = mlp_logits(weights(w), x)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    pred = logits.argmax(1)
    assert ev.samples == 100 and ev.task == "classification"
    assert ev.metrics["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert ev.metrics["loss"] == pytest.approx(log_loss(y, prob, labels=[0, 1, 2]), rel=1e-4)
    np.testing.assert_array_equal(ev.confusion, confusion_matrix(y, pred, labels=[0, 1, 2]))
    pr, rc, f1, sup = prfs(y, pred, labels=[0, 1, 2], zero_division=0)
    for c, row in enumerate(ev.classes):
        assert row == pytest.approx({"class": c, "precision": pr[c], "recall": rc[c],
                                     "f1": f1[c], "support": sup[c]}, abs=1e-12)
    assert 0 < ev.metrics["accuracy"] < 1 and (ev.confusion != np.diag(np.diag(ev.confusion))).any()


def test_evaluate_defaults_to_the_validation_split(classifier):
    p, w, *_ = classifier
    run = w.parent
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    ev = dlgraph.evaluate(dlgraph.load(p), w)
    assert ev.samples == 96 and ev.data == "the validation split of the spec's data"
    assert ev.metrics["accuracy"] == val["val_accuracy"]
    assert ev.metrics["loss"] == pytest.approx(val["val_loss"], rel=1e-5)


def test_evaluate_cli_table_json_and_picture(classifier, tmp_path):
    p, w, data, x, y = classifier
    cm = tmp_path / "cm.png"
    r = CliRunner().invoke(main, ["evaluate", str(p), "--weights", str(w), "--data",
                                  str(data), "--json", "-o", str(cm), "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["samples"] == 100 and len(out["confusion"]) == 3 and out["data"] == str(data)
    assert sum(map(sum, out["confusion"])) == 100
    assert cm.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["evaluate", str(p), "--weights", str(w), "-o",
                                  str(tmp_path / "cm.jpg"), "-q"])
    assert r.exit_code == 1 and "cm.jpg: cannot draw cm.jpg: pictures are .png, .svg or " \
        ".pdf" in r.output and not (tmp_path / "cm.jpg").exists()
    r = CliRunner().invoke(main, ["evaluate", str(p), "--weights", str(w), "--data",
                                  "{source: spirals, samples: 64, classes: 3}", "-q"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "evaluated daily on 64 samples (the 'spirals' source)"
    assert "confusion matrix (rows: true class, columns: predicted class):" in lines
    assert any(ln.split()[:1] == ["macro"] for ln in lines)
    r = CliRunner().invoke(main, ["evaluate", str(p), "--weights", str(w), "--data",
                                  "nope.txt"])
    assert r.exit_code == 1 and "error: --data 'nope.txt' is neither a data file (.csv, " \
        ".npy, .npz) nor a data source\n  help: give a file, a source name" in r.output


def test_evaluate_a_regression_against_scikit_learn(tmp_path):
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    rng = np.random.default_rng(0)
    x = rng.standard_normal((160, 3)).astype(np.float32)
    y = (x @ rng.standard_normal((3, 2)) + 0.3).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    p = tmp_path / "reg.yaml"
    p.write_text(REGRESSION)
    res = dlgraph.train(dlgraph.load(p), out=tmp_path / "run", quiet=True)
    w = weights(res.run_dir / "weights.safetensors")
    np.savez(tmp_path / "test.npz", x=x[:50], y=y[:50])
    ev = dlgraph.evaluate(dlgraph.load(p), res.run_dir / "weights.safetensors",
                          str(tmp_path / "test.npz"), batch=16)   # 16, 16, 16 and 2 rows
    pred = x[:50].astype(np.float64) @ w["pred.weight"].T + w["pred.bias"]
    assert ev.task == "regression" and ev.samples == 50
    assert ev.metrics["mse"] == pytest.approx(mean_squared_error(y[:50], pred), rel=1e-5)
    assert ev.metrics["mae"] == pytest.approx(mean_absolute_error(y[:50], pred), rel=1e-5)
    assert ev.metrics["r2"] == pytest.approx(r2_score(y[:50], pred), rel=1e-5)
    assert ev.metrics["loss"] == pytest.approx(mean_squared_error(y[:50], pred), rel=1e-5)


def test_predict_csv_and_npz(classifier, tmp_path):
    p, w, data, x, y = classifier
    csv_in = tmp_path / "new.csv"
    csv_in.write_text("a,b\n" + "".join(f"{u!r},{v!r}\n" for u, v in x[:70].tolist()))
    r = CliRunner().invoke(main, ["predict", str(p), "--weights", str(w), "--data",
                                  str(csv_in), "-o", str(tmp_path / "p.csv"), "--batch", "32"])
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'p.csv'}: 70 rows (logits [70, 3], logits_prob [70, 3], " \
        "logits_class [70])" in r.output
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "logits_class,logits_p0,logits_p1,logits_p2" and len(rows) == 71
    got = np.array([[float(c) for c in row.split(",")] for row in rows[1:]])
    logits = mlp_logits(weights(w), x[:70])
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    np.testing.assert_array_equal(got[:, 0], logits.argmax(1))
    np.testing.assert_allclose(got[:, 1:], prob, atol=1e-5)
    dlgraph.predict(dlgraph.load(p), w, data, tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as z:
        assert sorted(z.files) == ["logits", "logits_class", "logits_prob"]
        np.testing.assert_allclose(z["logits"], mlp_logits(weights(w), x), atol=1e-4)


def test_predict_writes_nothing_on_error(classifier, tmp_path):
    p, w, *_ = classifier
    out = tmp_path / "p.csv"
    out.write_text("old\n")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[0.1, 0.2], [np.nan, 0.0]], np.float32))
    # p.csv is not dlgraph's: refused before anything runs; with --force the data's errors
    # still leave it as it was
    r = CliRunner().invoke(main, ["predict", str(p), "--weights", str(w), "--data", str(bad),
                                  "-o", str(out)])
    assert r.exit_code == 1 and f"error: {out}: the file is already there and dlgraph did " \
        "not write it\n  help: name a new file, or pass --force to replace it" in r.output
    r = CliRunner().invoke(main, ["predict", str(p), "--weights", str(w), "--data", str(bad),
                                  "-o", str(out), "--force"])
    assert r.exit_code == 1 and f"error: {bad}: row 1 of 'x' holds nan" in r.output
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 5), np.float32))
    r = CliRunner().invoke(main, ["predict", str(p), "--weights", str(w), "--data",
                                  str(wrong), "-o", str(out), "--force"])
    assert r.exit_code == 1 and "input 'x' has shape [4, 5]" in r.output, r.output
    assert out.read_text() == "old\n" and sorted(f.name for f in tmp_path.iterdir()) == \
        ["bad.npy", "p.csv", "wrong.npy"]


def test_trainable_false_and_init_from_on_the_command_line(tmp_path):
    first = dlgraph.train(dlgraph.load(spec_file(tmp_path, epochs=1)), out=tmp_path / "a",
                          quiet=True)
    src = first.run_dir / "weights.safetensors"
    frozen = SPEC.replace("activation: tanh}", "activation: tanh, trainable: false}")
    p = spec_file(tmp_path, "b.yaml", frozen, epochs=1, seed=5)
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "b"),
                                  "--init-from", str(src)])
    assert r.exit_code == 0, r.output
    assert f"initialised 4 parameters from {src}" in r.output
    a, b = weights(src), weights(tmp_path / "b" / "weights.safetensors")
    np.testing.assert_array_equal(b["h.weight"], a["h.weight"])       # frozen by the layer
    assert not np.array_equal(b["logits.weight"], a["logits.weight"])  # trained on


def test_resumed_early_stopping_keeps_counting(tmp_path):
    # mode max on a falling val_loss: epoch 1 stays the best; patience 2 stops after epoch 3,
    # also when the run is cut after epoch 2 and resumed
    es = {"metric": "val_loss", "mode": "max", "patience": 2}
    p = spec_file(tmp_path, epochs=8, early_stopping=es)
    dlgraph.train(dlgraph.load(p), out=tmp_path / "r", epochs=2, quiet=True)
    said: list[str] = []
    res = dlgraph.train(dlgraph.load(p), out=tmp_path / "r", resume=True, log=said.append)
    assert res.epochs == 3 and any(s.startswith("early stopping at epoch 3: val_loss has not "
                                                "improved for 2 epochs") for s in said)
    assert res.best["epoch"] == 1 and "restored the weights of epoch 1" in said
    final, best = (weights(tmp_path / "r" / f) for f in ("weights.safetensors",
                                                          "best.safetensors"))
    for k in best:
        np.testing.assert_array_equal(final[k], best[k], err_msg=k)


# ---------------------------------------------------------------- standardized features

SCALED = """\
dlgraph: 1
name: scaled
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  logits: {op: linear, in: x, out: 2}
  loss: {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: csv, path: d.csv, x: [age, income], y: y, label: true, standardize: true}
  batch: 32
  epochs: 4
  objective: loss
  optimizer: {type: adam, lr: 0.05}
  metrics:
    - {type: accuracy, in: [logits, y]}
  validation: {split: 0.2, stratify: y}
"""


def _scaled_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.stack([rng.normal(40, 12, n), rng.normal(50_000, 15_000, n)], 1)
    y = ((x[:, 0] - 40) / 12 + (x[:, 1] - 50_000) / 15_000 > 0).astype(int)
    return x, y


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> None:
    rows = [f"{a!r},{b!r}" for a, b in x.tolist()]
    if y is not None:
        rows = [f"{r},{k}" for r, k in zip(rows, y.tolist(), strict=True)]
    path.write_text("age,income" + (",y" if y is not None else "") + "\n" +
                    "".join(r + "\n" for r in rows))


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaled")
    x, y = _scaled_data(400, 0)
    _write_csv(d / "d.csv", x, y)
    (d / "scaled.yaml").write_text(SCALED)
    res = dlgraph.train(dlgraph.load(d / "scaled.yaml"), out=d / "run", quiet=True)
    return d, res


def test_standardize_is_saved_and_applied_by_evaluate_and_predict(scaled_run):
    from sklearn.metrics import accuracy_score
    d, res = scaled_run
    saved = json.loads((res.run_dir / "standardize.json").read_text())["inputs"]["x"]
    mean, std = np.array(saved["mean"]), np.array(saved["std"])
    assert saved["shape"] == [2] and 35 < mean[0] < 45 and 10_000 < std[1] < 20_000
    assert res.metrics["val_accuracy"] > 0.9              # unscaled, adam at 0.05 stalls
    x, y = _scaled_data(100, 1)                           # new rows, raw units
    _write_csv(d / "test.csv", x, y)
    w = res.run_dir / "weights.safetensors"
    g = dlgraph.load(d / "scaled.yaml")
    p = weights(w)
    logits = ((x - mean) / std) @ p["logits.weight"].T.astype(np.float64) + p["logits.bias"]
    ev = dlgraph.evaluate(g, w, str(d / "test.csv"))
    assert ev.metrics["accuracy"] == pytest.approx(accuracy_score(y, logits.argmax(1)),
                                                   abs=1e-12)
    assert ev.metrics["accuracy"] > 0.9
    _write_csv(d / "new.csv", x)
    dlgraph.predict(g, w, d / "new.csv", d / "pred.npz")
    with np.load(d / "pred.npz") as z:
        np.testing.assert_allclose(z["logits"], logits, atol=1e-4)
    # the default data (the validation split) is standardised once, as training saw it
    val = dlgraph.evaluate(g, w)
    assert val.metrics["accuracy"] == res.metrics["val_accuracy"]


def test_run_with_weights_standardizes_raw_inputs_too(scaled_run, tmp_path):
    d, res = scaled_run
    w = res.run_dir / "weights.safetensors"
    saved = json.loads((res.run_dir / "standardize.json").read_text())["inputs"]["x"]
    x, _ = _scaled_data(20, 2)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    r = CliRunner().invoke(main, ["run", str(d / "scaled.yaml"), "--weights", str(w),
                                  "--input", f"x={tmp_path / 'x.npy'}", "--output",
                                  str(tmp_path / "out.npz")])
    assert r.exit_code == 0, r.output
    p = weights(w)
    z = (x.astype(np.float32).astype(np.float64) - saved["mean"]) / saved["std"]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["logits"], z @ p["logits.weight"].T + p["logits.bias"],
                                   atol=1e-4)


def test_weights_without_their_statistics_are_refused(scaled_run, tmp_path):
    d, res = scaled_run
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((res.run_dir / "weights.safetensors").read_bytes())
    r = CliRunner().invoke(main, ["predict", str(d / "scaled.yaml"), "--weights", str(lone),
                                  "--data", str(d / "test.csv"), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 1 and not (tmp_path / "p.csv").exists()
    assert r.output == (
        f"error: {tmp_path / 'standardize.json'}: the spec standardizes x, but there is no "
        f"standardize.json beside {lone}\n  help: use the weights of a run of this spec (its "
        "run directory keeps the training split's mean and std)\n")


# ---------------------------------------------------------------- memory, from the API

BIG = {"dlgraph": 1, "name": "big", "inputs": {"x": {"shape": ["batch", 4]},
                                              "y": {"shape": ["batch", 1]}},
       "nodes": {"h": {"op": "linear", "in": "x", "out": 10**11},
                 "p": {"op": "linear", "in": "h", "out": 1},
                 "loss": {"op": "mse", "in": ["p", "y"]}},
       "outputs": ["p"],
       "train": {"data": {"source": "sine", "samples": 64, "length": 4}, "batch": 16,
                 "objective": "loss", "optimizer": {"type": "sgd", "lr": 0.1}}}


def test_train_and_compile_refuse_a_graph_that_cannot_fit(tmp_path):
    from dlgraph.engine.errors import DeviceError
    g = dlgraph.load(BIG)
    # parameters: 4e11 + 1e11 + 1e11 + 1 floats; per sample one [1e11] value alive at once
    # (the matmul's; the bias added to it fuses into the next kernel) and a few scalars
    params, act = 6e11 + 1, 1e11
    tib = lambda floats: f"{4 * floats / 2**40:.1f} TiB"     # noqa: E731
    assert tib(params) == "2.2 TiB"
    with pytest.raises(DeviceError, match=rf"^<dict>: this graph needs about "
                                          rf"{tib(params + 16 * act)} at batch 16 \(2.2 TiB "
                                          r"of parameters\), more than the "):
        dlgraph.train(g, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DeviceError, match=rf"needs about {tib(params + act)} at batch 1 "
                                          r"\(2.2 TiB of parameters\)"):
        dlgraph.compile(g)


# ------------------------------------------------------ the transfer and denoising examples

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"


def test_the_transfer_pair_pretrains_then_classifies_on_the_frozen_encoder(tmp_path):
    folder = tmp_path / "graphs" / "transfer"        # classify.yaml finds the pretrained
    folder.mkdir(parents=True)                        # weights at ../../runs/transfer/pretrain
    for name in ("pretrain.yaml", "classify.yaml"):
        (folder / name).write_text((GRAPHS / "transfer" / name).read_text())
    pre = dlgraph.train(dlgraph.load(folder / "pretrain.yaml"), steps=20, quiet=True,
                        out=tmp_path / "runs" / "transfer" / "pretrain")
    said: list[str] = []
    g = dlgraph.load(folder / "classify.yaml")
    res = dlgraph.train(g, steps=20, out=tmp_path / "cls", log=said.append)
    src = pre.run_dir / "weights.safetensors"
    assert f"initialised 4 parameters from {tmp_path / 'runs/transfer/pretrain'}" \
        f"/weights.safetensors" in said               # the spec's ../.. resolved
    theirs, mine = weights(src), weights(res.run_dir / "weights.safetensors")
    for name in ("enc1.weight", "enc1.bias", "code.weight", "code.bias"):
        np.testing.assert_array_equal(mine[name], theirs[name])     # copied, then frozen
    fresh = dlgraph.compile(g, seed=g.spec.train.seed).state_dict()
    assert not np.allclose(mine["head.weight"], fresh["head.weight"])  # the head trained
    assert res.steps == 20


def test_denoising_noise_is_off_at_inference():
    g = dlgraph.load(GRAPHS / "denoising.yaml")
    model = dlgraph.compile(g, seed=3)
    x = np.random.default_rng(0).uniform(0, 1, (5, 1, 16, 16)).astype(np.float32)
    a, b = model(x=x)["recon"], model(x=x)["recon"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)     # no noise: rounding only
    w = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    h = x.reshape(5, -1).astype(np.float64)                      # clean: no noise added
    for layer, act in (("enc1", "relu"), ("code", None), ("dec1", "relu"), ("dec2", "sig")):
        h = h @ w[f"{layer}.weight"].T + w[f"{layer}.bias"]
        h = np.maximum(h, 0) if act == "relu" else 1 / (1 + np.exp(-h)) if act else h
    np.testing.assert_allclose(a.reshape(5, -1), h, atol=1e-5)


def test_predict_refuses_a_csv_it_cannot_write_before_any_work(tmp_path):
    """An output with more than one feature axis cannot be CSV rows: said first (here the
    weights file does not even exist), not after predicting every batch."""
    spec = tmp_path / "seq.yaml"
    spec.write_text("dlgraph: 1\nname: seq\ninputs:\n  x: {shape: [batch, 3, 4]}\nnodes:\n"
                    "  h: {op: linear, in: x, out: 2}\noutputs: [h]\n")
    np.save(tmp_path / "x.npy", np.zeros((5, 3, 4), np.float32))
    r = CliRunner().invoke(main, ["predict", str(spec), "--weights", str(tmp_path / "no.st"),
                                  "--data", str(tmp_path / "x.npy"), "-o",
                                  str(tmp_path / "p.csv")])
    assert r.exit_code == 1
    assert r.output == (f"error: {tmp_path / 'p.csv'}: output 'h' is [batch, 3, 2] per batch: "
                        "a CSV holds one row of features per sample\n"
                        "  help: write the predictions to a .npz instead\n")
    assert not (tmp_path / "p.csv").exists()
