"""Sequence lengths left symbolic (`shape: [batch, time, ...]`) and padded batches (`mask:`):
one compiled program for every length, checked against PyTorch at each length."""

import numpy as np
import pytest
import torch
from test_recurrent import CASES, assert_grads, data, spec, torch_reference

import dlgraph
from dlgraph.engine.compile.interpret import input_dims, input_tensors
from dlgraph.engine.compile.lower import LoopStage, lower
from dlgraph.engine.graph.autodiff import reverse

B, I, H = 4, 3, 5
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def compiled(prog) -> list[int]:
    """How many programs each stage compiled."""
    return [len(st._compiled if isinstance(st, LoopStage) else st._jits) for st in prog.stages]


@pytest.mark.parametrize("kind,layers,bidir,states", CASES)
def test_one_program_for_every_length(kind, layers, bidir, states):
    """Outputs and every parameter gradient match PyTorch at lengths 7, 1, 16 and 3, all
    through the program compiled for the declared longest length."""
    s = spec(kind, layers, bidir, states, T="time")
    s["dims"] = {"time": {"max": 16}}
    g = dlgraph.load(s)
    model = dlgraph.compile(g, seed=1)
    tg = reverse(g, "loss")
    names = list(tg.grads)
    prog = lower(tg, [tg.grads[n] for n in names], params=model.params, training=True)
    for steps in (7, 1, 16, 3):
        arrays = data(layers, bidir, states, steps)
        out, loss, ref = torch_reference(kind, layers, bidir, states, model, arrays)
        ours = model(**arrays)
        assert ours["enc"].shape == out.shape
        np.testing.assert_allclose(ours["enc"], out, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours["loss"], loss, rtol=1e-4)
        assert_grads(names, prog(input_tensors(tg, arrays), input_dims(tg, arrays)), ref)
    assert set(compiled(prog)) == {1} and set(compiled(model._program)) == {1}
    loops = [st for st in prog.stages if isinstance(st, LoopStage)]
    assert loops and all(st.node.attrs.steps == "time" for st in loops)


def test_longest_length_grows_without_a_declared_max():
    """Without `dims:` the first length is the longest compiled for; a longer one doubles
    it (one more compile), shorter ones reuse what is there."""
    g = dlgraph.load(spec("gru", 1, False, (), T="time"))
    model = dlgraph.compile(g, seed=0)
    seen = []
    for steps in (5, 3, 5, 6, 2, 10, 11):
        arrays = data(1, False, (), steps)
        out, _, _ = torch_reference("gru", 1, False, (), model, arrays)
        np.testing.assert_allclose(model(**arrays)["enc"], out, rtol=1e-4, atol=1e-5)
        seen.append(model._program.lengths.most["time"])
    assert seen == [5, 5, 5, 10, 10, 10, 20]


def test_longer_than_the_declared_max_is_refused():
    s = spec("lstm", 1, False, (), T="time")
    s["dims"] = {"time": {"max": 8}}
    model = dlgraph.compile(dlgraph.load(s))
    with pytest.raises(dlgraph.ShapeError) as e:
        model(**data(1, False, (), 9))
    assert str(e.value) == ("a sequence of 9 steps is longer than the spec's "
                            "`dims: {time: {max: 8}}`\n"
                            "  help: raise dims.time.max, or cut the sequences")


def test_dims_must_name_a_dim_of_an_input():
    s = spec("lstm", 1, False, (), T="time")
    s["dims"] = {"tme": {"max": 8}}
    with pytest.raises(dlgraph.SpecError) as e:
        dlgraph.load(s)
    assert "dims names 'tme', which no input's shape uses (inputs use batch, time)" \
        in str(e.value)


def test_initial_states_are_read_on_every_call():
    """A stage output that is a view of an input (h0[k]) came back from every replay with
    the first call's values: later initial states were silently ignored."""
    g = dlgraph.load(spec("rnn", 1, True, ("h0",)))
    model = dlgraph.compile(g, seed=1)
    for k in range(3):
        arrays = data(1, True, ("h0",))
        arrays["h0"] = np.random.default_rng(k).standard_normal((2, 3, 6)).astype(np.float32)
        out, _, _ = torch_reference("rnn", 1, True, ("h0",), model, arrays)
        np.testing.assert_allclose(model(**arrays)["enc"], out, rtol=1e-5, atol=1e-6)


def masked_spec(kind, layers, bidir):
    d = 2 if bidir else 1
    return {"dlgraph": 1, "name": "masked", "inputs": {
        "x": {"shape": ["batch", "time", I]}, "m": {"shape": ["batch", "time"]},
        "wo": {"shape": ["batch", "time", d * H]}, "wh": {"shape": ["batch", d * H]}},
        "nodes": {
            "enc": {"op": kind, "in": "x", "mask": "m", "hidden": H, "layers": layers,
                    "bidirectional": bidir},
            "a": {"op": "mul", "in": ["enc", "wo"]}, "b": {"op": "mul", "in": ["enc.h", "wh"]},
            "sa": {"op": "sum", "in": "a"}, "sb": {"op": "sum", "in": "b"},
            "loss": {"op": "add", "in": ["sa", "sb"]}},
        "outputs": ["enc", "loss"]}


def packed_reference(kind, layers, bidir, model, arrays, lengths):
    """PyTorch on packed sequences (each its own length); outputs padded with zeros."""
    net = TORCH[kind](I, H, num_layers=layers, bidirectional=bidir, batch_first=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(model.params[f"enc.{name}"].numpy()))
    steps = arrays["x"].shape[1]
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(arrays["x"]), torch.tensor(lengths), batch_first=True,
        enforce_sorted=False)
    out, hn = net(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=steps)
    hn = hn[0] if kind == "lstm" else hn
    last = torch.cat([hn[-2], hn[-1]], -1) if bidir else hn[-1]
    loss = (out * torch.from_numpy(arrays["wo"])).sum() + (
        last * torch.from_numpy(arrays["wh"])).sum()
    loss.backward()
    return out.detach().numpy(), {n: p.grad.numpy() for n, p in net.named_parameters()}


