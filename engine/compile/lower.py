"""Graph → tinygrad: resolve each node's forward rule once, then run a flat loop.

The loop builds tinygrad's lazy graph; nothing runs until a value is realised, so one
call of :func:`evaluate` inside a ``TinyJit`` becomes one compiled program. Nodes marked
``cut`` are made contiguous: a kernel boundary chosen by the graph, not the user.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
from tinygrad import Tensor, TinyJit, Variable
from tinygrad.engine.jit import JitError, _prepare_jit_inputs
from tinygrad.engine.realize import ExecContext, get_runtime, pm_exec, resolve_params, unwrap_multi
from tinygrad.helpers import DEV, PARALLEL, to_tuple
from tinygrad.uop.ops import Ops

from dlgraph.engine.compile.cache import (
    ProgramCache,
    cacheable,
    digest,
    freeze,
    remember_device,
    remembered_device,
    thaw,
)
from dlgraph.engine.errors import DeviceError, ShapeError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.spec.init import init_param, random_inputs
from dlgraph.engine.types import NUMPY_DTYPES, dim_parts, dim_value, fmt
from dlgraph.ops import OPS
from dlgraph.ops.common import resolve
from dlgraph.ops.control import loop_types

DEVICES = ("cpu", "cuda", "nv", "amd", "metal", "cl", "webgpu")


@dataclass
class Ctx:
    """What a forward rule may need beyond its inputs."""

    training: bool = False
    dims: dict[str, int] = field(default_factory=dict)   # named dim -> size for this call
    updates: list[Tensor] = field(default_factory=list)  # state assignments to realise

    def run_loop(self, a, xs) -> tuple[Tensor, ...]:
        """A loop run inline: its body traced once per step into the current program
        (the staged lowering runs loops as compiled steps instead, see :class:`LoopStage`)."""
        body = Evaluator(a.body, list(a.body.outputs.values()))
        names = list(a.body.inputs)
        ns, nst, steps = a.n_seq, a.n_state, dim_value(a.steps, self.dims)
        states = list(xs[ns:ns + nst])
        consts = dict(zip(names[ns + nst:], xs[ns + nst:], strict=True))
        hist = [[None] * (steps + 1) for _ in range(nst)]
        for j, s in enumerate(states):
            hist[j][steps if a.reverse else 0] = s
        per, acc = None, None
        for t in (reversed(range(steps)) if a.reverse else range(steps)):
            feed = {n: x[:, t] for n, x in zip(names[:ns], xs[:ns], strict=True)}
            feed.update(zip(names[ns:ns + nst], states, strict=True))
            outs = body(self, {**feed, **consts}, {})
            states = outs[:nst]
            for j, s in enumerate(states):
                hist[j][t if a.reverse else t + 1] = s
            step_out = outs[nst:nst + a.n_out]
            per = [[None] * steps for _ in step_out] if per is None else per
            for j, o in enumerate(step_out):
                per[j][t] = o
            inc = outs[nst + a.n_out:]
            acc = inc if acc is None else [u + v for u, v in zip(acc, inc, strict=True)]
        return (*[Tensor.stack(*h, dim=1) for h in hist],
                *[Tensor.stack(*p, dim=1) for p in (per or [])], *(acc or []))


SERIAL_COMPILE_CORES = 4
"""On machines with at most this many cores, kernels are compiled in this process rather
than in tinygrad's pool of worker processes (``PARALLEL``; set it to choose). Measured on 2
cores (graphs/lstm.yaml, first training step): 5.0-7.9 s serial against 11-16 s with the
pool, and 1.1-1.6 s against 1.6-1.8 s with the program cache: starting the pool's
processes costs more than the parallel compile saves."""


def use_device(name: str | None) -> str:
    """Select and probe a tinygrad device; a :class:`DeviceError` says how to fix a failure."""
    if "PARALLEL" not in os.environ and (os.cpu_count() or 1) <= SERIAL_COMPILE_CORES:
        PARALLEL.value = 0
    auto = not name and not os.environ.get("DEV")
    if auto and (known := remembered_device()) is not None:
        try:
            return _probe(known)
        except DeviceError:             # the hardware changed under the same fingerprint
            remember_device(None)
            DEV.value = ""
    dev = _probe(name)
    if auto:
        remember_device(dev)
    return dev


def _probe(name: str | None) -> str:
    """Select ``name`` (None: tinygrad's choice) and run one kernel on it."""
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
    return Tensor(np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype])).realize()


