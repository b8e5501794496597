"""Graph → tinygrad: resolve each node's forward rule once, then run a flat loop.

The loop builds tinygrad's lazy graph; nothing runs until a value is realised, so one
call of :func:`evaluate` inside a ``TinyJit`` becomes one compiled program. Nodes marked
``cut`` are made contiguous: a kernel boundary chosen by the graph, not the user.
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass, field

import numpy as np
from tinygrad import Tensor, TinyJit
from tinygrad.helpers import DEV

from dlgraph.ops import REGISTRY

from .errors import DeviceError, ShapeError
from .ir import Graph, Param
from .types import fmt

DEVICES = ("cpu", "cuda", "nv", "amd", "metal", "cl", "webgpu")
NP_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}


@dataclass
class Ctx:
    """What a forward rule may need beyond its inputs."""

    training: bool = False
    dims: dict[str, int] = field(default_factory=dict)   # named dim -> size for this call
    updates: list[Tensor] = field(default_factory=list)  # state assignments to realise


def use_device(name: str | None) -> str:
    """Select and probe a tinygrad device; a :class:`DeviceError` says how to fix a failure."""
    if name:
        if name.lower() not in DEVICES:
            raise DeviceError(f"unknown device '{name}'",
                              help=f"devices: {', '.join(DEVICES)}")
        DEV.value = name.upper()
    from tinygrad import Device
    dev = name.upper() if name else "the default device"
    try:
        dev = Device.DEFAULT
        Tensor([1.0], device=dev).add(1).realize()
    except Exception as e:  # tinygrad raises many kinds; every one means "unusable"
        hint = "install a C compiler for tinygrad's CPU backend: apt-get install clang" \
            if dev.upper().startswith(("CPU", "THE DEFAULT")) and not shutil.which("clang") else \
            f"check the {dev} driver, or pick another with --device cpu"
        raise DeviceError(f"no usable tinygrad device ({dev}): {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": "),
                          help=hint) from None
    return dev


# -------------------------------------------------------------------------- parameters


def init_param(p: Param, seed: int) -> np.ndarray:
    """The initial value of a parameter: depends only on the seed and the parameter's name.

    >>> from dlgraph.engine.ir import Param
    >>> init_param(Param("fc.bias", "fc/bias", (3,), "zeros", 3, 3), 0)
    array([0., 0., 0.], dtype=float32)
    """
    rng = np.random.default_rng([seed, zlib.crc32(p.name.encode())])
    shape, fi, fo, init = p.shape, max(p.fan_in, 1), max(p.fan_out, 1), p.init
    if isinstance(init, int | float):
        v = np.full(shape, float(init))
    elif init == "zeros":
        v = np.zeros(shape)
    elif init == "ones":
        v = np.ones(shape)
    elif init == "normal":
        v = rng.standard_normal(shape)
    elif init == "uniform":
        v = rng.uniform(-1 / np.sqrt(fi), 1 / np.sqrt(fi), shape)
    elif init == "glorot_uniform":
        v = rng.uniform(-np.sqrt(6 / (fi + fo)), np.sqrt(6 / (fi + fo)), shape)
    elif init == "glorot_normal":
        v = rng.standard_normal(shape) * np.sqrt(2 / (fi + fo))
    elif init == "he_uniform":
        v = rng.uniform(-np.sqrt(6 / fi), np.sqrt(6 / fi), shape)
    elif init == "he_normal":
        v = rng.standard_normal(shape) * np.sqrt(2 / fi)
    elif init == "lecun_normal":
        v = rng.standard_normal(shape) * np.sqrt(1 / fi)
    elif init == "orthogonal":
        flat = rng.standard_normal((shape[0], int(np.prod(shape[1:])) or 1))
        q, r = np.linalg.qr(flat if flat.shape[0] >= flat.shape[1] else flat.T)
        q = q * np.sign(np.diag(r))
        v = (q if flat.shape[0] >= flat.shape[1] else q.T).reshape(shape)
    else:  # the spec model only lets known names through
        raise ValueError(f"unknown initialiser {init}")
    return v.astype(np.float32)


def init_params(graph: Graph, seed: int) -> dict[str, Tensor]:
    """Fresh parameter tensors for a graph, realised, keyed by checkpoint name."""
    return {name: Tensor(init_param(p, seed)).realize() for name, p in graph.params.items()}


# -------------------------------------------------------------------------- evaluation


def bind(graph: Graph, arrays: dict[str, np.ndarray], where: str = "input") -> dict[str, int]:
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
    return Tensor(np.ascontiguousarray(a, dtype=NP_DTYPES[dtype])).realize()


class Evaluator:
    """Runs a set of nodes of a graph: the schedule and each node's rule resolved once."""

    def __init__(self, graph: Graph, targets: list[str]):
        self.graph = graph
        needed = graph.ancestors(targets)
        self.order = [nid for nid in graph.nodes if nid in needed]
        self.rules = {nid: REGISTRY[graph[nid].op].forward for nid in self.order
                      if graph[nid].role not in ("input", "param")}
        self.targets = targets

    def __call__(self, ctx: Ctx, inputs: dict[str, Tensor], params: dict[str, Tensor]):
        g = self.graph
        env: dict[str, Tensor] = {}
        for nid in self.order:
            n = g.nodes[nid]
            if n.role == "input":
                env[nid] = inputs[nid]
            elif n.role == "param":
                env[nid] = params[nid.replace("/", ".")]
            else:
                out = self.rules[nid](ctx, n.attrs, *(env[i] for i in n.inputs))
                env[nid] = out.contiguous() if n.cut else out
        return [env[t] for t in self.targets]


