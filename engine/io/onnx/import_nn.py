"""ONNX operators of everyday PyTorch models that map onto a few dlgraph ops: activations
with parameters (HardSigmoid, Selu, PRelu, Clip), sums of several inputs (Sum, Mean),
Split, Tile, InstanceNormalization, and Pad by reflection, edge or wrap.

Each rule has the signature of :mod:`.import_ops`'s; :data:`NN_RULES` joins the importer's
table (:data:`.importer.RULES`) beside :data:`.import_ops.OPERATOR_RULES`.
"""

from __future__ import annotations

import numpy as np

from dlgraph.engine.io.onnx.import_base import Unsupported, Value, hint, origin
from dlgraph.engine.io.onnx.import_ops import (
    attrs,
    axes_input,
    f32,
    fold,
    need_shape,
    nonneg_axis,
    pad,
    text,
)


def _const_ref(imp, node, value: np.ndarray, tag: str) -> str:
    """A spec ref for a constant the rule made (a reshaped scale, say)."""
    name = f"{node.output[0]}_{tag}"
    imp.values[name] = Value(const=value)
    return imp.ref(name)


def _emit(imp, node, op, ins, **fields) -> None:
    imp.bind(node.output[0], imp.add(hint(node, imp), op, ins, [origin(node)], **fields))


def hard_sigmoid(imp, node):
    a = attrs(node)
    alpha, beta = f32(a.get("alpha", 0.2)), f32(a.get("beta", 0.5))
    _emit(imp, node, "hard_sigmoid", [imp.ref(node.input[0])],
          alpha=None if abs(alpha - 1 / 6) < 1e-7 else alpha,
          beta=None if beta == 0.5 else beta)


def selu(imp, node):
    from dlgraph.ops.elementwise import SELU_ALPHA, SELU_GAMMA
    a = attrs(node)
    alpha, gamma = a.get("alpha", SELU_ALPHA), a.get("gamma", SELU_GAMMA)
    # ONNX's defaults are PyTorch's constants rounded to float32: the same numbers
    _emit(imp, node, "selu", [imp.ref(node.input[0])],
          alpha=None if abs(alpha - SELU_ALPHA) < 1e-6 else f32(alpha),
          gamma=None if abs(gamma - SELU_GAMMA) < 1e-6 else f32(gamma))


def prelu(imp, node):
    """x if x > 0 else slope * x, the slope a frozen weight (broadcast as numpy does)."""
    x, slope = imp.ref(node.input[0]), imp.ref(node.input[1])
    h = hint(node)
    pos = imp.add(f"{h}_positive", "greater", [x, imp.add(f"{h}_zero", "const", [], [],
                                                          value=0.0)], [])
    neg = imp.add(f"{h}_scaled", "mul", [x, slope], [])
    _emit(imp, node, "where", [pos, x, neg])


def clip(imp, node):
    a = attrs(node)
    bounds = [(i, imp.const(node.input[i]) if len(node.input) > i and node.input[i] else None)
              for i in (1, 2)]
    if any(len(node.input) > i and node.input[i] and c is None for i, c in bounds):
        raise Unsupported("bounds computed at run time")
    low = bounds[0][1] if bounds[0][1] is not None else a.get("min")
    high = bounds[1][1] if bounds[1][1] is not None else a.get("max")
    if fold(imp, node, lambda x, *_: np.clip(x, low, high)):
        return
    ref = imp.ref(node.input[0])
    steps = [(op, v) for op, v in (("maximum", low), ("minimum", high)) if v is not None]
    if not steps:
        imp.values[node.output[0]] = imp.values[node.input[0]]
        return
    for k, (op, v) in enumerate(steps):
        last = k == len(steps) - 1
        c = imp.add(f"{hint(node)}_{op}", "const", [], [], value=float(np.asarray(v)))
        ref = imp.add(hint(node, imp) if last else f"{hint(node)}_{k}", op, [ref, c],
                      [origin(node)] if last else [])
    imp.bind(node.output[0], ref)


def sum_of(mean: bool):
    def rule(imp, node):
        if fold(imp, node, lambda *xs: sum(xs) / len(xs) if mean else sum(xs)):
            return
        refs = [imp.ref(i) for i in node.input if i]
        if len(refs) == 1:
            imp.values[node.output[0]] = imp.values[node.input[0]]
            return
        out, h = refs[0], hint(node)
        for k, r in enumerate(refs[1:], 1):
            last = k == len(refs) - 1 and not mean
            out = imp.add(hint(node, imp) if last else f"{h}_{k}", "add", [out, r],
                          [origin(node)] if last else [])
        if mean:
            n = imp.add(f"{h}_count", "const", [], [], value=float(len(refs)))
            out = imp.add(hint(node, imp), "div", [out, n], [origin(node)])
        imp.bind(node.output[0], out)
    return rule


