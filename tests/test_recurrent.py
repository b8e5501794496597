"""rnn, lstm and gru against PyTorch's modules on the same weights: outputs and the
gradients our graph reversal derives, for every parameter (relative error < 1e-4)."""

import numpy as np
import pytest
import torch

import dlgraph
from dlgraph.engine.compile import lower as lower_mod
from dlgraph.engine.compile import tinygrad_door as door
from dlgraph.engine.compile.interpret import Ctx, Interpreter, input_dims, input_tensors, to_tensor
from dlgraph.engine.compile.lower import lower
from dlgraph.engine.graph.autodiff import reverse

B, T, I, H = 3, 5, 4, 6
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def spec(kind, layers, bidir, states, T=T):
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


def torch_reference(kind, layers, bidir, states, model, arrays):
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
    return out.detach().numpy(), loss.item(), {n: p.grad.numpy() for n, p in
                                               net.named_parameters()}


def data(layers, bidir, states, steps=T):
    rng = np.random.default_rng(0)
    d = 2 if bidir else 1
    arrays = {"x": rng.standard_normal((B, steps, I)),
              "wo": rng.standard_normal((B, steps, d * H)),
              "wh": rng.standard_normal((B, d * H))}
    for s in states:
        arrays[s] = rng.standard_normal((layers * d, B, H))
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def assert_grads(names, grads, ref):
    for n, gr in zip(names, grads, strict=True):
        want = ref[n.removeprefix("enc.")]
        err = np.abs(gr.numpy() - want).max() / (np.abs(want).max() + 1e-12)
        assert err < 1e-4, f"{n}: relative error {err:.2e}"


def staged_grads(tg, names, model, arrays):
    """The gradients as training computes them: compiled stages, loops as compiled steps
    (however short: the lowering would trace short loops inline, tested above)."""
    saved, lower_mod.INLINE_STEPS = lower_mod.INLINE_STEPS, 0
    try:
        prog = lower(tg, [tg.grads[n] for n in names], params=model.params, training=True)
    finally:
        lower_mod.INLINE_STEPS = saved
    assert any(isinstance(st, lower_mod.LoopStage) for st in prog.stages)
    return prog(input_tensors(tg, arrays), input_dims(tg, arrays))


@pytest.mark.parametrize("kind,layers,bidir,states", CASES)
def test_matches_torch(kind, layers, bidir, states):
    g = dlgraph.load(spec(kind, layers, bidir, states))
    model = dlgraph.compile(g, seed=1)
    arrays = data(layers, bidir, states)
    out, loss, ref = torch_reference(kind, layers, bidir, states, model, arrays)

    ours = model(**arrays)
    np.testing.assert_allclose(ours["enc"], out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["loss"], loss, rtol=1e-5)

    tg = reverse(g, "loss")
    names = list(tg.grads)
    assert sorted(names) == sorted(f"enc.{n}" for n in ref)
    feeds = {k: to_tensor(v, "float32") for k, v in arrays.items()}
    inline = Interpreter(tg, [tg.grads[n] for n in names])(
        Ctx(training=True, dims=input_dims(g, arrays)), feeds, model.params)
    assert_grads(names, inline, ref)
    assert_grads(names, staged_grads(tg, names, model, arrays), ref)


@pytest.mark.parametrize("kind,layers,bidir,states,steps", [
    ("lstm", 1, False, (), 1), ("gru", 1, True, ("h0",), 1), ("lstm", 2, True, ("h0", "c0"), 16),
    ("lstm", 1, False, (), 200), ("gru", 1, False, (), 200)])
def test_matches_torch_at_lengths(kind, layers, bidir, states, steps):
    """Sequence lengths 1, 16 and 200 through the compiled loop, forward and backward."""
    g = dlgraph.load(spec(kind, layers, bidir, states, T=steps))
    model = dlgraph.compile(g, seed=2)
    arrays = data(layers, bidir, states, steps)
    out, loss, ref = torch_reference(kind, layers, bidir, states, model, arrays)
    ours = model(**arrays)
    np.testing.assert_allclose(ours["enc"], out, rtol=1e-4, atol=1e-5)
    tg = reverse(g, "loss")
    names = list(tg.grads)
    assert_grads(names, staged_grads(tg, names, model, arrays), ref)
    if steps == 1 and not states:     # W_hh only ever sees the zero initial state
        assert not ref["weight_hh_l0"].any()


