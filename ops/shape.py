"""Movement ops: reshape, transpose, slicing, concatenation, broadcasting, windows."""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from pydantic import BeforeValidator, Field
from tinygrad import Tensor

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.types import TType, broadcast, dim_add, dim_sub, fmt, norm_axis
from dlgraph.ops import reference as R
from dlgraph.ops.common import axes_of, pair, resolve
from dlgraph.ops.examples import E, F, Int
from dlgraph.ops.registry import NO_GRAD, attrs, register

FAMILY = "shape"


def _axis(axis: int, rank: int) -> int:
    return axes_of([axis], rank)[0]


# -- reshape ----------------------------------------------------------------------------------
def _reshape_infer(a, x):
    target = list(a.shape)
    if target.count(-1) > 1:
        raise ShapeError("at most one -1 in a reshape", help="give every other dim")
    for d in target:
        if isinstance(d, str) and d not in x.shape:
            raise ShapeError(f"named dim '{d}' is not in the input shape {fmt(x.shape)}",
                             help="a reshape can keep named dims, not invent them")
        if isinstance(d, int) and d < 1 and d != -1:
            raise ShapeError(f"bad dim {d} in reshape", help="dims are positive, or -1")
    left = [d for d in x.shape]
    right = [d for d in target if d != -1]
    for d in [d for d in right if isinstance(d, str)]:
        if d not in left:
            raise ShapeError(f"named dim '{d}' appears more often in {fmt(target)} than in "
                             f"the input shape {fmt(x.shape)}",
                             help="a reshape keeps each named dim once")
        left.remove(d)
        right.remove(d)
    if any(isinstance(d, str) for d in left):
        raise ShapeError(f"cannot reshape {fmt(x.shape)} to {fmt(target)}: named dims "
                         f"{[d for d in left if isinstance(d, str)]} would be merged",
                         help="keep named dims as they are")
    n_in, n_out = math.prod(left), math.prod(right)
    if -1 in target:
        if n_in % n_out:
            raise ShapeError(f"cannot reshape {fmt(x.shape)} to {fmt(target)}",
                             help=f"{n_in} elements do not divide by {n_out}")
        target[target.index(-1)] = n_in // n_out
    elif n_in != n_out:
        raise ShapeError(f"cannot reshape {fmt(x.shape)} to {fmt(target)}: "
                         f"{n_in} elements vs {n_out}", help="the element counts must agree")
    return TType(tuple(target), x.dtype)


register("reshape", doc="view with another shape (-1: inferred; named dims kept)", family=FAMILY,
         inputs="x", attrs_model=attrs("reshape", shape=(list[int | str], Field(
             description="target shape; -1 once for 'the rest'; named dims such as batch"))),
         infer=_reshape_infer, forward=lambda c, a, x: x.reshape(resolve(c, a.shape)),
         vjp=lambda b, n, g: [b.emit("reshape_like", g, n.inputs[0])],
         reference=lambda a, xs, c: xs[0].reshape([c.dims[d] if isinstance(d, str) else d
                                                   for d in a.shape]),
         examples=[E([F((2, 3, 4))], {"shape": [6, 4]}),
                   E([F((2, 3, 4))], {"shape": [-1, 2]}, id="reshape_infer"),
                   E([F((2, 3, 4))], {"shape": [24]}, id="reshape_rank1"),
                   E([F(("batch", 2, 3))], {"shape": ["batch", 6]}, id="reshape_named",
                     dims={"batch": 3}),
                   E([F(("batch", 2, 3))], {"shape": ["batch", -1, 1]},
                     id="reshape_named_infer", dims={"batch": 3})],
         grad_examples=[E([F((2, 3, 4))], {"shape": [-1, 2]})])

register("reshape_like", doc="reshape x to the shape of ref", family=FAMILY, inputs="x, ref",
         infer=lambda a, x, r: TType(r.shape, x.dtype),
         forward=lambda c, a, x, r: x.reshape(r.shape),
         vjp=lambda b, n, g: [b.emit("reshape_like", g, n.inputs[0]), None],
         reference=lambda a, xs, c: xs[0].reshape(xs[1].shape),
         examples=[E([F((2, 6)), F((3, 4))])],
         grad_examples=[E([F((2, 6)), F((3, 4), diff=False)])])


