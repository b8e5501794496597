"""conv1d and conv_transpose2d against PyTorch on the same weights: F.conv1d and
F.conv_transpose2d outputs (1e-5), and the gradients our graph reversal derives for the
weight, the bias and the input (made a parameter), to 1e-4 (max-norm relative error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from test_attention import leaf, load_module, mse, versus_torch

import dlgraph
from dlgraph.engine.errors import ShapeError

N = 2


def conv_spec(op: str, x_shape, out_shape, attrs: dict) -> dict:
    """A spec whose input image is a ``param`` (so its gradient is checked too), node ``a``
    the op, and objective mse(a, y)."""
    return {"dlgraph": 1, "name": "conv", "inputs": {"y": {"shape": list(out_shape)}},
            "nodes": {"x": {"op": "param", "shape": list(x_shape)},
                      "a": {"op": op, "in": "x", **attrs},
                      "loss": {"op": "mse", "in": ["a", "y"]}}, "outputs": ["a"]}


def check(op, torch_op, module, x_shape, attrs, torch_kw):
    """Forward and gradients of one conv node against ``torch_op`` (F.conv1d, ...) with the
    weights loaded into ``module`` (which checks PyTorch's names and shapes)."""
    with torch.no_grad():
        probe = torch_op(torch.zeros(x_shape), module.weight, module.bias, **torch_kw)
    spec = conv_spec(op, x_shape, probe.shape, attrs)
    y = np.random.default_rng(1).standard_normal(tuple(probe.shape)).astype(np.float32)

    def torch_side(w):
        leaves = load_module(module, w)
        leaves["x"] = x = leaf(w, "x")
        act = attrs.get("activation")

        def fn(y):
            o = torch_op(x, module.weight, module.bias, **torch_kw)
            o = torch.relu(o) if act == "relu" else o
            return o, mse(o, y)
        return fn, leaves
    versus_torch(spec, torch_side, {"y": y})


# ---------------------------------------------------------------------------------- conv1d
CONV1D = {  # id: (in channels, length, attrs)
    "stride_pad_relu": (3, 11, {"out": 5, "kernel": 3, "stride": 2, "padding": 1,
                                "activation": "relu"}),
    "dilation_groups_no_bias": (4, 12, {"out": 6, "kernel": 3, "dilation": 2, "padding": 2,
                                        "groups": 2, "bias": False}),
}


@pytest.mark.parametrize("c,length,attrs", CONV1D.values(), ids=CONV1D.keys())
def test_conv1d_matches_torch(c, length, attrs):
    module = torch.nn.Conv1d(c, attrs["out"], attrs["kernel"], stride=attrs.get("stride", 1),
                             padding=attrs.get("padding", 0), dilation=attrs.get("dilation", 1),
                             groups=attrs.get("groups", 1), bias=attrs.get("bias", True))
    kw = {k: attrs[k] for k in ("stride", "padding", "dilation", "groups") if k in attrs}
    check("conv1d", TF.conv1d, module, (N, c, length), attrs, kw)


# ------------------------------------------------------------------------ conv_transpose2d
CONVT = {  # id: (in channels, (h, w), attrs)
    "dcgan_k4_s2_p1": (4, (3, 3), {"out": 3, "kernel": 4, "stride": 2, "padding": 1,
                                   "bias": False}),
    "rect_output_padding_relu": (2, (3, 4), {"out": 3, "kernel": [3, 2], "stride": [2, 3],
                                             "padding": [1, 0], "output_padding": [1, 2],
                                             "activation": "relu"}),
    "dilation_groups_crop": (4, (4, 3), {"out": 6, "kernel": 2, "stride": 1, "padding": 2,
                                         "dilation": 3, "groups": 2}),
}


@pytest.mark.parametrize("c,hw,attrs", CONVT.values(), ids=CONVT.keys())
def test_conv_transpose2d_matches_torch(c, hw, attrs):
    kw = {k: attrs[k] for k in ("stride", "padding", "output_padding", "groups", "dilation")
          if k in attrs}
    module = torch.nn.ConvTranspose2d(c, attrs["out"], attrs["kernel"],
                                      bias=attrs.get("bias", True), **kw)
    check("conv_transpose2d", TF.conv_transpose2d, module, (N, c, *hw), attrs, kw)


def test_conv_transpose2d_upsamples_a_named_batch():
    spec = {"dlgraph": 1, "name": "up", "inputs": {"x": {"shape": ["batch", 3, 4, 4]}},
            "nodes": {"a": {"op": "conv_transpose2d", "in": "x", "out": 2, "kernel": 2,
                            "stride": 2}}, "outputs": ["a"]}
    g = dlgraph.load(spec)
    assert g[g.outputs["a"]].type.shape == ("batch", 2, 8, 8)
    assert {k: p.shape for k, p in g.params.items()} == {"a.weight": (3, 2, 2, 2),
                                                         "a.bias": (2,)}


# --------------------------------------------------------------------------------- errors
def error_of(op, shape, **attrs) -> ShapeError:
    spec = {"dlgraph": 1, "name": "e", "inputs": {"x": {"shape": list(shape)}},
            "nodes": {"a": {"op": op, "in": "x", **attrs}}, "outputs": ["a"]}
    with pytest.raises(ShapeError) as info:
        dlgraph.load(spec)
    assert info.value.node == "a"
    return info.value


def test_shape_errors():
    assert error_of("conv1d", ["batch", 3, 4, 4], out=2, kernel=3).message == \
        "conv1d needs [batch, channels, length], got [batch, 3, 4, 4]"
    assert error_of("conv1d", ["batch", 3, 8], out=2, kernel=3, groups=2).message == \
        "groups=2 must divide in channels 3 and out 2"
    assert error_of("conv1d", ["batch", 3, 4], out=2, kernel=3, dilation=2).message == \
        "a kernel spanning 5 steps does not fit in a length of 4 (padding 0)"
    assert error_of("conv_transpose2d", ["batch", 3, 8], out=2, kernel=3).message == \
        "conv_transpose2d needs [batch, channels, height, width], got [batch, 3, 8]"
    assert error_of("conv_transpose2d", ["batch", 3, 4, 4], out=2, kernel=3, stride=2,
                    output_padding=2).message == \
        "output_padding 2 must be smaller than the stride 2 or the dilation 1"
    assert error_of("conv_transpose2d", ["batch", 3, 1, 1], out=2, kernel=1,
                    padding=1).message == "padding 1 leaves no output of a 1x1 image"


# ------------------------------------------------- padding: same, four sides; pool options
CONV2D_PADDING = {  # id: (in channels, (h, w), attrs, PyTorch's padding)
    "same_odd_kernel": (3, (6, 5), {"out": 4, "kernel": 3, "padding": "same"}, "same"),
    "same_even_kernel_dilated": (2, (5, 6), {"out": 3, "kernel": [2, 4], "dilation": 2,
                                             "padding": "same"}, "same"),
}


@pytest.mark.parametrize("c,hw,attrs,pad", CONV2D_PADDING.values(), ids=CONV2D_PADDING.keys())
def test_conv2d_padding_same_matches_torch(c, hw, attrs, pad):
    module = torch.nn.Conv2d(c, attrs["out"], attrs["kernel"], padding=pad,
                             dilation=attrs.get("dilation", 1))
    check("conv2d", TF.conv2d, module, (N, c, *hw), attrs,
          {"padding": pad, "dilation": attrs.get("dilation", 1)})


def test_conv2d_four_sided_and_strided_same_padding_match_a_padded_torch_conv():
    # PyTorch's padding='same' is for stride 1; with a stride it is Keras' and ONNX's
    # SAME_UPPER: output ceil(7 / 2) = 4, the odd row at the bottom (pads 1 top, 1 bottom
    # for a 3-kernel over 7; 0 left, 1 right for a 2-kernel over 6)
    for padding, sides in (("same", (0, 1, 1, 1)), ([0, 1, 2, 1], (2, 1, 0, 1))):
        module = torch.nn.Conv2d(2, 3, [3, 2], stride=2)
        fn = lambda x, w, b, **kw: TF.conv2d(TF.pad(x, sides), w, b, stride=2)  # noqa: B023
        check("conv2d", fn, module, (N, 2, 7, 6),
              {"out": 3, "kernel": [3, 2], "stride": 2, "padding": padding}, {})


def pool_case(op, hw, attrs):
    spec = {"dlgraph": 1, "name": "p", "inputs": {"x": {"shape": ["batch", 2, *hw]}},
            "nodes": {"a": {"op": op, "in": "x", **attrs}}, "outputs": ["a"]}
    x = np.random.default_rng(3).standard_normal((N, 2, *hw)).astype(np.float32)
    return dlgraph.compile(dlgraph.load(spec))(x=x)["a"], torch.from_numpy(x)


@pytest.mark.parametrize("hw,kernel,stride,padding", [((7, 7), 2, 2, 0), ((6, 7), 3, 2, 1),
                                                      ((5, 8), [3, 2], [2, 3], [1, 0])])
def test_pools_with_ceil_mode_match_torch(hw, kernel, stride, padding):
    attrs = dict(kernel=kernel, stride=stride, padding=padding, ceil_mode=True)
    got, x = pool_case("max_pool2d", hw, attrs)
    want = torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    for include in (True, False):
        got, x = pool_case("avg_pool2d", hw, {**attrs, "count_include_pad": include})
        want = torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=True,
                                  count_include_pad=include)(x)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_avg_pool_excluding_padding_matches_torch_and_its_gradient_too():
    spec = conv_spec("avg_pool2d", (N, 2, 5, 5), (N, 2, 3, 3),
                     {"kernel": 3, "stride": 2, "padding": 1, "count_include_pad": False})

    def torch_side(w):
        x = leaf(w, "x")

        def fn(y):
            o = TF.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
            return o, mse(o, y)
        return fn, {"x": x}
    y = np.random.default_rng(2).standard_normal((N, 2, 3, 3)).astype(np.float32)
    versus_torch(spec, torch_side, {"y": y})


