"""Import rules that fold a pattern of ONNX primitives back into one dlgraph layer.

``layer_norm``: exporters below opset 17 (PyTorch's among them) write a layer norm as

    m = ReduceMean(x, trailing axes); d = x - m; v = ReduceMean(d ** 2)   (or d * d)
    y = d / Sqrt(v + eps) [* weight] [+ bias]

The rule on ReduceMean matches this exactly (each intermediate read only by the next step,
eps a scalar constant, weight and bias constants of the normalised shape) and writes one
``layer_norm``; anything else stays primitive.

``softmax``: ``e = Exp(x - ReduceMax(x)); e / ReduceSum(e)`` over one axis (kept dims), as
dlgraph itself exports a softmax nested in a block, becomes one ``softmax``.

ONNX ``Attention`` (opset 23) is dlgraph's ``attention`` (3-D inputs split into heads and
merged again around it), where it has no cache, no grouped heads, softcap or window.
"""

from __future__ import annotations

import numpy as np

from dlgraph.engine.io.onnx.import_base import Importer, hint, origin
from dlgraph.engine.io.onnx.import_ops import (
    OPERATOR_RULES,
    attrs,
    axes_input,
    emit_layer,
    f32,
    nonneg_axis,
)


def _peek(imp: Importer, name: str):
    """A constant, also one made later in the file (Constant, Identity of an initializer):
    a pattern is matched from its first node, before the rest has been read."""
    c = imp.peek(name)
    made = next((n for n in imp.model.graph.node if name in n.output), None)
    if c is None and made is not None and made.op_type == "Identity":
        return _peek(imp, made.input[0])
    return c