def _flatten_infer(a, x):
    s, e = _axis(a.start, x.rank), _axis(a.end, x.rank)
    if s > e:
        raise ShapeError(f"flatten start (axis {s}) comes after its end (axis {e}) in "
                         f"{fmt(x.shape)}", help="start is the first axis merged, end the last")
    mid = x.shape[s:e + 1]
    if any(isinstance(d, str) for d in mid) and len(mid) > 1:
        raise ShapeError(f"cannot flatten named dims of {fmt(x.shape)}",
                         help="flatten the axes after the batch axis (start: 1)")
    return TType(x.shape[:s] + (math.prod(mid) if len(mid) > 1 or not mid else mid[0],)
                 + x.shape[e + 1:], x.dtype)


def _flatten_ref(a, xs, c):
    x = xs[0]
    s, e = a.start % x.ndim, a.end % x.ndim
    return x.reshape(x.shape[:s] + (-1,) + x.shape[e + 1:])


register("flatten", doc="merge axes start..end into one (default: all but the first)",
         family=FAMILY, inputs="x",
         attrs_model=attrs("flatten", start=(int, Field(1, description="first axis merged")),
                           end=(int, Field(-1, description="last axis merged"))),
         infer=_flatten_infer, forward=lambda c, a, x: x.flatten(a.start, a.end),
         vjp=lambda b, n, g: [b.emit("reshape_like", g, n.inputs[0])],
         reference=_flatten_ref,
         examples=[E([F((2, 3, 4))]),
                   E([F((2, 3, 4))], {"start": 0}, id="flatten_all"),
                   E([F((2, 3, 4, 5))], {"start": 1, "end": -2}, id="flatten_middle"),
                   E([F(("batch", 3, 4))], id="flatten_named", dims={"batch": 2})],
         grad_examples=[E([F((2, 3, 4))], {"start": 0})])


def _perm(a, rank):
    axes = list(reversed(range(rank))) if a.axes is None else [_axis(i, rank) for i in a.axes]
    if sorted(axes) != list(range(rank)):
        raise ShapeError(f"axes {a.axes} are not a permutation of {rank} axes",
                         help=f"list each of 0..{rank - 1} once")
    return axes


register("transpose", doc="permute axes (default: reverse them)", family=FAMILY, inputs="x",
         attrs_model=attrs("transpose", axes=(list[int] | None, Field(
             None, description="new order of the axes, e.g. [0, 2, 1]"))),
         infer=lambda a, x: TType(tuple(x.shape[i] for i in _perm(a, x.rank)), x.dtype),
         forward=lambda c, a, x: x.permute(_perm(a, x.ndim)),
         vjp=lambda b, n, g: [b.emit("transpose", g, axes=sorted(
             range(len(p := _perm(n.attrs, b.type(n.inputs[0]).rank))), key=p.__getitem__))],
         reference=lambda a, xs, c: np.transpose(xs[0], a.axes),
         examples=[E([F((2, 3, 4))]),
                   E([F((2, 3, 4))], {"axes": [0, 2, 1]}, id="transpose_axes"),
                   E([F((2, 3, 4))], {"axes": [-1, 0, 1]}, id="transpose_negative")],
         grad_examples=[E([F((2, 3, 4))], {"axes": [-1, 0, 1]})])


def _squeeze_infer(a, x):
    ax = _axis(a.axis, x.rank)
    if x.shape[ax] != 1:
        raise ShapeError(f"axis {a.axis} of {fmt(x.shape)} has size {x.shape[ax]}, not 1")
    return TType(x.shape[:ax] + x.shape[ax + 1:], x.dtype)


def _unsqueeze_infer(a, x):
    ax = norm_axis(a.axis, x.rank + 1)
    if ax is None:
        raise ShapeError(f"axis {a.axis} is out of range for rank {x.rank + 1}")
    return TType(x.shape[:ax] + (1,) + x.shape[ax:], x.dtype)


_ax = (int, Field(description="the axis"))
register("squeeze", doc="drop an axis of size 1", family=FAMILY, inputs="x",
         attrs_model=attrs("squeeze", axis=_ax), infer=_squeeze_infer,
         forward=lambda c, a, x: x.squeeze(a.axis),
         vjp=lambda b, n, g: [b.emit("reshape_like", g, n.inputs[0])],
         reference=lambda a, xs, c: np.squeeze(xs[0], a.axis),
         examples=[E([F((3, 1, 4))], {"axis": 1}),
                   E([F((3, 4, 1))], {"axis": -1}, id="squeeze_negative")],
         grad_examples=[E([F((3, 1, 4))], {"axis": -2})])