class Evaluator:
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
            out = self.rules[nid](ctx, n.attrs, *(env[i] for i in n.inputs))
            env[nid] = out.contiguous() if n.cut else out
        return env


class Model:
    """A compiled graph: call it with numpy arrays, get numpy outputs.

    >>> import dlgraph, numpy as np                                     # doctest: +SKIP
    >>> m = dlgraph.compile(dlgraph.load("graphs/mlp.yaml"))            # doctest: +SKIP
    >>> m(x=np.zeros((4, 2), np.float32))["logits"].shape               # doctest: +SKIP
    (4, 3)
    """

    def __init__(self, graph: Graph, params: dict[str, Tensor] | None = None, seed: int = 0,
                 cache: ProgramCache | None = None):
        self.graph = graph
        self.params = params if params is not None else init_params(graph, seed)
        self.outputs = list(graph.outputs)
        computed = [graph.outputs[o] for o in self.outputs if graph.outputs[o] not in graph.inputs]
        self._program = lower(graph, computed, params=self.params, cache=cache)
        self._names = self._program.input_names

    def __call__(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        g = self.graph
        unknown = [n for n in arrays if n not in g.inputs]
        if unknown:
            raise ShapeError(f"unknown input{'s' * (len(unknown) > 1)}: {', '.join(unknown)}",
                             help=f"inputs: {', '.join(g.inputs)}")
        arrays = {k: _array(k, v, g.inputs[k].dtype) for k, v in arrays.items()}
        missing = [n for n in self._names if n not in arrays]
        if missing:
            raise ShapeError(f"missing input{'s' * (len(missing) > 1)}: {', '.join(missing)}",
                             help=f"inputs: {', '.join(g.inputs)}")
        dims = bind(g, arrays)
        outs = self._program.arrays(feed(g, {n: arrays[n] for n in self._names}), dims)
        got = dict(zip(self._program.targets, outs, strict=True))
        return {name: got[nid] if nid in got else np.asarray(arrays[nid])
                for name, nid in g.outputs.items()}

    def reserve(self, **lengths: int) -> None:
        """Compile for sequences up to these lengths at the first call (``time=64``), where
        the spec declares no ``dims:`` maximum; longer ones still work (and compile again)."""
        self._program.lengths.reserve(lengths)

    def random_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return random_inputs(self.graph, batch, seed)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.params.items()}


def _array(name: str, value, dtype: str) -> np.ndarray:
    """An input as a numpy array (lists welcome); numbers only, whole for int inputs."""
    a = np.asarray(value)
    if a.dtype.kind not in "biuf":
        raise ShapeError(f"input '{name}' holds {a.dtype} values, not numbers",
                         help="pass numbers (a numpy array or nested lists)")
    if dtype != "float32" and a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        raise ShapeError(f"input '{name}' is {dtype} but holds fractions",
                         help="pass whole numbers (labels, token ids)")
    return a


# -------------------------------------------------------------------------- lowering


