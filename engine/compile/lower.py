"""Graph -> a staged tinygrad program: the nodes between loops are one compiled ``TinyJit``
each, and every loop runs its body as one compiled step over a symbolic time index.
Inference, training, validation and gradcheck all call :func:`lower`.
"""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
from tinygrad import Context, Tensor, Variable

from dlgraph.engine.compile import tinygrad_door as door
from dlgraph.engine.compile.cache import (
    ProgramCache,
    canon,
    digest,
    kernel_cache,
    tuned_key,
    tuning,
)
from dlgraph.engine.compile.interpret import Ctx, Interpreter, input_array
from dlgraph.engine.compile.lengths import Lengths
from dlgraph.engine.graph.autodiff import cut_products, product_operands
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.types import dim_parts, dim_value
from dlgraph.ops import OPS
from dlgraph.ops.common import resolve
from dlgraph.ops.control import loop_types


def lower(graph: Graph, targets: list[str], *, params: dict[str, Tensor],
          training: bool = False, finish=None, params_as_inputs: bool = False,
          inline: bool = False, cache: ProgramCache | None = None,
          state: dict[str, Tensor] | None = None, tag=None) -> Program:
    """Lower ``graph`` to a tinygrad program computing ``targets``.

    The program is a few compiled stages: the nodes between loops are one ``TinyJit``
    each, and every loop runs its body as one compiled step over a symbolic time index,
    called once per time step. From the second call on, a stage whose buffers are those it
    was planned for replays its kernels directly (``door.Replay``). ``finish(*targets)``
    (training: the optimizer update) runs inside the last stage and returns tensors to
    realise with it. ``params_as_inputs``
    passes the parameter tensors to every call (gradcheck perturbs them) instead of
    capturing them; ``inline`` traces loops step by step into one program (any dtype,
    compile time growing with the steps).

    ``cache`` keeps each stage's compiled program across processes (engine/compile/cache.py):
    ``state`` names the live tensors ``finish`` reads and writes besides the parameters (the
    optimizer's), ``tag`` describes what ``finish`` does (the optimizer's settings) for the key.
    """
    graph = copy.copy(graph)        # every product's operands kept in buffers (the backward
    graph.nodes = dict(graph.nodes)  # pass marked its own): plain products for the host's BLAS
    cut_products(graph)
    prog = Program(graph, targets, params, training, finish, params_as_inputs, inline)
    prog.state = {f"state.{k}": t for k, t in (state or {}).items()}
    if cache is not None and not params_as_inputs:
        prog.use_cache(cache, tag)
    return prog


INLINE_STEPS = 1
"""Loops of at most this many steps are traced step by step into their stage; longer ones
run as a compiled step per time step, so that compile time stays flat in the length.
Measured (LSTM-32 training step, batch 64, 2 loaded cores, warm kernel cache): traced, the
first step took 19.5 s at T=4 and 32 s at T=16; as a compiled step 14 s and 8-13 s. The
traced steady step is faster (22-32 ms against 41-100 ms at T=4-16): start-up wins."""


SEGMENT_NODES = 250
"""The nodes between loops are compiled in segments of at most this many: tinygrad's
scheduling grows faster than the graph it is given, so a deep network is scheduled in
pieces (identical pieces then also hit tinygrad's schedule cache). Measured on 2 cores, an
MLP of 100 32-wide linear+relu layers (1,434 nodes to train), first step without the caches:
one segment 16.7 s, 500 nodes 10.9 s, 250 nodes 9.7 s, 125 nodes 12.2 s; with 250, the
25-, 100- and 400-layer MLPs reach their first step after 4.4, 10.0 and 29.1 s (one segment:
5.7, 16.4 and 148 s). A cut costs a buffer for each value that crosses it; the transformer's
steady step was unchanged (22.5 -> 17.6 ms, within noise)."""


def knobs(graph: Graph) -> dict[tuple, Tensor]:
    """A realised [1] buffer for each runtime attribute (``OpDef.runtime``) of the graph's
    nodes that is not zero (zero changes what is computed): the kernels read it, so a spec
    edited only there loads its compiled program from the cache with the new value."""
    out = {}
    for nid, n in graph.nodes.items():
        for attr in _runtime(n.op):
            if v := getattr(n.attrs, attr):
                out[(id(graph), nid, attr)] = Tensor([float(v)]).realize()
    return out


