"""Weight sharing (`share: NODE`): one set of parameters used by several nodes, its gradient
the sum of every use's (checked against PyTorch autograd), one copy in the checkpoint, drawn
as linked boxes, and located errors for what cannot share."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import evaluate
from tinygrad import Tensor

import dlgraph
from dlgraph.engine.graph.autodiff import reverse
from dlgraph.engine.train.checkpoint import load_tensors

MODULE = """\
modules:
  mlp:
    inputs: [v]
    nodes:
      h: {op: linear, in: v, out: 5, activation: tanh}
      o: {op: linear, in: h, out: 2}
    outputs: [o]
"""


def spec_text(nodes: str, extra: str = "", train: str = "") -> str:
    return ("dlgraph: 1\nname: shared\n" + MODULE + "inputs:\n  x: {shape: [batch, 3]}\n"
            "  y: {shape: [batch, 3]}\nnodes:\n" + nodes + "outputs: [obj]\n" + extra + train)


TWO_USES = ("  a: {op: mlp, in: x}\n"
            "  b: {op: mlp, in: y, share: a}\n"
            "  d: {op: sub, in: [a, b]}\n"
            "  sq: {op: mul, in: [d, a]}\n"            # both uses enter non-linearly
            "  obj: {op: mean, in: sq}\n")


def load(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return dlgraph.load(p)


def test_one_parameter_set_for_two_calls(tmp_path):
    g = load(tmp_path, spec_text(TWO_USES))
    assert sorted(g.params) == ["a.h.bias", "a.h.weight", "a.o.bias", "a.o.weight"]
    m = dlgraph.compile(g, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    # the same input through both calls: b computes exactly what a computes
    out = dlgraph.compile(load(tmp_path, spec_text(TWO_USES.replace("  obj: {op: mean, in: sq}",
                                                                    "  obj: {op: sub, in: [a, b]}"
                                                                    ))), seed=0)(x=x, y=x)
    np.testing.assert_array_equal(out["obj"], np.zeros((4, 2), np.float32))
    assert m(x=x, y=x)["obj"].shape == ()


def _torch_grads(p: dict[str, np.ndarray], x, y, tied: bool) -> dict[str, np.ndarray]:
    """PyTorch autograd of the same objective; ``tied=False`` gives each use its own copy
    of the weights (same values) and returns both copies' gradients summed."""
    def leaf(v):
        return torch.tensor(v, dtype=torch.float64, requires_grad=True)
    w1 = {k: leaf(v) for k, v in p.items()}
    w2 = w1 if tied else {k: leaf(v) for k, v in p.items()}

    def mlp(w, v):
        h = torch.tanh(v @ w["a.h.weight"].T + w["a.h.bias"])
        return h @ w["a.o.weight"].T + w["a.o.bias"]
    a = mlp(w1, torch.tensor(x, dtype=torch.float64))
    b = mlp(w2, torch.tensor(y, dtype=torch.float64))
    ((a - b) * a).mean().backward()
    return {k: (w1[k].grad + (0 if tied else w2[k].grad)).numpy() for k in p}


