"""Import rules that follow reshapes and transposes as views (see :mod:`.views`).

Each rule here handles an operator on a :class:`~.views.View` without making the value
itself, and hands every other case to the ordinary rule of :mod:`.import_ops` (which
materializes its inputs through :meth:`Importer.ref`). Together with :func:`infer_missing`,
which fills in the shapes ONNX's own inference leaves unknown after such a reshape, this
lets PyTorch's attention (heads folded into the batch) import as plain spec nodes.
"""

from __future__ import annotations

from dlgraph.engine.io.onnx.import_base import Importer, Unsupported, Value, hint, origin
from dlgraph.engine.io.onnx.import_ops import OPERATOR_RULES as BASE
from dlgraph.engine.io.onnx.import_ops import attrs, axes_input, nonneg_axis, value_dims
from dlgraph.engine.io.onnx.views import (
    View,
    bind_view,
    ddiv,
    dprod,
    last_plain,
    regroup,
    renumber,
    view_of,
)


def _lazy(imp: Importer, name: str) -> View | None:
    """The view of `name` if it is one not made yet."""
    v = imp.values.get(name)
    return v.view if v is not None and v.view is not None and v.ref is None else None


def _eager(imp: Importer, node) -> bool:
    """Graph outputs are made by the ordinary rules (their nodes carry the output names)."""
    return any(o in imp.outputs for o in node.output)


def _run_on(imp: Importer, node, subs: dict[str, tuple[Value, tuple]]) -> list[str]:
    """Run the ordinary rule of `node` with some inputs standing for other values;
    returns the names the rule bound."""
    saved = {n: (imp.values.get(n), imp.shapes.get(n)) for n in subs}
    before = set(imp.values)
    for n, (v, s) in subs.items():
        imp.values[n], imp.shapes[n] = v, s
    try:
        BASE[node.op_type](imp, node)
    finally:
        for n, (v, s) in saved.items():
            imp.values[n], imp.shapes[n] = v, s
    return [n for n in imp.values if n not in before]


def transpose(imp, node):
    view = view_of(imp, node.input[0])
    if view is None or imp.const(node.input[0]) is not None:
        return BASE["Transpose"](imp, node)
    perm = attrs(node).get("perm")
    perm = list(perm) if perm is not None else list(reversed(range(len(view.groups))))
    bind_view(imp, node, View(view.ref, view.dshape, [list(view.groups[p]) for p in perm]))


def _reshape_target(imp, node, view: View) -> tuple | None:
    """The reshape's target dims (0: copy, -1: the rest resolved), symbolic, or None."""
    dims = value_dims(imp, node.input[1])
    if dims is None:
        out = imp.shape(node.output[0])
        return tuple(out) if out is not None and None not in out else None
    have = view.shape
    dims = [have[i] if d == 0 and not attrs(node).get("allowzero", 0) else d
            for i, d in enumerate(dims)]
    if -1 in dims:
        rest = ddiv(dprod(have), dprod(d for d in dims if d != -1))
        if rest is None:
            return None
        dims[dims.index(-1)] = rest
    return tuple(dims)


def reshape(imp, node):
    view = view_of(imp, node.input[0])
    target = None if view is None else _reshape_target(imp, node, view)
    if target is None or imp.const(node.input[0]) is not None or 0 in target or \
            0 in view.shape:
        return BASE["Reshape"](imp, node)
    try:
        regrouped = regroup(imp, node, view, target)
    except Unsupported:        # not a regrouping of axes: an ordinary reshape, if it can be
        return BASE["Reshape"](imp, node)
    bind_view(imp, node, regrouped)


def unsqueeze(imp, node):
    view = view_of(imp, node.input[0])
    if view is None or imp.const(node.input[0]) is not None or _eager(imp, node):
        return BASE["Unsqueeze"](imp, node)
    axes = axes_input(imp, node)
    rank = len(view.groups) + len(axes)
    groups = [list(g) for g in view.groups]
    for a in sorted(nonneg_axis(a, rank) for a in axes):
        groups.insert(a, [])
    bind_view(imp, node, View(view.ref, view.dshape, groups))