@pytest.mark.parametrize("kind,layers,bidir", [("lstm", 1, False), ("gru", 2, True),
                                               ("rnn", 1, True), ("lstm", 2, True)])
def test_mask_matches_packed_sequences(kind, layers, bidir):
    """Padded batches with `mask:` give PyTorch's packed-sequence results: zero outputs past
    each end, `h` each sequence's last real state (the backward direction starting there),
    and the same gradients, at several batch lengths through one program."""
    g = dlgraph.load(masked_spec(kind, layers, bidir))
    model = dlgraph.compile(g, seed=1)
    tg = reverse(g, "loss")
    names = list(tg.grads)
    prog = lower(tg, [tg.grads[n] for n in names], params=model.params, training=True)
    d = 2 if bidir else 1
    for steps in (9, 6, 2):
        rng = np.random.default_rng(steps)
        lengths = rng.integers(1, steps + 1, B)
        lengths[0] = steps
        arrays = {"x": rng.standard_normal((B, steps, I)),
                  "m": np.arange(steps)[None] < lengths[:, None],
                  "wo": rng.standard_normal((B, steps, d * H)),
                  "wh": rng.standard_normal((B, d * H))}
        arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
        out, ref = packed_reference(kind, layers, bidir, model, arrays, lengths)
        np.testing.assert_allclose(model(**arrays)["enc"], out, rtol=1e-4, atol=1e-5)
        assert_grads(names, prog(input_tensors(tg, arrays), input_dims(tg, arrays)), ref)
    assert set(compiled(prog)) == {1}


def test_mask_of_the_wrong_shape_is_refused():
    s = masked_spec("gru", 1, False)
    s["inputs"]["m"] = {"shape": ["batch", 7]}
    with pytest.raises(dlgraph.ShapeError) as e:
        dlgraph.load(s)
    assert str(e.value) == (
        "<dict>: node 'enc' (gru): gru mask has type [batch, 7], expected [batch, time] "
        "float32: 1 for each real step, 0 for padding\n"
        "  help: give one float per sequence step, e.g. an input {shape: [batch, time]}")


def test_mask_naming_nothing_is_located():
    s = masked_spec("gru", 1, False)
    s["nodes"]["enc"]["mask"] = "mm"
    with pytest.raises(dlgraph.GraphError) as e:
        dlgraph.load(s)
    assert str(e.value).startswith("<dict>: node 'enc' (gru): 'mm' is not an input or a node")


def test_training_on_batches_of_several_lengths(tmp_path):
    """A model trained with the Python API on data of one length predicts at others with the
    same program; the training program compiled once."""
    s = {"dlgraph": 1, "name": "sum-seq", "inputs": {
        "x": {"shape": ["batch", "time", 1]}, "y": {"shape": ["batch", 1]}},
        "dims": {"time": {"max": 24}},
        "nodes": {"enc": {"op": "gru", "in": "x", "hidden": 16},
                  "pred": {"op": "linear", "in": "enc.h", "out": 1},
                  "loss": {"op": "mse", "in": ["pred", "y"]}},
        "outputs": ["pred"],
        "train": {"batch": 32, "epochs": 30, "objective": "loss",
                  "optimizer": {"type": "adam", "lr": 0.02}}}
    g = dlgraph.load(s)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (512, 12, 1)).astype(np.float32)
    res = dlgraph.train(g, data={"x": x, "y": x.mean(1)}, quiet=True, out=tmp_path / "run")
    assert res.metrics["loss"] < 0.01
    model = dlgraph.compile(g, weights=res.run_dir / "weights.safetensors")
    errs = []
    for steps in (4, 12, 20):
        xs = rng.uniform(-1, 1, (64, steps, 1)).astype(np.float32)
        errs.append(float(np.mean((model(x=xs)["pred"] - xs.mean(1)) ** 2)))
    assert errs[1] < 0.01 and errs[0] < 0.05, errs     # 12 was trained; 4 and 20 were not
    assert compiled(model._program) == [1] * len(model._program.stages)


@pytest.mark.parametrize("kind,bidir", [("lstm", True), ("gru", False)])
def test_masked_symbolic_export_matches_onnxruntime(kind, bidir, tmp_path):
    """A symbolic length exports as a named ONNX dim and `mask:` as the recurrent operator's
    sequence_lens: onnxruntime gives dlgraph's outputs at two lengths from one file."""
    ort = pytest.importorskip("onnxruntime")
    s = masked_spec(kind, 2, bidir)
    s["outputs"] = ["enc", "enc.h"]
    g = dlgraph.load(s)
    weights = tmp_path / "w.safetensors"
    model = dlgraph.compile(g, seed=4)
    from safetensors.numpy import save_file
    save_file(model.state_dict(), weights)
    path = dlgraph.export(g, tmp_path / "m.onnx", weights=weights)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for steps in (7, 3):
        rng = np.random.default_rng(steps)
        lengths = rng.integers(1, steps + 1, B)
        x = rng.standard_normal((B, steps, I)).astype(np.float32)
        m = (np.arange(steps)[None] < lengths[:, None]).astype(np.float32)
        ours = model(x=x, m=m)
        got = sess.run(None, {"x": x, "m": m})
        for want, o in zip(ours.values(), got, strict=True):
            np.testing.assert_allclose(o, want, atol=1e-5, rtol=1e-5)