register("unsqueeze", doc="insert an axis of size 1", family=FAMILY, inputs="x",
         attrs_model=attrs("unsqueeze", axis=_ax), infer=_unsqueeze_infer,
         forward=lambda c, a, x: x.unsqueeze(a.axis),
         vjp=lambda b, n, g: [b.emit("reshape_like", g, n.inputs[0])],
         reference=lambda a, xs, c: np.expand_dims(xs[0], a.axis),
         examples=[E([F((3, 4))], {"axis": 0}),
                   E([F((3, 4))], {"axis": -1}, id="unsqueeze_last"),
                   E([F((3, 4))], {"axis": -2}, id="unsqueeze_negative")],
         grad_examples=[E([F((3, 4))], {"axis": -1})])


# -- slicing and concatenation -------------------------------------------------------------
def _slice_bounds(a, dim):
    """(start, stop) of a slice of a dim: ints for a size; for a named dim such as ``time``
    dims relative to it (``stop: -1`` is ``time-1``), so that the length stays known."""
    if isinstance(dim, str):
        start = a.start if a.start >= 0 else dim_add(dim, a.start)
        stop = dim if a.stop is None else a.stop if a.stop >= 0 else dim_add(dim, a.stop)
        size = dim_sub(stop, start)
        if size is None or (isinstance(size, int) and size <= 0):
            raise ShapeError(f"cannot slice the named dim '{dim}' as [{a.start}:{a.stop}]",
                             help="slice from a fixed start to the end or to a negative "
                                  "stop, or between two fixed indices")
        return start, stop
    start, stop, _ = slice(a.start, a.stop).indices(dim)
    if stop <= start:
        raise ShapeError(f"slice [{a.start}:{a.stop}] of a dim of size {dim} is empty")
    return start, stop


def _runtime_bounds(a, size):
    """The bounds of a slice of a dim of ``size`` (an int, or a symbolic sequence length)."""
    if isinstance(size, int):
        return slice(a.start, a.stop).indices(size)[:2]
    start = a.start if a.start >= 0 else size + a.start
    return start, size if a.stop is None else a.stop if a.stop >= 0 else size + a.stop


def _slice_infer(a, x):
    ax = _axis(a.axis, x.rank)
    s, e = _slice_bounds(a, x.shape[ax])
    return TType(x.shape[:ax] + (dim_sub(e, s),) + x.shape[ax + 1:], x.dtype)


def _slice_fwd(c, a, x):
    ax = a.axis % x.ndim
    s, e = _runtime_bounds(a, x.shape[ax])
    return x.shrink(tuple((s, e) if i == ax else None for i in range(x.ndim)))


def _slice_vjp(b, n, g):
    t = b.type(n.inputs[0])
    ax = _axis(n.attrs.axis, t.rank)
    if isinstance(t.shape[ax], str):
        return [b.emit("unslice", g, n.inputs[0], axis=ax, start=n.attrs.start,
                       stop=n.attrs.stop)]
    s, e = _slice_bounds(n.attrs, t.shape[ax])
    return [b.emit("pad", g, axis=ax, before=s, after=t.shape[ax] - e)]


def _slice_ref(a, xs, c):
    x = xs[0]
    idx = [slice(None)] * x.ndim
    idx[a.axis % x.ndim] = slice(a.start, a.stop)
    return x[tuple(idx)]


_bounds = dict(axis=_ax, start=(int, Field(0, description="first index; negative counts "
                                             "from the end")),
               stop=(int | None, Field(None, description="end (exclusive); negative counts "
                                                         "from the end, null is the end")))
register("slice", doc="x[start:stop] along one axis", family=FAMILY, inputs="x",
         attrs_model=attrs("slice", **_bounds), infer=_slice_infer, forward=_slice_fwd,
         vjp=_slice_vjp, reference=_slice_ref,
         examples=[E([F((3, 5))], {"axis": 1, "start": 1, "stop": 3}),
                   E([F((3, 5))], {"axis": -1, "start": -3}, id="slice_negative"),
                   E([F((4, 2))], {"axis": 0, "stop": -1}, id="slice_stop_negative")],
         grad_examples=[E([F((3, 5))], {"axis": -1, "start": -3, "stop": -1})])


def _unslice_fwd(c, a, g, x):
    ax = a.axis % x.ndim
    s, e = _runtime_bounds(a, x.shape[ax])
    return g.pad(tuple((s, x.shape[ax] - e) if i == ax else None for i in range(x.ndim)))


