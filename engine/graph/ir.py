"""The graph IR: primitive nodes with inferred types, in a deterministic schedule.

A node's id names its one value, except for a multi-output node (``loop``: its type is that
of its first output), whose outputs are read through one ``pick`` node each. Composite ops
of the spec (``linear``, ``lstm``) have been expanded into primitives by the builder; each
primitive remembers the ``scope`` of the composite it came from, so drawings can fold it
back, and backward nodes remember the forward node they came from (``origin``).

Every attribute a graph or node carries is declared here; nothing adds others later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from dlgraph.engine.errors import CycleError, Source
from dlgraph.engine.types import TType


@dataclass
class Node:
    id: str
    op: str
    attrs: Any                      # the op's validated pydantic model
    inputs: tuple[str, ...]
    type: TType
    scope: tuple[str, ...] = ()     # composites it was expanded from, outermost first
    source: Source | None = None
    origin: str | None = None       # for a backward node: the forward node whose VJP emitted it
    role: str = "forward"           # input | param | forward | backward
    cut: bool = False               # lowering hint: realise this value (a kernel boundary)

    @property
    def user_id(self) -> str:
        """The spec node this primitive belongs to (itself when not expanded)."""
        return self.scope[0] if self.scope else self.id


@dataclass
class Param:
    """A learnable (or frozen) tensor owned by a layer."""

    name: str                       # checkpoint name, e.g. 'fc1.weight'
    node: str                       # the `param` node that yields it
    shape: tuple[int, ...]
    init: str | float
    fan_in: int
    fan_out: int
    trainable: bool = True
    scope: tuple[str, ...] = ()


@dataclass
class Graph:
    """A primitive graph: nodes in emission order (always a topological order)."""

    name: str = "graph"
    nodes: dict[str, Node] = field(default_factory=dict)
    inputs: dict[str, TType] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)    # public name -> node id
    aliases: dict[str, str] = field(default_factory=dict)    # spec ref ('enc', 'enc.h') -> id
    params: dict[str, Param] = field(default_factory=dict)   # checkpoint name -> Param
    grads: dict[str, str] = field(default_factory=dict)      # param name -> gradient node id
    objective: str | None = None                             # set on a training graph
    source: str = "<spec>"
    spec: Any = None                                         # the GraphSpec it was built from
    lines: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    base: Any = None                                         # folder relative data paths start in
    shared: dict[str, str] = field(default_factory=dict)     # sharing spec node -> owner
    layers: dict[str, Any] = field(default_factory=dict)     # module node scope path -> its spec
    # drawings only (report/render.py fills them in the copy it draws): a loop's body drawn
    # in its place, its state fed back to the next step along `loop_edges`
    loop_edges: set[tuple[str, str]] = field(default_factory=set)
    loop_notes: dict[tuple, str] = field(default_factory=dict)  # step scope -> its note

    def __getitem__(self, nid: str) -> Node:
        return self.nodes[nid]

    def resolve(self, ref: str) -> str:
        return self.aliases.get(ref, ref)

    def ancestors(self, targets) -> set[str]:
        """Every node some target depends on, targets included."""
        seen, stack = set(), list(targets)
        while stack:
            nid = stack.pop()
            if nid not in seen:
                seen.add(nid)
                stack.extend(self.nodes[nid].inputs)
        return seen

    def dependents(self, sources) -> set[str]:
        """Every node that depends on some source, sources included (one pass: the nodes are
        in a topological order)."""
        seen = set(sources)
        for nid, n in self.nodes.items():
            if any(i in seen for i in n.inputs):
                seen.add(nid)
        return seen


def schedule(g: nx.DiGraph) -> list:
    """Deterministic topological order: file order (node attribute ``pos``) breaks ties.

    A cycle raises :class:`CycleError` naming the nodes on it.
    """
    try:
        return list(nx.lexicographical_topological_sort(g, key=lambda n: g.nodes[n]["pos"]))
    except nx.NetworkXUnfeasible:
        cycle = [u for u, _ in nx.find_cycle(g)]
        raise CycleError("the graph has a cycle: " + " -> ".join(cycle + cycle[:1]),
                         node=cycle[0],
                         help="a node cannot depend on its own output; "
                              "break the loop or use a recurrent op (rnn, lstm, gru)") from None

