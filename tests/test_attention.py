"""Attention layers against PyTorch on the same weights: scaled_dot_product_attention,
nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerDecoderLayer (batch
first, no dropout). Outputs agree to 1e-5 and the gradients our graph reversal derives, for
every parameter (and inputs made parameters), to 1e-4 (max-norm relative error)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import evaluate, random_params, rel_err
from tinygrad import Tensor

import dlgraph
from dlgraph.engine.errors import ShapeError
from dlgraph.engine.graph.autodiff import reverse

B, T, E, H, FF = 2, 5, 16, 4, 24


def t32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32))


def versus_torch(spec: dict, torch_side, feeds: dict, *, out: str = "a", objective: str = "loss",
                 seed: int = 0, fwd_tol: float = 1e-5, grad_tol: float = 1e-4) -> None:
    """Check a spec's output ``out``, its objective and the gradient of every trainable
    parameter (by graph reversal, on random weights) against PyTorch.

    ``torch_side(weights)`` gets the weights (numpy, by dlgraph name) and returns
    ``(fn, leaves)``: ``fn(**feeds as torch tensors) -> (out, objective)``, and ``leaves``
    maps every trainable dlgraph parameter to the torch leaf tensor playing its role.
    """
    g = dlgraph.load(spec)
    weights = random_params(g, np.random.default_rng(seed))
    tg = reverse(g, objective)
    names = list(tg.grads)
    outs = evaluate(tg, [g.outputs[out], tg.objective] + [tg.grads[n] for n in names], feeds,
                    {k: Tensor(v) for k, v in weights.items()})
    fn, leaves = torch_side({k: v.copy() for k, v in weights.items()})
    assert sorted(leaves) == sorted(names)
    t_out, t_obj = fn(**{k: t32(v) for k, v in feeds.items()})
    t_obj.backward()
    assert rel_err(outs[0].numpy(), t_out.detach().numpy()) < fwd_tol
    assert rel_err(outs[1].numpy(), t_obj.detach().numpy()) < fwd_tol
    errs = {n: rel_err(o.numpy(), leaves[n].grad.numpy())
            for n, o in zip(names, outs[2:], strict=True)}
    bad = {n: e for n, e in errs.items() if not e < grad_tol}
    assert not bad, f"gradients differ from torch: {bad}"


def load_module(module: torch.nn.Module, weights: dict, prefix: str = "a.") -> dict:
    """Load dlgraph weights named ``<prefix><torch name>`` into a module (strictly: the
    names and shapes must be PyTorch's); returns its parameters by dlgraph name."""
    module.load_state_dict({k[len(prefix):]: t32(v) for k, v in weights.items()
                            if k.startswith(prefix)}, strict=True)
    return {prefix + k: p for k, p in module.named_parameters()}


def leaf(weights: dict, name: str) -> torch.Tensor:
    return t32(weights[name]).requires_grad_()


def seq_spec(nodes: dict, inputs: dict | None = None, out_shape=("batch", T, E)) -> dict:
    """A spec over x [batch, T, E] (and ``inputs``) whose objective is mse(a, y)."""
    return {"dlgraph": 1, "name": "t",
            "inputs": {"x": {"shape": ["batch", T, E]}, "y": {"shape": list(out_shape)},
                       **(inputs or {})},
            "nodes": {**nodes, "loss": {"op": "mse", "in": ["a", "y"]}}, "outputs": ["a"]}


def mse(a, b):
    return ((a - b) ** 2).mean()


def causal_bool(tq, tk):
    return torch.ones(tq, tk, dtype=torch.bool).tril()


# -------------------------------------------------------------------------- attention
TQ, TK = 5, 6


def attention_case(causal=False, mask=None, scale=None):
    """(spec, feeds, torch reference) of attention on q [B, 2, TQ, 4], k, v [B, 2, TK, .]."""
    rng = np.random.default_rng(7)
    feeds = {"q": rng.standard_normal((B, 2, TQ, 4)), "k": rng.standard_normal((B, 2, TK, 4)),
             "v": rng.standard_normal((B, 2, TK, 3))}
    nodes, ins, tmask = {}, ["q", "k", "v"], None
    if mask is not None:
        kind, shape = mask
        if kind == "bool":
            m = rng.random(shape) < 0.6
            m[..., 0] = True                                  # no row fully masked
            feeds["m"] = m.astype(np.float32)
            nodes = {"half": {"op": "const", "value": 0.5},
                     "mask": {"op": "greater", "in": ["m", "half"]}}
            ins.append("mask")
            tmask = torch.from_numpy(m)
        else:
            feeds["m"] = rng.standard_normal(shape)
            ins.append("m")
            tmask = t32(feeds["m"])
    if causal:
        tmask = causal_bool(TQ, TK) if tmask is None else tmask & causal_bool(TQ, TK)
    feeds = {k: np.asarray(v, np.float32) for k, v in feeds.items()}
    spec = {"dlgraph": 1, "name": "att",
            "inputs": {k: {"shape": list(v.shape)} for k, v in feeds.items()},
            "nodes": {**nodes, "a": {"op": "attention", "in": ins, "causal": causal,
                                     "scale": scale}}, "outputs": ["a"]}
    want = TF.scaled_dot_product_attention(t32(feeds["q"]), t32(feeds["k"]), t32(feeds["v"]),
                                           attn_mask=tmask, scale=scale).numpy()
    return spec, feeds, want


ATTENTION = {
    "plain": {}, "causal": {"causal": True},
    "bool_mask_scale": {"mask": ("bool", (TQ, TK)), "scale": 0.3},
    "padding_mask": {"mask": ("bool", (B, 1, 1, TK))},
    "float_mask": {"mask": ("float", (B, 1, TQ, TK))},
    "causal_and_mask": {"causal": True, "mask": ("bool", (B, 2, TQ, TK))},
}


@pytest.mark.parametrize("kw", ATTENTION.values(), ids=ATTENTION.keys())
def test_attention_matches_torch_sdpa(kw):
    spec, feeds, want = attention_case(**kw)
    got = dlgraph.compile(dlgraph.load(spec))(**feeds)["a"]
    assert rel_err(got, want) < 1e-5


def test_attention_fully_masked_row_is_the_mean_of_the_values():
    spec, feeds, _ = attention_case(mask=("bool", (TQ, TK)))
    feeds["m"][2] = 0.0                                      # query 2 may see no key
    got = dlgraph.compile(dlgraph.load(spec))(**feeds)["a"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:, :, 2], feeds["v"].mean(axis=2), rtol=1e-5, atol=1e-6)