def test_one_loop_whatever_the_length():
    """The graph holds one loop per layer and direction; its body (the cell, forward and
    backward) and the number of graph nodes do not depend on the sequence length."""
    sizes = []
    for steps in (3, 50):
        g = dlgraph.load(spec("lstm", 1, False, (), T=steps))
        tg = reverse(g, "loss")
        loops = [n for n in tg.nodes.values() if n.op == "loop"]
        assert [n.attrs.steps for n in loops] == [steps, steps]     # forward, backward
        assert loops[0].attrs.reverse is False and loops[1].attrs.reverse is True
        sizes.append((len(tg.nodes), [len(n.attrs.body.nodes) for n in loops]))
        cuts = [n.id for n in loops[0].attrs.body.nodes.values() if n.cut]
        # h and c, and h @ W_hh^T + b_hh: kernel boundaries inside the step
        assert cuts == ["enc/step_l0/add", "enc/step_l0/c_1", "enc/step_l0/h_1"]
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_backward_step_reads_saved_gates_and_the_weight_gradient_is_one_product(kind):
    """The forward loop of the training graph saves the step values its VJP reads, so the
    backward step recomputes no gate (no sigmoid, no tanh, no recurrent product: one
    matmul left, the state's cotangent); W_hh's gradient is one product over every batch
    row and step after the loop, not a sum the backward step accumulates (its numbers:
    test_matches_torch)."""
    g = dlgraph.load(spec(kind, 1, False, ()))
    tg = reverse(g, "loss")
    fwd, bwd = [n for n in tg.nodes.values() if n.op == "loop"]
    saved = [k for k in fwd.attrs.body.outputs if k.startswith("saved:")]
    assert len(saved) >= 3
    ops = [n.op for n in bwd.attrs.body.nodes.values()]
    assert "sigmoid" not in ops and "tanh" not in ops and ops.count("matmul") == 1
    assert not any(k.startswith("ct:") and "weight_hh" in k for k in bwd.attrs.body.outputs)
    n = tg.nodes[tg.grads["enc.weight_hh_l0"]]
    while n.op != "sum":                    # through the transposes back to W_hh's layout
        n = tg.nodes[n.inputs[0]]
    assert n.attrs.axes == [0, 1]           # batch and time at once


def test_compiled_step_is_one_program_for_every_t():
    """The loop's compiled step runs the same kernels whatever the sequence length."""
    counts = []
    for steps in (32, 64):
        g = dlgraph.load(spec("lstm", 1, False, (), T=steps))
        tg = reverse(g, "loss")
        names = list(tg.grads)
        model = dlgraph.compile(g, seed=0)
        arrays = data(1, False, (), steps)
        prog = lower(tg, [tg.grads[n] for n in names], params=model.params, training=True)
        prog(input_tensors(tg, arrays), input_dims(tg, arrays))
        loops = [st for st in prog.stages if isinstance(st, lower_mod.LoopStage)]
        counts.append([door.kernels(next(iter(st._compiled.values()))[2]) for st in loops])
    assert counts[0] == counts[1]


def test_recurrent_needs_fixed_features():
    bad = spec("gru", 1, False, ())
    bad["inputs"]["x"]["shape"] = ["batch", "time", "feat"]
    with pytest.raises(dlgraph.ShapeError) as e:
        dlgraph.load(bad)
    assert str(e.value) == (
        "<dict>: node 'enc' (gru): gru needs [batch, time, features] with a fixed number of "
        "features, got [batch, time, feat]\n"
        "  help: declare the input like {shape: [batch, time, 1]}")


def test_the_gate_kernels_compile_as_plain_loops_and_reductions_keep_tinygrad_opts(monkeypatch):
    """On the CPU an elementwise kernel computing exponentials (the gates' sigmoid and tanh)
    is compiled without tinygrad's hand-coded optimisations, which the C compiler then
    vectorises; a reduction keeps them. The numbers: test_matches_torch."""
    from dlgraph.engine.compile import tinygrad_door as door
    seen = []
    real = door._plain_call

    def record(c):
        out = real(c)
        ops = door.kernel_ops(c)
        if ops:
            seen.append((out is not c, "REDUCE" in ops, bool(ops & {"EXP2", "LOG2"})))
        return out
    monkeypatch.setattr(door, "_plain_call", record)
    g = dlgraph.load(spec("lstm", 1, False, ()))
    model = dlgraph.compile(g, seed=0, cache=False)
    model(**{k: v for k, v in data(1, False, ()).items() if k in model.input_names})
    assert any(plain for plain, _, _ in seen)
    assert all(plain == (exp and not red) for plain, red, exp in seen)
