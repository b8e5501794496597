"""The table of ONNX operators dlgraph imports: one rule per operator type.

``rule(imp, node)`` binds each of the node's outputs to a spec ref or a constant, or
raises :class:`Unsupported` naming what it cannot express. Layer rules fold a pattern back
into one spec layer (Gemm + Relu -> ``linear`` with ``activation: relu``).
"""

from __future__ import annotations

import numpy as np

from dlgraph.engine.io.onnx.import_base import Importer, Unsupported, Value, hint, origin
from dlgraph.engine.io.onnx.recurrent import GATES, reorder

BIG = 2**62


def attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def text(v):
    """A string attribute as a str (onnx hands them over as bytes)."""
    return v.decode() if isinstance(v, bytes) else v


def f32(x: float) -> float:
    """A float32 attribute as the short decimal a person wrote (9.99e-06 -> 1e-05)."""
    return float(f"{np.float32(x):.7g}")


def nonneg_axis(axis: int, rank: int) -> int:
    """An ONNX axis (negative: from the end) as a non-negative one."""
    return axis + rank if axis < 0 else axis


def need_shape(imp: Importer, name: str) -> tuple:
    s = imp.shape(name)
    if s is None or None in s:
        raise Unsupported(f"the shape of '{name}' is not known statically")
    return s


# -- elementwise -----------------------------------------------------------------------------
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow",
          "Max": "maximum", "Min": "minimum", "Greater": "greater", "Less": "less",
          "GreaterOrEqual": "greater_equal", "LessOrEqual": "less_equal", "Equal": "equal"}
UNARY = {"Neg": "neg", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Sign": "sign",
         "Abs": "abs", "Sin": "sin", "Cos": "cos", "Relu": "relu", "Sigmoid": "sigmoid",
         "Tanh": "tanh", "Erf": "erf"}
NUMPY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
         "Max": np.maximum, "Min": np.minimum, "Mod": np.mod}
