"""`dlgraph sweep`: overrides checked before anything starts, trials on a local Ray Tune,
the results table against each trial's own metrics.jsonl, the best trial re-run alone."""

from __future__ import annotations

import builtins
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.train.sweep import RAY_MISSING, search_space
from dlgraph.engine.train.sweep_plan import (
    parse_param,
    plan_sweep,
    split_values,
    trial_data,
    with_override,
)

TINY = """\
dlgraph: 1
name: tiny-mlp
inputs:
  x: {shape: [batch, 2]}
  y: {shape: [batch], dtype: int32}
nodes:
  fc1:    {op: linear, in: x, out: 8, activation: relu}
  logits: {op: linear, in: fc1, out: 3}
  loss:   {op: cross_entropy, in: [logits, y]}
outputs: [logits]
train:
  data: {source: spirals, samples: 384, classes: 3}
  batch: 64
  epochs: 2
  objective: loss
  optimizer: {type: adam, lr: 0.01}
  metrics:
    - {type: accuracy, in: [logits, y]}
  validation: {split: 0.25}
"""

SECTION = """\
sweep:
  parameters:
    train.optimizer.lr: [0.1, 0.003, 1.0e+30]
  search: grid
  concurrency: 2
"""


def write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------ before anything starts


@pytest.mark.parametrize("param, text", [
    ("nodes.fc9.out=3", "--param nodes.fc9.out=3: nodes has no 'fc9'\n"
                        "  help: did you mean 'fc1'?"),
    ("train.optimizer.lrr=0.1", "--param train.optimizer.lrr=0.1: unknown field 'lrr'\n"
                                "  help: did you mean 'lr'?"),
    ("train.optimizer.lr=0.1,abc", "--param train.optimizer.lr=abc: field "
                                   "'train.optimizer.lr' must be a number, got 'abc'"),
    ("nodes.fc1.out=8,0", "--param nodes.fc1.out=0: node 'fc1' (linear): field 'out': "),
    ("train.metrics.3.type=mse", "--param train.metrics.3.type=mse: 'train.metrics' is a "
                                 "list of 1; '3' is not a position in it\n  help: use 0 to 0"),
])
def test_a_bad_path_or_value_is_one_error_naming_it(tmp_path, param, text):
    spec = write(tmp_path, TINY)
    r = cli("sweep", spec, "--param", param, "--out", tmp_path / "sw")
    assert r.exit_code == 1
    assert r.output.startswith(f"error: {spec}: {text}")
    assert "Traceback" not in r.output
    assert not (tmp_path / "sw").exists()           # nothing started


def test_a_bad_value_in_the_sweep_section_names_its_line(tmp_path):
    spec = write(tmp_path, TINY + "sweep:\n  parameters:\n    nodes.fc1.out: [4, -2]\n")
    with pytest.raises(DlgraphError) as e:
        plan_sweep(spec)
    assert str(e.value).startswith(f"{spec}:22: sweep parameter nodes.fc1.out: value -2: "
                                   "node 'fc1' (linear): field 'out'")


def test_the_sweep_section_is_validated_by_its_models(tmp_path):
    spec = write(tmp_path, TINY + "sweep:\n  parameters: {train.optimizer.lr: [0.1]}\n"
                                  "  serach: random\n")
    r = cli("validate", spec)
    assert r.exit_code == 1
    assert r.output.startswith(f"error: {spec}:22: unknown field 'serach'")
    assert "did you mean 'search'?" in r.output


def test_a_grid_over_a_range_and_an_unlogged_metric_are_refused(tmp_path):
    spec = write(tmp_path, TINY)
    r = cli("sweep", spec, "--param", "train.optimizer.lr=log:0.001:0.1")
    assert r.output == (f"error: {spec}: --param train.optimizer.lr=log:0.001:0.1: a grid "
                        "needs listed values, not a range\n  help: use --search random or "
                        "optuna, or list the values\n")
    r = cli("sweep", spec, "--param", "train.optimizer.lr=0.1", "--metric", "val_acuracy")
    assert r.exit_code == 1
    assert "sweep metric 'val_acuracy' is never logged; logged: loss, val_loss, " \
           "val_accuracy, train_accuracy\n  help: did you mean 'val_accuracy'?" in r.output


def test_an_out_folder_holding_a_sweep_is_refused(tmp_path):
    spec = write(tmp_path, TINY)
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.csv").write_text("trial\n")
    r = cli("sweep", spec, "--param", "train.optimizer.lr=0.1", "--out", tmp_path / "sw")
    assert r.output == (f"error: {spec}: {tmp_path / 'sw'} already holds a sweep (its "
                        "sweep.csv)\n  help: pass a new --out folder, or remove that one\n")


