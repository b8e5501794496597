"""Tensor types with symbolic dimensions, and the broadcasting rule over them.

A dimension is an ``int`` or a name such as ``"batch"``, possibly with an offset
(``"time+1"``: a loop's states, the initial one included). Two names agree only when they
are the same name; a name meets an int only when the int is 1 (broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Dim = int | str
NUMPY_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
"""The dtypes of the IR, as numpy dtypes: the one table of them."""


@dataclass(frozen=True)
class TType:
    """The static type of one value: a shape of dims and a dtype.

    >>> TType((\"batch\", 10)).rank
    2
    """

    shape: tuple[Dim, ...]
    dtype: str = "float32"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"[{dims}]" + ("" if self.dtype == "float32" else f" {self.dtype}")


def fmt(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def broadcast(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """The broadcast of several shapes (numpy rules), or None where they do not fit.

    >>> broadcast(("batch", 1), (1, 10))
    ('batch', 10)
    """
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out: list[Dim] = []
    for dims in zip(*padded, strict=True):
        real = {d for d in dims if d != 1}
        if len(real) > 1:
            return None
        out.append(real.pop() if real else 1)
    return tuple(out)


def dim_parts(d: Dim) -> tuple[str | None, int]:
    """A dim as (name, offset): ``"time+1"`` is ``("time", 1)``, ``7`` is ``(None, 7)``."""
    if isinstance(d, int):
        return None, d
    name, sign, k = d.partition("+") if "+" in d else d.partition("-")
    return name, (int(k) if sign == "+" else -int(k)) if sign else 0


def dim_add(d: Dim, k: int) -> Dim:
    """``d + k`` for a size or a named dim.

    >>> dim_add("time", 1), dim_add("time+1", -1), dim_add(3, 2)
    ('time+1', 'time', 5)
    """
    name, off = dim_parts(d)
    if name is None:
        return off + k
    off += k
    return name if off == 0 else f"{name}{off:+d}"


def dim_sub(a: Dim, b: Dim) -> Dim | None:
    """``a - b`` where it is known: a size, a named dim minus a size, or the difference of
    two offsets of the same name; None otherwise.

    >>> dim_sub("time+1", 1), dim_sub("time+1", "time"), dim_sub(5, "time")
    ('time', 1, None)
    """
    (na, oa), (nb, ob) = dim_parts(a), dim_parts(b)
    if nb is None:
        return dim_add(a, -ob)
    return oa - ob if na == nb else None


def dim_value(d: Dim, dims: dict):
    """A dim's size from the bindings of its name (an int, or a symbolic tinygrad value)."""
    name, off = dim_parts(d)
    return off if name is None else dims[name] + off


def numel(shape: tuple[Dim, ...], dims: dict[str, int] | None = None) -> int | None:
    """Number of elements, resolving names through ``dims``; None if a name is unbound."""
    n = 1
    for d in shape:
        name, _ = dim_parts(d)
        if name is not None and (not dims or name not in dims):
            return None
        n *= dim_value(d, dims or {})
    return n


def norm_axis(axis: int, rank: int) -> int | None:
    """A possibly negative axis as a non-negative one, or None when out of range."""
    a = axis + rank if axis < 0 else axis
    return a if 0 <= a < rank else None