def _other(node, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def origins(nodes) -> list[str]:
    """The ONNX nodes a folded layer stands for, shortened to the first two and the last."""
    names = [origin(n) for n in nodes]
    return names if len(names) <= 3 else names[:2] + ["..."] + names[-1:]


def layer_hint(node) -> str:
    """The id of a folded layer: its first node's name without the last part
    ('block1/norm1/mean' -> 'block1/norm1')."""
    parts = [p for p in (node.name or "").split("/") if p]
    return "/".join(parts[:-1]) if len(parts) > 1 else hint(node)


def _next(imp: Importer, name: str, op: str):
    return imp.sole_consumer(name, (op,))


def _variance(imp, d: str):
    """The nodes of mean((x - m) ** 2) read from d = x - m: (square, mean) or None."""
    sq = [c for c in imp.consumers.get(d, []) if c.op_type in ("Pow", "Mul")]
    for s in sq:
        ok = (s.op_type == "Pow" and s.input[0] == d and _peek(imp, s.input[1]) is not None
              and float(np.asarray(_peek(imp, s.input[1])).reshape(-1)[0]) == 2.0
              and _peek(imp, s.input[1]).size == 1) or \
             (s.op_type == "Mul" and list(s.input) == [d, d])
        mean = _next(imp, s.output[0], "ReduceMean") if ok else None
        if mean is not None:
            return s, mean
    return None


def _affine(imp, y: str, shape: tuple):
    """An optional `* weight` then `+ bias` after the normalisation: (nodes, weight, bias)."""
    nodes, params = [], {}
    for op, key in (("Mul", "weight"), ("Add", "bias")):
        n = _next(imp, y, op)
        c = None if n is None else _peek(imp, _other(n, y))
        if c is None or c.shape != shape:
            if op == "Mul":
                continue
            break
        nodes.append(n)
        params[key] = c
        y = n.output[0]
    return nodes, params


def _layer_norm_nodes(imp, node):
    """The nodes of the pattern from the first ReduceMean, and its fields, or None."""
    x = node.input[0]
    rank = imp.rank(x)
    axes = axes_input(imp, node)
    if rank is None or not axes or not attrs(node).get("keepdims", 1):
        return None
    axes = sorted(nonneg_axis(a, rank) for a in axes)
    if axes != list(range(rank - len(axes), rank)):
        return None
    sub = _next(imp, node.output[0], "Sub")
    if sub is None or list(sub.input) != [x, node.output[0]]:
        return None
    d = sub.output[0]
    var = _variance(imp, d)
    if var is None or axes_input(imp, var[1]) is None or \
            sorted(nonneg_axis(a, rank) for a in axes_input(imp, var[1])) != axes:
        return None
    add = _next(imp, var[1].output[0], "Add")
    eps = None if add is None else _peek(imp, _other(add, var[1].output[0]))
    sqrt = None if add is None else _next(imp, add.output[0], "Sqrt")
    div = None if sqrt is None else _next(imp, sqrt.output[0], "Div")
    if eps is None or eps.size != 1 or div is None or list(div.input) != [d, sqrt.output[0]]:
        return None
    if len({id(c) for c in imp.consumers.get(d, [])}) != 2 or d in imp.outputs:
        return None
    shape = tuple(imp.shape(x)[rank - len(axes):])
    more, params = _affine(imp, div.output[0], shape)
    nodes = [node, sub, *var, add, sqrt, div, *more]
    return nodes, len(axes), float(eps.reshape(())), params, shape


def reduce_mean(imp, node):
    found = _layer_norm_nodes(imp, node)
    if found is None:
        return OPERATOR_RULES["ReduceMean"](imp, node)
    nodes, dims, eps, params, shape = found
    for n in nodes[1:]:
        imp.absorb(n)
    affine = bool(params)
    params = {"weight": params.get("weight", np.ones(shape, np.float32)),
              "bias": params.get("bias", np.zeros(shape, np.float32))} if affine else {}
    nid = emit_layer(imp, node, "layer_norm", [imp.ref(node.input[0])], params,
                     out_name=nodes[-1].output[0], name=layer_hint(node),
                     eps=None if f32(eps) == 1e-5 else f32(eps),
                     dims=None if dims == 1 else dims, affine=None if affine else False)
    imp.origin[nid] = origins(nodes)


def _softmax_nodes(imp, node):
    """exp(x - max) / sum(exp(x - max)) over one axis, from its ReduceMax: nodes, axis."""
    x, rank = node.input[0], imp.rank(node.input[0])
    axes = axes_input(imp, node)
    if rank is None or axes is None or len(axes) != 1 or not attrs(node).get("keepdims", 1):
        return None
    m, nodes = node.output[0], [node]
    ident = _next(imp, m, "Identity")           # dlgraph's own: x - stop_gradient(max)
    if ident is not None:
        m = ident.output[0]
        nodes.append(ident)
    sub = _next(imp, m, "Sub")
    exp = None if sub is None or list(sub.input) != [x, m] else _next(imp, sub.output[0], "Exp")
    e = None if exp is None else exp.output[0]
    users = {c.op_type: c for c in imp.consumers.get(e, [])} if e else {}
    total, div = users.get("ReduceSum"), users.get("Div")
    if len(users) != 2 or total is None or div is None or e in imp.outputs or \
            axes_input(imp, total) != axes or not attrs(total).get("keepdims", 1) or \
            _next(imp, total.output[0], "Div") is not div or list(div.input) != [
                e, total.output[0]]:
        return None
    return nodes + [sub, exp, total, div], nonneg_axis(axes[0], rank)


def reduce_max(imp, node):
    found = _softmax_nodes(imp, node)
    if found is None:
        return OPERATOR_RULES["ReduceMax"](imp, node)
    nodes, axis = found
    for n in nodes[1:]:
        imp.absorb(n)
    out = nodes[-1].output[0]
    rank = imp.rank(node.input[0])
    nid = imp.add(hint(nodes[-1], imp) if out in imp.outputs else layer_hint(node), "softmax",
                  [imp.ref(node.input[0])], origins(nodes),
                  axis=None if axis == rank - 1 else axis)
    imp.bind(out, nid)


def _attention_problems(imp, node, a) -> list[str]:
    ins = list(node.input) + [""] * 7
    used = [o for o in node.output[1:] if o and (o in imp.consumers or o in imp.outputs)]
    ranks = [imp.rank(i) for i in node.input[:3]]
    heads = (a.get("q_num_heads"), a.get("kv_num_heads"))
    shapes = [imp.shape(i) for i in node.input[:3]]
    problems = [
        (ins[4] or ins[5], "past key and value (a cache)"), (ins[6], "padded key lengths"),
        (used, "its present key/value or scores outputs"),
        (a.get("softcap", 0.0), "softcap"),
        (a.get("left_window_size", -1) != -1 or a.get("right_window_size", -1) != -1,
         "a sliding window"),
        (len(set(ranks)) != 1 or ranks[0] not in (3, 4), "inputs of ranks {ranks}"),
        (ranks[0] == 3 and (None in heads or heads[0] != heads[1]),
         "grouped query heads" if None not in heads else "3-D inputs without head counts"),
        (ranks[0] == 4 and None not in shapes and shapes[0][1] != shapes[1][1],
         "grouped query heads")]
    return [why for cond, why in problems if cond]


def _heads(imp, ref, shape, h, name):
    """[B, S, H*d] -> [B, H, S, d]."""
    b, t, e = shape
    r = imp.add(f"{name}_heads", "reshape", [ref], [], shape=[b, t, h, e // h])
    return imp.add(f"{name}_heads", "transpose", [r], [], axes=[0, 2, 1, 3])


def attention_op(imp, node):
    """ONNX Attention (opset 23): dlgraph's attention, heads split for 3-D inputs."""
    from dlgraph.engine.io.onnx.import_base import Unsupported
    a = attrs(node)
    bad = _attention_problems(imp, node, a)
    if bad:
        raise Unsupported("; ".join(bad))
    refs = [imp.ref(i) for i in node.input[:3]]
    three = imp.rank(node.input[0]) == 3
    if three:
        h = a["q_num_heads"]
        refs = [_heads(imp, r, imp.shape(i), h, hint(node)) for r, i in
                zip(refs, node.input[:3], strict=True)]
    mask = [imp.ref(node.input[3])] if len(node.input) > 3 and node.input[3] else []
    causal = bool(a.get("is_causal", 0))
    boolean = mask and imp.dtypes.get(node.input[3]) == "bool"
    if boolean and causal:
        c = imp.const(node.input[3])
        if c is None or not (c & np.tril(np.ones(c.shape[-2:], bool))).any(axis=-1).all():
            raise Unsupported("a causal attention with a bool mask that may mask every key "
                              "of a row (ONNX answers such a row with zeros)")
    y = imp.add(hint(node) if three else hint(node, imp), "attention", refs + mask,
                [origin(node)], causal=causal or None,
                scale=f32(a["scale"]) if "scale" in a else None)
    if boolean and not causal:
        # ONNX answers a row whose keys are all masked with zeros (dlgraph's attention: the
        # mean of the values): zero it where the mask holds no key
        h = hint(node)
        keys = imp.add(f"{h}_keys", "max", [imp.add(f"{h}_mask", "cast", mask, [],
                                                     dtype="float32")], [], axes=[-1],
                       keepdims=True)
        y = imp.add(f"{h}_masked_rows", "mul", [y, keys], [])
    if three:
        b, t = imp.shape(node.input[0])[:2]
        y = imp.add(hint(node, imp), "reshape",
                    [imp.add(hint(node), "transpose", [y], [], axes=[0, 2, 1, 3])], [],
                    shape=[b, t, -1])
    imp.bind(node.output[0], y)


def _is(imp, name, value: float) -> bool:
    c = _peek(imp, name)
    return c is not None and c.size == 1 and abs(float(c.reshape(())) - value) < 1e-4


def _exact_gelu(imp, node) -> list | None:
    """x / sqrt(2) -> Erf -> + 1 -> * x -> * 0.5, each read only by the next (PyTorch's
    exact GELU below opset 20): the nodes after the Div, or None."""
    x = node.input[0]
    if not _is(imp, node.input[1], 2 ** 0.5):
        return None
    erf = imp.sole_consumer(node.output[0], ("Erf",))
    add = erf and imp.sole_consumer(erf.output[0], ("Add",))
    if not add or not _is(imp, _other(add, erf.output[0]), 1.0):
        return None
    mul = imp.sole_consumer(add.output[0], ("Mul",))
    if not mul or _other(mul, add.output[0]) != x:
        return None
    half = imp.sole_consumer(mul.output[0], ("Mul",))
    if not half or not _is(imp, _other(half, mul.output[0]), 0.5):
        return None
    return [erf, add, mul, half]


def div(imp, node):
    """Div, or the first node of an exact GELU folded back into ``gelu``."""
    from dlgraph.engine.io.onnx.import_views import VIEW_RULES
    rest = _exact_gelu(imp, node)
    if rest is None:
        return VIEW_RULES["Div"](imp, node)
    for n in rest:
        imp.absorb(n)
    out = rest[-1].output[0]
    nid = imp.add(hint(rest[-1], imp) if out in imp.outputs else layer_hint(node), "gelu",
                  [imp.ref(node.input[0])], origins([node, *rest]), approximate="none")
    imp.bind(out, nid)


FOLD_RULES = {"ReduceMean": reduce_mean, "ReduceMax": reduce_max, "Attention": attention_op,
              "Div": div}
"""ONNX operator type -> its rule that folds a pattern starting there back into one layer
(layer_norm, softmax, attention, exact gelu); where there is no pattern, the operator's own rule in
:data:`.import_ops.OPERATOR_RULES`."""