def _runtime(op: str) -> tuple[str, ...]:
    return OPS[op].runtime if op in OPS else ()       # inputs and parameters have no rule


def blind(graph: Graph):
    """The graph as the program key sees it: runtime attributes only as zero or not."""
    c = canon(graph)
    for row in c["nodes"]:
        for attr in _runtime(row[1]):
            row[2][1][attr] = bool(row[2][1][attr])
    return c


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
                if len(cur) >= SEGMENT_NODES:       # scheduled in pieces: see SEGMENT_NODES
                    stages.append(Segment(self, cur))
                    cur = []
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
        self.kernels = None         # the kernel cache its compiles use (with the program cache)
        self.tuned: dict | None = None      # how `dlgraph tune` searched this spec's kernels
        self._slots: dict[tuple, Tensor] = {}   # (input, shape) -> the buffer it is copied into
        self.lock = threading.RLock()
        self.knobs = knobs(graph)
        Tensor.rand(1).realize()   # the RNG state must exist before a capture (fresh noise)

    def use_cache(self, cache: ProgramCache, tag) -> None:
        """Load and store compiled stages in ``cache`` (see :func:`lower`)."""
        self.cache, self.tag = cache, tag
        self.kernels = kernel_cache(cache)
        self.tuned = tuning(cache, tuned_key(self.graph))

    def _live(self) -> dict[str, Tensor]:
        """Every live tensor a capture may touch: the parameters as they are now (a caller
        may have replaced some since lowering), the rest of the state and tinygrad's random
        generator."""
        rng = door.rng_state()
        return {**{f"param.{k}": t for k, t in self.params.items()}, **self.state, **rng,
                **{f"knob.{k[1]}.{k[2]}": t for k, t in self.knobs.items()}}

    def cached(self, stage, dims: dict[str, int]):
        """The stage's compiled TinyJits from the cache, or None (then :meth:`keep` them)."""
        if self.cache is None:
            return None
        live = self._live()
        if not door.cacheable(live):
            return None
        key = self._stage_key(stage, dims)
        payload = self.cache.load(key)
        if payload is None:
            return None
        try:
            return door.thaw(payload, live)
        except Exception:   # an entry that checks but does not load: made elsewhere, rebuild
            self.cache.discard(key)
            return None

    def keep(self, stage, dims: dict[str, int], jits: list) -> None:
        """Store a stage's freshly captured TinyJits in the cache."""
        if self.cache is not None and all(door.has_captured(j) for j in jits):
            payload = door.freeze(jits, self._live())
            if payload is not None:
                self.cache.store(self._stage_key(stage, dims), payload)

    def beam(self, dims: dict[str, int]) -> int:
        """The BEAM width to compile at ``dims`` with: the tuning's, where the spec was tuned
        at these sizes (other sizes make other kernels, and would search at run time)."""
        t = self.tuned
        ok = t is not None and all(dims.get(k) == v for k, v in t["dims"].items())
        return t["beam"] if ok else 0

    def _stage_key(self, stage, dims: dict[str, int]) -> str:
        if self._key is None:
            self._key = digest(blind(self.graph), self.targets, self.training, self.tag,
                               [(k, str(t.device)) for k, t in sorted(self._live().items())],
                               [st.finish is not None for st in self.stages])
        return digest(self._key, self.stages.index(stage), type(stage).__name__, stage.made,
                      stage.outputs, sorted(dims.items()), self.beam(dims))

    def announce(self, stage, seconds: float | None = None, kernels: int = 0,
                 cached: bool = False) -> None:
        """One progress line as a stage compiles (before) and when it is done (after), or
        when it was loaded from the program cache."""
        loaded, made, beside = self.kernels.take_counts() if self.kernels else (0, 0, 0)
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
            kept = f"; {loaded} from the kernel cache, {made} generated" if loaded + made else ""
            kept += f" ({beside} of them by a second process)" if beside else ""
            self.progress(f"compiled {what}: {n} in {seconds:.1f} s{kept}")

    def value(self, env: dict, nid: str) -> Tensor:
        n = self.graph.nodes[nid]
        if n.role == "param":
            return self.params[nid.replace("/", ".")]
        return env[nid]

    def __call__(self, inputs: dict, dims: dict[str, int],
                 params: dict[str, Tensor] | None = None) -> list[Tensor]:
        """Run every stage; returns the targets, realised (a target with a sequence length
        comes in a buffer made for the program's longest, stale past this call's length:
        :meth:`arrays` cuts it). ``inputs`` are realised tensors or numpy arrays; arrays are
        copied into buffers the program keeps, so that from the second call on its compiled
        stages replay on the same buffers without tinygrad rewriting anything."""
        if params is not None:
            self.params = params
        dims, syms = self.lengths.for_call(dims)
        env = {k: self._input(k, v, dims) for k, v in inputs.items()}
        for st in self.stages:
            st.run(env, dims, syms)
        return [self.value(env, t) for t in self.targets]

    def _input(self, name: str, x, dims: dict[str, int]) -> Tensor:
        """An input as a realised tensor at the compiled lengths (arrays: in a kept buffer)."""
        t = self.graph.inputs[name]
        if not isinstance(x, np.ndarray):
            return self.lengths.pad(t, x, dims)
        a = self.lengths.pad_array(t, input_array(x, t.dtype), dims)
        slot = self._slots.get((name, a.shape))
        if slot is None or not door.write(slot, a):
            with door.LOCK:
                slot = self._slots[(name, a.shape)] = Tensor(a.copy()).realize()
        return slot

    def arrays(self, inputs: dict, dims: dict[str, int],
               params: dict[str, Tensor] | None = None) -> list[np.ndarray]:
        """The targets as numpy arrays, each cut to this call's sequence lengths. One call at
        a time: the program's buffers are shared by every call (a lock keeps threads apart)."""
        with self.lock:
            outs = self(inputs, dims, params)
            return [self.lengths.trim(self.graph[t].type, door.read(o), dims)
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
        self.interpreter = Interpreter(g, nids, nids) if nids else None
        self._jits: dict[tuple, tuple] = {}
        self._replays: dict[tuple, door.Replay] = {}

    def _fn(self, dims):
        g, prog = self.prog.graph, self.prog
        names = [r for r in self.reads if g[r].role != "param" or prog.params_as_inputs]
        seq = prog.lengths.names
        held = self._held(dims) if seq else {}

        def step(*args):
            syms, xs = dict(zip(seq, args[:len(seq)], strict=True)), args[len(seq):]
            xs, into = xs[:len(names)], dict(zip(held, xs[len(names):], strict=True))
            ctx = Ctx(training=prog.training, dims={**dims, **syms}, knobs=prog.knobs)
            env = {}
            for r, x in zip(names, xs, strict=True):
                t = g[r].type
                x = x.reshape(()) if g[r].role == "input" and t.rank == 0 else x
                env[r] = Lengths.narrow(t, x, ctx.dims)
            for r in self.reads:
                if r not in env:
                    env[r] = prog.value(env, r)
            outs = self.interpreter.run(ctx, env) if self.interpreter else env
            # a value with a sequence length is written, at this call's length, into a
            # buffer made for the longest (padding it would write the whole buffer)
            # an output that is a view of an input (a slice of it) is copied by a kernel:
            # as a view, the replay would read a buffer of the first call
            inputs = {door.storage(x) for x in xs} - {None}
            res = [Lengths.into(g[o].type, into[o], outs[o], ctx.dims) if o in into
                   else outs[o].clone() if door.storage(outs[o]) in inputs
                   else outs[o].contiguous() for o in self.outputs]
            extra = self.finish(*[outs[t] for t in prog.targets]) if self.finish else []
            Tensor.realize(*res, *extra, *ctx.updates)
            # an output whose buffer is an input's (h0[k] of an initial state) or another
            # output's (a reshape of it) is copied: every replay would hand on the first
            # call's input, and a reader would get one buffer twice
            given = {door.storage(x) for x in xs} - {None}
            out = []
            for o, r in zip(self.outputs, res, strict=True):
                if o not in into and door.storage(r) in given:
                    r = r.clone().realize()
                r = into[o] if o in into else door.real(r, g[o].type.dtype)
                given.add(door.storage(r))
                out.append(r)
            return out
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
        fresh, t0 = key not in self._jits, time.perf_counter()
        loaded = self._ready(key, dims, t0) if fresh else False
        names, jit, held = self._jits[key]
        args = [*syms.values()] + [self.prog.value(env, r) for r in names] + [*held.values()]
        rep = self._replays.get(key)
        if rep is None and loaded and door.can_snapshot(self.prog._live()):
            # its first step replayed, as a fresh one's is (Segment._call)
            rep = self._replays[key] = door.Replay(jit, args, door.returned(jit),
                                                   self.prog.kernels)
        if rep is not None and rep.fits(args):
            outs = rep(self.prog.lengths.values())
        else:
            outs = self._call(key, dims, args, rep, first=fresh and not loaded)
        # the buffers themselves, not what the capture returned (a program loaded from the
        # cache returns its own copies of them)
        env.update((o, held.get(o, r)) for o, r in zip(self.outputs, outs, strict=True))
        if fresh and not loaded:
            self.prog.announce(self, time.perf_counter() - t0, door.kernels(jit))
            self.prog.keep(self, dims, [jit])

    def _ready(self, key: tuple, dims: dict[str, int], t0: float) -> bool:
        """The stage's TinyJit at ``dims``, loaded from the program cache (True) or to be
        captured at its first call."""
        with door.LOCK:
            names, step, held = self._fn(dict(dims))
            loaded = self.prog.cached(self, dims)
            jit = loaded[0] if loaded else door.jit(step)
        self._jits[key] = (names, jit, held)
        if loaded:
            self.prog.announce(self, time.perf_counter() - t0, door.kernels(jit), cached=True)
        else:
            self.prog.announce(self)
        return bool(loaded)

    def _call(self, key: tuple, dims: dict[str, int], args: list, rep, first: bool) -> list:
        """The TinyJit called (capturing at the ``first`` call) and its replay planned. A
        first call's step runs tinygrad's kernels, a replay the host's BLAS for products:
        the state it changed is put back and the step replayed, so that the first step
        computes what a program loaded from the cache computes, bit for bit."""
        names, jit, held = self._jits[key]
        live = self.prog._live() if first else {}
        snap = door.snapshot(live) if first else None
        with door.LOCK, door.kernels_from(self.prog.kernels), \
                Context(BEAM=self.prog.beam(dims)):
            runner, outs = door.call_jit(jit, args)
        if runner is not jit:   # nothing to compile (constants, views): run it as it is
            self._jits[key] = names, runner, held
        elif door.has_captured(jit) and (rep is None or not rep.hits):
            # planned for these buffers, unless a replay that did serve is kept
            rep = self._replays[key] = door.Replay(jit, args, outs, self.prog.kernels)
            if snap is not None and rep.ok and door.touches_only([jit], live):
                door.restore(snap)
                outs = rep(self.prog.lengths.values())
        return outs


class LoopStage:
    """A loop: its body compiled once as one time step over a symbolic index, called once
    per step; states are written into preallocated ``[batch, time + 1, ...]`` buffers, sums
    accumulate in place. A named number of steps runs the same program for every length up
    to the program's longest (the buffers' size).

    A state that the step multiplies by a matrix (an RNN's ``h @ W_hh``) is also kept in a
    buffer of its own, read by the next step: read from the stacked buffer, at a row that
    moves with the step and one batch row ``time + 1`` values after the other, the product
    is no plain one for the host's BLAS (engine/compile/gemm.py)."""

    def __init__(self, prog: Program, node):
        self.prog, self.node = prog, node
        self.made, self.reads, self.finish = [node.id], list(node.inputs), None
        self.picks = [n.id for n in prog.graph.nodes.values()
                      if n.op == "pick" and n.inputs[0] == node.id]
        self.made += self.picks
        self.outputs: list[str] = []
        self.body = Interpreter(node.attrs.body, list(node.attrs.body.outputs.values()))
        self.current = _multiplied_states(node.attrs)
        self._compiled: dict[tuple, tuple] = {}
        self._replays: dict[tuple, tuple[door.Replay, door.Replay]] = {}
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
        a = self.node.attrs
        names = list(a.body.inputs)
        for t in loop_types(a) + [a.body.inputs[names[a.n_seq + j]] for j in self.current]:
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
            with door.LOCK:
                jits = self.prog.cached(self, dims) or [door.jit(self._prologue),
                                                        door.jit(self._step_fn(dict(dims)))]
                self._compiled[key] = (self._buffers(dims), *jits)
            if door.has_captured(jits[1]):
                self.prog.announce(self, time.perf_counter() - t0,
                                   door.kernels(jits[0]) + door.kernels(jits[1]), cached=True)
        bufs, prologue, step = self._compiled[key]
        xs = [self.prog.value(env, i) for i in self.node.inputs]
        ns, nst = a.n_seq, a.n_state
        steps = dim_value(a.steps, self.prog.lengths.now)
        order = range(steps - 1, -1, -1) if a.reverse else range(steps)
        var = Variable("step", 0, dim_value(a.steps, dims) - 1)
        pro_args = (*[syms[n] for n in self.length], *xs[ns:ns + nst], *bufs)
        step_args = (var.bind(order[0]), *xs[:ns], *xs[ns + nst:], *bufs)
        reps = self._replays.get(key)
        if reps and reps[0].fits(pro_args) and reps[1].fits(step_args):
            reps[0](self.prog.lengths.values())
            for t in order:
                reps[1]({"step": t})
        else:
            with door.LOCK, door.kernels_from(self.prog.kernels), \
                    Context(BEAM=self.prog.beam(dims)):
                self._first_run(key, dims, t0, pro_args, step_args, order)
        env.update(zip([p for p in self.picks], [bufs[self._index(p)] for p in self.picks],
                       strict=True))

    def _first_run(self, key, dims, t0: float, pro_args: tuple, step_args: tuple, order) -> None:
        """A run through the TinyJits (capturing on the first), then replays of the step;
        keeps the replays of both programs for later runs on the same buffers."""
        _, prologue, step = self._compiled[key]
        fresh = not door.has_captured(step)
        if fresh:
            self.prog.announce(self)
        prologue(*pro_args)
        step(*step_args)        # captures on the first run, replays later
        replay = door.replayer(step, step_args, self.prog.kernels)
        if fresh:
            self.prog.announce(self, time.perf_counter() - t0,
                               door.kernels(step) + door.kernels(prologue))
            self.prog.keep(self, dims, [prologue, step])
        for t in order[1:]:
            replay({"step": t})
        pro = door.Replay(prologue, pro_args, kernels=self.prog.kernels)
        if pro.ok and isinstance(replay, door.Replay):
            self._replays[key] = (pro, replay)

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
        nst, n, m = a.n_state, len(self.length), len(self.current)
        at = (xs[0] if n else a.steps) if a.reverse else 0
        inits, bufs = xs[n:n + nst], xs[n + nst:]
        work = [b[:, at:at + 1].assign(i.unsqueeze(1)) for b, i in zip(bufs, inits, strict=False)]
        work += [b.assign(b.zeros_like()) for b in bufs[nst + a.n_out:len(bufs) - m]]
        work += [b.assign(inits[j]) for b, j in zip(bufs[len(bufs) - m:], self.current,
                                                      strict=True)]
        Tensor.realize(*work)
        return bufs[0]

    def _step_fn(self, dims):
        a = self.node.attrs
        names = list(a.body.inputs)
        ns, nst, n_out, m = a.n_seq, a.n_state, a.n_out, len(self.current)

        def step(t, *xs):
            ctx = Ctx(training=self.prog.training, dims=dims, knobs=self.prog.knobs)
            n_c = len(names) - ns - nst
            seqs, consts, bufs = xs[:ns], xs[ns:ns + n_c], xs[ns + n_c:len(xs) - m]
            current = dict(zip(self.current, xs[len(xs) - m:], strict=True))
            feed = {n: x[:, t] for n, x in zip(names[:ns], seqs, strict=True)}
            read = t + 1 if a.reverse else t
            feed.update((n, current[j] if j in current else bufs[j][:, read])
                        for j, n in enumerate(names[ns:ns + nst]))
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
            work += [b.assign(outs[j]) for j, b in current.items()]
            Tensor.realize(*work, *ctx.updates)
            return bufs[0]
        return step


def _multiplied_states(a) -> list[int]:
    """The indices of a loop's states that its body multiplies by a matrix (through views)."""
    names = list(a.body.inputs)
    states = {names[a.n_seq + j]: j for j in range(a.n_state)}
    return sorted({states[src] for _, src in product_operands(a.body) if src in states})
