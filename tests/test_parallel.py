"""Data-parallel training as a user meets it.

On the devices of one machine (``devices=["cpu:0", "cpu:1"]``, tinygrad's sharding): the
losses, validation metrics and weights after N steps equal those of training on one device
with the same global batch. Across processes (Ray Train workers, when Ray is installed):
every rank ends with the same weights, and they and the losses match one process.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dlgraph
from dlgraph.cli.main import main
from dlgraph.engine.train.checkpoint import load_tensors

DEVICES = ["cpu:0", "cpu:1"]
STEPS = 6
TOL = 1e-5


def step_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "step"]


def spec(inputs: dict, nodes: dict, **train) -> dict:
    t = {"batch": 32, "epochs": 1, "objective": "loss", "seed": 3,
         "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
         "validation": {"split": 0}}
    t.update(train)
    return {"dlgraph": 1, "name": "dp", "inputs": inputs, "nodes": nodes,
            "outputs": [n for n in nodes if n in ("logits", "pred")], "train": t}


def one_and_two(tmp_path, s: dict, data: dict, steps: int = STEPS):
    """The same training on one device and split over two."""
    one = dlgraph.train(dlgraph.load(s), data=data, steps=steps, quiet=True, cache=False,
                        out=tmp_path / "one")
    two = dlgraph.train(dlgraph.load(s), data=data, steps=steps, quiet=True, cache=False,
                        out=tmp_path / "two", devices=DEVICES)
    # the run really was split: its parameters live on both devices
    assert all(isinstance(t.device, tuple) and len(t.device) == 2
               for t in two.params.values())
    assert all(isinstance(t.device, str) for t in one.params.values())
    return one, two


def assert_same_training(one, two):
    a, b = step_losses(one.run_dir), step_losses(two.run_dir)
    assert len(a) == len(b) == STEPS
    np.testing.assert_allclose(b, a, rtol=TOL, atol=TOL)
    wa, _ = load_tensors(one.run_dir / "weights.safetensors")
    wb, _ = load_tensors(two.run_dir / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=TOL, atol=TOL, err_msg=k)
        # the weights moved: equality is not that of two untouched initialisations
    moved = load_tensors(one.run_dir / "checkpoint.safetensors")[0]
    assert moved.keys() >= {f"param.{k}" for k in wa}
    for k, v in one.metrics.items():
        np.testing.assert_allclose(two.metrics[k], v, rtol=TOL, atol=TOL, err_msg=k)


def blobs(n: int, d: int, classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    x = (rng.normal(size=(n, d)) + 2 * np.eye(classes, d)[y]).astype(np.float32)
    return {"x": x, "y": y}


def test_mlp_two_cpu_devices_equal_one(tmp_path):
    # adam, a warm-up + cosine schedule (the rate is set on both devices), clipping,
    # dropout (its mask drawn whole and split like the batch) and validation
    s = spec({"x": {"shape": ["batch", 6]}, "y": {"shape": ["batch"], "dtype": "int32"}},
             {"h": {"op": "linear", "in": "x", "out": 16, "activation": "relu"},
              "d": {"op": "dropout", "in": "h", "p": 0.2},
              "logits": {"op": "linear", "in": "d", "out": 3},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}},
             optimizer={"type": "adam", "lr": 0.01}, clip=1.0,
             schedule={"type": "cosine", "warmup": 2},
             metrics=[{"type": "accuracy", "in": ["logits", "y"]}],
             validation={"split": 0.2})
    one, two = one_and_two(tmp_path, s, blobs(320, 6, 3))
    assert "val_accuracy" in one.metrics and "val_loss" in one.metrics
    assert_same_training(one, two)
    w0 = dlgraph.train(dlgraph.load(s), data=blobs(320, 6, 3), steps=1, quiet=True,
                       cache=False, out=tmp_path / "first").params["h.weight"].numpy()
    assert np.abs(two.params["h.weight"].numpy() - w0).max() > 1e-3   # it did train


def test_cnn_with_batch_norm_two_cpu_devices_equal_one(tmp_path):
    # batch_norm's batch statistics are over the whole batch, not each device's half
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 128).astype(np.int32)
    x = (rng.normal(size=(128, 1, 8, 8)) + y[:, None, None, None]).astype(np.float32)
    s = spec({"x": {"shape": ["batch", 1, 8, 8]}, "y": {"shape": ["batch"], "dtype": "int32"}},
             {"c": {"op": "conv2d", "in": "x", "out": 4, "kernel": 3},
              "bn": {"op": "batch_norm", "in": "c"},
              "r": {"op": "relu", "in": "bn"},
              "p": {"op": "max_pool2d", "in": "r", "kernel": 2},
              "f": {"op": "flatten", "in": "p"},
              "logits": {"op": "linear", "in": "f", "out": 2},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}},
             batch=16)
    one, two = one_and_two(tmp_path, s, {"x": x, "y": y})
    assert_same_training(one, two)


def test_lstm_two_cpu_devices_equal_one(tmp_path):
    # the loop's state buffers are split like the batch, its gradient sums replicated
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 5, 2)).astype(np.float32)
    y = x[:, :, :1].sum(1).astype(np.float32)
    s = spec({"x": {"shape": ["batch", 5, 2]}, "y": {"shape": ["batch", 1]}},
             {"enc": {"op": "lstm", "in": "x", "hidden": 8},
              "pred": {"op": "linear", "in": "enc.h", "out": 1},
              "loss": {"op": "mse", "in": ["pred", "y"]}})
    one, two = one_and_two(tmp_path, s, {"x": x, "y": y})
    assert_same_training(one, two)


def test_resume_on_two_devices(tmp_path):
    s = spec({"x": {"shape": ["batch", 6]}, "y": {"shape": ["batch"], "dtype": "int32"}},
             {"logits": {"op": "linear", "in": "x", "out": 3},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}},
             optimizer={"type": "adam", "lr": 0.01}, epochs=2)
    data = blobs(64, 6, 3)
    full = dlgraph.train(dlgraph.load(s), data=data, quiet=True, cache=False,
                         out=tmp_path / "full")
    dlgraph.train(dlgraph.load(s), data=data, quiet=True, cache=False, epochs=1,
                  out=tmp_path / "part", devices=DEVICES)
    res = dlgraph.train(dlgraph.load(s), data=data, quiet=True, cache=False, resume=True,
                        out=tmp_path / "part", devices=DEVICES)
    a, _ = load_tensors(full.run_dir / "weights.safetensors")
    b, _ = load_tensors(res.run_dir / "weights.safetensors")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=TOL, atol=TOL, err_msg=k)


@pytest.mark.parametrize("devices, text, hint", [
    ("cpu:0,cpu:1,cpu:2", "batch 32 does not divide over 3 devices", "multiple of 3"),
    ("cpu:0,cpu:0", "device cpu:0 is listed twice", "list each device once"),
    ("cpu:0", "names one device", "--device NAME"),
    ("cpu:0,gpu:1", "unknown device 'gpu:1'", "KIND:INDEX"),
    ("cpu:0,cuda:0", "mixes kinds of device", "one kind"),
])
def test_device_mistakes_are_one_clear_error(tmp_path, devices, text, hint):
    path = tmp_path / "s.yaml"
    import yaml
    path.write_text(yaml.safe_dump(spec(
        {"x": {"shape": ["batch", 2]}, "y": {"shape": ["batch"], "dtype": "int32"}},
        {"logits": {"op": "linear", "in": "x", "out": 2},
         "loss": {"op": "cross_entropy", "in": ["logits", "y"]}},
        data={"source": "xor", "samples": 128})))
    r = CliRunner().invoke(main, ["run", str(path), "--devices", devices, "--no-cache",
                                  "--out", str(tmp_path / "run")])
    assert r.exit_code == 1, r.output
    assert text in r.output and "help: " in r.output and hint in r.output
    assert "Traceback" not in r.output


def test_fixed_batch_axis_cannot_be_split(tmp_path):
    s = spec({"x": {"shape": [32, 2]}, "y": {"shape": [32], "dtype": "int32"}},
             {"logits": {"op": "linear", "in": "x", "out": 2},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}})
    with pytest.raises(dlgraph.DlgraphError) as e:
        dlgraph.train(dlgraph.load(s), data=blobs(64, 2, 2), devices=DEVICES, quiet=True,
                      out=tmp_path / "run")
    assert "not a named batch dim" in str(e.value)
    assert "shape: [batch, ...]" in e.value.help


# ------------------------------------------------------------------- Ray Train workers


def weights_digest(path: Path) -> str:
    import hashlib
    w, _ = load_tensors(path)
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode() + np.ascontiguousarray(w[k], np.float32).tobytes())
    return h.hexdigest()


def test_two_ray_workers_equal_one_process(tmp_path):
    pytest.importorskip("ray.train")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a local Ray needs a CPU per worker")
    s = spec({"x": {"shape": ["batch", 6]}, "y": {"shape": ["batch"], "dtype": "int32"}},
             {"h": {"op": "linear", "in": "x", "out": 16, "activation": "tanh"},
              "logits": {"op": "linear", "in": "h", "out": 3},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}},
             optimizer={"type": "adam", "lr": 0.01}, clip=1.0,
             schedule={"type": "cosine", "warmup": 2},
             metrics=[{"type": "accuracy", "in": ["logits", "y"]}], validation={"split": 0.2})
    data = blobs(320, 6, 3)
    one = dlgraph.train(dlgraph.load(s), data=data, steps=STEPS, quiet=True, cache=False,
                        out=tmp_path / "one")
    two = dlgraph.train(dlgraph.load(s), data=data, steps=STEPS, quiet=True,
                        out=tmp_path / "two", workers=2)
    ranks = json.loads((two.run_dir / "workers.json").read_text())
    assert ranks["workers"] == 2 and len(ranks["weights_sha256"]) == 2
    # every rank ends with the weights the run directory holds
    assert set(ranks["weights_sha256"]) == {weights_digest(two.run_dir / "weights.safetensors")}
    assert_same_training(one, two)
    assert set(one.metrics) == set(two.metrics) >= {"loss", "val_loss", "val_accuracy"}


def test_workers_without_ray_is_one_line(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)
    s = spec({"x": {"shape": ["batch", 2]}, "y": {"shape": ["batch"], "dtype": "int32"}},
             {"logits": {"op": "linear", "in": "x", "out": 2},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}})
    with pytest.raises(dlgraph.DlgraphError) as e:
        dlgraph.train(dlgraph.load(s), data=blobs(64, 2, 2), workers=2, out=tmp_path / "r")
    assert str(e.value) == ("--workers trains on Ray Train, which is not installed: "
                            "pip install 'dlgraph[ray]'")


def test_workers_need_a_divisible_batch(tmp_path):
    s = spec({"x": {"shape": ["batch", 2]}, "y": {"shape": ["batch"], "dtype": "int32"}},
             {"logits": {"op": "linear", "in": "x", "out": 2},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(s))
    r = CliRunner().invoke(main, ["run", str(path), "--workers", "3"])
    assert r.exit_code == 1, r.output
    assert "batch 32 does not divide over 3 workers" in r.output
    assert "help: use a batch that is a multiple of 3" in r.output


def test_the_actor_all_reduce_is_the_mean_of_every_rank():
    # the Board actor's method as plain asyncio: three ranks, two steps in flight at once
    import asyncio

    from dlgraph.engine.train.board import Board
    rng = np.random.default_rng(4)
    parts = {(s, r): rng.normal(size=1000).astype(np.float32) for s in (0, 1) for r in range(3)}

    async def run():
        b = Board(3)
        got = await asyncio.gather(*[b.allreduce(s, r, parts[s, r])
                                     for r in (2, 0, 1) for s in (1, 0)])
        return b, got
    board, got = asyncio.run(run())
    order = [(s, r) for r in (2, 0, 1) for s in (1, 0)]
    for (s, _), mean in zip(order, got, strict=True):
        want = np.mean([parts[s, r].astype(np.float64) for r in range(3)], axis=0)
        np.testing.assert_allclose(mean, want, rtol=1e-6, atol=1e-7)
    assert not board.parts and not board.means      # nothing kept after a step is done


def test_the_actor_broadcast_hands_every_rank_rank_0s_value():
    import asyncio

    from dlgraph.engine.train.board import Board

    async def run():
        b = Board(3)
        got = await asyncio.gather(*[b.broadcast(n, r, {"n": n, "rank": r} if r == 0 else None)
                                     for r in (2, 1, 0) for n in (1, 0)])
        return b, got
    board, got = asyncio.run(run())
    assert got == [{"n": n, "rank": 0} for _ in (2, 1, 0) for n in (1, 0)]
    assert not board.means and not board.ready and not board.left


# ------------------------------------------- the one loop: a step split around an all-reduce


class OneRank:
    """The all-reduce of a world of one process: a mean and a broadcast that change nothing."""

    def mean(self, part):
        return part

    def broadcast(self, value):
        return value


def test_the_loop_with_the_reduced_step_trains_as_one_process(tmp_path):
    # the workers' step (gradients, all-reduce, update) driven by the same loop as the fused
    # one-process step: the same losses, metrics and weights, and the same run directory
    from dlgraph.engine.graph.autodiff import phase_graphs
    from dlgraph.engine.train.loop import fit, new_run
    from dlgraph.engine.train.prepare import frozen, split_data
    from dlgraph.engine.train.rundir import RunFiles, start_run_dir
    from dlgraph.engine.train.step import ReducedStep
    s = spec({"x": {"shape": ["batch", 6]}, "y": {"shape": ["batch"], "dtype": "int32"}},
             {"h": {"op": "linear", "in": "x", "out": 8, "activation": "tanh"},
              "logits": {"op": "linear", "in": "h", "out": 3},
              "loss": {"op": "cross_entropy", "in": ["logits", "y"]}},
             optimizer={"type": "adam", "lr": 0.01}, clip=1.0, epochs=2,
             schedule={"type": "cosine", "warmup": 2},
             metrics=[{"type": "accuracy", "in": ["logits", "y"]}], validation={"split": 0.2})
    data = blobs(320, 6, 3)
    one = dlgraph.train(dlgraph.load(s), data=data, quiet=True, cache=False,
                        out=tmp_path / "one")
    g = dlgraph.load(s)
    g = frozen(g, g.spec.train.freeze)
    train_arrays, val_arrays, _, _ = split_data(g, g.spec.train, data)
    out = tmp_path / "two"
    start_run_dir(out, g, [])
    run = new_run(g, phase_graphs(g), ReducedStep(OneRank(), 0, 1), train_arrays, val_arrays,
                  run_dir=out, files=RunFiles(out), epochs=None, steps=None,
                  echo=lambda s: None, quiet=True, debug=False, t_start=0.0)
    two = fit(run)
    assert two.epochs == one.epochs == 2 and two.steps == one.steps
    assert len(step_losses(two.run_dir)) == len(step_losses(one.run_dir)) == one.steps
    np.testing.assert_allclose(step_losses(two.run_dir), step_losses(one.run_dir),
                               rtol=TOL, atol=TOL)
    for f in ("weights.safetensors", "best.safetensors", "checkpoint.safetensors"):
        a, b = load_tensors(one.run_dir / f)[0], load_tensors(two.run_dir / f)[0]
        assert a.keys() == b.keys(), f
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=TOL, atol=TOL, err_msg=f"{f}: {k}")
    assert set(two.metrics) == set(one.metrics) >= {"loss", "val_loss", "val_accuracy"}
    assert two.best["epoch"] == one.best["epoch"]


# ------------------------------------------------- callbacks and resume on Ray Train workers


def needs_ray():
    pytest.importorskip("ray.train")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a local Ray needs a CPU per worker")


def callback_spec(**train) -> dict:
    return spec({"x": {"shape": ["batch", 6]}, "y": {"shape": ["batch"], "dtype": "int32"}},
                {"h": {"op": "linear", "in": "x", "out": 16, "activation": "tanh"},
                 "logits": {"op": "linear", "in": "h", "out": 3},
                 "loss": {"op": "cross_entropy", "in": ["logits", "y"]}},
                optimizer={"type": "sgd", "lr": 0.05},          # val_loss falls every epoch
                metrics=[{"type": "accuracy", "in": ["logits", "y"]}],
                validation={"split": 0.25}, **train)


def epoch_numbers(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in rows if r["kind"] == "epoch"]


def assert_same_files(a: Path, b: Path, *names: str):
    for f in names:
        wa, wb = load_tensors(a / f)[0], load_tensors(b / f)[0]
        assert wa.keys() == wb.keys(), f
        for k in wa:
            np.testing.assert_allclose(wb[k], wa[k], rtol=TOL, atol=TOL, err_msg=f"{f}: {k}")


def test_early_stopping_and_the_best_checkpoint_on_two_ray_workers(tmp_path):
    # val_loss falls every epoch, so watched with mode max epoch 1 stays the best: with
    # patience 1 the run stops after epoch 2 and ends with epoch 1's weights, on the workers
    # (rank 0 validates, every rank takes the same decision) as in one process; rank 0 also
    # writes the TensorBoard events
    needs_ray()
    s = callback_spec(epochs=6, early_stopping={"metric": "val_loss", "mode": "max",
                                                "patience": 1})
    data = blobs(320, 6, 3)
    one = dlgraph.train(dlgraph.load(s), data=data, quiet=True, cache=False,
                        out=tmp_path / "one")
    said: list[str] = []
    two = dlgraph.train(dlgraph.load(s), data=data, log=said.append, out=tmp_path / "two",
                        workers=2, tensorboard=True)
    assert one.epochs == two.epochs == 2
    assert epoch_numbers(two.run_dir) == [1, 2]
    assert any(x.startswith("early stopping at epoch 2: val_loss has not improved for "
                            "1 epoch (best ") for x in said)
    assert "restored the weights of epoch 1" in said
    assert two.best["epoch"] == 1 and two.best["file"] == "best.safetensors"
    assert two.best["value"] == pytest.approx(one.best["value"], rel=TOL, abs=TOL)
    assert load_tensors(two.run_dir / "best.safetensors")[1]["epoch"] == 1
    assert_same_files(one.run_dir, two.run_dir, "weights.safetensors", "best.safetensors",
                      "checkpoint.safetensors")
    best, final = (load_tensors(two.run_dir / f)[0] for f in ("best.safetensors",
                                                               "weights.safetensors"))
    for k in best:
        np.testing.assert_array_equal(final[k], best[k], err_msg=k)   # epoch 1's, restored
    ranks = json.loads((two.run_dir / "workers.json").read_text())
    assert set(ranks["weights_sha256"]) == {weights_digest(two.run_dir / "weights.safetensors")}
    assert list((two.run_dir / "tensorboard").glob("events.out.tfevents.*"))  # rank 0's


def test_a_run_on_two_ray_workers_resumes_and_keeps_counting(tmp_path):
    # patience 2 on a val_loss watched with mode max stops after epoch 3, also when the run
    # on the workers is cut after epoch 2 and resumed (the actor all-reduce this time)
    needs_ray()
    s = callback_spec(epochs=8, early_stopping={"metric": "val_loss", "mode": "max",
                                                "patience": 2})
    data = blobs(320, 6, 3)
    one = dlgraph.train(dlgraph.load(s), data=data, quiet=True, cache=False,
                        out=tmp_path / "one")
    part = dlgraph.train(dlgraph.load(s), data=data, epochs=2, quiet=True,
                         out=tmp_path / "two", workers=2, reduce="actor")
    assert part.epochs == 2 and epoch_numbers(part.run_dir) == [1, 2]
    said: list[str] = []
    res = dlgraph.train(dlgraph.load(s), data=data, resume=True, log=said.append,
                        out=tmp_path / "two", workers=2, reduce="actor")
    assert said[0] == f"resuming {tmp_path / 'two'} at epoch 3, step {part.steps}"
    assert one.epochs == res.epochs == 3 and res.steps == one.steps
    assert epoch_numbers(res.run_dir) == [1, 2, 3]
    assert any(x.startswith("early stopping at epoch 3: val_loss has not improved for "
                            "2 epochs") for x in said)
    assert res.best["epoch"] == 1 and "restored the weights of epoch 1" in said
    assert_same_files(one.run_dir, res.run_dir, "weights.safetensors", "best.safetensors")