register("unslice", doc="g zero-padded to the shape of x, where x[start:stop] was taken "
         "(internal: the VJP of a slice of a named dim)", family=FAMILY, inputs="g, x",
         internal=True, attrs_model=attrs("unslice", **_bounds),
         infer=lambda a, g, x: TType(x.shape, g.dtype), forward=_unslice_fwd,
         vjp=lambda b, n, g: [b.emit("slice", g, axis=n.attrs.axis, start=n.attrs.start,
                                     stop=n.attrs.stop), None])


def _pad_infer(a, x):
    ax = _axis(a.axis, x.rank)
    d = x.shape[ax]
    if isinstance(d, str):
        raise ShapeError(f"cannot pad the named dim '{d}'")
    return TType(x.shape[:ax] + (d + a.before + a.after,) + x.shape[ax + 1:], x.dtype)


def _pad_ref(a, xs, c):
    x = xs[0]
    width = [(0, 0)] * x.ndim
    width[a.axis % x.ndim] = (a.before, a.after)
    return np.pad(x, width, constant_values=a.value)


register("pad", doc="zero-pad one axis", family=FAMILY, inputs="x",
         attrs_model=attrs("pad", axis=_ax, before=(int, Field(0, ge=0)),
                           after=(int, Field(0, ge=0)),
                           value=(float, Field(0.0, description="the fill value"))),
         infer=_pad_infer,
         forward=lambda c, a, x: x.pad(tuple((a.before, a.after) if i == a.axis % x.ndim
                                             else None for i in range(x.ndim)), value=a.value),
         vjp=lambda b, n, g: [b.emit("slice", g, axis=n.attrs.axis, start=n.attrs.before,
                                     stop=n.attrs.before + b.type(n.inputs[0]).shape[
                                         _axis(n.attrs.axis, b.type(n.inputs[0]).rank)])],
         reference=_pad_ref,
         examples=[E([F((2, 3))], {"axis": 0, "before": 1, "after": 2}),
                   E([F((2, 3))], {"axis": -1, "after": 1, "value": 2.5}, id="pad_value")],
         grad_examples=[E([F((2, 3))], {"axis": -1, "before": 1, "after": 2, "value": 1.5})])


def _concat_infer(a, *xs):
    ax = _axis(a.axis, xs[0].rank)
    total = 0
    for t in xs:
        if t.rank != xs[0].rank or any(
                d != e for i, (d, e) in enumerate(zip(t.shape, xs[0].shape, strict=True))
                if i != ax):
            raise ShapeError("inputs differ outside the concat axis: "
                             + ", ".join(fmt(t.shape) for t in xs),
                             help=f"all dims but axis {a.axis} must agree")
        if isinstance(t.shape[ax], str):
            raise ShapeError(f"cannot concat along the named dim '{t.shape[ax]}'")
        total += t.shape[ax]
    return TType(xs[0].shape[:ax] + (total,) + xs[0].shape[ax + 1:], xs[0].dtype)


def _concat_vjp(b, n, g):
    ax = _axis(n.attrs.axis, b.type(n.id).rank)
    out, start = [], 0
    for i in n.inputs:
        size = b.type(i).shape[ax]
        out.append(b.emit("slice", g, axis=ax, start=start, stop=start + size))
        start += size
    return out


register("concat", doc="join inputs along an axis", family=FAMILY, inputs="x, more*",
         attrs_model=attrs("concat", axis=(int, Field(-1, description="the axis"))),
         infer=_concat_infer, forward=lambda c, a, *xs: xs[0].cat(*xs[1:], dim=a.axis),
         vjp=_concat_vjp, reference=lambda a, xs, c: np.concatenate(xs, axis=a.axis),
         examples=[E([F((2, 1)), F((2, 3)), F((2, 2))]),
                   E([F((1, 3)), F((2, 3))], {"axis": 0}, id="concat_axis0"),
                   E([F((2, 3))], id="concat_single")],
         grad_examples=[E([F((2, 1)), F((2, 3)), F((2, 2))])])


