"""Sequence lengths left symbolic: one compiled program for every length up to the longest."""

from __future__ import annotations

import numpy as np
from tinygrad import Tensor, Variable

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.types import dim_parts, dim_value


class Lengths:
    """The sequence lengths a program leaves symbolic: the named numbers of steps of its
    loops (``shape: [batch, time, 1]``). One compiled program serves every length up to
    ``most``: values cross stages in buffers made for it, and each stage reads and writes
    them at this call's length, a bound tinygrad ``Variable``, so no kernel depends on the
    length itself.

    ``most`` is the spec's ``dims: {time: {max: N}}``, or else the longest length seen so
    far; a longer one doubles it (and compiles once more).
    """

    def __init__(self, graph: Graph, names: set[str]):
        self.names = sorted(names)
        declared = getattr(graph.spec, "dims", None) or {}
        self.declared = {n: declared[n].max for n in self.names if n in declared}
        self.most: dict[str, int] = dict(self.declared)
        self.now: dict[str, int] = {}

    def for_call(self, dims: dict[str, int]) -> tuple[dict[str, int], dict]:
        """The dims to compile for (lengths at their most) and the bound lengths."""
        if not self.names:
            return dims, {}
        out, syms = dict(dims), {}
        for n in self.names:
            t = dims.get(n)
            if t is None:
                raise ShapeError(f"no input gives the length '{n}' (a bug in dlgraph)")
            most = self.most.get(n, 0)
            if t > most:
                if n in self.declared:
                    raise ShapeError(f"a sequence of {t} steps is longer than the spec's "
                                     f"`dims: {{{n}: {{max: {most}}}}}`",
                                     help=f"raise dims.{n}.max, or cut the sequences")
                self.most[n] = most = t if not most else max(t, 2 * most)
            self.now[n] = t
            out[n] = most
            syms[n] = Variable(n, 1, most).bind(t)
        return out, syms

    def reserve(self, lengths: dict[str, int]) -> None:
        """Compile for at least these longest lengths (fewer recompiles as lengths grow)."""
        for n, k in lengths.items():
            if n in self.names and n not in self.declared:
                self.most[n] = max(self.most.get(n, 0), k)

    def pad(self, t, x: Tensor, dims: dict[str, int]) -> Tensor:
        """A graph input padded with zeros to the compiled lengths."""
        want = tuple(dim_value(d, dims) for d in t.shape)
        if not self.names or tuple(x.shape) == want or len(want) != x.ndim:
            return x
        # padded on the host: a pad kernel would compile per length
        return Tensor(self.pad_array(t, x.numpy(), dims)).realize()

    def pad_array(self, t, a: np.ndarray, dims: dict[str, int]) -> np.ndarray:
        """A graph input's array padded with zeros to the compiled lengths."""
        want = tuple(dim_value(d, dims) for d in t.shape)
        if not self.names or a.shape == want or len(want) != a.ndim:
            return a
        return np.pad(a, [(0, w - s) for w, s in zip(want, a.shape, strict=True)])

    def values(self) -> dict[str, int]:
        """This call's lengths by name: the values of the bound variables."""
        return dict(self.now)

    @staticmethod
    def _span(t, dims: dict) -> tuple | None:
        """The shrink that cuts a buffer of type ``t`` to this call's lengths (``dims`` with
        each length a bound variable), or None where ``t`` has none."""
        sizes = [dim_value(d, dims) for d in t.shape]
        if all(isinstance(v, int) for v in sizes):
            return None
        return tuple(None if isinstance(v, int) else (0, v) for v in sizes)

    @staticmethod
    def narrow(t, x: Tensor, dims: dict) -> Tensor:
        """A value as this call's lengths: padded axes shrunk to their symbolic size."""
        span = Lengths._span(t, dims) if len(t.shape) == x.ndim else None
        return x if span is None else x.shrink(span)

    @staticmethod
    def into(t, buf: Tensor, x: Tensor, dims: dict) -> Tensor:
        """The write of ``x`` into ``buf`` (made for the longest lengths) at this call's
        lengths: what lies past them is stale, and every reader cuts it off."""
        return buf.shrink(Lengths._span(t, dims)).assign(x)

    def trim(self, t, a: np.ndarray, dims: dict[str, int]) -> np.ndarray:
        """A target's array cut to this call's lengths."""
        if not self.names or a.ndim != len(t.shape):
            return a
        return a[tuple(slice(0, dim_value(d, dims)) if dim_parts(d)[0] in self.names
                       else slice(None) for d in t.shape)]