def split(imp, node):
    a = attrs(node)
    shape = need_shape(imp, node.input[0])
    axis = nonneg_axis(a.get("axis", 0), len(shape))
    size = shape[axis]
    given = len(node.input) > 1 and node.input[1]
    sizes = imp.const(node.input[1]) if given else a.get("split")
    if given and sizes is None:
        raise Unsupported("split sizes computed at run time")
    n = len(node.output)
    if sizes is None:
        # equal parts, the last smaller (opset 18's num_outputs)
        part = -(-size // n)
        sizes = [min(part, size - k * part) for k in range(n)]
    sizes = [int(s) for s in np.atleast_1d(sizes)]
    if len(sizes) != n or sum(sizes) != size:
        raise Unsupported(f"split sizes {sizes} do not cover the axis of {size}")
    start, x = 0, imp.ref(node.input[0])
    for k, (name, s) in enumerate(zip(node.output, sizes, strict=True)):
        if name:
            imp.bind(name, imp.add(f"{hint(node)}_{k}", "slice", [x], [origin(node)],
                                   axis=axis, start=start, stop=start + s))
        start += s


def tile(imp, node):
    reps = imp.const(node.input[1])
    if fold(imp, node, np.tile):
        return
    if reps is None:
        raise Unsupported("repeats computed at run time")
    ref, todo = imp.ref(node.input[0]), [(ax, int(r)) for ax, r in enumerate(reps) if r != 1]
    for k, (ax, r) in enumerate(todo):
        last = k == len(todo) - 1
        ref = imp.add(hint(node, imp) if last else f"{hint(node)}_{k}", "concat", [ref] * r,
                      [origin(node)] if last else [], axis=ax)
    imp.bind(node.output[0], ref)


def instance_norm(imp, node):
    """Normalise each sample's channel over its spatial axes: a layer_norm over the
    trailing rank - 2 axes without affine, then the per-channel scale and shift."""
    rank = imp.rank(node.input[0])
    scale, bias = imp.const(node.input[1]), imp.const(node.input[2])
    if rank is None or rank < 3 or scale is None or bias is None:
        raise Unsupported("only InstanceNormalization with constant scale and bias")
    eps = f32(attrs(node).get("epsilon", 1e-5))
    h, keep = hint(node), (-1,) + (1,) * (rank - 2)
    y = imp.add(f"{h}_norm", "layer_norm", [imp.ref(node.input[0])], [], dims=rank - 2,
                affine=False, eps=None if eps == 1e-5 else eps)
    y = imp.add(f"{h}_scale", "mul", [y, _const_ref(imp, node, scale.reshape(keep), "scale")],
                [])
    _emit(imp, node, "add", [y, _const_ref(imp, node, bias.reshape(keep), "bias")])


def pad_modes(imp, node):
    """Pad by reflection, edge or wrap: slices of the input concatenated around it (the
    constant mode is :func:`.import_ops.pad`'s)."""
    a = attrs(node)
    mode = text(a.get("mode", "constant"))
    if mode == "constant":
        return pad(imp, node)
    pads = imp.const(node.input[1]) if len(node.input) > 1 else np.array(a.get("pads"))
    if mode not in ("reflect", "edge", "wrap") or pads is None or (pads < 0).any():
        raise Unsupported(f"{mode} padding by {pads} (dlgraph: constant, reflect, edge, wrap "
                          "by non-negative constants)")
    shape = need_shape(imp, node.input[0])
    axes = axes_input(imp, node, 3) or list(range(len(shape)))
    axes = [nonneg_axis(ax, len(shape)) for ax in axes]
    ref, h = imp.ref(node.input[0]), hint(node)
    for k, ax in enumerate(axes):
        before, after, n = int(pads[k]), int(pads[len(axes) + k]), shape[ax]
        if not before and not after:
            continue
        if mode == "reflect" and max(before, after) >= n:
            raise Unsupported(f"reflect padding of {max(before, after)} over an axis of {n}")
        cut = lambda i, j: imp.add(f"{h}_{ax}_{i}", "slice", [ref], [], axis=ax, start=i,  # noqa: B023
                                   stop=j)
        idx = {"reflect": (list(range(before, 0, -1)), list(range(n - 2, n - 2 - after, -1))),
               "edge": ([0] * before, [n - 1] * after),
               "wrap": ([n - before + i for i in range(before)], list(range(after)))}[mode]
        parts = [cut(i, i + 1) for i in idx[0]] + [ref] + [cut(i, i + 1) for i in idx[1]]
        ref = imp.add(f"{h}_{ax}", "concat", parts, [origin(node)], axis=ax)
    imp.bind(node.output[0], ref)


def _scaled(imp, node, op, x, value, tag) -> str:
    c = imp.add(f"{hint(node)}_{tag}", "const", [], [], value=value)
    return imp.add(f"{hint(node)}_{tag}_{op}", op, [x, c], [])


def celu(imp, node):
    """alpha * elu(x / alpha)."""
    alpha = f32(attrs(node).get("alpha", 1.0))
    x = _scaled(imp, node, "div", imp.ref(node.input[0]), alpha, "alpha")
    _emit(imp, node, "mul", [imp.add(f"{hint(node)}_elu", "elu", [x], []),
                             imp.add(f"{hint(node)}_scale", "const", [], [], value=alpha)])


def thresholded_relu(imp, node):
    """x where x > alpha, else 0."""
    x = imp.ref(node.input[0])
    above = _scaled(imp, node, "greater", x, f32(attrs(node).get("alpha", 1.0)), "alpha")
    _emit(imp, node, "where", [above, x, imp.add(f"{hint(node)}_zero", "const", [], [],
                                                  value=0.0)])


def softsign(imp, node):
    """x / (1 + |x|)."""
    x = imp.ref(node.input[0])
    den = _scaled(imp, node, "add", imp.add(f"{hint(node)}_abs", "abs", [x], []), 1.0, "one")
    _emit(imp, node, "div", [x, den])


def mish(imp, node):
    """x * tanh(softplus(x))."""
    x = imp.ref(node.input[0])
    t = imp.add(f"{hint(node)}_tanh", "tanh", [imp.add(f"{hint(node)}_softplus", "softplus",
                                                       [x], [])], [])
    _emit(imp, node, "mul", [x, t])


def reciprocal(imp, node):
    if fold(imp, node, lambda x: (1 / x).astype(x.dtype)):
        return
    _emit(imp, node, "div", [imp.add(f"{hint(node)}_one", "const", [], [], value=1.0),
                             imp.ref(node.input[0])])


def global_max_pool(imp, node):
    rank = imp.rank(node.input[0])
    if rank is None or rank < 3:
        raise Unsupported("only GlobalMaxPool of [batch, channels, ...]")
    _emit(imp, node, "max", [imp.ref(node.input[0])], axes=list(range(2, rank)), keepdims=True)


def lrn(imp, node):
    """Local response normalisation across channels: x / (bias + alpha / size * the sum of
    x^2 over `size` neighbouring channels) ^ beta; the sum adds `size` shifted slices of the
    channel-padded squares."""
    a = attrs(node)
    size, c = int(a["size"]), need_shape(imp, node.input[0])[1]
    x, h = imp.ref(node.input[0]), hint(node)
    sq = imp.add(f"{h}_square", "mul", [x, x], [])
    sq = imp.add(f"{h}_pad", "pad", [sq], [], axis=1, before=(size - 1) // 2,
                 after=size // 2)
    total = None
    for i in range(size):
        part = imp.add(f"{h}_window{i}", "slice", [sq], [], axis=1, start=i, stop=i + c)
        total = part if total is None else imp.add(f"{h}_sum{i}", "add", [total, part], [])
    scaled = _scaled(imp, node, "mul", total, f32(a.get("alpha", 1e-4)) / size, "alpha")
    base = _scaled(imp, node, "add", scaled, f32(a.get("bias", 1.0)), "bias")
    _emit(imp, node, "div", [x, _scaled(imp, node, "pow", base, f32(a.get("beta", 0.75)),
                                        "beta")])


NN_RULES = {
    "GlobalMaxPool": global_max_pool, "LRN": lrn,
    "Celu": celu, "ThresholdedRelu": thresholded_relu, "Softsign": softsign, "Mish": mish,
    "Reciprocal": reciprocal,
    "HardSigmoid": hard_sigmoid, "Selu": selu, "PRelu": prelu, "Clip": clip,
    "Sum": sum_of(False), "Mean": sum_of(True), "Split": split, "Tile": tile,
    "InstanceNormalization": instance_norm, "Pad": pad_modes,
}
"""ONNX operator type -> its import rule: operators that map onto a few dlgraph ops."""