def feed(graph: Graph, arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Realised input tensors for a program (a 0-d value travels as [1]: tinygrad's 0-d
    tensors are views, which a JIT refuses)."""
    return {n: to_tensor(np.reshape(a, -1) if np.ndim(a) == 0 else a, graph.inputs[n].dtype)
            for n, a in arrays.items()}


def lower(graph: Graph, targets: list[str], *, params: dict[str, Tensor],
          training: bool = False, finish=None, params_as_inputs: bool = False,
          inline: bool = False, cache: ProgramCache | None = None,
          state: dict[str, Tensor] | None = None, tag=None) -> Program:
    """Lower ``graph`` to a tinygrad program computing ``targets``.

    The program is a few compiled stages: the nodes between loops are one ``TinyJit``
    each, and every loop runs its body as one compiled step over a symbolic time index,
    a chunk of steps per call. ``finish(*targets)`` (training: the optimizer update) runs
    inside the last stage and returns tensors to realise with it. ``params_as_inputs``
    passes the parameter tensors to every call (gradcheck perturbs them) instead of
    capturing them; ``inline`` traces loops step by step into one program (any dtype,
    compile time growing with the steps).

    ``cache`` keeps each stage's compiled program across processes (engine/compile/cache.py):
    ``state`` names the live tensors ``finish`` reads and writes besides the parameters (the
    optimizer's), ``tag`` describes what ``finish`` does (the optimizer's settings) for the key.
    """
    prog = Program(graph, targets, params, training, finish, params_as_inputs, inline)
    if cache is not None and not params_as_inputs:
        prog.use_cache(cache, state or {}, tag)
    return prog


INLINE_STEPS = 1
"""Loops of at most this many steps are traced step by step into their stage; longer ones
run as a compiled step per time step, so that compile time stays flat in the length.
Measured (LSTM-32 training step, batch 64, 2 loaded cores, warm kernel cache): traced, the
first step took 19.5 s at T=4 and 32 s at T=16; as a compiled step 14 s and 8-13 s. The
traced steady step is faster (22-32 ms against 41-100 ms at T=4-16): start-up wins."""


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

    def bind(self, dims: dict[str, int]) -> tuple[dict[str, int], dict]:
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
        a = x.numpy()       # padded on the host: a pad kernel would compile per length
        pads = [(0, w - s) for w, s in zip(want, a.shape, strict=True)]
        return Tensor(np.pad(a, pads)).realize()

    @staticmethod
    def _span(t, dims: dict) -> tuple | None:
        """The shrink that cuts a buffer of type ``t`` to this call's lengths (``dims`` with
        each length a bound variable), or None where ``t`` has none."""
        sizes = [dim_value(d, dims) for d in t.shape]
        if all(isinstance(v, int) for v in sizes):
            return None
        return tuple(None if isinstance(v, int) else (0, v) for v in sizes)

    @staticmethod
    def cut(t, x: Tensor, dims: dict) -> Tensor:
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


class Program:
    """Stages run in order over an environment of realised values (see :func:`lower`)."""

    def __init__(self, graph, targets, params, training, finish, params_as_inputs, inline):
        self.graph, self.targets, self.params = graph, list(targets), params
        self.training = training
        needed = graph.ancestors(self.targets)
        order = [nid for nid in graph.nodes if nid in needed]
        self.input_names = [n for n in graph.inputs if n in needed]
        stages: list = []
        cur: list[str] = []
        loops = [graph[nid].attrs.steps for nid in order if graph[nid].op == "loop"]
        self.lengths = Lengths(graph, set() if inline else {s for s in loops
                                                             if isinstance(s, str)})
        staged = {nid for nid in order if graph[nid].op == "loop" and not inline
                  and (isinstance(graph[nid].attrs.steps, str)
                       or graph[nid].attrs.steps > INLINE_STEPS)}
        for nid in order:
            n = graph[nid]
            if n.role in ("input", "param") or (n.op == "pick" and n.inputs[0] in staged):
                continue
            if nid in staged:
                stages += [Segment(self, cur), LoopStage(self, n)]
                cur = []
            else:
                cur.append(nid)
        stages.append(Segment(self, cur, finish))
        later: set[str] = set(self.targets)
        for st in reversed(stages):            # what each stage must hand on
            st.outputs = [nid for nid in st.made if nid in later]
            later |= set(st.reads)
        self.stages = [st for st in stages if st.made or st.finish]
        self.params_as_inputs = params_as_inputs
        self.progress = None        # callable(str): says what is compiled before the first run
        self.label = "program"
        self.cache, self.state, self.tag, self._key = None, {}, None, None
        Tensor.rand(1).realize()   # the RNG state must exist before a capture (fresh noise)

    def use_cache(self, cache: ProgramCache, state: dict[str, Tensor], tag) -> None:
        """Load and store compiled stages in ``cache`` (see :func:`lower`)."""
        self.cache, self.tag = cache, tag
        self.state = {f"state.{k}": t for k, t in state.items()}

    def _live(self) -> dict[str, Tensor]:
        """Every live tensor a capture may touch: the parameters as they are now (a caller
        may have replaced some since lowering), the rest of the state and tinygrad's random
        generator."""
        rng = {f"rng.{k}.{d}": t for k, ts in (("seed", Tensor._device_seeds),
                                              ("counter", Tensor._device_rng_counters))
               for d, t in ts.items()}
        return {**{f"param.{k}": t for k, t in self.params.items()}, **self.state, **rng}

    def cached(self, stage, dims: dict[str, int]):
        """The stage's compiled TinyJits from the cache, or None (then :meth:`keep` them)."""
        if self.cache is None:
            return None
        live = self._live()
        if not cacheable(live):
            return None
        key = self._stage_key(stage, dims)
        payload = self.cache.load(key)
        if payload is None:
            return None
        try:
            return thaw(payload, live)
        except Exception:   # an entry that checks but does not load: made elsewhere, rebuild
            self.cache.discard(key)
            return None

    def keep(self, stage, dims: dict[str, int], jits: list) -> None:
        """Store a stage's freshly captured TinyJits in the cache."""
        if self.cache is not None and all(getattr(j, "captured", None) for j in jits):
            payload = freeze(jits, self._live())
            if payload is not None:
                self.cache.store(self._stage_key(stage, dims), payload)

    def _stage_key(self, stage, dims: dict[str, int]) -> str:
        if self._key is None:
            self._key = digest(self.graph, self.targets, self.training, self.tag,
                               [(k, str(t.device)) for k, t in sorted(self._live().items())],
                               [st.finish is not None for st in self.stages])
        return digest(self._key, self.stages.index(stage), type(stage).__name__, stage.made,
                      stage.outputs, sorted(dims.items()))

    def announce(self, stage, seconds: float | None = None, kernels: int = 0,
                 cached: bool = False) -> None:
        """One progress line as a stage compiles (before) and when it is done (after), or
        when it was loaded from the program cache."""
        if self.progress is None:
            return
        k = self.stages.index(stage) + 1
        what = f"{self.label}: stage {k}/{len(self.stages)}, {stage.describe()}"
        n = f"{kernels} kernel{'s' * (kernels != 1)}"
        if cached:
            self.progress(f"loaded {what} from the program cache: {n} in {seconds:.1f} s")
        elif seconds is None:
            self.progress(f"compiling {what} …")
        else:
            self.progress(f"compiled {what}: {n} in {seconds:.1f} s")

    def value(self, env: dict, nid: str) -> Tensor:
        n = self.graph.nodes[nid]
        if n.role == "param":
            return self.params[nid.replace("/", ".")]
        return env[nid]

    def __call__(self, inputs: dict[str, Tensor], dims: dict[str, int],
                 params: dict[str, Tensor] | None = None) -> list[Tensor]:
        """Run every stage on realised ``inputs``; returns the targets, realised (a target
        with a sequence length comes in a buffer made for the program's longest, stale past
        this call's length: :meth:`arrays` cuts it)."""
        if params is not None:
            self.params = params
        dims, syms = self.lengths.bind(dims)
        env = {k: self.lengths.pad(self.graph.inputs[k], v, dims) for k, v in inputs.items()}
        for st in self.stages:
            st.run(env, dims, syms)
        return [self.value(env, t) for t in self.targets]

    def arrays(self, inputs: dict[str, Tensor], dims: dict[str, int],
               params: dict[str, Tensor] | None = None) -> list[np.ndarray]:
        """The targets as numpy arrays, each cut to this call's sequence lengths."""
        outs = self(inputs, dims, params)
        return [self.lengths.trim(self.graph[t].type, o.numpy(), dims)
                for t, o in zip(self.targets, outs, strict=True)]


