"""Graph -> tinygrad, node by node: each node's forward rule resolved once, then a flat loop.

The loop builds tinygrad's lazy graph; nothing runs until a value is realised, so one call of
an :class:`Interpreter` inside a ``TinyJit`` becomes one compiled program. Nodes marked ``cut``
are made contiguous: a kernel boundary chosen by the graph, not the user. Also here: the
checks and conversions of input arrays, and fresh parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tinygrad import Tensor

from dlgraph.engine.errors import ShapeError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.spec.init import init_param
from dlgraph.engine.types import NUMPY_DTYPES, fmt
from dlgraph.ops import OPS


@dataclass
class Ctx:
    """What a forward rule may need beyond its inputs."""

    training: bool = False
    dims: dict[str, int] = field(default_factory=dict)   # named dim -> size for this call
    updates: list[Tensor] = field(default_factory=list)  # state assignments to realise

    evaluators: dict[int, Interpreter] = field(default_factory=dict)
    # runtime attribute values (see OpDef.runtime): (id(graph), node, attr) -> a [1] buffer
    knobs: dict[tuple, Tensor] = field(default_factory=dict)
    node: tuple = ()                                     # (id(graph), node id) being run

    def value(self, attr: str, default: float):
        """An attribute the op reads at run time (``OpDef.runtime``): the program's buffer
        holding it, so that a new value reuses the compiled kernels; else the number."""
        return self.knobs.get((*self.node, attr), default)

    def run_body(self, body: Graph, env: dict[str, Tensor]) -> list[Tensor]:
        """A body sub-graph's outputs from values for its inputs: what the forward rule of a
        higher-order op (``loop``) calls to trace its body into the current program."""
        ev = self.evaluators.get(id(body))
        if ev is None:
            ev = self.evaluators[id(body)] = Interpreter(body, list(body.outputs.values()))
        return ev(self, env, {})


def init_params(graph: Graph, seed: int) -> dict[str, Tensor]:
    """Fresh parameter tensors for a graph, realised, keyed by checkpoint name."""
    return {name: Tensor(init_param(p, seed)).realize() for name, p in graph.params.items()}


def input_dims(graph: Graph, arrays: dict[str, np.ndarray], where: str = "input") -> dict[str, int]:
    """Check arrays against the declared input types; returns the named dims' sizes."""
    dims: dict[str, int] = {}
    for name, t in graph.inputs.items():
        if name not in arrays:
            continue
        a = arrays[name]
        ok = a.ndim == t.rank
        for d, s in zip(t.shape, a.shape, strict=False):
            if isinstance(d, str):
                ok = ok and dims.setdefault(d, s) == s
            else:
                ok = ok and d == s
        if not ok:
            bound = ", ".join(f"{k}={v}" for k, v in dims.items())
            raise ShapeError(f"{where} '{name}' has shape {fmt(a.shape)}, but the spec "
                             f"declares {t}" + (f" with {bound}" if dims else ""),
                             help="reshape the data, or change the input's `shape:`")
    return dims


def to_tensor(a: np.ndarray, dtype: str) -> Tensor:
    return Tensor(np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype])).realize()


class Interpreter:
    """Runs a set of nodes of a graph: the schedule and each node's rule resolved once.

    ``nodes`` (default: every ancestor of the targets) are computed in schedule order;
    :meth:`run` takes the values of everything else from its environment.
    """

    def __init__(self, graph: Graph, targets: list[str], nodes: list[str] | None = None):
        self.graph = graph
        needed = graph.ancestors(targets) if nodes is None else set(nodes)
        self.order = [nid for nid in graph.nodes if nid in needed]
        self.rules = {nid: OPS[graph[nid].op].forward for nid in self.order
                      if graph[nid].role not in ("input", "param")}
        self.targets = targets
        self.constant: set[str] = set()    # made of constants alone (no input, no parameter,
        for nid in self.rules:             # nothing computed outside these nodes)
            if all(i in self.constant for i in graph[nid].inputs):
                self.constant.add(nid)

    def __call__(self, ctx: Ctx, inputs: dict[str, Tensor], params: dict[str, Tensor]):
        env = dict(inputs)
        env.update((n, params[n.replace("/", ".")]) for n in self.order
                   if self.graph.nodes[n].role == "param")
        env = self.run(ctx, env)
        return [env[t] for t in self.targets]

    def run(self, ctx: Ctx, env: dict[str, Tensor]) -> dict[str, Tensor]:
        """Compute the nodes not yet in ``env``; returns it extended."""
        g = self.graph
        for nid in self.order:
            if nid in env:
                continue
            n = g.nodes[nid]
            ctx.node = (id(g), nid)
            out = self.rules[nid](ctx, n.attrs, *(env[i] for i in n.inputs))
            env[nid] = (_kept(out) if nid in self.constant else out.contiguous()) if n.cut \
                else out
        return env


def _kept(t: Tensor) -> Tensor:
    """A cut value made of constants alone (a sinusoid table) in a buffer of its own:
    tinygrad drops ``contiguous`` there and computes it again inside every kernel that
    reads it, for every value (the transformer workload's sines: 0.54 of a 2.5 ms call)."""
    if isinstance(t.device, tuple) or not all(isinstance(d, int) for d in t.shape):
        return t.contiguous()
    return Tensor.empty(*t.shape, dtype=t.dtype, device=t.device).assign(t)


def input_array(a, dtype: str) -> np.ndarray:
    """An input's array as a program takes it: contiguous, of its declared dtype, a 0-d value
    as [1] (tinygrad's 0-d tensors are views, which a JIT refuses)."""
    return np.ascontiguousarray(np.reshape(a, -1) if np.ndim(a) == 0 else a,
                                dtype=NUMPY_DTYPES[dtype])


def input_tensors(graph: Graph, arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Realised input tensors for a program (see :func:`input_array`)."""
    return {n: Tensor(input_array(a, graph.inputs[n].dtype)).realize()
            for n, a in arrays.items()}