def test_attention_gradients_match_torch():
    rng = np.random.default_rng(3)
    spec = {"dlgraph": 1, "name": "att", "inputs": {"y": {"shape": [B, 2, TQ, 3]}},
            "nodes": {"q": {"op": "param", "shape": [B, 2, TQ, 4]},
                      "k": {"op": "param", "shape": [B, 2, TK, 4]},
                      "v": {"op": "param", "shape": [B, 2, TK, 3]},
                      "a": {"op": "attention", "in": ["q", "k", "v"], "causal": True},
                      "loss": {"op": "mse", "in": ["a", "y"]}}, "outputs": ["a"]}

    def torch_side(w):
        leaves = {n: leaf(w, n) for n in "qkv"}

        def fn(y):
            o = TF.scaled_dot_product_attention(*leaves.values(), is_causal=True)
            return o, mse(o, y)
        return fn, leaves
    versus_torch(spec, torch_side, {"y": rng.standard_normal((B, 2, TQ, 3)).astype(np.float32)})


# ------------------------------------------------------------------- multi-head attention
def mha_case(cross=False, causal=False, bias=True, mask=False, query_param=False):
    rng = np.random.default_rng(11)
    tk = 7 if cross else T
    ins, nodes, inputs = ["x"], {}, {}
    bdim = B if query_param else "batch"          # a param query has a fixed batch
    feeds = {"x": rng.standard_normal((B, T, E)), "y": rng.standard_normal((B, T, E))}
    if query_param:
        nodes["xq"] = {"op": "param", "shape": [B, T, E]}
        ins = ["xq"]
    if cross:
        inputs["c"] = {"shape": [bdim, tk, E]}
        feeds["c"] = rng.standard_normal((B, tk, E))
        ins.append("c")
    m = None
    if mask:
        m = rng.random((T, tk)) < 0.6
        m[:, 0] = True
        inputs["m"] = {"shape": [T, tk]}
        feeds["m"] = m.astype(np.float32)
        nodes.update({"half": {"op": "const", "value": 0.5},
                      "mask": {"op": "greater", "in": ["m", "half"]}})
        ins += [] if cross else [ins[0]]
        ins.append("mask")
    nodes["a"] = {"op": "multi_head_attention", "in": ins, "heads": H, "causal": causal,
                  "bias": bias}
    spec = seq_spec(nodes, inputs, out_shape=(bdim, T, E))
    if query_param:
        del spec["inputs"]["x"]
        feeds.pop("x")
    feeds = {k: np.asarray(v, np.float32) for k, v in feeds.items()}

    allowed = None if m is None else torch.from_numpy(m)
    if causal:
        allowed = causal_bool(T, tk) if allowed is None else allowed & causal_bool(T, tk)

    def torch_side(w):
        mha = torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True)
        leaves = load_module(mha, w)
        xq = leaf(w, "xq") if query_param else None
        if xq is not None:
            leaves["xq"] = xq

        def fn(y, x=None, c=None, m=None):
            q = xq if x is None else x
            kv = q if c is None else c
            o = mha(q, kv, kv, need_weights=False,
                    attn_mask=None if allowed is None else ~allowed)[0]   # torch: True = hide
            return o, mse(o, y)
        return fn, leaves
    return spec, feeds, torch_side