class Segment:
    """Nodes between loops, compiled as one TinyJit per set of dims."""

    def __init__(self, prog: Program, nids: list[str], finish=None):
        g = prog.graph
        self.prog, self.made, self.finish = prog, nids, finish
        mine = set(nids)
        reads = dict.fromkeys(i for nid in nids for i in g[nid].inputs if i not in mine)
        if finish is not None:
            reads.update(dict.fromkeys(t for t in prog.targets if t not in mine))
        self.reads = list(reads)
        self.outputs: list[str] = []
        self.evaluator = Evaluator(g, nids, nids) if nids else None
        self._jits: dict[tuple, TinyJit] = {}

    def _fn(self, dims):
        g, prog = self.prog.graph, self.prog
        names = [r for r in self.reads if g[r].role != "param" or prog.params_as_inputs]
        seq = prog.lengths.names
        held = self._held(dims) if seq else {}

        def step(*args):
            syms, xs = dict(zip(seq, args[:len(seq)], strict=True)), args[len(seq):]
            xs, into = xs[:len(names)], dict(zip(held, xs[len(names):], strict=True))
            ctx = Ctx(training=prog.training, dims={**dims, **syms})
            env = {}
            for r, x in zip(names, xs, strict=True):
                t = g[r].type
                x = x.reshape(()) if g[r].role == "input" and t.rank == 0 else x
                env[r] = Lengths.cut(t, x, ctx.dims)
            for r in self.reads:
                if r not in env:
                    env[r] = prog.value(env, r)
            outs = self.evaluator.run(ctx, env) if self.evaluator else env
            # a value with a sequence length is written, at this call's length, into a
            # buffer made for the longest (padding it would write the whole buffer)
            res = [Lengths.into(g[o].type, into[o], outs[o], ctx.dims) if o in into
                   else outs[o].contiguous() for o in self.outputs]
            extra = self.finish(*[outs[t] for t in prog.targets]) if self.finish else []
            Tensor.realize(*res, *extra, *ctx.updates)
            # an output that is only a view of an input (h0[k] of an initial state) would
            # come back from every replay as the first call's input: copy it
            given = {_storage(x) for x in xs} - {None}
            return [into[o] if o in into else r.clone().realize() if _storage(r) in given
                    else r for o, r in zip(self.outputs, res, strict=True)]
        return names, step, held

    def _held(self, dims) -> dict[str, Tensor]:
        """Buffers for the outputs whose type has a sequence length, made for the longest."""
        g, names = self.prog.graph, self.prog.lengths.names
        return {o: Tensor.zeros(*resolve(Ctx(dims=dims), g[o].type.shape),
                                dtype=g[o].type.dtype).contiguous().realize()
                for o in self.outputs
                if any(dim_parts(d)[0] in names for d in g[o].type.shape)}

    def describe(self) -> str:
        return f"{len(self.made)} nodes" + (" and the update" if self.finish else "")

    def run(self, env: dict, dims: dict[str, int], syms: dict) -> None:
        key = tuple(sorted(dims.items()))
        fresh = key not in self._jits
        if fresh:
            t0 = time.perf_counter()
            names, step, held = self._fn(dict(dims))
            loaded = self.prog.cached(self, dims)
            jit = loaded[0] if loaded else TinyJit(step)
            jit.cnt = max(jit.cnt, 1)   # capture on the first call: scheduled once
            self._jits[key] = (names, jit, held)
            if loaded:
                self.prog.announce(self, time.perf_counter() - t0, _kernels(jit), cached=True)
                fresh = False
            else:
                self.prog.announce(self)
        names, jit, held = self._jits[key]
        args = [*syms.values()] + [self.prog.value(env, r) for r in names] + [*held.values()]
        try:
            outs = jit(*args)
        except JitError as e:   # nothing to compile (constants, views): run it as it is
            if "didn't JIT anything" not in str(e):
                raise
            self._jits[key] = names, jit, held = names, jit.fxn, held
            outs = jit(*args)
        # the buffers themselves, not what the capture returned (a program loaded from the
        # cache returns its own copies of them)
        env.update((o, held.get(o, r)) for o, r in zip(self.outputs, outs, strict=True))
        if fresh:
            self.prog.announce(self, time.perf_counter() - t0, _kernels(jit))
            self.prog.keep(self, dims, [jit])


