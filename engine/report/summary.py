"""What `dlgraph validate` and `dlgraph summary` print: a table of the spec's nodes.

Validation here goes one step past loading: a spec with a ``train:`` section is reversed
for every phase, so an unreachable parameter or a missing gradient rule is reported now,
not after compiling. ``backward=True`` also describes each phase's backward graph: its
nodes by op and the parameters it computes gradients for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dlgraph.engine.graph.autodiff import phase_graphs, phase_params, training_graph
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.spec.checks import activation_floats, check_training
from dlgraph.engine.types import TType, fmt, numel


@dataclass
class Row:
    node: str
    op: str
    shape: str
    params: int


@dataclass
class PhaseSummary:
    """The backward graph of one training phase."""

    name: str
    nodes: int                                            # backward nodes
    ops: dict[str, int]                                   # op -> backward nodes, most first
    params: dict[str, tuple[tuple[int, ...], int]]        # param -> (shape, elements)

    def lines(self, detail: bool) -> list[str]:
        out = [f"backward ({self.name}): {self.nodes} nodes, derived by graph reversal"]
        if not detail:
            return out
        out += _wrap("  nodes by op: ", [f"{op} {n}" for op, n in self.ops.items()])
        total = sum(n for _, n in self.params.values())
        out.append(f"  gradients of {len(self.params)} parameter"
                   f"{'s' * (len(self.params) != 1)} ({total:,} elements):")
        w = max(len(k) for k in self.params)
        s = max(len(fmt(shape)) for shape, _ in self.params.values())
        out += [f"    {k:<{w}}  {fmt(shape):<{s}}  {n:>9,}"
                for k, (shape, n) in self.params.items()]
        return out


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
    phases: list[PhaseSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    activation_floats: int | None = None                     # per sample
    detail: bool = False                                     # describe the backward graphs

    def activations_at(self, batch: int) -> str | None:
        """The forward activation memory at ``batch`` samples (float32) in words, e.g.
        '1.2 MiB'; None where it is not estimated."""
        if self.activation_floats is None:
            return None
        return bytes_text(self.activation_floats * 4 * batch)

    @property
    def backward(self) -> dict[str, int]:
        """Backward node count per phase."""
        return {p.name: p.nodes for p in self.phases}

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
                     f"{bytes_text(self.params * 4)} as float32)")
        if self.activation_floats is not None:
            lines.append(f"activations: {bytes_text(self.activation_floats * 4)} per sample "
                         f"(forward, float32)")
        lines.append(f"primitive nodes: {self.primitives}")
        for phase in self.phases:
            lines += phase.lines(self.detail)
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _wrap(head: str, items: list[str], width: int = 96) -> list[str]:
    """``head`` and comma-separated items, wrapped between items (never inside one)."""
    lines, line = [], head
    for k, item in enumerate(items):
        piece = item + ("," if k < len(items) - 1 else "")
        if line.strip() and len(line) + len(piece) > width and line != head:
            lines.append(line.rstrip())
            line = "    "
        line += piece + " "
    return lines + [line.rstrip()]


def bytes_text(n: float) -> str:
    """``n`` bytes in words, up to GiB: '512 B', '3.2 MiB', '2048.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarize(g: Graph, graphs: dict[str, Graph] | None = None,
              backward: bool = False) -> Summary:
    """Check a graph fully (training phases included) and summarise it.

    ``graphs`` are the phase graphs when the caller has reversed them already
    (:func:`~dlgraph.engine.graph.autodiff.phase_graphs`); ``backward`` describes them in full.

    >>> import dlgraph                                                   # doctest: +SKIP
    >>> summarize(dlgraph.load("graphs/mlp.yaml")).backward              # doctest: +SKIP
    {'train': 39}
    """
    check_training(g)
    graphs = phase_graphs(g) if graphs is None else graphs
    counts: dict[str, int] = {}
    for p in g.params.values():
        key = p.scope[0] if p.scope else p.node
        counts[key] = counts.get(key, 0) + numel(p.shape)
    rows = []
    for nid, nd in (g.spec.nodes.items() if g.spec else []):
        t = g[g.aliases[nid]].type
        rows.append(Row(nid, nd.op, str(t), counts.get(nid, 0)))
    return Summary(
        g.name, g.source, rows, dict(g.inputs), {k: g[v].type for k, v in g.outputs.items()},
        sum(numel(p.shape) for p in g.params.values()),
        sum(numel(p.shape) for p in g.params.values() if p.trainable),
        sum(1 for n in g.nodes.values() if n.role == "forward"),
        phases=[_phase(name, tg) for name, tg in graphs.items()],
        warnings=list(g.warnings), activation_floats=activation_floats(g),
        detail=backward)


def _phase(name: str, tg: Graph) -> PhaseSummary:
    ops = Counter(n.op for n in tg.nodes.values() if n.role == "backward")
    return PhaseSummary(
        name, sum(ops.values()), dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        {p: (tg.params[p].shape, numel(tg.params[p].shape)) for p in tg.grads})


# training_graph and phase_params live with graph reversal; these names stay importable
# from here until every caller imports them from .autodiff
__all__ = ["Summary", "PhaseSummary", "summarize", "bytes_text", "training_graph", "phase_params"]