def _take(b, a, x):
    t = b.type(x)
    ax = _axis(a.axis, t.rank)
    d, i = t.shape[ax], a.index
    if isinstance(d, str):          # a named dim: count from the end with a negative index
        stop = None if i == -1 else i + 1
        return b.emit("squeeze", b.emit("slice", x, axis=ax, start=i, stop=stop), axis=ax)
    i = i + d if i < 0 else i
    if not 0 <= i < d:
        raise ShapeError(f"index {a.index} is out of range for axis {a.axis} of size {d}")
    return b.emit("squeeze", b.emit("slice", x, axis=ax, start=i, stop=i + 1), axis=ax)


register("take", doc="x[..., index, ...]: one index along an axis, which is dropped",
         family=FAMILY, inputs="x",
         attrs_model=attrs("take", axis=_ax, index=(int, Field(description="the index; "
                                                                            "-1 is the last"))),
         expand=_take, reference=lambda a, xs, c: np.take(xs[0], a.index, axis=a.axis),
         examples=[E([F((2, 3, 4))], {"axis": 1, "index": -1}),
                   E([F((2, 3, 4))], {"axis": 0, "index": 1}, id="take_first_axis")],
         grad_examples=[E([F((2, 3, 4))], {"axis": 1, "index": -1})])


# -- broadcasting helpers (the VJP rules of broadcasting ops use these) -----------------------
def _bcast_like_infer(a, x, r):
    out = broadcast(x.shape, r.shape)
    if out != tuple(r.shape):
        raise ShapeError(f"{fmt(x.shape)} does not broadcast to {fmt(r.shape)}")
    return TType(r.shape, x.dtype)


def _reduce_to_infer(a, x, r):
    if broadcast(x.shape, r.shape) != tuple(x.shape):
        raise ShapeError(f"{fmt(x.shape)} cannot be summed down to {fmt(r.shape)}")
    return TType(r.shape, x.dtype)


def reduce_to(x, shape):
    """Sum a tinygrad tensor down to a broadcast-compatible shape."""
    extra = x.ndim - len(shape)
    if extra:
        x = x.sum(tuple(range(extra)))
    axes = tuple(i for i, (d, s) in enumerate(zip(x.shape, shape, strict=True))
                 if s == 1 and d != 1)
    return x.sum(axes, keepdim=True) if axes else x


def _reduce_to_ref(a, xs, c):
    x, target = xs[0], xs[1].shape
    x = x.sum(axis=tuple(range(x.ndim - len(target))))
    keep = tuple(i for i, t in enumerate(target) if t == 1 and x.shape[i] != 1)
    return x.sum(axis=keep, keepdims=True)


register("broadcast_like", doc="broadcast x to the shape of ref", family=FAMILY, inputs="x, ref",
         infer=_bcast_like_infer, forward=lambda c, a, x, r: x.expand(r.shape),
         vjp=lambda b, n, g: [b.emit("reduce_to", g, n.inputs[0]), None],
         reference=lambda a, xs, c: np.broadcast_to(xs[0], xs[1].shape),
         examples=[E([F((3, 1)), F((2, 3, 4))]),
                   E([F((4,)), F((3, 4))], id="broadcast_like_rank")],
         grad_examples=[E([F((3, 1)), F((2, 3, 4), diff=False)])])
register("reduce_to", doc="sum x down to the (broadcastable) shape of ref", family=FAMILY,
         inputs="x, ref", infer=_reduce_to_infer,
         forward=lambda c, a, x, r: reduce_to(x, r.shape),
         vjp=lambda b, n, g: [b.emit("broadcast_like", g, n.inputs[0]), None],
         reference=_reduce_to_ref,
         examples=[E([F((2, 3, 4)), F((3, 1))]),
                   E([F((2, 3, 4)), F((4,))], id="reduce_to_rank1"),
                   E([F((2, 3, 4)), F((1, 3, 1))], id="reduce_to_keep")],
         grad_examples=[E([F((2, 3, 4)), F((3, 1), diff=False)])])


# -- sliding windows (convolution and pooling are built on these) --------------------------------
#: The largest size a kernel, stride, padding or dilation may have (an int32 dim).
MAX_SIZE = 2**31 - 1


def pair_field(default, what: str, least: int, description: str):
    """A field holding one int or a list of two ([h, w]), each at least ``least``; anything
    else (0 strides, [3], [1, 0, 2, 1], negatives, true) is a plain-worded spec error."""
    def check(v):
        ok = isinstance(v, int) or (isinstance(v, list) and len(v) == 2)
        vals = [v] if isinstance(v, int) else v if ok else []
        if not ok or any(isinstance(i, bool) or not isinstance(i, int) for i in vals):
            raise ValueError(f"{what} is one integer or a list of two, [h, w]; got {v!r}"[:160])
        if any(not least <= i <= MAX_SIZE for i in vals):
            raise ValueError(f"{what} must be {'at least 1' if least else '0 or more'} "
                             f"(and below 2^31); got {v!r}")
        return v
    return (Annotated[int | list[int], BeforeValidator(check)],
            Field(default, description=description))