MHA = {"self_no_bias": {"bias": False}, "self_causal_mask": {"mask": True, "causal": True},
       "cross_mask_query_param": {"cross": True, "mask": True, "query_param": True}}


@pytest.mark.parametrize("kw", MHA.values(), ids=MHA.keys())
def test_multi_head_attention_matches_torch(kw):
    spec, feeds, torch_side = mha_case(**kw)
    versus_torch(spec, torch_side, feeds)


def test_multi_head_attention_weights_are_torchs():
    g = dlgraph.load(mha_case()[0])
    assert {k: p.shape for k, p in g.params.items()} == {
        f"a.{k}": tuple(v.shape)
        for k, v in torch.nn.MultiheadAttention(E, H, batch_first=True).state_dict().items()}
    assert {k: p.init for k, p in g.params.items()} == {
        "a.in_proj_weight": "glorot_uniform", "a.in_proj_bias": "zeros",
        "a.out_proj.weight": "uniform", "a.out_proj.bias": "zeros"}


def test_multi_head_attention_named_time_dims():
    """A causal self-attention over [batch, time, E] runs at any length."""
    spec = {"dlgraph": 1, "name": "lm", "inputs": {"x": {"shape": ["batch", "time", E]}},
            "nodes": {"a": {"op": "multi_head_attention", "in": "x", "heads": H,
                            "causal": True}}, "outputs": ["a"]}
    m = dlgraph.compile(dlgraph.load(spec))
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    load_module(mha, {k: v.numpy() for k, v in m.params.items()})
    for steps in (3, 6):
        x = np.random.default_rng(steps).standard_normal((B, steps, E)).astype(np.float32)
        want = mha(t32(x), t32(x), t32(x), need_weights=False,
                   attn_mask=~causal_bool(steps, steps))[0].detach().numpy()
        assert rel_err(m(x=x)["a"], want) < 1e-5


# --------------------------------------------------------------------- transformer blocks
def tanh_gelu(t):
    return TF.gelu(t, approximate="tanh")


BLOCKS = {"pre_relu_padding_mask": (True, "relu", False, True),
          "post_gelu_causal": (False, "gelu", True, False)}


@pytest.mark.parametrize("norm_first,act,causal,padding", BLOCKS.values(), ids=BLOCKS.keys())
def test_transformer_encoder_block_matches_torch(norm_first, act, causal, padding):
    rng = np.random.default_rng(5)
    keep = np.ones((B, T), bool)
    keep[0, 3:] = not padding                                # sequence 0 may have 3 steps
    spec = seq_spec({"half": {"op": "const", "value": 0.5},
                     "mask": {"op": "greater", "in": ["m", "half"]},
                     "a": {"op": "transformer_encoder_block", "in": ["x", "mask"] if padding
                           else "x", "heads": H, "ff": FF, "norm_first": norm_first,
                           "activation": act, "causal": causal}},
                    {"m": {"shape": ["batch", 1, 1, T]}} if padding else {})
    if not padding:
        del spec["nodes"]["half"], spec["nodes"]["mask"]
    feeds = {k: rng.standard_normal((B, T, E)).astype(np.float32) for k in "xy"}
    if padding:
        feeds["m"] = keep.reshape(B, 1, 1, T).astype(np.float32)

    def torch_side(w):
        layer = torch.nn.TransformerEncoderLayer(
            E, H, FF, dropout=0.0, activation=tanh_gelu if act == "gelu" else "relu",
            batch_first=True, norm_first=norm_first)
        leaves = load_module(layer, w)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T) if causal else None

        def fn(x, y, m=None):
            o = layer(x, src_mask=mask, is_causal=causal,
                      src_key_padding_mask=torch.from_numpy(~keep) if padding else None)
            return o, mse(o, y)
        return fn, leaves
    versus_torch(spec, torch_side, feeds)