COMPARE = {"Equal": np.equal, "Greater": np.greater, "Less": np.less,
           "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal}


def binary(op):
    def rule(imp, node):
        if node.op_type in ("Max", "Min") and len(node.input) != 2:
            return _variadic(imp, node, op)
        if len(node.input) != 2:
            raise Unsupported(f"{node.op_type} of {len(node.input)} inputs")
        if _dynamic(imp, node):          # shape arithmetic at run time (batch * heads)
            return
        a, b = (imp.const(i) for i in node.input)
        if a is not None and b is not None and node.op_type in COMPARE:   # shape arithmetic
            imp.values[node.output[0]] = Value(const=COMPARE[node.op_type](a, b))
            return
        if a is not None and b is not None and node.op_type in NUMPY:
            with np.errstate(all="ignore"):
                r = NUMPY[node.op_type](a, b)
            imp.values[node.output[0]] = Value(const=(r // 1).astype(a.dtype)
                                               if node.op_type == "Div" and a.dtype.kind
                                               in "iu" else r.astype(a.dtype))
            return
        ins = [imp.ref(i) for i in node.input]
        imp.bind(node.output[0], imp.add(hint(node, imp), op, ins, [origin(node)]))
    return rule


def shape_only(imp, node):
    """Ops dlgraph has no tensor form of, met in shape arithmetic: folded or run-time."""
    fn = NUMPY.get(node.op_type)
    if (fn and fold(imp, node, fn)) or _dynamic(imp, node):
        return
    raise Unsupported(f"{node.op_type} of tensors (dlgraph has it for shapes only)")


def _variadic(imp, node, op):
    """Max/Min of any number of inputs, as a chain of two-input ops."""
    refs = [imp.ref(i) for i in node.input]
    out = refs[0] if len(refs) == 1 else None
    for k, r in enumerate(refs[1:], 1):
        last = k == len(refs) - 1
        out = imp.add(hint(node, imp) if last else f"{hint(node)}_{k}", op,
                      [out or refs[0], r], [origin(node)] if last else [])
    imp.bind(node.output[0], out)


FOLD_UNARY = {"Neg": np.negative, "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt,
              "Sign": np.sign, "Abs": np.abs, "Sin": np.sin, "Cos": np.cos}


def unary(op):
    def rule(imp, node):
        fn = FOLD_UNARY.get(node.op_type)
        if fn is not None and fold(imp, node, lambda x: fn(x).astype(x.dtype)):
            return
        imp.bind(node.output[0], imp.add(hint(node, imp), op, [imp.ref(node.input[0])],
                                         [origin(node)]))
    return rule


def activation(imp, node) -> tuple[str, dict] | None:
    """A node's dlgraph activation name, when it matches dlgraph's defaults exactly."""
    a = attrs(node)
    if node.op_type in ("Relu", "Sigmoid", "Tanh", "Softplus"):
        return node.op_type.lower(), {}
    if node.op_type == "HardSwish":
        return "hard_swish", {}
    if node.op_type == "LeakyRelu" and abs(a.get("alpha", 0.01) - 0.01) < 1e-9:
        return "leaky_relu", {}
    if node.op_type == "Elu" and abs(a.get("alpha", 1.0) - 1.0) < 1e-9:
        return "elu", {}
    if node.op_type == "Gelu" and text(a.get("approximate", "none")) == "tanh":
        return "gelu", {}
    return None


ACTS = ("Relu", "Sigmoid", "Tanh", "Softplus", "LeakyRelu", "Elu", "Gelu", "HardSwish")


def _act_fields(node) -> tuple[str, dict]:
    """An activation with attributes other than dlgraph's defaults, as op and fields (a
    layer's `activation:` holds defaults only)."""
    a = attrs(node)
    if node.op_type in ("LeakyRelu", "Elu"):
        default = 0.01 if node.op_type == "LeakyRelu" else 1.0
        return ("leaky_relu" if node.op_type == "LeakyRelu" else "elu"), \
            {"alpha": f32(a.get("alpha", default))}
    if node.op_type == "Gelu":          # approximate: none, ONNX's default
        return "gelu", {"approximate": "none"}
    raise Unsupported(f"{node.op_type} with {a}")


def act_rule(op):
    def rule(imp, node):
        op, fields = activation(imp, node) or _act_fields(node)
        imp.bind(node.output[0], imp.add(hint(node, imp), op, [imp.ref(node.input[0])],
                                         [origin(node)], **fields))
    return rule


def emit_layer(imp, node, op, ins, params: dict, out_name=None, name=None, **fields) -> str:
    """A layer node with its parameters; a following activation is folded into it."""
    out_name = out_name or node.output[0]
    origins = [origin(node)]
    act = imp.sole_consumer(out_name, ACTS) if "activation" in fields else None
    if act is not None and activation(imp, act) is not None:
        fields["activation"] = activation(imp, act)[0]
        imp.absorb(act)
        origins.append(origin(act))
        out_name = act.output[0]
    nid = imp.add("=" + out_name if out_name in imp.outputs else name or hint(node, imp), op, ins,
                  origins, **fields)
    for k, v in params.items():
        imp.weights[f"{nid}.{k}"] = np.ascontiguousarray(v, np.float32)
    imp.bind(out_name, nid)
    return nid


# -- layers ----------------------------------------------------------------------------------
def gemm(imp, node):
    a = attrs(node)
    w = imp.const(node.input[1])
    c = imp.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if (w is None or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0
            or a.get("beta", 1.0) != 1.0 or (len(node.input) > 2 and node.input[2]
                                              and (c is None or c.ndim != 1))):
        return gemm_primitives(imp, node, a)
    weight = w if a.get("transB", 0) else w.T
    params = {"weight": weight, **({"bias": c} if c is not None else {})}
    emit_layer(imp, node, "linear", [imp.ref(node.input[0])], params, out=weight.shape[0],
               bias=None if c is not None else False, activation=None)


def gemm_primitives(imp, node, a):
    """alpha * A' @ B' + beta * C as primitives (weights that are values of the graph)."""
    ins = [imp.ref(i) for i in node.input if i]
    origins = [origin(node)]
    for k, flag in ((0, "transA"), (1, "transB")):
        if a.get(flag, 0):
            ins[k] = imp.add(f"{hint(node)}_t{k}", "transpose", [ins[k]], [], axes=[1, 0])
    y = imp.add(hint(node), "matmul", ins[:2], [] if len(ins) > 2 else origins)
    if a.get("alpha", 1.0) != 1.0:
        y = imp.add(hint(node), "mul", [y, imp.add(hint(node), "const", [], [],
                                                  value=float(a["alpha"]))], [])
    if len(ins) > 2:
        c = ins[2]
        if a.get("beta", 1.0) != 1.0:
            c = imp.add(hint(node), "mul", [c, imp.add(hint(node), "const", [], [],
                                                      value=float(a["beta"]))], [])
        y = imp.add(hint(node, imp), "add", [y, c], origins)
    imp.bind(node.output[0], y)


def matmul(imp, node):
    w = imp.const(node.input[1])
    if w is None or w.ndim != 2 or imp.const(node.input[0]) is not None:
        ins = [imp.ref(i) for i in node.input]
        imp.bind(node.output[0], imp.add(hint(node, imp), "matmul", ins, [origin(node)]))
        return
    params, out = {"weight": w.T}, node.output[0]
    add = imp.sole_consumer(out, ("Add",))
    if add is not None:
        other = add.input[1] if add.input[0] == out else add.input[0]
        b = imp.const(other)
        if b is not None and b.shape == (w.shape[1],):
            params["bias"] = b
            imp.absorb(add)
            out = add.output[0]
    emit_layer(imp, node, "linear", [imp.ref(node.input[0])], params, out_name=out,
               out=w.shape[1], bias=None if "bias" in params else False, activation=None)


def _sym_pads(a, rank):
    pads = list(a.get("pads", [0] * 2 * rank))
    if text(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID") or pads[:rank] != pads[rank:]:
        raise Unsupported("only equal padding on both sides (no auto_pad)")
    return pads[:rank]


def _one(v):
    """[3, 3] -> 3: one int where all dims agree, as a person would write it."""
    v = [int(d) for d in v]
    return v[0] if len(set(v)) == 1 else v


def _tidy(fields: dict, defaults: dict) -> dict:
    """Leave out fields at their default value (None is dropped by `add`)."""
    return {k: None if k in defaults and v == defaults[k] else v for k, v in fields.items()}


CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def _pads(imp, node, a, k) -> int | list | str:
    """ONNX's padding as dlgraph's field: an int, [h, w], [top, bottom, left, right] or
    'same' (auto_pad SAME_UPPER); ONNX writes all begins, then all ends."""
    auto = text(a.get("auto_pad", "NOTSET"))
    if auto == "SAME_UPPER":
        return "same"
    if auto == "SAME_LOWER":                 # the odd row at the start: written out
        size = need_shape(imp, node.input[0])[2:]
        kernel = a.get("kernel_shape") or imp.const(node.input[1]).shape[2:]
        out = []
        for n, kk, s, d in zip(size, kernel, a.get("strides", [1] * k),
                               a.get("dilations", [1] * k), strict=True):
            total = max((-(-n // s) - 1) * s + d * (kk - 1) + 1 - n, 0)
            out.append((total - total // 2, total // 2))
        return [v for pair in out for v in pair] if k == 2 else list(out[0])
    if auto not in ("NOTSET", "VALID"):
        raise Unsupported(f"auto_pad {auto}")
    pads = [0] * 2 * k if auto == "VALID" else [int(p) for p in a.get("pads", [0] * 2 * k)]
    if pads[:k] == pads[k:]:
        return _one(pads[:k])
    return [v for d in range(k) for v in (pads[d], pads[k + d])]


def conv(imp, node):
    a, w = attrs(node), imp.const(node.input[1])
    b = imp.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or w.ndim not in (3, 4) or (len(node.input) > 2 and b is None):
        raise Unsupported("only 1-D and 2-D convolutions with constant weights (dlgraph has "
                          "no 3-D convolution)")
    k = w.ndim - 2
    x, padding = imp.ref(node.input[0]), _pads(imp, node, a, k)
    strides, dilations = a.get("strides", [1] * k), a.get("dilations", [1] * k)
    fields = dict(out=w.shape[0], kernel=_one(list(w.shape[2:])), stride=_one(strides),
                  padding=padding, dilation=_one(dilations), groups=a.get("group", 1))
    params = {"weight": w, **({"bias": b} if b is not None else {})}
    emit_layer(imp, node, "conv2d" if k == 2 else "conv1d", [x], params,
               bias=None if b is not None else False, activation=None,
               **_tidy(fields, CONV_DEFAULTS))


def conv_transpose(imp, node):
    a, w = attrs(node), imp.const(node.input[1])
    b = imp.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or w.ndim != 4 or "output_shape" in a or (len(node.input) > 2 and b is None):
        raise Unsupported("only 2-D transposed convolutions with constant weights and no "
                          "output_shape")
    g = a.get("group", 1)
    fields = dict(out=w.shape[1] * g, kernel=_one(w.shape[2:]),
                  stride=_one(a.get("strides", [1, 1])), padding=_one(_sym_pads(a, 2)),
                  output_padding=_one(a.get("output_padding", [0, 0])),
                  dilation=_one(a.get("dilations", [1, 1])), groups=g)
    params = {"weight": w, **({"bias": b} if b is not None else {})}
    emit_layer(imp, node, "conv_transpose2d", [imp.ref(node.input[0])], params,
               bias=None if b is not None else False, activation=None,
               **_tidy(fields, CONV_DEFAULTS))


def pool(op):
    def rule(imp, node):
        a, rank = attrs(node), imp.rank(node.input[0])
        k = (rank or 0) - 2
        dilations = list(a.get("dilations", [1] * k))
        if k not in (1, 2) or (op == "avg_pool2d" and dilations != [1] * k) or \
                len(node.output) > 1 and node.output[1]:
            raise Unsupported("only 1-D and 2-D pooling without indices (dilation: max only)")
        kernel, strides = list(a["kernel_shape"]), list(a.get("strides", [1] * k))
        padding, x = _pads(imp, node, a, k), imp.ref(node.input[0])
        if k == 1:                    # a 1-D pool is the 2-D pool of the [N, C, 1, L] view
            x = imp.add(f"{hint(node)}_2d", "unsqueeze", [x], [], axis=2)
            kernel, strides, dilations = [1] + kernel, [1] + strides, [1] + dilations
            padding = padding if padding == "same" else [0, 0] + list(padding) \
                if isinstance(padding, list) else [0, padding]
        ceil = bool(a.get("ceil_mode", 0))
        padded = ceil or padding == "same" or any(np.atleast_1d(padding))
        exclude = op == "avg_pool2d" and padded and not a.get("count_include_pad", 0)
        # ONNX's strides default to 1, dlgraph's to the kernel
        y = imp.add(hint(node, imp) if k == 2 else f"{hint(node)}_pool", op, [x],
                    [origin(node)] if k == 2 else [], kernel=_one(kernel),
                    stride=None if strides == kernel else _one(strides),
                    padding=padding if padded and padding != 0 else None,
                    ceil_mode=ceil or None, count_include_pad=False if exclude else None,
                    dilation=_one(dilations) if set(dilations) != {1} else None)
        if k == 1:
            y = imp.add(hint(node, imp), "squeeze", [y], [origin(node)], axis=2)
        imp.bind(node.output[0], y)
    return rule


def global_avg_pool(imp, node):
    if imp.rank(node.input[0]) != 4:
        raise Unsupported("only 2-D global pooling")
    imp.bind(node.output[0], imp.add(hint(node, imp), "mean", [imp.ref(node.input[0])],
                                     [origin(node)], axes=[2, 3], keepdims=True))


def batch_norm(imp, node):
    a = attrs(node)
    consts = [imp.const(i) for i in node.input[1:5]]
    rank = imp.rank(node.input[0])
    if any(c is None for c in consts) or a.get("training_mode", 0) or len(node.output) > 1 \
            or rank is None:
        raise Unsupported("only inference-mode BatchNormalization with constant statistics")
    scale, bias, mean, var = consts
    keep = (1, scale.shape[0]) + (1,) * (rank - 2)
    params = {"weight": scale, "bias": bias, "running_mean": mean.reshape(keep),
              "running_var": var.reshape(keep)}
    emit_layer(imp, node, "batch_norm", [imp.ref(node.input[0])], params,
               **_tidy(dict(eps=f32(a.get("epsilon", 1e-5)),
                            momentum=f32(1 - a.get("momentum", 0.9))),
                       {"eps": 1e-5, "momentum": 0.1}))


def layer_norm(imp, node):
    a, rank = attrs(node), imp.rank(node.input[0])
    scale = imp.const(node.input[1])
    bias = imp.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if rank is None or scale is None or (len(node.input) > 2 and node.input[2] and bias is None):
        raise Unsupported("only LayerNormalization with constant scale and bias")
    dims = rank - nonneg_axis(a.get("axis", -1), rank)
    bias = np.zeros_like(scale) if bias is None else np.broadcast_to(bias, scale.shape)
    emit_layer(imp, node, "layer_norm", [imp.ref(node.input[0])],
               {"weight": scale, "bias": bias},
               **_tidy({"eps": f32(a.get("epsilon", 1e-5))}, {"eps": 1e-5}),
               dims=dims if dims != 1 else None)
    if any(node.output[1:]):
        _norm_statistics(imp, node, list(range(rank - dims, rank)), a.get("epsilon", 1e-5))


def _norm_statistics(imp, node, axes, eps):
    """LayerNormalization's Mean and InvStdDev outputs, as primitives beside the layer."""
    h, x = hint(node), imp.ref(node.input[0])
    mean = imp.add(f"{h}_mean", "mean", [x], [origin(node)], axes=axes, keepdims=True)
    d = imp.add(h, "sub", [x, mean], [])
    var = imp.add(h, "mean", [imp.add(h, "mul", [d, d], [])], [], axes=axes, keepdims=True)
    std = imp.add(h, "sqrt", [imp.add(h, "add", [var, imp.add(h, "const", [], [],
                                                             value=float(eps))], [])], [])
    inv = imp.add(f"{h}_inv_std", "div", [imp.add(h, "const", [], [], value=1.0), std],
                  [origin(node)])
    for name, ref in zip(node.output[1:3], (mean, inv), strict=False):
        if name:
            imp.bind(name, ref)


def softmax(op):
    def rule(imp, node):
        axis = attrs(node).get("axis", -1)
        imp.bind(node.output[0], imp.add(hint(node, imp), op, [imp.ref(node.input[0])],
                                         [origin(node)], axis=axis if axis != -1 else None))
    return rule


def gather(imp, node):
    axis = attrs(node).get("axis", 0)
    data, idx = imp.const(node.input[0]), imp.const(node.input[1])
    if data is not None and idx is None and data.ndim == 2 and axis == 0:
        emit_layer(imp, node, "embedding", [imp.ref(node.input[1])], {"weight": data},
                   num=data.shape[0], dim=data.shape[1])
        return
    if data is not None and idx is not None:
        imp.values[node.output[0]] = Value(const=np.take(data, idx, axis=axis))
        return
    if _dynamic(imp, node):
        return
    if idx is not None and idx.ndim == 0:
        imp.bind(node.output[0], imp.add(hint(node, imp), "take", [imp.ref(node.input[0])],
                                         [origin(node)], axis=axis, index=int(idx)))
        return
    raise Unsupported("only Gather of one constant index, or of rows of a constant table")


# -- recurrent -------------------------------------------------------------------------------
DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _check_recurrent(imp, node, a) -> int:
    kind = node.op_type
    acts = [text(x) for x in a.get("activations", [])]
    direction = text(a.get("direction", "forward"))
    dirs = {"forward": 1, "bidirectional": 2}.get(direction)
    ins = list(node.input) + [""] * 8
    problems = [
        (dirs is None, f"direction {direction} (dlgraph: forward or bidirectional)"),
        ("clip" in a, "clip"), (a.get("input_forget", 0), "input_forget"),
        (acts and dirs and acts != DEFAULT_ACTS[kind] * dirs, f"activations {acts}"),
        (ins[4], "sequence lengths"), (kind == "LSTM" and ins[7], "peepholes"),
        (kind == "GRU" and a.get("linear_before_reset", 0) != 1,
         "linear_before_reset=0 (dlgraph's GRU is PyTorch's: linear_before_reset=1)"),
        (kind == "LSTM" and ins[6] and not ins[5], "initial_c without initial_h")]
    bad = [why for cond, why in problems if cond]
    if bad:
        raise Unsupported("; ".join(bad))
    return dirs


def _recurrent_params(kind, node, imp, dirs) -> dict:
    w, r = imp.const(node.input[1]), imp.const(node.input[2])
    b = imp.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if w is None or r is None or (len(node.input) > 3 and node.input[3] and b is None):
        raise Unsupported("only constant weights")
    g = GATES[kind]
    b = np.zeros((dirs, 2 * r.shape[1]), np.float32) if b is None else b
    out = {}
    for d in range(dirs):
        sfx = "_l0" + ("_reverse" if d else "")
        out[f"weight_ih{sfx}"] = reorder(kind, w[d], to_onnx=False)
        out[f"weight_hh{sfx}"] = reorder(kind, r[d], to_onnx=False)
        half = b.shape[1] // 2
        out[f"bias_ih{sfx}"] = reorder(kind, b[d, :half], to_onnx=False)
        out[f"bias_hh{sfx}"] = reorder(kind, b[d, half:], to_onnx=False)
        if out[f"weight_ih{sfx}"].shape[0] != g * r.shape[2]:
            raise Unsupported(f"W has {w.shape[1]} rows, not {g} gates x {r.shape[2]} hidden")
    return out


def _batch_first(imp, x: str) -> str:
    """The spec ref of X [T, B, F] as [B, T, F] (reusing the source of a transpose)."""
    ref = imp.ref(x)
    nd = imp.nodes.get(ref)
    if nd is not None and nd["op"] == "transpose" and nd.get("axes") == [1, 0, 2]:
        return nd["in"]
    return imp.add(f"{ref}_batch_first", "transpose", [ref], [], axes=[1, 0, 2])


def _bind_state(imp, nid, part, name, dirs, hidden, batch):
    """Y_h/Y_c [dirs, B, H] of the layer's state `part` [B, dirs * H]."""
    t = imp.sole_consumer(name, ("Transpose",))
    if t is not None and list(attrs(t)["perm"]) == [1, 0, 2]:
        rs = imp.sole_consumer(t.output[0], ("Reshape", "Flatten"))
        if rs is not None and imp.shape(rs.output[0]) == (batch, dirs * hidden):
            imp.absorb(t)
            imp.absorb(rs)
            imp.bind(rs.output[0], f"{nid}.{part}")
            return
    r = imp.add(f"{nid}_{part}_dirs", "reshape", [f"{nid}.{part}"], [],
                shape=[batch, dirs, hidden])
    imp.bind(name, imp.add(f"{nid}_{part}_onnx", "transpose", [r], [], axes=[1, 0, 2]))


def _bind_seq(imp, nid, name, steps, dirs, hidden, batch):
    """Y [T, dirs, B, H] from the layer's `out` [B, T, dirs * H]."""
    t = imp.sole_consumer(name, ("Transpose",))
    if t is not None and list(attrs(t)["perm"]) == [2, 0, 1, 3]:
        rs = imp.sole_consumer(t.output[0], ("Reshape",))
        if rs is not None and imp.shape(rs.output[0]) == (batch, steps, dirs * hidden):
            imp.absorb(t)
            imp.absorb(rs)
            imp.bind(rs.output[0], f"{nid}.out")
            return
    sq = imp.sole_consumer(name, ("Squeeze",)) if dirs == 1 else None
    axes = imp.peek(sq.input[1]) if sq is not None and len(sq.input) > 1 else None
    if axes is not None and [int(v) for v in np.atleast_1d(axes)] == [1]:
        t = imp.sole_consumer(sq.output[0], ("Transpose",))
        if t is not None and list(attrs(t)["perm"]) == [1, 0, 2]:       # PyTorch's pattern
            imp.absorb(sq)
            imp.absorb(t)
            imp.bind(t.output[0], f"{nid}.out")
            return
    r = imp.add(f"{nid}_out_dirs", "reshape", [f"{nid}.out"], [],
                shape=[batch, steps, dirs, hidden])
    imp.bind(name, imp.add(f"{nid}_out_onnx", "transpose", [r], [], axes=[1, 2, 0, 3]))


def _bind_batch_major(imp, nid, outs, steps, dirs, hidden, batch):
    """layout=1: Y [B, T, dirs, H] and Y_h/Y_c [B, dirs, H] are reshapes of out, h, c."""
    for part, name, shape in (("out", outs[0], [batch, steps, dirs, hidden]),
                              ("h", outs[1], [batch, dirs, hidden]),
                              ("c", outs[2], [batch, dirs, hidden])):
        if name:
            imp.bind(name, imp.add(f"{nid}_{part}_onnx", "reshape", [f"{nid}.{part}"], [],
                                   shape=shape))


def recurrent(op):
    def rule(imp, node):
        a = attrs(node)
        dirs = _check_recurrent(imp, node, a)
        kind = op
        params = _recurrent_params(kind, node, imp, dirs)
        layout = a.get("layout", 0)                      # 1: batch-major X, Y and states
        shape = imp.shape(node.input[0]) or (None, None, None)
        steps, batch = (shape[1], shape[0]) if layout else (shape[0], shape[1])
        if not isinstance(steps, int) or batch is None:
            raise Unsupported("the number of time steps must be fixed")
        hidden = a["hidden_size"]
        ins = [imp.ref(node.input[0]) if layout else _batch_first(imp, node.input[0])]
        states = [i for i in node.input[5:7] if i and not imp.values[i].zeros]
        if len(states) < len([i for i in node.input[5:7] if i]) and states:
            raise Unsupported("one initial state is zeros, the other is not")
        ins += [imp.add(f"{imp.ref(i)}_dirs_first", "transpose", [imp.ref(i)], [],
                        axes=[1, 0, 2]) if layout else imp.ref(i) for i in states]
        nid = imp.add(hint(node, imp), kind, ins, [origin(node)], hidden=hidden,
                      bidirectional=True if dirs == 2 else None)
        for k, v in params.items():
            imp.weights[f"{nid}.{k}"] = np.ascontiguousarray(v, np.float32)
        outs = list(node.output) + [""] * 3
        if layout:
            return _bind_batch_major(imp, nid, outs, steps, dirs, hidden, batch)
        if outs[0]:
            _bind_seq(imp, nid, outs[0], steps, dirs, hidden, batch)
        for part, name in (("h", outs[1]), ("c", outs[2])):
            if name:
                _bind_state(imp, nid, part, name, dirs, hidden, batch)
    return rule


# -- shapes and movement ----------------------------------------------------------------------
def fold(imp, node, fn) -> bool:
    """Evaluate a node at import time when all its inputs are constants."""
    cs = [imp.const(i) if i else None for i in node.input]
    if any(c is None for c, i in zip(cs, node.input, strict=True) if i):
        return False
    _check_made(node, cs)
    imp.values[node.output[0]] = Value(const=np.asarray(fn(*cs)))
    return True


def _check_made(node, cs) -> None:
    """Refuse, before numpy allocates it, a constant that ops making shapes would make
    larger than memory (ConstantOfShape, Expand and Tile of constants)."""
    from dlgraph.engine.errors import DataError
    from dlgraph.engine.io.onnx.import_checks import memory_bytes
    dims = {"ConstantOfShape": lambda: [int(d) for d in np.atleast_1d(cs[0])],
            "Expand": lambda: [max(int(d), 1) for d in np.atleast_1d(cs[1])] + [cs[0].size],
            "Tile": lambda: [int(d) for d in np.atleast_1d(cs[1])] + [cs[0].size]}.get(
                node.op_type)
    n = 1
    for d in dims() if dims else []:
        n *= max(d, 0)
    if 8 * n > memory_bytes():
        raise DataError(f"{node.op_type} '{node.output[0]}' would make {n:,} values, more "
                        "than this machine's memory holds",
                        help="the model's constants are wrong or too large for this "
                             "machine; nothing was written")


ZERO_KEEPING = ("Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Expand", "Cast")


def _dynamic(imp, node) -> bool:
    """Shape arithmetic at run time: its result is only read through inferred shapes."""
    if any(imp.values[i].dynamic or imp.values[i].shape_of for i in node.input if i):
        # a part of zeros is zeros (PyTorch slices its zero initial states per layer)
        zeros = imp.values[node.input[0]].zeros and node.op_type in ZERO_KEEPING
        for o in node.output:
            imp.values[o] = Value(dynamic=True, zeros=zeros)
        dims = _dims_of(imp, node)
        if dims is not None and not zeros and all(isinstance(d, int | np.integer) for d in dims):
            # the named dims cancelled out (a slice of a shape, say): a constant after all
            rank = imp.rank(node.output[0])
            idx = imp.const(node.input[1]) if node.op_type == "Gather" else None
            rank = 0 if rank is None and idx is not None and idx.ndim == 0 else rank
            c = np.array(dims, np.int64)
            imp.values[node.output[0]] = Value(const=c.reshape(()) if rank == 0 else c)
        else:
            imp.values[node.output[0]].dims = dims
        return True
    return False


def value_dims(imp, name):
    """The dims an ONNX value holds (shape arithmetic): the ones followed so far, or its
    constant int vector; None if neither."""
    v = imp.values[name]
    return v.dims if v.dims is not None else (
        tuple(int(d) for d in np.atleast_1d(v.const)) if v.const is not None
        and v.const.ndim <= 1 and v.const.dtype.kind in "iu" else None)


def _dims_of(imp, node) -> tuple | None:
    """The dims a piece of shape arithmetic yields, when they can be followed: Concat,
    Unsqueeze and Squeeze of dims, Gather of one of them, Cast."""
    ins = [value_dims(imp, i) for i in node.input if i]
    if any(d is None for d in ins[:1]):
        return None
    if node.op_type == "Concat" and all(d is not None for d in ins):
        return tuple(d for part in ins for d in part)
    if node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return ins[0]
    if node.op_type in DIM_ARITHMETIC and len(ins) == 2 and None not in ins:
        return _dim_arithmetic(node.op_type, *ins)
    if node.op_type in ("Equal", "Where") and None not in ins and len({len(d) for d in ins}) == 1:
        # PyTorch's expand(batch, -1, -1): Where(Equal(dims, -1), 1, dims); a named dim is
        # never -1, so it compares unequal to every number
        if node.op_type == "Equal":
            return tuple(int(x == y) for x, y in zip(*ins, strict=True))
        return tuple(x if c else y for c, x, y in zip(*ins, strict=True))
    if node.op_type == "Slice":
        cs = [imp.const(i) if i else None for i in node.input[1:]]
        if all(c is not None for c in cs) and all(int(a) in (0, -1) for a in
                                                  (cs[2] if len(cs) > 2 else [0])):
            step = int(cs[3][0]) if len(cs) > 3 else 1
            return ins[0][slice(int(cs[0][0]), min(int(cs[1][0]), BIG), step)]
        return None
    idx = imp.const(node.input[1]) if node.op_type == "Gather" else None
    if idx is not None and idx.ndim == 0 and -len(ins[0]) <= int(idx) < len(ins[0]):
        return (ins[0][int(idx)],)
    if idx is not None and idx.ndim == 1 and all(-len(ins[0]) <= int(i) < len(ins[0])
                                                 for i in idx):
        return tuple(ins[0][int(i)] for i in idx)
    return None


DIM_ARITHMETIC = ("Mul", "Div", "Add", "Sub")


def _dim_arithmetic(op, a: tuple, b: tuple) -> tuple | None:
    """Shape arithmetic on dims (batch * 4, 16 / 4), broadcasting a single dim."""
    from dlgraph.engine.io.onnx.views import ddiv, dmul
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    out = []
    for x, y in zip(a, b, strict=True):
        ints = isinstance(x, int | np.integer) and isinstance(y, int | np.integer)
        if op == "Mul":
            r = dmul(x, y)
        elif op == "Div":
            r = int(x) // int(y) if ints and y else ddiv(x, y)
        elif ints:
            r = int(x) + int(y) if op == "Add" else int(x) - int(y)
        else:
            r = x if y == 0 else None
        if r is None:
            return None
        out.append(r)
    return tuple(out)


def shape_op(imp, node):
    a = attrs(node)
    s = imp.shape(node.input[0])
    start, end = a.get("start", 0), a.get("end", None)
    if s is not None and all(isinstance(d, int) for d in s[start:end]):
        imp.values[node.output[0]] = Value(const=np.array(s[start:end], np.int64))
    else:
        dims = tuple(s[start:end]) if s is not None and None not in s else None
        imp.values[node.output[0]] = Value(shape_of=node.input[0] if start == 0 and end is None
                                           else None, dynamic=True, dims=dims)


def _target(imp, node, shape):
    """The reshape target in dlgraph's terms: the inferred output shape where known."""
    out = imp.shape(node.output[0])
    if out is not None and None not in out:
        return list(out)
    if shape is None:
        raise Unsupported("a shape computed at run time that shape inference cannot resolve")
    ins = need_shape(imp, node.input[0])
    dims = [ins[i] if d == 0 else d if isinstance(d, str) else int(d)
            for i, d in enumerate(shape)]
    if sum(1 for d in dims if isinstance(d, str)) != sum(1 for d in ins if isinstance(d, str)):
        raise Unsupported("a reshape that merges named dims")
    return dims


def reshape(imp, node):
    if fold(imp, node, lambda x, s: x.reshape([x.shape[i] if d == 0 else d
                                                for i, d in enumerate(s)])):
        return
    if imp.values[node.input[0]].dynamic:         # a shape vector reshaped (ViT's class token)
        _dynamic(imp, node)
        return
    v = imp.values[node.input[1]]
    if v.shape_of and imp.shape(node.output[0]) is None:
        imp.bind(node.output[0], imp.add(hint(node, imp), "reshape_like",
                                         [imp.ref(node.input[0]), imp.ref(v.shape_of)],
                                         [origin(node)]))
        return
    shape = _target(imp, node, value_dims(imp, node.input[1]))
    imp.bind(node.output[0], imp.add(hint(node, imp), "reshape", [imp.ref(node.input[0])],
                                     [origin(node)], shape=shape))


def flatten(imp, node):
    axis = attrs(node).get("axis", 1)
    if fold(imp, node, lambda x: x.reshape(int(np.prod(x.shape[:axis])), -1)):
        return
    if axis == 1 and (imp.rank(node.input[0]) or 0) >= 2:     # dlgraph's flatten keeps axis 0
        imp.bind(node.output[0], imp.add(hint(node, imp), "flatten", [imp.ref(node.input[0])],
                                         [origin(node)]))
        return
    imp.bind(node.output[0], imp.add(hint(node, imp), "reshape", [imp.ref(node.input[0])],
                                     [origin(node)], shape=_target(imp, node, None)))


def transpose(imp, node):
    perm = attrs(node).get("perm")
    if fold(imp, node, lambda x: np.transpose(x, perm)):
        return
    rank = imp.rank(node.input[0])
    perm = list(perm) if perm is not None else list(reversed(range(rank)))
    if perm == list(range(len(perm))):
        imp.values[node.output[0]] = imp.values[node.input[0]]
        return
    imp.bind(node.output[0], imp.add(hint(node, imp), "transpose", [imp.ref(node.input[0])],
                                     [origin(node)], axes=perm))


def axes_input(imp, node, k=1):
    """The axes of a node: its `axes` attribute, or its constant input ``k``; None if
    neither is given."""
    a = attrs(node)
    if "axes" in a:
        return list(a["axes"])
    if len(node.input) > k and node.input[k]:
        c = imp.const(node.input[k])
        if c is None:
            raise Unsupported("axes computed at run time")
        return [int(v) for v in np.atleast_1d(c)]
    return None


def _chain(imp, node, op, axes, **more):
    ref = imp.ref(node.input[0])
    for i, ax in enumerate(axes):
        last = i == len(axes) - 1
        ref = imp.add(hint(node, imp) if last else f"{hint(node)}_{i}", op, [ref],
                      [origin(node)] if last else [], axis=ax, **more)
    imp.bind(node.output[0], ref)


def squeeze(imp, node):
    axes = axes_input(imp, node)
    if fold(imp, node, lambda x, *_: np.squeeze(x, tuple(axes) if axes else None)) or \
            _dynamic(imp, node):
        return
    s = need_shape(imp, node.input[0]) if axes is None else None
    rank = imp.rank(node.input[0])
    axes = [i for i, d in enumerate(s) if d == 1] if axes is None else axes
    _chain(imp, node, "squeeze", sorted((nonneg_axis(a, rank) for a in axes), reverse=True))


def unsqueeze(imp, node):
    axes = axes_input(imp, node)
    if fold(imp, node, lambda x, *_: np.expand_dims(x, tuple(axes))) or _dynamic(imp, node):
        return
    rank = imp.rank(node.input[0]) + len(axes)
    _chain(imp, node, "unsqueeze", sorted(nonneg_axis(a, rank) for a in axes))


def _slice_np(x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    idx = [slice(None)] * x.ndim
    for k, ax in enumerate(axes):
        idx[ax] = slice(int(starts[k]), int(ends[k]), 1 if steps is None else int(steps[k]))
    return x[tuple(idx)]


def slice_op(imp, node):
    if fold(imp, node, _slice_np) or _dynamic(imp, node):
        return
    cs = [imp.const(i) if i else None for i in list(node.input[1:]) + [""] * 4][:4]
    starts, ends, axes, steps = cs
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3]
                                          and axes is None):
        raise Unsupported("slice bounds computed at run time")
    if steps is not None and any(int(s) != 1 for s in steps):
        raise Unsupported("slices with a step other than 1")
    rank = imp.rank(node.input[0])
    axes = list(range(len(starts))) if axes is None else [nonneg_axis(int(a), rank) for a in axes]
    ref = imp.ref(node.input[0])
    for k, ax in enumerate(axes):
        stop = int(ends[k])
        ref = imp.add(hint(node, imp) if k == len(axes) - 1 else f"{hint(node)}_{k}", "slice",
                      [ref], [origin(node)] if k == len(axes) - 1 else [], axis=ax,
                      start=int(starts[k]), stop=None if stop >= BIG else stop)
    imp.bind(node.output[0], ref)


def concat(imp, node):
    axis = attrs(node)["axis"]
    if fold(imp, node, lambda *xs: np.concatenate(xs, axis=axis)) or _dynamic(imp, node):
        return
    imp.bind(node.output[0], imp.add(hint(node, imp), "concat",
                                     [imp.ref(i) for i in node.input], [origin(node)],
                                     axis=axis))


def pad(imp, node):
    """Constant padding of the given axes (all by default); a negative pad crops."""
    a = attrs(node)
    pads = imp.const(node.input[1]) if len(node.input) > 1 and node.input[1] else \
        (np.array(a["pads"]) if "pads" in a else None)
    value = imp.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if text(a.get("mode", "constant")) != "constant" or pads is None or \
            (len(node.input) > 2 and node.input[2] and value is None):
        raise Unsupported("only constant padding by constants")
    n, rank = len(pads) // 2, imp.rank(node.input[0])
    axes = [nonneg_axis(ax, rank) for ax in axes_input(imp, node, 3) or range(n)]
    ref, h = imp.ref(node.input[0]), hint(node)
    steps = [(ax, int(pads[k]), int(pads[n + k])) for k, ax in enumerate(axes)
             if pads[k] or pads[n + k]]
    for k, (ax, before, after) in enumerate(steps):
        last, grow = k == len(steps) - 1, max(before, 0) or max(after, 0)
        if before < 0 or after < 0:
            end = last and not grow
            ref = imp.add(hint(node, imp) if end else f"{h}_crop{ax}", "slice", [ref],
                          [origin(node)] if end else [], axis=ax, start=max(-before, 0),
                          stop=need_shape(imp, node.input[0])[ax] + min(after, 0))
        if grow:
            ref = imp.add(hint(node, imp) if last else f"{h}_{k}", "pad", [ref],
                          [origin(node)] if last else [], axis=ax, before=max(before, 0),
                          after=max(after, 0), value=float(value) if value is not None
                          and float(value) else None)
    if not steps:
        imp.values[node.output[0]] = imp.values[node.input[0]]
        return
    imp.bind(node.output[0], ref)


def _batch_source(imp, shape) -> str | None:
    """A graph input whose first dim is the (named) first dim of `shape`."""
    if not shape or not isinstance(shape[0], str) or None in shape[1:]:
        return None
    return next((vi.name for vi in imp.model.graph.input
                 if (imp.shape(vi.name) or (None,))[0] == shape[0]), None)


def _broadcast(a: tuple, b: list) -> tuple | None:
    """numpy's broadcast of two shapes whose dims may be names ('batch' against 1)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = tuple(y if x == 1 else x if y == 1 or x == y else None
                for x, y in zip(a, b, strict=True))
    return None if None in out else out


def expand(imp, node):
    v, x = imp.values[node.input[1]], imp.const(node.input[0])
    if v.shape_of:
        imp.bind(node.output[0], imp.add(hint(node, imp), "broadcast_like",
                                         [imp.ref(node.input[0]), imp.ref(v.shape_of)],
                                         [origin(node)]))
        return
    if fold(imp, node, lambda x, s: x * np.ones(s, x.dtype)):
        return
    shape, target = imp.shape(node.output[0]), value_dims(imp, node.input[1])
    if (shape is None or None in shape) and target is not None:
        have = imp.shape(node.input[0]) or (x.shape if x is not None else None)
        shape = None if have is None else _broadcast(have, list(target))
    src = _batch_source(imp, shape)
    if src is None:
        raise Unsupported("Expand to a shape computed at run time")
    imp.shapes[node.output[0]] = shape
    if imp.sole_consumer(node.output[0], ("RandomNormalLike", "RandomUniformLike")):
        imp.values[node.output[0]] = Value(dynamic=True)     # only its shape is read
        return
    # [batch, ...] of an input's batch: zeros of that shape plus the value, broadcast
    # (a class token, a padding mask over heads)
    ref = imp.add(hint(node, imp), "zeros", [imp.ref(src)], [origin(node)],
                  shape=list(shape[1:]))
    if x is None or x.size != 1 or float(x.reshape(())):
        ref = imp.add(hint(node, imp), "add", [ref, imp.ref(node.input[0])], [])
    imp.bind(node.output[0], ref)


def constant_of_shape(imp, node):
    a = attrs(node)
    from onnx import numpy_helper
    value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    if fold(imp, node, lambda s: np.full([int(d) for d in s], value.reshape(-1)[0],
                                          value.dtype)):
        return
    if float(value.reshape(-1)[0]) != 0:
        raise Unsupported("a filled tensor of a shape computed at run time")
    imp.values[node.output[0]] = Value(dynamic=True, zeros=True)


def constant(imp, node):
    from onnx import helper, numpy_helper
    a = node.attribute[0]
    if a.name != "value":
        value = np.asarray(helper.get_attribute_value(a))
    else:
        value = numpy_helper.to_array(a.t)
    imp.values[node.output[0]] = Value(const=value)


def identity(imp, node):
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = imp.const(node.input[2])
        if mode is None or bool(mode):          # dlgraph's dropout: of the spec, in training
            raise Unsupported("Dropout in training mode (an inference model drops nothing)")
    v = imp.values[node.input[0]]
    if node.output[0] in imp.outputs and v.ref in imp.nodes and v.ref not in imp.outputs \
            and node.input[0] not in imp.outputs:
        imp.rename(v.ref, node.output[0])            # the node making an output is named so
    imp.values[node.output[0]] = imp.values[node.input[0]]
    for extra in node.output[1:]:      # Dropout's mask
        if extra and (extra in imp.consumers or extra in imp.outputs):
            raise Unsupported("Dropout's mask output is used")


CASTS = {1: "float32", 11: "float32", 6: "int32", 7: "int32", 9: "bool"}


def cast(imp, node):
    to = attrs(node)["to"]
    if to not in CASTS:
        raise Unsupported(f"cast to ONNX type {to}")
    np_type = {"float32": np.float32, "int32": np.int64 if to == 7 else np.int32,
               "bool": np.bool_}[CASTS[to]]
    if fold(imp, node, lambda x: x.astype(np_type)) or _dynamic(imp, node):
        return
    imp.bind(node.output[0], imp.add(hint(node, imp), "cast", [imp.ref(node.input[0])],
                                     [origin(node)], dtype=CASTS[to]))


def where(imp, node):
    if fold(imp, node, np.where):
        return
    if any(imp.values[i].dynamic and not imp.values[i].zeros for i in node.input):
        _dynamic(imp, node)                   # shape arithmetic (ViT's expand(batch, -1, -1))
        return
    out, ins = imp.shape(node.output[0]), []
    for i in node.input:
        v, others = imp.values[i], [j for j in node.input if j != i]
        if v.zeros and v.ref is None and any(imp.shape(j) == out for j in others):
            # zeros of a run-time shape (PyTorch's mask.new_zeros): a scalar 0 broadcasts
            # to the same result
            ins.append(imp.add(f"{hint(node)}_zero", "const", [], [], value=0.0))
        else:
            ins.append(imp.ref(i))
    imp.bind(node.output[0], imp.add(hint(node, imp), "where", ins, [origin(node)]))


def reduce(op):
    def rule(imp, node):
        a = attrs(node)
        axes = axes_input(imp, node)
        if not axes and a.get("noop_with_empty_axes", 0):
            imp.values[node.output[0]] = imp.values[node.input[0]]
            return
        keep = bool(a.get("keepdims", 1))
        imp.bind(node.output[0], imp.add(hint(node, imp), op, [imp.ref(node.input[0])],
                                         [origin(node)], axes=axes or None, keepdims=keep
                                         or None))
    return rule


def argmax(imp, node):
    a = attrs(node)
    if a.get("select_last_index", 0):
        raise Unsupported("select_last_index")
    imp.bind(node.output[0], imp.add(hint(node, imp), "argmax", [imp.ref(node.input[0])],
                                     [origin(node)], axis=a.get("axis", 0),
                                     keepdims=bool(a.get("keepdims", 1))))


def random_like(kind):
    def rule(imp, node):
        a = attrs(node)
        shape = imp.shape(node.output[0])
        src = _batch_source(imp, shape)
        ok = {"mean": 0.0, "scale": 1.0} if kind == "normal" else {"low": 0.0, "high": 1.0}
        if any(abs(a.get(k, v) - v) > 1e-9 for k, v in ok.items()) or src is None:
            raise Unsupported("only standard random values of shape [batch, ...], the batch "
                              "of an input")
        imp.bind(node.output[0], imp.add(hint(node, imp), "noise", [imp.ref(src)],
                                         [origin(node)], shape=list(shape[1:]),
                                         kind=None if kind == "normal" else "uniform"))
    return rule


OPERATOR_RULES = {
    **{t: binary(op) for t, op in BINARY.items()},
    **{t: unary(op) for t, op in UNARY.items() if t not in ("Relu", "Sigmoid", "Tanh")},
    **{t: act_rule(t.lower()) for t in ACTS},
    "Gemm": gemm, "MatMul": matmul, "Conv": conv, "ConvTranspose": conv_transpose,
    "MaxPool": pool("max_pool2d"), "AveragePool": pool("avg_pool2d"),
    "GlobalAveragePool": global_avg_pool, "BatchNormalization": batch_norm,
    "LayerNormalization": layer_norm, "Softmax": softmax("softmax"),
    "LogSoftmax": softmax("log_softmax"), "Gather": gather,
    "LSTM": recurrent("lstm"), "GRU": recurrent("gru"), "RNN": recurrent("rnn"),
    "Shape": shape_op, "Reshape": reshape, "Flatten": flatten, "Transpose": transpose,
    "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Slice": slice_op, "Concat": concat,
    "Pad": pad, "Expand": expand, "Constant": constant, "ConstantOfShape": constant_of_shape,
    "Identity": identity,
    "Dropout": identity, "Cast": cast, "Where": where,
    "ReduceSum": reduce("sum"), "ReduceMean": reduce("mean"), "ReduceMax": reduce("max"),
    "ArgMax": argmax, "Mod": shape_only, "RandomNormalLike": random_like("normal"),
    "RandomUniformLike": random_like("uniform"),
}
"""ONNX operator type -> its import rule, one operator at a time (materializing its inputs
through :meth:`Importer.ref`). The other tables (:data:`.import_views.VIEW_RULES`,
:data:`.import_fold.FOLD_RULES`, :data:`.import_scan.SCAN_RULES`) take some operators over
and hand the cases they do not handle back to these rules; :data:`.importer.RULES` is the
importer's table, assembled from all four."""
