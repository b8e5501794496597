"""Reshapes and transposes that dlgraph's types cannot hold, followed without writing them.

PyTorch's attention, exported to ONNX, folds the heads into the batch: it reshapes
``[T, batch, E]`` to ``[T, batch * heads, E / heads]`` and transposes that. dlgraph keeps
each named dim apart (a ``batch * heads`` axis has no type here), so the import keeps such a
value as a :class:`View`: a tensor D of the spec and, for each ONNX axis, the group of D's
axes it is made of, in order. The ONNX value is D with its axes in group order, each group
merged into one axis. Transposes only permute the groups, reshapes regroup them (splitting
an axis of D where a new dim starts inside it), so nothing is emitted until an operator
needs the value itself; then the view is *materialized* (one transpose, one reshape) —
which fails, with a reason, only where a named dim really stays merged.

Symbolic dims are ints, names (``'batch'``) or :class:`Sym` products (``4*batch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dlgraph.engine.io.onnx.import_base import Importer, Unsupported, Value, hint, origin


# -- symbolic dims ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Sym:
    """A product of named dims and an int: ``Sym(4, ('batch',))`` is batch * 4."""

    coef: int
    names: tuple[str, ...]

    def __str__(self) -> str:
        return "*".join(([str(self.coef)] if self.coef != 1 else []) + list(self.names))


def _parts(d) -> tuple[int, tuple[str, ...]]:
    if isinstance(d, Sym):
        return d.coef, d.names
    return (1, (d,)) if isinstance(d, str) else (int(d), ())


def _make(coef: int, names) -> int | str | Sym:
    names = tuple(sorted(names))
    if not names:
        return coef
    return names[0] if coef == 1 and len(names) == 1 else Sym(coef, names)


def dmul(a, b):
    (ca, na), (cb, nb) = _parts(a), _parts(b)
    return _make(ca * cb, na + nb)


def ddiv(a, b):
    """a / b where it divides exactly (named dims included), else None."""
    (ca, na), (cb, nb) = _parts(a), _parts(b)
    left = list(na)
    for n in nb:
        if n not in left:
            return None
        left.remove(n)
    if cb == 0 or ca % cb:
        return None
    return _make(ca // cb, left)


def dprod(dims):
    out = 1
    for d in dims:
        out = dmul(out, d)
    return out


def named(d) -> bool:
    return not isinstance(d, int | np.integer)


def fmt(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


# -- the view -----------------------------------------------------------------------------------
@dataclass
class View:
    """An ONNX value as a spec tensor ``ref`` of shape ``dshape``, regrouped."""

    ref: str
    dshape: tuple
    groups: list[list[int]]
    hint: str = "view"
    origins: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple:
        return tuple(dprod(self.dshape[a] for a in g) for g in self.groups)

    def plain(self) -> bool:
        return self.groups == [[k] for k in range(len(self.dshape))]

    def materialize(self, imp: Importer) -> str:
        """The value as a spec node: D transposed to group order, the groups merged."""
        order = [a for g in self.groups for a in g]
        ref = self.ref
        if order != list(range(len(self.dshape))):
            ref = imp.add(self.hint, "transpose", [ref], list(self.origins), axes=order)
        if all(len(g) <= 1 for g in self.groups):          # new axes of size 1 only
            for k, g in enumerate(self.groups):
                if not g:
                    ref = imp.add(self.hint, "unsqueeze", [ref], list(self.origins), axis=k)
            return ref
        if any(len(g) != 1 for g in self.groups):
            for g in self.groups:
                big = [self.dshape[a] for a in g if self.dshape[a] != 1]
                if len(big) > 1 and any(named(d) for d in big):
                    raise Unsupported(f"a value of shape {fmt(self.shape)} merges the named "
                                      f"dim of {fmt(big)} with others (dlgraph keeps named "
                                      "dims apart)")
            ref = imp.add(self.hint, "reshape", [ref], list(self.origins),
                          shape=[d if named(d) else int(d) for d in self.shape])
        return ref


def view_of(imp: Importer, name: str) -> View | None:
    """The value `name` as a view (a plain one for an ordinary value of known shape)."""
    v = imp.values.get(name)
    if v is None:
        return None
    if v.view is not None and v.ref is None:
        return v.view
    if v.ref is None:
        return None
    s = imp.shape(name)
    if s is None or None in s:
        return None
    return View(v.ref, tuple(s), [[k] for k in range(len(s))])


def bind_view(imp: Importer, node, view: View, out: str | None = None) -> None:
    """Bind an output to a view (a plain view binds its tensor; a graph output is
    materialized at once so that its node carries the output's name)."""
    out = out or node.output[0]
    imp.shapes[out] = view.shape
    if view.plain():
        ref = view.ref
        if out in imp.outputs and ref in imp.nodes and ref not in {
                imp.values[o].ref for o in imp.outputs if o in imp.values}:
            ref = imp.rename(ref, out)          # the node making an output carries its name
        imp.bind(out, ref)
        return
    view.hint, view.origins = hint(node, imp), (origin(node),)
    imp.values[out] = Value(view=view)
    if out in imp.outputs:
        imp.bind(out, view.materialize(imp))


def renumber(groups, drop: int) -> list[list[int]]:
    """Groups once D's axis `drop` is gone."""
    return [[a - (a > drop) for a in g if a != drop] for g in groups]


# -- regrouping ----------------------------------------------------------------------------
def _match(view: View, target) -> tuple[dict[int, list], list[list[tuple[int, int]]]]:
    """Split D's axes so that each target dim is a run of whole pieces: (pieces per D axis,
    for each target dim its pieces as (D axis, piece index))."""
    pieces = {a: [view.dshape[a]] for a in range(len(view.dshape))}
    queue = [(a, 0) for g in view.groups for a in g]
    size = lambda p: pieces[p[0]][p[1]]
    groups = []
    for t in target:
        rem, grp = t, []
        while True:
            while queue and size(queue[0]) == 1:
                grp.append(queue.pop(0))
            if rem == 1 or not queue:
                break
            s = size(queue[0])
            if named(s):
                q = ddiv(rem, s)
                if q is None:
                    break
                grp.append(queue.pop(0))
                rem = q
                continue
            g = math.gcd(int(s), _parts(rem)[0])
            if g == 1:
                break
            if g != s:                       # a new dim starts inside this axis: split it
                a, j = queue[0]
                pieces[a][j:j + 1] = [g, int(s) // g]
                queue = [queue[0]] + [(a, j + 1)] + [(b, k + (b == a and k > j))
                                                     for b, k in queue[1:]]
            grp.append(queue.pop(0))
            rem = ddiv(rem, g)
        if rem != 1:
            raise Unsupported(f"a reshape of {fmt(view.shape)} to {fmt(target)} that dlgraph "
                              "cannot follow")
        groups.append(grp)
    if any(size(p) != 1 for p in queue):
        raise Unsupported(f"a reshape of {fmt(view.shape)} to {fmt(target)} that dlgraph "
                          "cannot follow")
    if queue:
        (groups[-1] if groups else []).extend(queue)
    return pieces, groups


def regroup(imp: Importer, node, view: View, target) -> View:
    """The view reshaped to ``target`` (symbolic dims): D is reshaped only to split axes."""
    pieces, groups = _match(view, target)
    split = any(len(p) > 1 for p in pieces.values())
    index, dshape = {}, []
    for a in range(len(view.dshape)):
        for j, d in enumerate(pieces[a]):
            if d != 1 or not split:           # a reshape anyway: size-1 axes go with it
                index[a, j] = len(dshape)
                dshape.append(d)
    ref = view.ref
    if split:
        ref = imp.add(hint(node), "reshape", [ref], [],
                      shape=[d if named(d) else int(d) for d in dshape])
    return View(ref, tuple(dshape), [[index[p] for p in g if p in index] for g in groups])


def last_plain(imp: Importer, view: View) -> View:
    """The view with its last group as D's last axis, alone (for a layer over features)."""
    last = view.groups[-1]
    others = [a for a in range(len(view.dshape)) if a not in last]
    ref, dshape = view.ref, view.dshape
    if others + last != list(range(len(dshape))):
        ref = imp.add(view.hint, "transpose", [ref], [], axes=others + last)
    if len(last) != 1:
        if any(named(dshape[a]) for a in last):
            raise Unsupported(f"features of a named dim in {fmt(view.shape)}")
        ref = imp.add(view.hint, "reshape", [ref], [],
                      shape=[d if named(d) else int(d) for d in
                             [dshape[a] for a in others] + [view.shape[-1]]])
    return View(ref, tuple(dshape[a] for a in others) + (view.shape[-1],),
                [[others.index(a) for a in g] for g in view.groups[:-1]] + [[len(others)]])