def test_gradient_is_the_sum_of_both_uses(tmp_path):
    g = load(tmp_path, spec_text(TWO_USES))
    rng = np.random.default_rng(1)
    p = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.params.items()}
    x, y = (rng.standard_normal((6, 3)).astype(np.float32) for _ in range(2))
    tg = reverse(g, "obj")
    names = sorted(tg.grads)
    outs = evaluate(tg, [tg.grads[n] for n in names], {"x": x, "y": y},
                    {k: Tensor(v) for k, v in p.items()})
    ours = {n: o.numpy() for n, o in zip(names, outs, strict=True)}
    tied, summed = _torch_grads(p, x, y, tied=True), _torch_grads(p, x, y, tied=False)
    for k in names:
        np.testing.assert_allclose(tied[k], summed[k], rtol=1e-10)   # the oracle agrees
        np.testing.assert_allclose(ours[k], tied[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # and it is not one use's gradient alone
    alone = _torch_grads(p, x, y, tied=False)
    assert not np.allclose(ours["a.h.weight"], alone["a.h.weight"] * 0.5, atol=1e-4)


def test_layer_applied_twice_trains_one_copy(tmp_path):
    nodes = ("  fa: {op: linear, in: x, out: 3, activation: tanh}\n"
             "  fb: {op: linear, in: fa, out: 3, share: fa}\n"     # the same layer, twice
             "  pred: {op: sum, in: fb, axes: [1], keepdims: true}\n"
             "  t: {op: sum, in: y, axes: [1], keepdims: true}\n"
             "  obj: {op: mse, in: [pred, t]}\n")
    train = ("train:\n  data: {source: npy, path: d.npz}\n  batch: 8\n  epochs: 1\n"
             "  objective: obj\n  optimizer: {type: sgd, lr: 0.1}\n"
             "  validation: {split: 0}\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 3)).astype(np.float32),
             y=rng.standard_normal((32, 3)).astype(np.float32))
    g = load(tmp_path, spec_text(nodes, train=train))
    res = dlgraph.train(g, out=tmp_path / "run", quiet=True)
    ckpt, _ = load_tensors(Path(res.run_dir) / "checkpoint.safetensors")
    assert sorted(k for k in ckpt if k.startswith("param.")) == ["param.fa.bias",
                                                                 "param.fa.weight"]
    arrays, _ = load_tensors(Path(res.run_dir) / "weights.safetensors")
    assert sorted(arrays) == ["fa.bias", "fa.weight"]
    assert not np.allclose(arrays["fa.weight"], dlgraph.compile(g, seed=0).params[
        "fa.weight"].numpy())                                      # it trained


def test_drawn_as_linked_boxes(tmp_path):
    dot = dlgraph.render(load(tmp_path, spec_text(TWO_USES)))
    b_line = next(ln for ln in dot.splitlines() if ln.strip().startswith('"b" ['))
    assert "shares the parameters of a" in b_line
    a_line = next(ln for ln in dot.splitlines() if ln.strip().startswith('"a" ['))
    assert "32 params" in a_line
    shared = [ln for ln in dot.splitlines() if ln.strip().startswith('"a" -> "b"')]
    assert len(shared) == 1 and "shared parameters" in shared[0] and "dashed" in shared[0]
    # opened, the second use's layers read the first's parameters across the clusters
    dot = dlgraph.render(load(tmp_path, spec_text(TWO_USES)), expand=True)
    assert 'label="b (mlp; the parameters of a)"' in dot
    edges = [ln for ln in dot.splitlines() if "shared parameters" in ln]
    assert {ln.split(" -> ")[0].strip() for ln in edges} == {
        '"a/h/weight"', '"a/h/bias"', '"a/o/weight"', '"a/o/bias"'}
    assert all(ln.split(" -> ")[1].startswith('"b/') for ln in edges)


@pytest.mark.parametrize("nodes,message", [
    ("  a: {op: mlp, in: x}\n  b: {op: mlp, in: y, share: aa}\n  obj: {op: sub, in: [a, b]}\n",
     "spec.yaml:15: node 'b' (mlp): `share: aa`: 'aa' is not a node\n"
     "  help: did you mean 'a'?"),
    ("  a: {op: mlp, in: x}\n  b: {op: linear, in: y, out: 2, share: a}\n"
     "  obj: {op: sub, in: [a, b]}\n",
     "spec.yaml:15: node 'b' (linear): `share: a`: 'a' is a mlp, this node a linear\n"
     "  help: parameters are shared between nodes of the same op (or calls of the same "
     "module)"),
    ("  a: {op: linear, in: x, out: 2}\n  b: {op: linear, in: y, out: 4, share: a}\n"
     "  obj: {op: add, in: [a, a]}\n",
     "spec.yaml:15: node 'b' (linear): `share: a`: parameter weight of 'a' is [2, 3], here "
     "it would be [4, 3]\n  help: a node that shares parameters must have the same sizes and "
     "see inputs of the same size as 'a'"),
    ("  a: {op: linear, in: x, out: 2}\n  b: {op: linear, in: y, out: 2, bias: false, "
     "share: a}\n  obj: {op: add, in: [a, b]}\n",
     "spec.yaml:15: node 'b' (linear): `share: a`: this node does not use bias of 'a'\n"
     "  help: shared nodes need the same fields (sizes, bias, layers) and inputs of the "
     "same size"),
    ("  a: {op: linear, in: x, out: 2}\n  b: {op: linear, in: y, out: 2, share: a, "
     "trainable: false}\n  obj: {op: add, in: [a, b]}\n",
     "spec.yaml:15: node 'b' (linear): a node that shares the parameters of 'a' takes their "
     "trainable from it\n  help: set trainable on 'a', or remove `share:`"),
    ("  a: {op: linear, in: x, out: 2, share: a}\n  obj: {op: relu, in: a}\n",
     "spec.yaml:14: node 'a' (linear): `share: a` names no other node\n"
     "  help: no other node is a linear; share names one to reuse its parameters"),
])
def test_sharing_errors(tmp_path, nodes, message):
    with pytest.raises(dlgraph.DlgraphError) as e:
        load(tmp_path, spec_text(nodes))
    assert str(e.value).replace(str(tmp_path) + "/", "") == message


def test_module_without_parameters_cannot_share(tmp_path):
    extra = ("  twice:\n    inputs: [v]\n    nodes:\n      d: {op: add, in: [v, v]}\n"
             "    outputs: [d]\n")
    text = spec_text("  a: {op: twice, in: x}\n  b: {op: twice, in: y, share: a}\n"
                     "  obj: {op: add, in: [a, b]}\n").replace("    outputs: [o]\n",
                                                              "    outputs: [o]\n" + extra)
    with pytest.raises(dlgraph.GraphError) as e:
        load(tmp_path, text)
    assert "`share: a`: 'a' has no parameters to share" in str(e.value)
    assert "help:" in str(e.value)



def test_sharing_a_sharer_uses_the_first_nodes_parameters(tmp_path):
    g = load(tmp_path, spec_text("  fa: {op: linear, in: x, out: 3, activation: tanh}\n"
                                 "  fb: {op: linear, in: fa, out: 3, activation: tanh, "
                                 "share: fa}\n"
                                 "  obj: {op: linear, in: fb, out: 3, activation: tanh, "
                                 "share: fb}\n"))
    assert sorted(g.params) == ["fa.bias", "fa.weight"]
    m = dlgraph.compile(g, seed=0)
    w, b = (m.params[k].numpy().astype(np.float64) for k in ("fa.weight", "fa.bias"))
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    ref = x.astype(np.float64)
    for _ in range(3):                                      # the same layer, three times
        ref = np.tanh(ref @ w.T + b)
    np.testing.assert_allclose(m(x=x, y=x)["obj"], ref, rtol=1e-5, atol=1e-6)