def test_transformer_decoder_block_matches_torch(norm_first=True):
    tm = 7
    spec = seq_spec({"a": {"op": "transformer_decoder_block", "in": ["x", "mem"], "heads": H,
                           "ff": FF, "norm_first": norm_first}},
                    {"mem": {"shape": ["batch", tm, E]}})
    rng = np.random.default_rng(8)
    feeds = {"x": rng.standard_normal((B, T, E)), "y": rng.standard_normal((B, T, E)),
             "mem": rng.standard_normal((B, tm, E))}
    feeds = {k: np.asarray(v, np.float32) for k, v in feeds.items()}

    def torch_side(w):
        layer = torch.nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=True,
                                                 norm_first=norm_first)
        leaves = load_module(layer, w)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T)

        def fn(x, y, mem):
            o = layer(x, mem, tgt_mask=mask, tgt_is_causal=True)
            return o, mse(o, y)
        return fn, leaves
    versus_torch(spec, torch_side, feeds)


def test_block_init_overrides_reach_sub_layers():
    spec = seq_spec({"a": {"op": "transformer_encoder_block", "in": "x", "heads": H, "ff": FF,
                           "init": {"self_attn.out_proj.bias": 0.5, "linear1.weight": "zeros",
                                    "norm2.weight": 2.0}}})
    g = dlgraph.load(spec)
    inits = {k: p.init for k, p in g.params.items()}
    assert inits["a.self_attn.out_proj.bias"] == 0.5
    assert inits["a.linear1.weight"] == "zeros"
    assert inits["a.norm2.weight"] == 2.0
    assert inits["a.self_attn.in_proj_weight"] == "glorot_uniform"
    frozen = dlgraph.load(seq_spec({"a": {"op": "transformer_decoder_block", "in": ["x", "x"],
                                          "heads": H, "ff": FF, "trainable": False}}))
    assert frozen.params and not any(p.trainable for p in frozen.params.values())


# -------------------------------------------------------------------- positional encoding
def sinusoid_table(n, e):
    pos = np.arange(n)[:, None]
    div = np.exp(np.arange(0, e, 2) * (-math.log(10000.0) / e))
    pe = np.zeros((n, e))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return pe


def test_sinusoidal_positional_encoding_at_any_length():
    spec = {"dlgraph": 1, "name": "pe", "inputs": {"x": {"shape": ["batch", "time", 8]}},
            "nodes": {"a": {"op": "positional_encoding", "in": "x"}}, "outputs": ["a"]}
    g = dlgraph.load(spec)
    assert not g.params
    m = dlgraph.compile(g)
    for steps in (4, 40):
        x = np.random.default_rng(steps).standard_normal((B, steps, 8)).astype(np.float32)
        np.testing.assert_allclose(m(x=x)["a"], x + sinusoid_table(steps, 8), atol=2e-5)


def test_the_sinusoid_table_is_a_buffer_of_its_own_and_right_on_every_call():
    """At a fixed length the table (constants alone) is kept in a buffer the call computes
    once (tinygrad would fold it into every kernel that reads it); replayed calls with other
    inputs still add the right table."""
    from dlgraph.engine.compile import interpret
    spec = {"dlgraph": 1, "name": "pe", "inputs": {"x": {"shape": ["batch", 12, 8]}},
            "nodes": {"a": {"op": "positional_encoding", "in": "x"},
                      "b": {"op": "linear", "in": "a", "out": 4}}, "outputs": ["b"]}
    made = []
    real = interpret._kept
    interpret._kept = lambda t: (made.append(t.shape), real(t))[1]
    try:
        m = dlgraph.compile(dlgraph.load(spec), cache=False)
        w = {k: v.numpy() for k, v in m.params.items()}
        for seed in range(4):
            x = np.random.default_rng(seed).standard_normal((3, 12, 8)).astype(np.float32)
            want = (x + sinusoid_table(12, 8)) @ w["b.weight"].T + w["b.bias"]
            np.testing.assert_allclose(m(x=x)["b"], want, atol=2e-5)
    finally:
        interpret._kept = real
    assert made and all(shape == (12, 8) for shape in made)