def test_embedding_padding_idx_gives_zeros_and_never_trains_as_torch():
    ids = np.array([[0, 2, 1, 2], [1, 1, 3, 0]])
    spec = {"dlgraph": 1, "name": "e", "inputs": {"ids": {"shape": [2, 4], "dtype": "int32"},
                                                  "y": {"shape": [2, 4, 3]}},
            "nodes": {"a": {"op": "embedding", "in": "ids", "num": 4, "dim": 3,
                            "padding_idx": 2},
                      "loss": {"op": "mse", "in": ["a", "y"]}}, "outputs": ["a"]}
    module = torch.nn.Embedding(4, 3, padding_idx=2)

    def torch_side(w):
        w = {k: v.copy() for k, v in w.items()}
        w["a.weight"][2] = 0.0        # PyTorch's padding row starts (and stays) at zero
        leaves = load_module(module, w)
        return (lambda ids, y: (o := module(ids.long()), mse(o, y))), leaves
    y = np.random.default_rng(4).standard_normal((2, 4, 3)).astype(np.float32)
    versus_torch(spec, torch_side, {"ids": ids.astype(np.int32), "y": y})


def test_pool_and_embedding_option_errors():
    assert error_of("embedding", ["batch", 3], num=4, dim=2, padding_idx=4).message == \
        "padding_idx 4 is not an id of a 4-row table"
    assert error_of("max_pool2d", ["batch", 3, 8, 8], kernel=2,
                    padding=[1, 2, 0, 0]).message == \
        "padding [1, 2, 0, 0] is more than half the kernel 2: some windows would hold only " \
        "padding"
