"""Shared shape rules and helpers for op definitions."""

from __future__ import annotations

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.types import TType, broadcast, dim_value, fmt, norm_axis


def same(a, x: TType) -> TType:
    """Elementwise unary: the input's type."""
    return x


def floats(*ts: TType) -> None:
    for t in ts:
        if t.dtype != "float32":
            raise ShapeError(f"expects float32 inputs, got {t.dtype}",
                             help="integer inputs (labels, token ids) go to embedding, "
                                  "one_hot or a loss")


def bcast(a, *ts: TType) -> TType:
    """Elementwise n-ary with numpy broadcasting; float result unless all inputs agree."""
    out = broadcast(*(t.shape for t in ts))
    if out is None:
        raise ShapeError("shapes do not broadcast: " + " vs ".join(fmt(t.shape) for t in ts),
                         help="dims must be equal or 1 from the right; reshape one side")
    dtypes = {t.dtype for t in ts}
    return TType(out, dtypes.pop() if len(dtypes) == 1 else "float32")


def axes_of(axes, rank: int) -> tuple[int, ...]:
    """Normalised axes (None = all), checked against the rank."""
    if axes is None:
        return tuple(range(rank))
    axes = [axes] if isinstance(axes, int) else axes
    out = []
    for ax in axes:
        n = norm_axis(ax, rank)
        if n is None:
            raise ShapeError(f"axis {ax} is out of range for rank {rank}",
                             help=f"axes go from {-rank} to {rank - 1}")
        out.append(n)
    return tuple(sorted(set(out)))


def reduced(shape: tuple, axes: tuple[int, ...], keepdims: bool) -> tuple:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def pair(v) -> tuple:
    """An int or a pair ([h, w]) as a pair: kernel sizes, strides, padding, dilation."""
    return (v, v) if isinstance(v, int) else tuple(v)


def pads4(padding, size, kernel, stride=1, dilation=1) -> tuple[int, int, int, int]:
    """A 2-D padding field as (top, bottom, left, right) for an image of ``size`` (h, w).

    >>> pads4([1, 2], (8, 8), 3), pads4("same", (7, 7), 3, 2)
    ((1, 1, 2, 2), (1, 1, 1, 1))
    """
    if padding == "same":
        out = []
        for n, k, s, d in zip(size, pair(kernel), pair(stride), pair(dilation), strict=True):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            out += [total // 2, total - total // 2]
        return tuple(out)
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    return tuple(padding)


def resolve(ctx, shape) -> tuple[int, ...]:
    """Concrete ints for a shape with named dims, from the run's bindings."""
    return tuple(dim_value(d, ctx.dims) for d in shape)