def random_inputs(graph: Graph, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random arrays of the declared input shapes (named dims = ``batch``).

    Integer inputs get ids below the size of the one-hot or embedding that reads them.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in graph.inputs.items():
        shape = tuple(batch if isinstance(d, str) else d for d in t.shape)
        if t.dtype == "int32":
            depth = min([n.attrs.depth for n in graph.nodes.values()
                         if n.op == "one_hot" and name in n.inputs] or [2])
            out[name] = rng.integers(0, depth, shape).astype(np.int32)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


class Model:
    """A compiled graph: call it with numpy arrays, get numpy outputs.

    >>> import dlgraph, numpy as np                                     # doctest: +SKIP
    >>> m = dlgraph.compile(dlgraph.load("graphs/mlp.yaml"))            # doctest: +SKIP
    >>> m(x=np.zeros((4, 2), np.float32))["logits"].shape               # doctest: +SKIP
    (4, 3)
    """

    def __init__(self, graph: Graph, params: dict[str, Tensor] | None = None, seed: int = 0):
        self.graph = graph
        self.params = params if params is not None else init_params(graph, seed)
        self.outputs = list(graph.outputs)
        computed = [graph.outputs[o] for o in self.outputs if graph.outputs[o] not in graph.inputs]
        self._eval = Evaluator(graph, computed)
        self._computed = computed
        self._names = [n for n in graph.inputs if n in self._eval.order]
        self._jits: dict[tuple, TinyJit] = {}      # one compiled program per input shapes

    def __call__(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        g = self.graph
        missing = [n for n in self._names if n not in arrays]
        if missing:
            raise ShapeError(f"missing input{'s' * (len(missing) > 1)}: {', '.join(missing)}",
                             help=f"inputs: {', '.join(g.inputs)}")
        dims = bind(g, arrays)
        key = tuple(arrays[n].shape for n in self._names)
        if key not in self._jits:
            ctx = Ctx(training=False, dims=dims)
            # inputs travel flat (tinygrad's 0-d tensors are views, which a JIT refuses)
            self._jits[key] = TinyJit(lambda *xs: [t.realize() for t in self._eval(
                ctx, {n: x.reshape(s) for n, x, s in zip(self._names, xs, key, strict=True)},
                self.params)])
        outs = self._jits[key](*[to_tensor(np.reshape(arrays[n], -1), g.inputs[n].dtype)
                                 for n in self._names])
        got = {nid: t.numpy() for nid, t in zip(self._computed, outs, strict=True)}
        # a replayed JIT returns its captured buffers, so pass-through inputs come from arrays
        return {name: got[nid] if nid in got else np.asarray(arrays[nid])
                for name, nid in g.outputs.items()}

    def random_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return random_inputs(self.graph, batch, seed)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.params.items()}
