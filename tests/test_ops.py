"""Forward correctness of every registered op against an independent numpy reference.

Each row of :data:`CASES` builds a one-op spec, runs it through ``dlgraph.compile`` (eval
mode, float32) and compares the output, its shape and its dtype with the float64 reference
in ``tests/helpers.py`` and with the type the op's ``infer`` rule declared.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    ELMAN,
    FAST,
    REF,
    B,
    Case,
    F,
    Int,
    attrs_of,
    concrete,
    evaluate,
    forward,
    make_ctx,
    realize,
    run_ref,
)
from tinygrad import Context, Tensor

import dlgraph
from dlgraph.engine.compile.lower import Ctx, Evaluator, bind, to_tensor
from dlgraph.engine.types import NUMPY_DTYPES as NP_DTYPES
from dlgraph.engine.types import TType
from dlgraph.ops import NO_GRAD, REGISTRY

C = Case
TIES_X = F((2, 3), values=[[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
TIES_Y = F((3,), values=[1.0, 0.0, 2.0])
IMG = F((2, 3, 6, 6))

CASES: list[Case] = [
    # -- arithmetic, with broadcasting and scalars ------------------------------------------
    C("add", [F((3, 4)), F((3, 4))]),
    C("add", [F((4, 1, 3)), F((2, 3))], id="add_bcast"),
    C("add", [F((3, 4)), F(())], id="add_scalar"),
    C("add", [F(()), F(())], id="add_rank0"),
    C("add", [Int((3, 4), 9), Int((4,), 9)], id="add_int"),
    C("add", [Int((3, 4), 9), F((3, 4))], id="add_int_float"),
    C("sub", [F((2, 3)), F((3,))]),
    C("sub", [Int((2, 3), 9), Int((2, 3), 9)], id="sub_int"),
    C("mul", [F((2, 1)), F((4, 1, 3))]),
    C("mul", [Int((2, 3), 9), Int((3,), 9)], id="mul_int"),
    C("div", [F((3, 4)), F((4,), "away")]),
    C("div", [F((1,)), F((3, 1), "away")], id="div_size1"),
    C("div", [Int((2, 3), 9), Int((2, 3), 9, values=[[1, 2, 3], [4, 5, 6]])], id="div_int"),
    C("pow", [F((3, 4), "pos"), F((3, 4))]),
    C("pow", [F((3, 4), "pos"), F((), values=2.5)], id="pow_scalar_exponent"),
    C("pow", [F((5,), values=[-2.0, -1.5, -0.5, 0.5, 3.0]),
              F((5,), values=[2.0, 3.0, 2.0, 3.0, 2.0])], id="pow_negative_base_int_exp"),
    C("maximum", [F((2, 3)), F((3,))]),
    C("maximum", [TIES_X, TIES_Y], id="maximum_ties"),
    C("maximum", [Int((2, 3), 9), Int((2, 3), 9)], id="maximum_int"),
    C("minimum", [F((2, 3)), F((3,))]),
    C("minimum", [TIES_X, TIES_Y], id="minimum_ties"),
    # -- comparisons (ties included) ---------------------------------------------------------
    *[C(op, [TIES_X, TIES_Y]) for op in ("greater", "less", "greater_equal", "less_equal",
                                          "equal")],
    C("greater", [F((4, 1, 3)), F((2, 3))], id="greater_bcast"),
    C("equal", [Int((3, 4), 3), Int((3, 4), 3)], id="equal_int"),
    C("where", [B((3, 4)), F((3, 4)), F((3, 4))]),
    C("where", [B((3, 1)), F((4,)), F(())], id="where_bcast"),
    # -- math ---------------------------------------------------------------------------------
    C("neg", [F((3, 4))]),
    C("exp", [F((3, 4))]),
    C("exp", [F(())], id="exp_rank0"),
    C("log", [F((3, 4), "pos")]),
    C("sqrt", [F((3, 4), "pos")]),
    C("sign", [F((5,), values=[-2.0, -0.0, 0.0, 0.5, 3.0])]),
    C("abs", [F((5,), values=[-2.0, -0.0, 0.0, 0.5, -3.0])]),
    C("sin", [F((3, 4))]),
    C("cos", [F((3, 4))]),
    C("relu", [F((6,), values=[-2.0, -0.1, 0.0, 0.1, 2.0, 5.0])]),
    C("relu", [F((2, 1, 3, 1))], id="relu_rank4_size1"),
    C("sigmoid", [F((3, 4))]),
    C("sigmoid", [F((4,), values=[-100.0, -20.0, 20.0, 100.0])], id="sigmoid_large"),
    C("tanh", [F((3, 4))]),
    C("stop_gradient", [F((3, 4))]),
    C("leaky_relu", [F((3, 4))]),
    C("leaky_relu", [F((3, 4))], {"alpha": 0.2}, id="leaky_relu_alpha"),
    C("elu", [F((3, 4))]),
    C("elu", [F((3, 4))], {"alpha": 0.5}, id="elu_alpha"),
    C("softplus", [F((3, 4))]),
    C("softplus", [F((4,), values=[-100.0, -30.0, 30.0, 100.0])], id="softplus_large",
      atol=1e-12),
    C("gelu", [F((3, 4))]),
    C("silu", [F((3, 4))]),
    # -- constants, parameters and casts ------------------------------------------------------
    C("const", [], {"value": 2.5}),
    C("const", [], {"value": 3.0, "dtype": "int32"}, id="const_int"),
    C("const", [], {"value": 1.0, "dtype": "bool"}, id="const_bool"),
    C("param", [], {"shape": [2, 3]}),
    C("param", [], {"shape": [2, 3], "init": 0.25}, id="param_init", keep_init=True),
    C("cast", [F((6,), values=[-1.7, -0.5, 0.0, 0.4, 2.5, 3.9])], {"dtype": "int32"}),
    C("cast", [F((4,), values=[-1.0, 0.0, 0.3, 2.0])], {"dtype": "bool"}, id="cast_bool"),
    C("cast", [F((3, 4))], {"dtype": "float32"}, id="cast_float"),
    C("cast", [Int((3, 4), 9)], {"dtype": "float32"}, id="cast_int_float"),
    C("cast", [B((3, 4))], {"dtype": "float32"}, id="cast_bool_float"),
    # -- matrix products ----------------------------------------------------------------------
    C("matmul", [F((3, 4)), F((4, 5))]),
    C("matmul", [F((2, 3, 4)), F((4, 5))], id="matmul_batched"),
    C("matmul", [F((2, 1, 3, 4)), F((5, 4, 2))], id="matmul_bcast"),
    C("matmul", [F((1, 4)), F((4, 1))], id="matmul_size1"),
    # -- movement -----------------------------------------------------------------------------
    C("reshape", [F((2, 3, 4))], {"shape": [6, 4]}),
    C("reshape", [F((2, 3, 4))], {"shape": [-1, 2]}, id="reshape_infer"),
    C("reshape", [F((2, 3, 4))], {"shape": [24]}, id="reshape_rank1"),
    C("reshape", [F(("batch", 2, 3))], {"shape": ["batch", 6]}, id="reshape_named",
      dims={"batch": 3}),
    C("reshape", [F(("batch", 2, 3))], {"shape": ["batch", -1, 1]}, id="reshape_named_infer",
      dims={"batch": 3}),
    C("reshape_like", [F((2, 6)), F((3, 4))]),
    C("flatten", [F((2, 3, 4))]),
    C("flatten", [F((2, 3, 4))], {"start": 0}, id="flatten_all"),
    C("flatten", [F((2, 3, 4, 5))], {"start": 1, "end": -2}, id="flatten_middle"),
    C("flatten", [F(("batch", 3, 4))], id="flatten_named", dims={"batch": 2}),
    C("transpose", [F((2, 3, 4))]),
    C("transpose", [F((2, 3, 4))], {"axes": [0, 2, 1]}, id="transpose_axes"),
    C("transpose", [F((2, 3, 4))], {"axes": [-1, 0, 1]}, id="transpose_negative"),
    C("squeeze", [F((3, 1, 4))], {"axis": 1}),
    C("squeeze", [F((3, 4, 1))], {"axis": -1}, id="squeeze_negative"),
    C("unsqueeze", [F((3, 4))], {"axis": 0}),
    C("unsqueeze", [F((3, 4))], {"axis": -1}, id="unsqueeze_last"),
    C("unsqueeze", [F((3, 4))], {"axis": -2}, id="unsqueeze_negative"),
    C("slice", [F((3, 5))], {"axis": 1, "start": 1, "stop": 3}),
    C("slice", [F((3, 5))], {"axis": -1, "start": -3}, id="slice_negative"),
    C("slice", [F((4, 2))], {"axis": 0, "stop": -1}, id="slice_stop_negative"),
    C("pad", [F((2, 3))], {"axis": 0, "before": 1, "after": 2}),
    C("pad", [F((2, 3))], {"axis": -1, "after": 1, "value": 2.5}, id="pad_value"),
    C("concat", [F((2, 1)), F((2, 3)), F((2, 2))]),
    C("concat", [F((1, 3)), F((2, 3))], {"axis": 0}, id="concat_axis0"),
    C("concat", [F((2, 3))], id="concat_single"),
    C("take", [F((2, 3, 4))], {"axis": 1, "index": -1}),
    C("take", [F((2, 3, 4))], {"axis": 0, "index": 1}, id="take_first_axis"),
    C("broadcast_like", [F((3, 1)), F((2, 3, 4))]),
    C("broadcast_like", [F((4,)), F((3, 4))], id="broadcast_like_rank"),
    C("reduce_to", [F((2, 3, 4)), F((3, 1))]),
    C("reduce_to", [F((2, 3, 4)), F((4,))], id="reduce_to_rank1"),
    C("reduce_to", [F((2, 3, 4)), F((1, 3, 1))], id="reduce_to_keep"),
    C("windows", [F((1, 2, 5, 6))], {"kernel": 2}),
    C("windows", [F((1, 2, 5, 6))], {"kernel": [2, 3], "stride": [2, 1], "dilation": [1, 2]},
      id="windows_stride_dilation"),
    C("windows", [F((2, 5, 5))], {"kernel": 3, "stride": 2}, id="windows_rank3"),
    C("windows_grad", [F((1, 2, 4, 5, 2, 2)), F((1, 2, 5, 6))], {"kernel": 2}),
    C("windows_grad", [F((1, 2, 2, 2, 2, 3)), F((1, 2, 5, 6))],
      {"kernel": [2, 3], "stride": [2, 1], "dilation": [1, 2]}, id="windows_grad_stride"),
    C("windows_grad", [F((2, 2, 2, 3, 3)), F((2, 5, 5))], {"kernel": 3, "stride": 2},
      id="windows_grad_rank3"),
    C("one_hot", [Int((2, 3), 4)], {"depth": 4}),
    C("one_hot", [Int((5,), 3)], {"depth": 3}, id="one_hot_rank1"),
    # -- reductions ---------------------------------------------------------------------------
    *[C(op, [F((2, 3, 4))], attrs, id=f"{op}_{name}")
      for op in ("sum", "mean", "max")
      for name, attrs in [("all", {}), ("axis", {"axes": 1}),
                          ("axes_keepdims", {"axes": [0, -1], "keepdims": True}),
                          ("negative", {"axes": -1})]],
    C("sum", [F((5,))], id="sum_rank1"),
    C("max", [F((1,))], {"keepdims": True}, id="max_size1_keepdims"),
    C("count", [F((2, 3, 4))]),
    C("count", [F((2, 3, 4))], {"axes": [0, -1]}, id="count_axes"),
    C("argmax", [F((3, 5))]),
    C("argmax", [F((3, 5))], {"axis": 0, "keepdims": True}, id="argmax_axis0_keepdims"),
    # -- layers -------------------------------------------------------------------------------
    C("linear", [F((3, 4))], {"out": 5}),
    C("linear", [F((3, 4))], {"out": 5, "bias": False}, id="linear_nobias"),
    C("linear", [F((3, 4))], {"out": 5, "activation": "tanh"}, id="linear_activation"),
    C("linear", [F((2, 3, 4))], {"out": 5}, id="linear_rank3"),
    C("linear", [F(("batch", 4))], {"out": 1}, id="linear_named", dims={"batch": 3}),
    C("conv2d", [F((2, 3, 7, 7))], {"out": 4, "kernel": 3}),
    C("conv2d", [F((2, 3, 7, 7))], {"out": 4, "kernel": 3, "stride": 2, "padding": 1},
      id="conv2d_stride_pad"),
    C("conv2d", [F((2, 3, 7, 7))], {"out": 4, "kernel": 2, "dilation": 2, "padding": 1},
      id="conv2d_dilation"),
    C("conv2d", [F((2, 4, 6, 6))], {"out": 6, "kernel": [2, 3], "stride": [1, 2],
                                     "padding": [1, 0], "groups": 2, "bias": False},
      id="conv2d_groups_rect"),
    C("conv2d", [F((1, 2, 5, 5))], {"out": 2, "kernel": 1, "groups": 2,
                                     "activation": "relu"}, id="conv2d_depthwise_relu"),
    C("max_pool2d", [IMG], {"kernel": 2}),
    C("max_pool2d", [IMG], {"kernel": 3, "stride": 2, "padding": 1}, id="max_pool2d_pad"),
    C("max_pool2d", [IMG], {"kernel": [2, 3], "stride": 1}, id="max_pool2d_rect"),
    C("avg_pool2d", [IMG], {"kernel": 2}),
    C("avg_pool2d", [IMG], {"kernel": 3, "stride": 2, "padding": 1}, id="avg_pool2d_pad"),
    C("global_avg_pool", [F((2, 3, 4, 5))]),
    C("embedding", [Int((2, 5), 7)], {"num": 7, "dim": 3}),
    C("dropout", [F((3, 4))]),
    C("dropout_mask", [F((3, 4))], {"p": 0.3}),
    C("moving_average", [F((1, 3)), F((1, 3))]),
    C("layer_norm", [F((3, 4))]),
    C("layer_norm", [F((2, 3, 4))], {"dims": 2}, id="layer_norm_dims2"),
    C("layer_norm", [F((3, 4))], {"affine": False}, id="layer_norm_plain"),
    C("batch_norm", [F((4, 3))], id="batch_norm_initial_stats", keep_init=True),
    C("batch_norm", [F((4, 3))], id="batch_norm_2d"),
    C("batch_norm", [F((2, 3, 4, 4))], {"eps": 0.1}, id="batch_norm_4d"),
    C("batch_norm", [F((2, 3, 4, 4))], {"affine": False}, id="batch_norm_plain"),
    C("softmax", [F((3, 5))]),
    C("softmax", [F((3, 5))], {"axis": 0}, id="softmax_axis0"),
    C("softmax", [F((1, 3), values=[[1000.0, 1001.0, 999.0]])], id="softmax_large"),
    C("log_softmax", [F((3, 5))]),
    C("log_softmax", [F((2, 3, 4))], {"axis": 1}, id="log_softmax_axis1"),
    C("log_softmax", [F((1, 3), values=[[1000.0, 1001.0, -1000.0]])],
      id="log_softmax_large"),
    C("zeros", [F((3, 2))], {"shape": [4, 5]}),
    C("scan", [F((2, 3, 2))], {"body": "cell", "state": {"h": 3}}, extra=ELMAN),
    C("scan", [F((2, 3, 2)), F((2, 3))], {"body": "cell", "state": {"h": 3}}, extra=ELMAN,
      id="scan_initial_state"),
    C("noise", [F((3, 2))], {"shape": [4, 5]}),
    C("noise", [F((3, 2))], {"shape": [2], "kind": "uniform"}, id="noise_uniform"),
    # -- recurrent layers (reference: torch.nn.RNN / LSTM / GRU in float64) ---------------
    C("rnn", [F((2, 3, 2))], {"hidden": 3}),
    C("lstm", [F((2, 3, 2))], {"hidden": 3}),
    C("lstm", [F((2, 3, 2)), F((4, 2, 3)), F((4, 2, 3))],
      {"hidden": 3, "layers": 2, "bidirectional": True}, id="lstm_stacked_bidir_states"),
    C("gru", [F((2, 3, 2))], {"hidden": 3}),
    C("gru", [F((2, 3, 2)), F((1, 2, 3))], {"hidden": 3}, id="gru_h0"),
    # -- convolutions beyond conv2d (reference: torch.nn.functional in float64) ------------
    C("conv1d", [F((2, 3, 9))], {"out": 4, "kernel": 3}),
    C("conv1d", [F((2, 3, 9))], {"out": 6, "kernel": 2, "stride": 2, "padding": 1,
                                  "dilation": 2, "groups": 3, "bias": False},
      id="conv1d_stride_dilation_groups"),
    C("conv_transpose2d", [F((2, 4, 3, 3))], {"out": 2, "kernel": 3, "stride": 2,
                                               "padding": 1, "output_padding": 1}),
    C("conv_transpose2d", [F((1, 4, 3, 4))], {"out": 6, "kernel": [2, 3], "dilation": 2,
                                               "groups": 2, "bias": False},
      id="conv_transpose2d_groups_dilation"),
    # -- attention (multi-head and blocks: reference torch.nn modules in float64) -----------
    C("arange", [], {"size": 5}),
    C("attention", [F((2, 3, 4)), F((2, 5, 4)), F((2, 5, 3))]),
    C("attention", [F((1, 2, 4, 4)), F((1, 2, 4, 4)), F((1, 2, 4, 3))],
      {"causal": True, "scale": 0.5}, id="attention_causal_scale"),
    C("attention", [F((2, 3, 4)), F((2, 5, 4)), F((2, 5, 3)),
                    B((3, 5), values=[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])],
      id="attention_bool_mask_all_masked_row"),
    C("attention", [F((2, 3, 4)), F((2, 5, 4)), F((2, 5, 3)), F((2, 1, 5))],
      id="attention_float_mask"),
    C("multi_head_attention", [F((2, 3, 4))], {"heads": 2}),
    C("multi_head_attention", [F((2, 3, 4)), F((2, 5, 4)),
                               B((3, 5), values=[[1, 1, 0, 0, 1], [0, 1, 0, 1, 0],
                                                 [1, 1, 1, 1, 1]])],
      {"heads": 2}, id="multi_head_attention_cross_mask"),
    C("multi_head_attention", [F((2, 3, 4))], {"heads": 4, "causal": True, "bias": False},
      id="multi_head_attention_causal_nobias"),
    C("positional_encoding", [F((2, 5, 6))]),
    C("positional_encoding", [F((2, 5, 6))], {"kind": "learned", "max_len": 8},
      id="positional_encoding_learned"),
    C("transformer_encoder_block", [F((2, 3, 4))], {"heads": 2, "ff": 8}),
    C("transformer_encoder_block", [F((2, 3, 4)), B((3, 3), values=[[1, 0, 1], [1, 1, 0],
                                                                    [0, 1, 1]])],
      {"heads": 2, "ff": 8, "norm_first": False, "activation": "gelu", "causal": True},
      id="transformer_encoder_block_postnorm_mask"),
    C("transformer_decoder_block", [F((2, 3, 4)), F((2, 5, 4))], {"heads": 2, "ff": 8}),
    C("transformer_decoder_block", [F((2, 3, 4)), F((2, 5, 4))],
      {"heads": 1, "ff": 8, "norm_first": False, "causal": False},
      id="transformer_decoder_block_postnorm"),
    # -- losses -------------------------------------------------------------------------------
    C("mse", [F((3, 4)), F((3, 4))]),
    C("l1", [F((3, 4)), F((3, 4))]),
    C("huber", [F((3, 4)), F((3, 4))]),
    C("huber", [F((3, 4)), F((3, 4))], {"delta": 0.5}, id="huber_delta"),
    C("cross_entropy", [F((4, 5)), Int((4,), 5)]),
    C("cross_entropy", [F((4, 5)), Int((4,), 5)], {"label_smoothing": 0.1},
      id="cross_entropy_smoothing"),
    C("cross_entropy", [F((2, 3, 5)), Int((2, 3), 5)], id="cross_entropy_rank3"),
    C("cross_entropy", [F((2, 3), values=[[1000.0, 0.0, -1000.0], [0.0, 500.0, 0.0]]),
                        Int((2,), values=[0, 2])], id="cross_entropy_large"),
    C("nll", [F((4, 5)), Int((4,), 5)]),
    C("binary_cross_entropy", [F((3, 4)), F((3, 4), "unit")]),
    C("binary_cross_entropy", [F((4,), values=[-100.0, -30.0, 30.0, 100.0]),
                               F((4,), values=[1.0, 0.0, 1.0, 0.0])], id="bce_large"),
]


def _check(case: Case, g, m, feeds, xs, got, *, training=False):
    out = g[g.resolve("out")].type
    dims = bind(g, feeds)
    assert got.shape == concrete(out.shape, dims), f"shape differs from infer's {out}"
    assert got.dtype == NP_DTYPES[out.dtype], f"dtype {got.dtype}, but infer says {out.dtype}"
    params = {k: v.numpy() for k, v in m.params.items()}
    want = run_ref(case, attrs_of(case), xs, make_ctx(params, training=training, dims=dims))
    if want.ndim == 0 and want.item() is None:      # no value reference (random ops)
        return
    if got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=case.rtol, atol=case.atol)


XFAIL: dict[str, str] = {}


def _param(case: Case):
    marks = [pytest.mark.xfail(reason=XFAIL[case.id], strict=True)] if case.id in XFAIL else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_forward(case):
    g, m, feeds, xs, got = forward(case)
    _check(case, g, m, feeds, xs, got)


# -------------------------------------------------------------------------- the registry


def test_every_op_has_a_forward_case():
    missing = sorted(set(REGISTRY) - {c.op for c in CASES})
    assert not missing, f"ops without a forward test case in tests/test_ops.py: {missing}"
    no_ref = sorted(set(REGISTRY) - set(REF))
    assert not no_ref, f"ops without a numpy reference in tests/helpers.py: {no_ref}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_opdef_is_complete(name):
    d = REGISTRY[name]
    assert d.name == name
    assert d.doc.strip(), "every op needs a doc line"
    assert d.attrs.model_fields["op"].annotation.__args__ == (name,)
    assert all(isinstance(i, str) and i for i in d.inputs)
    assert not any(i.endswith("*") for i in d.inputs[:-1]), "only the last input is variadic"
    if d.composite:
        assert callable(d.expand)
        assert d.infer is None and d.forward is None and d.vjp is None
        assert d.outputs
    else:
        assert d.expand is None
        assert callable(d.infer) and callable(d.forward)
        assert callable(d.vjp) or d.vjp == NO_GRAD


# ----------------------------------------------------------------- modes and state, by hand


def test_param_init_and_const_values():
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {}, "nodes": {
        "p": {"op": "param", "shape": [2, 3], "init": 0.25},
        "z": {"op": "param", "shape": [4], "init": "zeros"},
        "c": {"op": "const", "value": -1.5}}, "outputs": ["p", "z", "c"]})
    out = dlgraph.compile(g, seed=0)()
    np.testing.assert_array_equal(out["p"], np.full((2, 3), 0.25, np.float32))
    np.testing.assert_array_equal(out["z"], np.zeros(4, np.float32))
    assert out["c"].shape == () and out["c"] == -1.5


def test_dropout_training_mask():
    """Training: every value is dropped (0) or scaled by 1/(1-p), about p of them dropped."""
    p = 0.25
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x": {"shape": [64, 64]}},
                      "nodes": {"d": {"op": "dropout", "in": "x", "p": p}}, "outputs": ["d"]})
    x = np.random.default_rng(0).uniform(1.0, 2.0, (64, 64)).astype(np.float32)
    (y,) = evaluate(g, [g.resolve("d")], {"x": x}, {}, training=True)
    ratio = y.numpy() / x
    kept = ratio > 0
    np.testing.assert_allclose(ratio[kept], 1 / (1 - p), rtol=1e-6)
    np.testing.assert_array_equal(ratio[~kept], 0.0)
    assert abs((~kept).mean() - p) < 0.05


def test_batch_norm_training_uses_batch_stats_and_updates_running_ones():
    case = Case("batch_norm", [F((6, 3))], {"momentum": 0.2})
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x0": {"shape": [6, 3]}},
                      "nodes": {"out": {"op": "batch_norm", "in": "x0", "momentum": 0.2}},
                      "outputs": ["out"]})
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 3)) * 2 + 1).astype(np.float32)
    params = {k: Tensor(np.asarray(v, np.float32)) for k, v in
              {"out.weight": rng.standard_normal(3), "out.bias": rng.standard_normal(3),
               "out.running_mean": np.zeros((1, 3)), "out.running_var": np.ones((1, 3))}.items()}
    ctx = Ctx(training=True)
    (y,) = Evaluator(g, [g.resolve("out")])(ctx, {"x0": to_tensor(x, "float32")}, params)
    realize(y, *ctx.updates)
    np_params = {k: v.numpy() for k, v in params.items()}
    want = run_ref(case, attrs_of(case), [x], make_ctx(np_params, training=True))
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    # running = (1 - momentum) * running + momentum * batch statistic (unbiased variance,
    # as PyTorch keeps it)
    np.testing.assert_allclose(np_params["out.running_mean"], 0.2 * x.mean(0, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_params["out.running_var"],
                               0.8 + 0.2 * x.var(0, ddof=1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_statistics(kind):
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x": {"shape": ["batch", 1]}},
                      "nodes": {"n": {"op": "noise", "in": "x", "shape": [64], "kind": kind}},
                      "outputs": ["n"]})
    m = dlgraph.compile(g, seed=0)
    feed = {"x": np.zeros((128, 1), np.float32)}
    with Context(**FAST):
        a, b = m(**feed)["n"], m(**feed)["n"]
    assert a.shape == (128, 64) and a.dtype == np.float32
    assert not np.array_equal(a, b), "two calls gave the same samples"
    if kind == "normal":
        assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05
    else:
        assert a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.03


def test_moving_average_training_returns_the_batch_statistic():
    g = dlgraph.load({"dlgraph": 1, "name": "t",
                      "inputs": {"s": {"shape": [1, 3]}},
                      "nodes": {"r": {"op": "param", "shape": [1, 3], "init": 1.0,
                                      "trainable": False},
                                "m": {"op": "moving_average", "in": ["s", "r"],
                                      "momentum": 0.5}}, "outputs": ["m"]})
    s = np.array([[1.0, 2.0, 3.0]], np.float32)
    r = Tensor(np.ones((1, 3), np.float32))
    ctx = Ctx(training=True)
    (y,) = Evaluator(g, ["m"])(ctx, {"s": to_tensor(s, "float32")}, {"r": r})
    realize(y, *ctx.updates)
    np.testing.assert_array_equal(y.numpy(), s)
    np.testing.assert_allclose(r.numpy(), [[1.0, 1.5, 2.0]])


def test_infer_matches_declared_types_for_named_dims():
    """Named dims survive shape inference through a small stack of ops."""
    g = dlgraph.load({"dlgraph": 1, "name": "t", "inputs": {"x": {"shape": ["batch", 2, 3]}},
                      "nodes": {"f": {"op": "flatten", "in": "x"},
                                "l": {"op": "linear", "in": "f", "out": 4},
                                "s": {"op": "softmax", "in": "l"}}, "outputs": ["s"]})
    assert g[g.resolve("s")].type == TType(("batch", 4))


def test_integer_pow_matches_numpy():
    """tinygrad compiles no integer pow and fuses a float pow with the cast back wrongly:
    integer powers go through float32 and come back exact."""
    g = dlgraph.load({"dlgraph": 1, "name": "p", "inputs": {
        "a": {"shape": [5], "dtype": "int32"}, "b": {"shape": [5], "dtype": "int32"}},
        "nodes": {"p": {"op": "pow", "in": ["a", "b"]}}, "outputs": ["p"]})
    a, b = np.array([2, 3, -2, 0, 7], np.int32), np.array([3, 2, 3, 0, 5], np.int32)
    got = dlgraph.compile(g)(a=a, b=b)["p"]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a.astype(np.int64) ** b)