def padding_field(default, description: str):
    """A 2-D padding field: one int, [h, w], [top, bottom, left, right] (each axis's before
    and after, in [h, w] order) or "same" (the output is ceil(input / stride), the odd row
    or column at the bottom and right, as Keras and ONNX's SAME_UPPER)."""
    def check(v):
        if v == "same":
            return v
        ok = isinstance(v, int) or (isinstance(v, list) and len(v) in (2, 4))
        vals = [v] if isinstance(v, int) else v if ok else []
        if not ok or any(isinstance(i, bool) or not isinstance(i, int) for i in vals):
            raise ValueError("padding is one integer, [h, w], [top, bottom, left, right] or "
                             f"'same'; got {v!r}"[:160])
        if any(not 0 <= i <= MAX_SIZE for i in vals):
            raise ValueError(f"padding must be 0 or more (and below 2^31); got {v!r}")
        return v
    return (Annotated[int | list[int] | str, BeforeValidator(check)],
            Field(default, description=description))


def padding1_field():
    """conv1d's padding: one int, [left, right] ([k - 1, 0] is a causal convolution) or
    "same" (output length ceil(length / stride), the odd step at the end)."""
    def check(v):
        if v == "same":
            return v
        ok = isinstance(v, int) or (isinstance(v, list) and len(v) == 2)
        vals = [v] if isinstance(v, int) else v if ok else []
        if not ok or any(isinstance(i, bool) or not isinstance(i, int) for i in vals):
            raise ValueError(f"padding is one integer, [left, right] or 'same'; got {v!r}"[:160])
        if any(not 0 <= i <= MAX_SIZE for i in vals):
            raise ValueError(f"padding must be 0 or more (and below 2^31); got {v!r}")
        return v
    return (Annotated[int | list[int] | str, BeforeValidator(check)],
            Field(0, description="zero padding: one int, [left, right] ([kernel - 1, 0]: "
                                 "causal), or 'same'"))


def _out_size(size, k, s, d):
    return (size - d * (k - 1) - 1) // s + 1


def _windows_infer(a, x):
    if x.rank < 3:
        raise ShapeError(f"windows need [..., H, W] with a leading axis, got {fmt(x.shape)}")
    (kh, kw), (sh, sw), (dh, dw) = pair(a.kernel), pair(a.stride), pair(a.dilation)
    h, w = x.shape[-2:]
    if isinstance(h, str) or isinstance(w, str):
        raise ShapeError("image height and width must be sizes, not names")
    oh, ow = _out_size(h, kh, sh, dh), _out_size(w, kw, sw, dw)
    if oh < 1 or ow < 1:
        raise ShapeError(f"a {kh}x{kw} window does not fit in a {h}x{w} image",
                         help="use a smaller kernel, or padding")
    return TType(x.shape[:-2] + (oh, ow, kh, kw), x.dtype)


def _windows_grad_fwd(c, a, g, x):
    """The adjoint of windows: scatter-add each window position back into the image."""
    (kh, kw), (sh, sw), (dh, dw) = pair(a.kernel), pair(a.stride), pair(a.dilation)
    *lead, h, w = x.shape
    oh, ow = g.shape[-4], g.shape[-3]
    total = None
    for i in range(kh):
        for j in range(kw):
            p = g[..., i, j]                                     # [..., oh, ow]
            if sh > 1 or sw > 1:                                 # spread out by the stride
                p = p.reshape(*lead, oh, 1, ow, 1).pad(
                    tuple([None] * len(lead) + [None, (0, sh - 1), None, (0, sw - 1)]))
                p = p.reshape(*lead, oh * sh, ow * sw)
            top, left = i * dh, j * dw
            hh, ww = min(p.shape[-2], h - top), min(p.shape[-1], w - left)
            p = p[..., :hh, :ww].pad(tuple([None] * len(lead) + [(top, h - top - hh),
                                                                  (left, w - left - ww)]))
            total = p if total is None else total + p
    return total