def test_learned_positional_encoding_gradients():
    spec = seq_spec({"a": {"op": "positional_encoding", "in": "x", "kind": "learned",
                           "max_len": 9}})
    rng = np.random.default_rng(2)
    feeds = {k: rng.standard_normal((B, T, E)).astype(np.float32) for k in "xy"}

    def torch_side(w):
        emb = torch.nn.Embedding(9, E)
        leaves = load_module(emb, w)

        def fn(x, y):
            o = x + emb(torch.arange(T))
            return o, mse(o, y)
        return fn, leaves
    versus_torch(spec, torch_side, feeds)


def test_arange():
    spec = {"dlgraph": 1, "name": "r", "inputs": {"x": {"shape": ["n"]}},
            "nodes": {"a": {"op": "arange", "size": 4}, "b": {"op": "arange", "size": "n"}},
            "outputs": ["a", "b"]}
    out = dlgraph.compile(dlgraph.load(spec))(x=np.zeros(3, np.float32))
    assert out["a"].tolist() == [0, 1, 2, 3] and out["b"].tolist() == [0, 1, 2]
    assert out["a"].dtype == np.float32


# --------------------------------------------------------------------------------- errors
def error_of(nodes, inputs=None) -> ShapeError:
    spec = {"dlgraph": 1, "name": "e", "inputs": inputs or {"x": {"shape": ["batch", T, E]}},
            "nodes": nodes, "outputs": [next(iter(nodes))]}
    with pytest.raises(ShapeError) as info:
        dlgraph.load(spec)
    return info.value


def test_heads_must_divide_the_model_dim():
    e = error_of({"a": {"op": "multi_head_attention", "in": "x", "heads": 3}})
    assert str(e) == ("<dict>: node 'a' (multi_head_attention): heads=3 must divide the model "
                      "dim 16\n  help: each head gets dim / heads features; heads can be one "
                      "of 1, 2, 4, 8, 16")
    e = error_of({"a": {"op": "transformer_encoder_block", "in": "x", "heads": 5, "ff": 8}})
    assert e.node == "a" and e.message == "heads=5 must divide the model dim 16"


ERRORS = {
    "qk_sizes": ({"a": {"op": "attention", "in": ["q", "k", "k"]}},
                 {"q": {"shape": [2, 3, 4]}, "k": {"shape": [2, 3, 5]}},
                 "queries and keys differ in size: q [2, 3, 4], k [2, 3, 5]"),
    "mask_shape": ({"a": {"op": "attention", "in": ["q", "q", "q", "m"]}},
                   {"q": {"shape": [2, 3, 4]}, "m": {"shape": [2, 3]}},
                   "the mask [2, 3] does not broadcast to the scores [2, 3, 3]"),
    "mha_rank": ({"a": {"op": "multi_head_attention", "in": "q", "heads": 2}},
                 {"q": {"shape": ["batch", 4]}},
                 "multi_head_attention needs [batch, time, features] with a fixed number of "
                 "features, got [batch, 4]"),
    "context_features": ({"a": {"op": "multi_head_attention", "in": ["x", "c"], "heads": 2}},
                         {"x": {"shape": ["batch", T, E]}, "c": {"shape": ["batch", 3, 8]}},
                         "the context has 8 features, the query 16"),
    "odd_sinusoid": ({"a": {"op": "positional_encoding", "in": "q"}}, {"q": {"shape": [2, 3, 5]}},
                     "sinusoidal positions need an even number of features, got 5"),
    "max_len": ({"a": {"op": "positional_encoding", "in": "x", "max_len": 4}}, None,
                "5 positions exceed max_len=4"),
    "learned_named": ({"a": {"op": "positional_encoding", "in": "q", "kind": "learned"}},
                      {"q": {"shape": ["batch", "time", 4]}},
                      "learned positions need a fixed number of steps, got the named dim "
                      "'time'"),
    "memory_features": ({"a": {"op": "transformer_decoder_block", "in": ["x", "m"], "heads": 2,
                               "ff": 8}},
                        {"x": {"shape": ["batch", T, E]}, "m": {"shape": ["batch", 3, 8]}},
                        "the memory has 8 features, the input 16"),
}


@pytest.mark.parametrize("nodes,inputs,message", ERRORS.values(), ids=ERRORS.keys())
def test_shape_errors(nodes, inputs, message):
    e = error_of(nodes, inputs)
    assert e.message == message
    assert e.node == "a"