def squeeze(imp, node):
    view = view_of(imp, node.input[0])
    if view is None or imp.const(node.input[0]) is not None or _eager(imp, node) \
            or len(view.groups) < 2:
        return BASE["Squeeze"](imp, node)
    axes = axes_input(imp, node)
    rank = len(view.groups)
    axes = [i for i, d in enumerate(view.shape) if d == 1] if axes is None else \
        [nonneg_axis(a, rank) for a in axes]
    groups = [list(g) for g in view.groups]
    ref, dshape = view.ref, view.dshape
    for a in sorted(axes, reverse=True):
        for d in sorted(groups.pop(a), reverse=True):      # size-1 axes of D: squeezed
            ref = imp.add(hint(node, imp), "squeeze", [ref], [origin(node)], axis=d)
            groups, dshape = renumber(groups, d), dshape[:d] + dshape[d + 1:]
    bind_view(imp, node, View(ref, dshape, groups))


def identity(imp, node):
    """A graph output made by Identity (or Dropout) of a view: made under its name."""
    view = _lazy(imp, node.input[0])
    if view is not None and node.output[0] in imp.outputs:
        view.hint = "=" + node.output[0]
        imp.ref(node.input[0])
    return BASE[node.op_type](imp, node)


def gather(imp, node):
    view, idx = _lazy(imp, node.input[0]), imp.const(node.input[1])
    axis = attrs(node).get("axis", 0)
    if view is None or idx is None or idx.ndim != 0 or _eager(imp, node):
        return BASE["Gather"](imp, node)
    axis = nonneg_axis(axis, len(view.groups))
    g = view.groups[axis]
    if len(g) != 1:
        return BASE["Gather"](imp, node)
    ref = imp.add(hint(node, imp), "take", [view.ref], [origin(node)], axis=g[0],
                  index=int(idx))
    groups = renumber(view.groups[:axis] + view.groups[axis + 1:], g[0])
    bind_view(imp, node, View(ref, view.dshape[:g[0]] + view.dshape[g[0] + 1:], groups))


def _scalar(imp, name: str, rank: int) -> tuple[Value, tuple] | None:
    """A one-element float constant as a 0-d one, when that changes no shape."""
    c = imp.const(name)
    if c is None or c.size != 1 or c.ndim > rank or c.dtype.kind != "f":
        return None
    return Value(const=c.reshape(())), ()


def elementwise(imp, node):
    """Unary ops, and binary ones with a scalar or a twin view, run on D itself."""
    views = [_lazy(imp, i) for i in node.input]
    lazy = [v for v in views if v is not None]
    if not lazy or _eager(imp, node) or len(node.input) > 2:
        return BASE[node.op_type](imp, node)
    view = lazy[0]
    subs = {}
    for name, v in zip(node.input, views, strict=True):
        if v is not None and (v.dshape, v.groups) != (view.dshape, view.groups):
            return BASE[node.op_type](imp, node)
        sub = (Value(ref=v.ref), v.dshape) if v is not None else \
            _scalar(imp, name, len(view.groups))
        if sub is None:
            return BASE[node.op_type](imp, node)
        subs[name] = sub
    _run_on(imp, node, subs)
    out = imp.values[node.output[0]]
    bind_view(imp, node, View(out.ref, view.dshape, view.groups))


def softmax(imp, node):
    view = _lazy(imp, node.input[0])
    axis = attrs(node).get("axis", -1)
    g = None if view is None else view.groups[nonneg_axis(axis, len(view.groups))]
    if g is None or len(g) != 1 or _eager(imp, node):
        return BASE[node.op_type](imp, node)
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    ref = imp.add(hint(node, imp), op, [view.ref], [origin(node)],
                  axis=g[0] if g[0] != len(view.dshape) - 1 else None)
    bind_view(imp, node, View(ref, view.dshape, view.groups))


def _linear_ok(imp, node) -> bool:
    w = imp.const(node.input[1])
    if node.op_type == "MatMul":
        return w is not None and w.ndim == 2
    a = attrs(node)
    c = imp.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return (w is not None and not a.get("transA", 0) and a.get("alpha", 1.0) == 1.0
            and a.get("beta", 1.0) == 1.0 and (len(node.input) < 3 or not node.input[2]
                                               or (c is not None and c.ndim == 1)))


def linear(imp, node):
    """MatMul / Gemm with constant weights over a view: a linear over D's last axis."""
    view = _lazy(imp, node.input[0])
    if view is None or not view.groups or not view.groups[-1] or not _linear_ok(imp, node) \
            or _eager(imp, node):
        return BASE[node.op_type](imp, node)
    view = last_plain(imp, view)
    bound = _run_on(imp, node, {node.input[0]: (Value(ref=view.ref), view.dshape)})
    for name in bound:
        ref = imp.values[name].ref
        out = imp.nodes[ref]["out"] if ref in imp.nodes and "out" in imp.nodes[ref] else None
        if out is None or name in imp.outputs:
            continue
        imp.values[name] = Value()
        bind_view(imp, node, View(ref, view.dshape[:-1] + (out,), view.groups), out=name)


