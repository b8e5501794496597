"""What `dlgraph validate` and `dlgraph summary` print: a table of the spec's nodes.

Validation here goes one step past loading: a spec with a ``train:`` section is reversed
for every phase, so an unreachable parameter or a missing gradient rule is reported now,
not after compiling.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .errors import GradientError, Source, SpecError
from .ir import Graph
from .types import TType, numel


@dataclass
class Row:
    node: str
    op: str
    shape: str
    params: int


@dataclass
class Summary:
    name: str
    source: str
    rows: list[Row]
    inputs: dict[str, TType]
    outputs: dict[str, TType]
    params: int
    trainable: int
    primitives: int
    backward: dict[str, int] = field(default_factory=dict)  # phase -> backward node count
    warnings: list[str] = field(default_factory=list)
    activation_floats: int | None = None                     # per sample

    def __str__(self) -> str:
        w = max([len(r.node) for r in self.rows] + [4])
        o = max([len(r.op) for r in self.rows] + [2])
        s = max([len(r.shape) for r in self.rows] + [5])
        lines = [f"{self.name}  ({self.source})", "",
                 f"{'node':<{w}}  {'op':<{o}}  {'output':<{s}}  {'params':>9}",
                 "-" * (w + o + s + 15)]
        for r in self.rows:
            lines.append(f"{r.node:<{w}}  {r.op:<{o}}  {r.shape:<{s}}  "
                         f"{(f'{r.params:,}' if r.params else ''):>9}")
        lines.append("-" * (w + o + s + 15))
        lines.append("inputs:  " + ", ".join(f"{k} {v}" for k, v in self.inputs.items()))
        lines.append("outputs: " + ", ".join(f"{k} {v}" for k, v in self.outputs.items()))
        frozen = self.params - self.trainable
        lines.append(f"params:  {self.params:,} ({self.trainable:,} trainable"
                     + (f", {frozen:,} frozen" if frozen else "") + f"; "
                     f"{_bytes(self.params * 4)} as float32)")
        if self.activation_floats is not None:
            lines.append(f"activations: {_bytes(self.activation_floats * 4)} per sample "
                         f"(forward, float32)")
        lines.append(f"primitive nodes: {self.primitives}")
        for phase, n in self.backward.items():
            lines.append(f"backward ({phase}): {n} nodes, derived by graph reversal")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarize(g: Graph, backward: bool = False) -> Summary:
    """Check a graph fully (training phases included) and summarise it."""
    counts: dict[str, int] = {}
    for p in g.params.values():
        key = p.scope[0] if p.scope else p.node
        counts[key] = counts.get(key, 0) + _count(p.shape)
    rows = []
    for nid, nd in (g.spec.nodes.items() if g.spec else []):
        t = g[g.aliases[nid]].type
        rows.append(Row(nid, nd.op, str(t), counts.get(nid, 0)))
    total = sum(_count(p.shape) for p in g.params.values())
    trainable = sum(_count(p.shape) for p in g.params.values() if p.trainable)
    act = [numel(n.type.shape, {d: 1 for d in _names(g)}) for n in g.nodes.values()
           if n.role == "forward"]
    s = Summary(g.name, g.source, rows, dict(g.inputs),
                {k: g[v].type for k, v in g.outputs.items()}, total, trainable,
                sum(1 for n in g.nodes.values() if n.role == "forward"),
                warnings=list(g.warnings),
                activation_floats=sum(a for a in act if a is not None))
    if g.spec is not None and g.spec.train is not None:
        for phase in g.spec.train.all_phases():
            tg = training_graph(g, phase)
            s.backward[phase.name] = sum(1 for n in tg.nodes.values() if n.role == "backward")
    return s


def _names(g: Graph) -> set[str]:
    return {d for t in g.inputs.values() for d in t.shape if isinstance(d, str)}


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def phase_params(g: Graph, phase) -> list[str]:
    """The trainable parameter names a phase's globs select (error if none)."""
    names = [n for n, p in g.params.items() if p.trainable
             and any(fnmatch.fnmatchcase(n, pat) for pat in phase.params)]
    if not names:
        raise SpecError(f"phase '{phase.name}': no trainable parameter matches "
                        f"{phase.params}", source=Source(g.source, g.lines.get(("train",))),
                        help="parameter names: " + ", ".join(list(g.params)[:12]))
    return names


def training_graph(g: Graph, phase) -> Graph:
    """The reversed graph of one phase; errors are located at the train section."""
    from .autodiff import reverse
    ref = phase.objective
    if ref not in g.aliases:
        raise SpecError(f"objective '{ref}' is not a node",
                        source=Source(g.source, g.lines.get(("train", "objective"))
                                      or g.lines.get(("train",))),
                        help="set `objective:` to the id of the loss node")
    try:
        return reverse(g, ref, phase_params(g, phase))
    except GradientError as e:
        line = g.lines.get(("nodes", e.node)) or g.lines.get(("train", "objective"))
        raise e.located(source=Source(g.source, line)) from None


__all__ = ["Summary", "summarize", "training_graph", "phase_params"]