SCALE = Path(__file__).resolve().parent.parent / "docs" / "scale.md"


def _doc_blocks() -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", SCALE.read_text(), re.S)


def test_the_documented_errors_are_what_the_command_says(monkeypatch):
    monkeypatch.chdir(SCALE.parent.parent)
    shown = next(b for b in _doc_blocks() if b.startswith("$ dlgraph sweep") and "error:" in b)
    runs = re.findall(r"^\$ dlgraph (sweep .*)\n((?:(?!\$ ).*\n)+)", shown, re.M)
    assert len(runs) == 3
    for command, text in runs:
        r = cli(*command.split())
        assert r.exit_code == 1 and r.output == text, command


def test_the_documented_sweep_section_is_a_valid_plan(tmp_path):
    section = next(b for b in _doc_blocks() if b.startswith("sweep:"))
    plan = plan_sweep(write(tmp_path, TINY + section))
    assert (plan.sweep.search, plan.samples, plan.metric, plan.mode) == \
        ("random", 8, "val_accuracy", "max")
    lr = plan.params[0].values
    assert (plan.params[0].path, lr.low, lr.high, lr.log) == ("train.optimizer.lr", 1e-4, 0.1,
                                                              True)
    assert plan.params[1].values == [16, 32, 64]


def test_values_parse_as_yaml_and_ranges_as_ranges():
    assert parse_param("train.optimizer.lr=1e-3,0.1").values == [0.001, 0.1]
    assert parse_param("train.optimizer.type=adam,sgd").values == ["adam", "sgd"]
    assert parse_param("train.schedule={type: cosine},null").values == [{"type": "cosine"},
                                                                        None]
    r = parse_param("nodes.fc1.out=8:64").values
    assert (r.low, r.high, r.log, r.whole) == (8, 64, False, True)
    assert split_values("a, [1, 2],{x: 1, y: 2}") == ["a", "[1, 2]", "{x: 1, y: 2}"]
    with pytest.raises(DlgraphError, match="needs low < high, got 3 and 1"):
        parse_param("nodes.fc1.out=3:1")


def test_an_override_sets_one_field_and_leaves_the_rest():
    data = yaml.safe_load(TINY)
    out = with_override(data, "train.metrics.0.type", "mse")
    assert out["train"]["metrics"][0] == {"type": "mse", "in": ["logits", "y"]}
    assert data["train"]["metrics"][0]["type"] == "accuracy"      # a copy
    assert with_override(data, "train.seed", 7)["train"]["seed"] == 7      # a default field


def test_a_grid_run_again_takes_the_next_seed(tmp_path):
    spec = write(tmp_path, TINY)
    plan = plan_sweep(spec, ["train.optimizer.lr=0.1,0.01"], samples=3)
    assert (plan.trials, plan.seed_every) == (6, 2)
    seeds = [trial_data(plan.data, {"train.optimizer.lr": 0.1}, k, tmp_path, tmp_path / "sw",
                        plan.seed_every)[1] for k in range(6)]
    assert seeds == [0, 0, 1, 1, 2, 2]
    data, _ = trial_data(plan.data, {"train.optimizer.lr": 0.1}, 5, tmp_path, tmp_path / "sw",
                         plan.seed_every)
    assert data["train"]["seed"] == 2 and data["train"]["optimizer"]["lr"] == 0.1
    assert data["doc"] == f"Trial 5 of the sweep in {tmp_path / 'sw'}: " \
                          "train.optimizer.lr=0.1; seed 2."
    assert plan_sweep(spec, ["train.seed=0,1"], samples=2).seed_every == 0   # varied itself
    assert plan_sweep(spec, ["train.optimizer.lr=0.1"], search="random").seed_every == 0


def test_random_search_samples_inside_the_ranges(tmp_path):
    tune = pytest.importorskip("ray.tune")
    spec = write(tmp_path, TINY)
    plan = plan_sweep(spec, ["train.optimizer.lr=log:0.0001:0.1", "nodes.fc1.out=4:6",
                             "train.optimizer.type=adam,sgd"], search="random")
    assert plan.samples == 8
    space = search_space(plan, tune)
    lrs = [space["train.optimizer.lr"].sample() for _ in range(200)]
    outs = {space["nodes.fc1.out"].sample() for _ in range(200)}
    kinds = {space["train.optimizer.type"].sample() for _ in range(200)}
    assert 1e-4 <= min(lrs) and max(lrs) <= 0.1 and min(lrs) < 1e-3 < max(lrs)
    assert outs == {4, 5, 6} and kinds == {"adam", "sgd"}