VIEW_RULES = {
    "Transpose": transpose, "Reshape": reshape, "Unsqueeze": unsqueeze, "Squeeze": squeeze,
    "Gather": gather, "Softmax": softmax, "LogSoftmax": softmax, "MatMul": linear,
    "Gemm": linear, "Identity": identity, "Dropout": identity,
    **{t: elementwise for t in ("Add", "Sub", "Mul", "Div", "Neg", "Exp", "Sqrt", "Relu",
                                "Sigmoid", "Tanh", "Abs")},
}
"""ONNX operator type -> its view-following rule; what it does not follow it hands to the
operator's own rule in :data:`.import_ops.OPERATOR_RULES`."""


# -- shapes ONNX's inference could not follow -------------------------------------------------
SAME = {"Relu", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "LayerNormalization", "Identity",
        "Dropout", "Cast", "Neg", "Exp", "Sqrt", "Abs", "Erf", "Gelu", "Log"}


def _broadcast(shapes) -> tuple | None:
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(rank):
        ds = {s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0} - {1}
        if len(ds) > 1:
            return None
        out.append(ds.pop() if ds else 1)
    return tuple(out)


def _shape_or_const(imp, name) -> tuple | None:
    """An ONNX value's shape: inferred, or its constant's (initializers have no value_info)."""
    c = imp.const(name)
    return imp.shape(name) or (tuple(c.shape) if c is not None else None)


def _infer(imp, node) -> tuple | None:
    ins = [_shape_or_const(imp, i) if i else None for i in node.input]
    if not ins or ins[0] is None or None in ins[0]:
        return None
    t, a = node.op_type, attrs(node)
    if t in SAME:
        return ins[0]
    if any(s is None or None in s for s in ins):
        return None
    if t in ("Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"):
        return _broadcast(ins)
    if t == "Transpose":
        perm = a.get("perm") or list(reversed(range(len(ins[0]))))
        return tuple(ins[0][p] for p in perm)
    if t == "MatMul" and min(len(ins[0]), len(ins[1])) >= 2:
        batch = _broadcast([ins[0][:-2], ins[1][:-2]])
        return None if batch is None else batch + (ins[0][-2], ins[1][-1])
    if t == "Gemm":
        return (ins[0][1 if a.get("transA") else 0], ins[1][0 if a.get("transB") else 1])
    return _infer_movement(imp, node, ins[0], a)


def _infer_movement(imp, node, s: tuple, a: dict) -> tuple | None:
    t = node.op_type
    if t == "Concat":
        shapes = [imp.shape(i) for i in node.input]
        axis = nonneg_axis(a["axis"], len(s))
        if any(len(x) != len(s) or x[:axis] + x[axis + 1:] != s[:axis] + s[axis + 1:]
               or not isinstance(x[axis], int) for x in shapes):
            return None
        return s[:axis] + (sum(x[axis] for x in shapes),) + s[axis + 1:]
    if t == "Gather":
        idx = imp.const(node.input[1])
        axis = nonneg_axis(a.get("axis", 0), len(s))
        return None if idx is None else s[:axis] + tuple(idx.shape) + s[axis + 1:]
    axes = axes_input(imp, node) if t in ("Squeeze", "Unsqueeze") else None
    if t == "Unsqueeze" and axes is not None:
        out = list(s)
        for ax in sorted(nonneg_axis(x, len(s) + len(axes)) for x in axes):
            out.insert(ax, 1)
        return tuple(out)
    if t == "Squeeze":
        drop = {nonneg_axis(x, len(s)) for x in axes} if axes else {i for i, d in enumerate(s)
                                                            if d == 1}
        return tuple(d for i, d in enumerate(s) if i not in drop)
    return None


def infer_missing(imp: Importer, node) -> None:
    """Shapes of `node`'s outputs that ONNX's inference left open, from its inputs'."""
    s = imp.shape(node.output[0]) if node.output else ()
    if s is not None and None not in s:
        return
    got = _infer(imp, node)
    if got is not None:
        imp.shapes[node.output[0]] = tuple(got)