class LoopStage:
    """A loop: its body compiled once as one time step over a symbolic index, called once
    per step; states are written into preallocated ``[batch, time + 1, ...]`` buffers, sums
    accumulate in place. A named number of steps runs the same program for every length up
    to the program's longest (the buffers' size)."""

    def __init__(self, prog: Program, node):
        self.prog, self.node = prog, node
        self.made, self.reads, self.finish = [node.id], list(node.inputs), None
        self.picks = [n.id for n in prog.graph.nodes.values()
                      if n.op == "pick" and n.inputs[0] == node.id]
        self.made += self.picks
        self.outputs: list[str] = []
        self.body = Evaluator(node.attrs.body, list(node.attrs.body.outputs.values()))
        self._compiled: dict[tuple, tuple] = {}
        steps = node.attrs.steps
        self.length = [steps] if isinstance(steps, str) else []   # the prologue's sym arg

    def _buffers(self, dims) -> list[Tensor]:
        """Zeroed state buffers. With parameters replicated over several devices (data
        parallel), a buffer that starts with the batch dim is split along it like the
        batch, any other (a parameter's gradient sum) is replicated like the parameters."""
        devices = next((p.device for p in self.prog.params.values()
                        if isinstance(p.device, tuple)), None)
        batch = {t.shape[0] for t in self.prog.graph.inputs.values()
                 if t.rank and isinstance(t.shape[0], str)}
        out = []
        for t in loop_types(self.node.attrs):
            b = Tensor.zeros(*resolve(Ctx(dims=dims), t.shape), dtype=t.dtype)
            if devices:
                b = b.shard(devices, axis=0 if t.rank and t.shape[0] in batch else None)
            out.append(b.contiguous().realize())
        return out

    def run(self, env: dict, dims: dict[str, int], syms: dict) -> None:
        a = self.node.attrs
        key = tuple(sorted(dims.items()))
        t0 = time.perf_counter()
        if key not in self._compiled:
            jits = self.prog.cached(self, dims) or [TinyJit(self._prologue),
                                                    TinyJit(self._step_fn(dict(dims)))]
            for j in jits:
                j.cnt = max(j.cnt, 1)
            self._compiled[key] = (self._buffers(dims), *jits)
            if jits[1].captured is not None:
                self.prog.announce(self, time.perf_counter() - t0,
                                   _kernels(jits[0]) + _kernels(jits[1]), cached=True)
        bufs, prologue, step = self._compiled[key]
        fresh = step.captured is None
        if fresh:
            self.prog.announce(self)
        xs = [self.prog.value(env, i) for i in self.node.inputs]
        ns, nst = a.n_seq, a.n_state
        prologue(*[syms[n] for n in self.length], *xs[ns:ns + nst], *bufs)
        steps = dim_value(a.steps, self.prog.lengths.now)
        order = range(steps - 1, -1, -1) if a.reverse else range(steps)
        var = Variable("step", 0, dim_value(a.steps, dims) - 1)
        args = (*xs[:ns], *xs[ns + nst:], *bufs)
        step(var.bind(order[0]), *args)        # captures on the first run, replays later
        replay = _replayer(step, (var.bind(order[0]), *args))
        if fresh:
            self.prog.announce(self, time.perf_counter() - t0, _kernels(step) + _kernels(prologue))
            self.prog.keep(self, dims, [prologue, step])
        for t in order[1:]:
            replay({"step": t})
        env.update(zip([p for p in self.picks], [bufs[self._index(p)] for p in self.picks],
                       strict=True))

    def describe(self) -> str:
        a = self.node.attrs
        ops = sum(1 for n in a.body.nodes.values() if n.role not in ("input", "param"))
        steps = f"up to {dim_value(a.steps, self.prog.lengths.most)} (`{a.steps}`)" \
            if isinstance(a.steps, str) else a.steps
        return (f"a loop over {steps} steps" + (" backwards" if a.reverse else "")
                + f" ({ops} ops per step)")

    def _index(self, pick: str) -> int:
        return self.prog.graph[pick].attrs.index

    def _prologue(self, *xs):
        a = self.node.attrs
        nst, n = a.n_state, len(self.length)
        at = (xs[0] if n else a.steps) if a.reverse else 0
        inits, bufs = xs[n:n + nst], xs[n + nst:]
        work = [b[:, at:at + 1].assign(i.unsqueeze(1)) for b, i in zip(bufs, inits, strict=False)]
        work += [b.assign(b.zeros_like()) for b in bufs[nst + a.n_out:]]
        Tensor.realize(*work)
        return bufs[0]

    def _step_fn(self, dims):
        a = self.node.attrs
        names = list(a.body.inputs)
        ns, nst, n_out = a.n_seq, a.n_state, a.n_out

        def step(t, *xs):
            ctx = Ctx(training=self.prog.training, dims=dims)
            n_c = len(names) - ns - nst
            seqs, consts, bufs = xs[:ns], xs[ns:ns + n_c], xs[ns + n_c:]
            feed = {n: x[:, t] for n, x in zip(names[:ns], seqs, strict=True)}
            read = t + 1 if a.reverse else t
            feed.update((n, b[:, read]) for n, b in zip(names[ns:ns + nst], bufs, strict=False))
            feed.update(zip(names[ns + nst:], consts, strict=True))
            outs = self.body(ctx, feed, {})
            # the step's values first, then the writes into the buffers: tinygrad cannot tell
            # that slot t (read) and slot t + 1 (written) are apart, and scheduled together it
            # recomputed the step around the writes (LSTM-32: 13 and 25 kernels a step
            # forward and backward; realised first, 5 and 14)
            Tensor.realize(*outs, *ctx.updates)
            w = t if a.reverse else t + 1
            work = [b[:, w:w + 1].assign(v.unsqueeze(1))
                    for b, v in zip(bufs[:nst], outs[:nst], strict=True)]
            work += [b[:, t:t + 1].assign(v.unsqueeze(1))
                     for b, v in zip(bufs[nst:nst + n_out], outs[nst:nst + n_out], strict=True)]
            work += [b.assign(b + v) for b, v in zip(bufs[nst + n_out:], outs[nst + n_out:],
                                                      strict=True)]
            Tensor.realize(*work, *ctx.updates)
            return bufs[0]
        return step