_win_fields = dict(
    kernel=pair_field(..., "kernel", 1, "window size (h, w)"),
    stride=pair_field(1, "stride", 1, "step between windows"),
    dilation=pair_field(1, "dilation", 1, "spacing inside a window"))
_WIN = {"kernel": [2, 3], "stride": [2, 1], "dilation": [1, 2]}
_win_kw = lambda a: dict(kernel=a.kernel, stride=a.stride, dilation=a.dilation)
register("windows", doc="sliding windows over the last two axes: [..., H, W] -> "
         "[..., OH, OW, KH, KW]", family=FAMILY, inputs="x",
         attrs_model=attrs("windows", **_win_fields), infer=_windows_infer,
         forward=lambda c, a, x: x._pool(pair(a.kernel), pair(a.stride), pair(a.dilation)),
         vjp=lambda b, n, g: [b.emit("windows_grad", g, n.inputs[0], **_win_kw(n.attrs))],
         reference=lambda a, xs, c: R.windows(xs[0], a.kernel, a.stride, a.dilation),
         examples=[E([F((1, 2, 5, 6))], {"kernel": 2}),
                   E([F((1, 2, 5, 6))], _WIN, id="windows_stride_dilation"),
                   E([F((2, 5, 5))], {"kernel": 3, "stride": 2}, id="windows_rank3")],
         grad_examples=[E([F((1, 2, 5, 6))], _WIN)])
register("windows_grad", doc="adjoint of windows: sum window cotangents back into the image",
         family=FAMILY, inputs="g, ref", attrs_model=attrs("windows_grad", **_win_fields),
         infer=lambda a, g, r: TType(r.shape, g.dtype), forward=_windows_grad_fwd,
         vjp=lambda b, n, g: [b.emit("windows", g, **_win_kw(n.attrs)), None],
         reference=lambda a, xs, c: R.windows_grad(xs[0], xs[1].shape, a.kernel, a.stride,
                                                   a.dilation),
         examples=[E([F((1, 2, 4, 5, 2, 2)), F((1, 2, 5, 6))], {"kernel": 2}),
                   E([F((1, 2, 2, 2, 2, 3)), F((1, 2, 5, 6))], _WIN, id="windows_grad_stride"),
                   E([F((2, 2, 2, 3, 3)), F((2, 5, 5))], {"kernel": 3, "stride": 2},
                     id="windows_grad_rank3")],
         grad_examples=[E([F((1, 2, 2, 2, 2, 3)), F((1, 2, 5, 6), diff=False)], _WIN)])


# -- integer helpers ----------------------------------------------------------------------------
def _one_hot_infer(a, x):
    if x.dtype != "int32":
        raise ShapeError(f"one_hot takes int32 ids, got {x.dtype}",
                         help="declare the input with `dtype: int32`")
    return TType(x.shape + (a.depth,), "float32")


register("one_hot", doc="int ids -> float one-hot vectors along a new last axis", family=FAMILY,
         inputs="ids", attrs_model=attrs("one_hot", depth=(int, Field(
             gt=0, description="number of classes"))), infer=_one_hot_infer,
         forward=lambda c, a, x: x.one_hot(a.depth).float(), vjp=NO_GRAD,
         reference=lambda a, xs, c: np.eye(a.depth)[xs[0]],
         examples=[E([Int((2, 3), 4)], {"depth": 4}),
                   E([Int((5,), 3)], {"depth": 3}, id="one_hot_rank1")])


# -- arange: positions (for encodings and masks) ------------------------------------------
def _arange_infer(a):
    if isinstance(a.size, int) and a.size < 1:
        raise ShapeError(f"arange needs a positive size, got {a.size}")
    return TType((a.size,))


def _arange_fwd(c, a):
    n = a.size
    if isinstance(n, str):
        if n not in c.dims:
            raise ShapeError(f"the named dim '{n}' is not bound by any input",
                             help="name a dim of one of the graph's inputs")
        n = c.dims[n]
    return Tensor.arange(n).float()


register("arange", doc="0, 1, ..., size-1 as float32 along one axis (no gradient): positions "
         "for encodings and masks", family="shape", inputs=(),
         attrs_model=attrs("arange", size=(int | str, Field(
             description="how many: a size, or a named dim such as time"))),
         infer=_arange_infer, forward=_arange_fwd, vjp=NO_GRAD,
         reference=lambda a, xs, c: np.arange(c.dims.get(a.size, a.size), dtype=np.float64),
         examples=[E([], {"size": 5})])
