"""rnn, lstm and gru against PyTorch's modules on the same weights: outputs and the
gradients our graph reversal derives, for every parameter (relative error < 1e-4)."""

import numpy as np
import pytest
import torch

import dlgraph
from dlgraph.engine.autodiff import reverse
from dlgraph.engine.lower import Ctx, Evaluator, bind, to_tensor

B, T, I, H = 3, 5, 4, 6
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def spec(kind, layers, bidir, states):
    d = 2 if bidir else 1
    inputs = {"x": {"shape": ["batch", T, I]}, "wo": {"shape": ["batch", T, d * H]},
              "wh": {"shape": ["batch", d * H]}}
    ins = ["x"]
    for s in states:
        inputs[s] = {"shape": [layers * d, "batch", H]}
        ins.append(s)
    return {"dlgraph": 1, "name": "rec", "inputs": inputs, "nodes": {
        "enc": {"op": kind, "in": ins, "hidden": H, "layers": layers, "bidirectional": bidir},
        "a": {"op": "mul", "in": ["enc", "wo"]},
        "b": {"op": "mul", "in": ["enc.h", "wh"]},
        "sa": {"op": "sum", "in": "a"}, "sb": {"op": "sum", "in": "b"},
        "loss": {"op": "add", "in": ["sa", "sb"]}}, "outputs": ["enc", "loss"]}


CASES = [("rnn", 1, False, ()), ("rnn", 2, True, ("h0",)), ("lstm", 1, False, ()),
         ("lstm", 2, False, ("h0", "c0")), ("lstm", 1, True, ()), ("gru", 1, False, ()),
         ("gru", 2, True, ("h0",))]


@pytest.mark.parametrize("kind,layers,bidir,states", CASES)
def test_matches_torch(kind, layers, bidir, states):
    g = dlgraph.load(spec(kind, layers, bidir, states))
    model = dlgraph.compile(g, seed=1)
    rng = np.random.default_rng(0)
    d = 2 if bidir else 1
    arrays = {"x": rng.standard_normal((B, T, I)), "wo": rng.standard_normal((B, T, d * H)),
              "wh": rng.standard_normal((B, d * H))}
    for s in states:
        arrays[s] = rng.standard_normal((layers * d, B, H))
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}

    net = TORCH[kind](I, H, num_layers=layers, bidirectional=bidir, batch_first=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(model.params[f"enc.{name}"].numpy()))
    init = tuple(torch.from_numpy(arrays[s]) for s in states)
    out, hn = net(torch.from_numpy(arrays["x"]),
                  (init if kind == "lstm" else init[0]) if init else None)
    hn = hn[0] if kind == "lstm" else hn
    last = torch.cat([hn[-2], hn[-1]], -1) if bidir else hn[-1]
    loss = (out * torch.from_numpy(arrays["wo"])).sum() + (last * torch.from_numpy(
        arrays["wh"])).sum()
    loss.backward()

    ours = model(**arrays)
    np.testing.assert_allclose(ours["enc"], out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["loss"], loss.item(), rtol=1e-5)

    tg = reverse(g, "loss")
    names = list(tg.grads)
    assert sorted(names) == sorted(f"enc.{n}" for n, _ in net.named_parameters())
    feeds = {k: to_tensor(v, "float32") for k, v in arrays.items()}
    grads = Evaluator(tg, [tg.grads[n] for n in names])(
        Ctx(training=True, dims=bind(g, arrays)), feeds, model.params)
    torch_grads = dict(net.named_parameters())
    for n, gr in zip(names, grads, strict=True):
        ref = torch_grads[n.removeprefix("enc.")].grad.numpy()
        err = np.abs(gr.numpy() - ref).max() / (np.abs(ref).max() + 1e-12)
        assert err < 1e-4, f"{n}: relative error {err:.2e}"


def test_states_are_kernel_boundaries():
    g = dlgraph.load(spec("lstm", 1, False, ()))
    cuts = [n.id for n in g.nodes.values() if n.cut]
    # h and c of every step, and h @ W_hh^T + b_hh of every step after the first
    assert len(cuts) == 2 * T + T - 1
    assert "enc/l0t0/c" in cuts and f"enc/l0t{T - 1}/h" in cuts and "enc/l0t1/add" in cuts
    tg = reverse(g, "loss")
    back = [n for n in tg.nodes.values() if n.cut and n.role == "backward"]
    assert len(back) >= 2 * (T - 1)                 # their cotangents too


def test_recurrent_needs_fixed_time():
    bad = spec("gru", 1, False, ())
    bad["inputs"]["x"]["shape"] = ["batch", "time", I]
    with pytest.raises(dlgraph.ShapeError) as e:
        dlgraph.load(bad)
    assert str(e.value) == (
        "<dict>: node 'enc' (gru): gru needs [batch, time, features] with a fixed number of "
        "steps and features, got [batch, time, 4]\n"
        "  help: declare the input like {shape: [batch, 32, 1]}")