def test_missing_ray_is_one_line(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    spec = write(tmp_path, TINY)
    r = cli("sweep", spec, "--param", "train.optimizer.lr=0.1", "--out", tmp_path / "sw")
    assert r.exit_code == 1
    assert r.output == f"error: {RAY_MISSING}\n"
    assert "pip install 'dlgraph[ray]'" in RAY_MISSING


def test_missing_optuna_is_one_line(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_optuna(name, *a, **kw):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    spec = write(tmp_path, TINY)
    r = cli("sweep", spec, "--param", "train.optimizer.lr=0.1,0.01", "--search", "optuna")
    assert r.exit_code == 1
    assert r.output == "error: --search optuna needs Optuna, which is not installed: " \
                       "pip install optuna\n"


def test_an_unreachable_cluster_is_one_error_within_seconds(tmp_path):
    import socket
    with socket.socket() as s:                  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = write(tmp_path, TINY)
    r = cli("sweep", spec, "--param", "train.optimizer.lr=0.1", "--address",
            f"127.0.0.1:{port}", "--out", tmp_path / "sw")
    assert r.exit_code == 1
    assert r.output.startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: "
                               "Connection refused\n  help: start it with `ray start --head`")
    assert not (tmp_path / "sw").exists()


# ------------------------------------------------------------------ trials on Ray Tune


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """One sweep of three trials (the last diverges), from the spec's `sweep:` section with
    a flag over it."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = write(tmp, TINY + SECTION)
    out = tmp / "sw"
    r = cli("sweep", spec, "--param", "nodes.fc1.out=12", "--out", out)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    return spec, out, r.output, [r for r in rows if r["status"] == "ok"], rows


def _last_epoch(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "epoch"][-1]


def test_the_csv_rows_are_each_trials_own_metrics(swept):
    _, out, output, ok, rows = swept
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert [float(r["train.optimizer.lr"]) for r in rows] == [0.1, 0.003, 1e30]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    failed = rows[2]
    assert failed["error"] == "the loss of phase 'train' became nan at step 2 (epoch 1)"
    assert failed["loss"] == failed["val_loss"] == failed["epochs"] == ""
    assert f"trial 2 failed: {failed['error']}" in output
    for r in ok:
        assert r["status"] == "ok" and r["nodes.fc1.out"] == "12"
        last = _last_epoch(Path(r["run_dir"]))
        for k in ("loss", "val_loss", "val_accuracy"):
            assert math.isclose(float(r[k]), last[k], rel_tol=1e-12), k
        assert int(r["epochs"]) == last["epoch"] == 2
        trial = json.loads((Path(r["run_dir"]) / "trial.json").read_text())
        assert trial["overrides"] == {"train.optimizer.lr": float(r["train.optimizer.lr"]),
                                      "nodes.fc1.out": 12}
        assert trial["seed"] == 0
        copy = yaml.safe_load((Path(r["run_dir"]) / "spec.yaml").read_text())
        assert copy["train"]["optimizer"]["lr"] == float(r["train.optimizer.lr"])
        assert copy["nodes"]["fc1"]["out"] == 12 and "sweep" not in copy


def test_the_best_trial_is_the_argmin_and_is_named(swept):
    _, out, output, ok, _ = swept
    best = min(ok, key=lambda r: float(r["val_loss"]))
    assert f"best: trial {best['trial']} (train.optimizer.lr={best['train.optimizer.lr']}, " \
           f"nodes.fc1.out=12): val_loss" in output
    assert f"run dir {best['run_dir']}" in output
    assert any(line.startswith(f"*{best['trial']} ") for line in output.splitlines())


def test_the_trials_curves_are_drawn(swept):
    import matplotlib.image
    out = swept[1]
    img = matplotlib.image.imread(out / "curves.png")
    assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.01


def test_a_trial_is_an_ordinary_run_and_rerunning_it_alone_gives_the_same_result(
        swept, tmp_path):
    best = min(swept[3], key=lambda r: float(r["val_loss"]))
    run_dir = Path(best["run_dir"])
    g = dlgraph.load(run_dir / "spec.yaml")
    ev = dlgraph.evaluate(g, run_dir / "weights.safetensors")
    assert math.isclose(ev.metrics["loss"], float(best["val_loss"]), rel_tol=1e-5)
    again = dlgraph.train(g, out=tmp_path / "again", quiet=True)
    for k in ("loss", "val_loss", "val_accuracy"):
        assert math.isclose(again.metrics[k], float(best[k]), rel_tol=1e-6), k
    a = dlgraph.compile(g, weights=run_dir / "weights.safetensors")
    b = dlgraph.compile(g, weights=tmp_path / "again" / "weights.safetensors")
    x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    np.testing.assert_allclose(a(x=x)["logits"], b(x=x)["logits"], rtol=1e-5, atol=1e-6)
