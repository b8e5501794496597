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