def _storage(t: Tensor):
    """The device buffer holding a realised tensor's values (a view's base buffer), or None
    (sharded over devices)."""
    try:
        b = t.uop.base.buffer
    except (AttributeError, RuntimeError, AssertionError):
        return None
    return getattr(b, "_base", None) or b


def _kernels(jit) -> int:
    captured = getattr(jit, "captured", None)
    return len(captured.linear.src) if captured is not None else 0


def _replayer(jit: TinyJit, args: tuple):
    """Replays a captured step with the same buffers and a new step index.

    TinyJit re-inspects every input on each call and dispatches each kernel through its
    pattern matcher (~2 ms and ~0.1 ms a kernel for a recurrent step, more than the
    kernels take on a CPU). Within one loop run the buffers never change, so they are
    resolved once here and each replay only binds the step index and calls the programs.
    """
    ins, _, names, info = _prepare_jit_inputs(args, {})
    cap = jit.captured
    if cap is None or cap.expected_names != names or cap.expected_input_info != info:
        return lambda var_vals: jit(*_rebind(args, var_vals))
    plan = _plan(cap, ins)
    if plan is None:
        return lambda var_vals: cap(ins, var_vals)

    def replay(var_vals):
        for step in plan:
            if type(step) is tuple:
                rt, bufs, prg = step
                gs, ls = prg.launch_dims(var_vals)
                rt(*bufs, global_size=gs, local_size=ls, vals=prg.vals(var_vals), wait=False)
            else:
                pm_exec.rewrite(step, ExecContext(var_vals, tuple(ins), False, True))
    return replay


def _plan(cap, ins) -> list | None:
    """Each kernel of a captured step as (program, buffers, launch info); other calls as
    they are. None where the plain replay must run (inputs it copies, several devices)."""
    if any(u in cap._written_uops for u in ins):
        return None
    plan: list = []
    for call in cap.linear.src:
        ast = call.src[0]
        if ast.op is not Ops.PROGRAM:
            plan.append(call)
            continue
        resolved = resolve_params(call, tuple(ins))
        per_dev = list(unwrap_multi(call, [resolved[i] for i in ast.arg.globals]))
        devices = to_tuple(call.src[1].device)
        if len(per_dev) != 1 or per_dev[0][1] or len(devices) != 1:
            return None
        bufs = [b.ensure_allocated().get_buf(devices[0]) for b in per_dev[0][0]]
        plan.append((get_runtime(devices[0], ast), bufs, ast.arg))
    return plan


def _rebind(args: tuple, var_vals: dict) -> tuple:
    var = args[0].unbind()[0]
    return (var.bind(var_vals["step"]), *args[1:])
