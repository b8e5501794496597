"""tinygrad's door: every use of tinygrad beyond its public API lives here, and only here.

The public API (``Tensor``, calling a ``TinyJit``, ``Variable``, ``Device``, ``nn``, ``dtypes``,
``Context``) may be used anywhere. Everything else is here: building a ``TinyJit`` and reading
what it captured, the direct replay of compiled kernels, the settings tinygrad keeps in context
variables (device, parallel compile), its random generator's state, UOp numbering, and the
freezing and thawing of captured programs for the program cache. A tinygrad upgrade touches
this one file; tests/test_architecture.py proves no other module reaches past the public API.
Pinned: tinygrad 0.14.0.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import io
import os
import pickle
import threading
import time
import weakref

import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes, helpers
from tinygrad.codegen import to_program, to_program_cache, to_program_key
from tinygrad.codegen.opt import KernelOptError, OptOps, heuristic
from tinygrad.device import MultiBuffer
from tinygrad.dtype import _to_np_dtype
from tinygrad.engine import realize
from tinygrad.engine.jit import CapturedJit, JitError, _prepare_jit_inputs, _TinyJit
from tinygrad.engine.realize import ExecContext, get_runtime, pm_exec, resolve_params, unwrap_multi
from tinygrad.helpers import BEAM, DEV, PARALLEL, ContextVar, to_tuple
from tinygrad.tensor import all_tensors
from tinygrad.uop.ops import KernelInfo, Ops, ProgramInfo, UOp, buffers

from dlgraph.engine.compile import gemm, together
from dlgraph.engine.compile.chunks import Chunked

FORMAT = b"dlgraph-program-2\n"
CODEGEN = "4: products for the BLAS without unrolled sums"
"""What dlgraph changes in tinygrad's choice of optimisations (:func:`_hand_coded`,
:func:`_plain_loops`): part of a kept kernel's key, so that kernels generated under another
choice are not reused."""


class _TinygradLock:
    """Held by whoever runs tinygrad's Python (scheduling, capture, a TinyJit call): it is
    not safe to enter from two threads at once (a :class:`Replay` runs without it).
    tinygrad's compiled-code database is one connection every thread may use
    (:func:`_compiled_code_for_every_thread`)."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


LOCK = _TinygradLock()

# ------------------------------------------------------------------------------ settings


def compile_in_process(helper: bool = False) -> None:
    """Compile kernels in this process, not in tinygrad's pool of worker processes; with
    ``helper``, a program's CPU kernels are generated half here, half in a copy of this
    process forked for them (:func:`_generate_beside`)."""
    PARALLEL.value = 0
    _HELPER[0] = helper and hasattr(os, "fork")


def select_device(name: str) -> None:
    """Make ``name`` (upper case: ``CPU``, ``CUDA``; empty: tinygrad's choice) the default."""
    DEV.value = name


def tinygrad_settings() -> dict[str, str]:
    """tinygrad's core settings, and any other set in the environment (backends define their
    own only once imported, so "every setting" would depend on what was probed)."""
    core = {v.key for v in vars(helpers).values() if isinstance(v, ContextVar)}
    return {k: repr(v.value) for k, v in sorted(ContextVar._cache.items())
            if k in core or k in os.environ}


def rng_state() -> dict[str, Tensor]:
    """tinygrad's random generator: its seed and counter tensors, per device."""
    return {f"rng.{k}.{d}": t for k, ts in (("seed", Tensor._device_seeds),
                                           ("counter", Tensor._device_rng_counters))
            for d, t in ts.items()}


def storage(t: Tensor):
    """The device buffer holding a realised tensor's values (a view's base buffer), or None
    (sharded over devices)."""
    try:
        b = t.uop.base.buffer
    except (AttributeError, RuntimeError, AssertionError):
        return None
    return getattr(b, "_base", None) or b


def real(t: Tensor, dtype: str) -> Tensor:
    """``t`` in a buffer of its own, of ``dtype`` (``"float32"``). tinygrad folds a value that
    depends on constants (and on shapes) alone to a constant without a buffer; a JIT takes
    only real buffers, so a stage that hands such a value on writes it into one."""
    if not t.uop.is_virtual:
        return t
    dt = getattr(dtypes, dtype)
    return Tensor.empty(*t.shape, dtype=dt, device=t.device).assign(t.cast(dt)).realize()


def _plain_buffer(t: Tensor):
    """The one device buffer a realised tensor's values fill exactly, or None (a view, an
    unrealised or sharded tensor)."""
    if not isinstance(t.device, str):           # sharded over several devices
        return None
    u = t.uop
    base = u.base
    if base.op is not Ops.BUFFER or not base.is_realized:
        return None
    if u is not base and not (u.op is Ops.RESHAPE and u.src[0] is base):
        return None
    b = base.buffer
    if getattr(b, "_base", None) is not None or b.size != t.numel():
        return None
    return b


def write(t: Tensor, a: np.ndarray) -> bool:
    """Copy ``a`` (contiguous, of ``t``'s dtype and size) into ``t``'s buffer; False where
    ``t`` is not one plain buffer."""
    if (view := _host_view(t)) is not None:
        _settle(t.device)
        np.copyto(view, a.reshape(view.shape))
    elif (b := _plain_buffer(t)) is not None:
        b.ensure_allocated()
        b.allocator._copyin(b._buf, memoryview(a).cast("B"))
    return view is not None or b is not None


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype of a tinygrad dtype."""
    return np.dtype(_to_np_dtype(dtype))


def read(t: Tensor) -> np.ndarray:
    """A realised tensor's values as a new numpy array, copied straight from its buffer
    (``Tensor.numpy`` schedules a copy through tinygrad's graph rewriting first)."""
    if (view := _host_view(t)) is not None:
        _settle(t.device)
        return view.copy()
    if (b := _plain_buffer(t)) is None or _to_np_dtype(t.dtype) is None:
        with LOCK:
            return t.numpy()
    out = np.empty(t.shape, dtype=_to_np_dtype(t.dtype))
    if out.size:
        b.allocator._copyout(memoryview(out).cast("B"), b._buf)
    return out


_VIEWS: dict[int, tuple] = {}


def _host_view(t: Tensor) -> np.ndarray | None:
    """A numpy array on the memory of ``t``'s buffer where that is the host's (the CPU), kept
    while ``t`` lives and holds it; else None. (Finding the buffer through tinygrad's
    properties was about 40% of a batch-1 call of graphs/mlp.yaml.)"""
    hit = _VIEWS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] is t.uop:
        return hit[2]
    b, dt = _plain_buffer(t), _to_np_dtype(t.dtype)
    if b is None or dt is None or not t.device.startswith("CPU") or not b.size \
            or not hasattr(b.allocator, "_as_buffer"):
        return None
    b.ensure_allocated()
    view = np.frombuffer(b.allocator._as_buffer(b._buf), dt, b.size).reshape(t.shape)
    if len(_VIEWS) > 4096:                       # forget the tensors that are gone
        [_VIEWS.pop(k) for k in [k for k, v in _VIEWS.items() if v[0]() is None]]
    _VIEWS[id(t)] = (weakref.ref(t), t.uop, view)
    return view


_IDLE: dict[str, object] = {}


def _settle(device: str) -> None:
    """Wait for work tinygrad queued on ``device`` (a replay runs its kernels at once), its
    HCQ counters read first as its ``synchronize`` reads them: that costs ~10 us a call."""
    if (idle := _IDLE.get(device)) is None:
        dev = Device[device]
        try:
            sig, tl = (dev.signal(*a)._buf.cpu_view().view(fmt="Q")
                       for a in (("timeline",), ("value", 1, "CPU")))
            work = [[getattr(w, x)._buf.cpu_view().view(fmt="Q") for x in ("put", "done")]
                    for w in dev.workers]
            idle = _IDLE[device] = lambda: sig[0] >= tl[0] - 1 and all(
                d[0] >= p[0] for p, d in work)
        except Exception:          # another runtime: always synchronize
            idle = _IDLE[device] = lambda: False
    if not idle():
        Device[device].synchronize()


# ----------------------------------------------------------------------------- the JIT


def jit(fn, capture_now: bool = True) -> TinyJit:
    """A ``TinyJit`` of ``fn``. ``capture_now``: capture on the first call (scheduled once)
    rather than run it plainly first, as tinygrad does by default."""
    j = TinyJit(fn)
    if capture_now:
        j.cnt = max(j.cnt, 1)
    return j


def kernels(j) -> int:
    """How many kernels a TinyJit captured (0 before it has)."""
    return len(j.captured.linear.src) if has_captured(j) else 0


def has_captured(j) -> bool:
    return getattr(j, "captured", None) is not None


def generated_opts() -> dict[str, set[str]]:
    """Each kernel this process generated code for, by its function's name: the kinds of
    optimisation applied to it (``UPCAST``, ``UNROLL``, ``THREAD``, ...)."""
    out: dict[str, set[str]] = {}
    for prg in list(to_program_cache.values()):
        info = prg.src[0].arg if prg.src and prg.src[0].op is Ops.SINK else None
        if isinstance(info, KernelInfo) and isinstance(prg.arg, ProgramInfo):
            out.setdefault(prg.arg.function_name, set()).update(
                o.op.name for o in info.applied_opts)
    return out


def call_jit(j: TinyJit, args: tuple):
    """``(runner, outputs)``: the jit called on ``args``; where it had nothing to compile
    (constants, views) its plain function runs instead, and is the runner from then on."""
    with LOCK:
        try:
            return j, j(*args)
        except JitError as e:
            if "didn't JIT anything" not in str(e):
                raise
            return j.fxn, j.fxn(*args)


class Replay:
    """A captured program called again on the same buffers, its kernels called directly.

    TinyJit re-inspects every input on each call and dispatches each kernel through its
    pattern matcher (~2 ms a call, ~0.1 ms a kernel). Where the buffers do not change between
    calls (a loop's steps; a program copying its inputs into buffers it keeps) they are
    resolved once here, and a call binds the symbolic values and calls each kernel's program.
    ``ok`` is False where it cannot be (inputs the capture copies, several devices)."""

    def __init__(self, j: TinyJit, args: tuple, ret=None, kernels: KernelCache | None = None):
        self.tensors = [a for a in args if isinstance(a, Tensor)]
        self.ret = ret
        ins, _, names, info = _prepare_jit_inputs(tuple(args), {})
        cap = j.captured
        fits = cap is not None and cap.expected_names == names and cap.expected_input_info == info
        self.ins = ins
        self.plan = _plan(cap, ins, kernels) if fits else None
        self.ok = self.plan is not None
        self.hits = 0                # calls that fitted (a replay never used may be replaced)

    def fits(self, args) -> bool:
        """Whether ``args`` are the very tensors this replay was planned for."""
        tensors = [a for a in args if isinstance(a, Tensor)]
        ok = self.ok and len(tensors) == len(self.tensors) and all(
            a is b for a, b in zip(tensors, self.tensors, strict=True))
        self.hits += ok
        return ok

    timings: list[float] | None = None
    """Set to a list to have every kernel launch's seconds appended to it (bench/ splits a
    call's time into kernels and the rest with it); None: no timing."""

    def __call__(self, var_vals: dict[str, int]):
        if Replay.timings is not None:
            return self._timed(var_vals)
        for step in self.plan:
            step(var_vals)
        return self.ret

    def _timed(self, var_vals: dict[str, int]):
        for step in self.plan:
            t = time.perf_counter()
            step(var_vals)
            Replay.timings.append(time.perf_counter() - t)
        return self.ret


def returned(j: TinyJit):
    """What a captured TinyJit's replays return (its output tensors)."""
    return j.captured.ret


SNAPSHOT_BYTES = 1 << 30
"""The most state a first step copies to replay itself (see ``Segment._call``); a program
with more runs its first step through tinygrad, loaded or fresh alike."""


def can_snapshot(tensors: dict[str, Tensor]) -> bool:
    """Whether :func:`snapshot` copies ``tensors``: each one plain buffer of a numpy dtype
    (what :func:`read` and :func:`write` copy straight), together at most
    :data:`SNAPSHOT_BYTES`."""
    return all(_plain_buffer(t) is not None and _to_np_dtype(t.dtype) is not None
               for t in tensors.values()) and \
        sum(t.nbytes() for t in tensors.values()) <= SNAPSHOT_BYTES


def snapshot(tensors: dict[str, Tensor]) -> list | None:
    """A copy of each tensor's values, for :func:`restore`; None where
    :func:`can_snapshot` says no."""
    return [(t, read(t)) for t in tensors.values()] if can_snapshot(tensors) else None


def restore(snap: list) -> None:
    """Put back the values :func:`snapshot` copied."""
    for t, a in snap:
        if not write(t, a):
            raise RuntimeError("a snapshot's tensor is no longer one plain buffer")


def touches_only(jits: list, tensors: dict[str, Tensor]) -> bool:
    """Whether the captures use no live tensor's buffer but those of ``tensors`` and of what
    they return (what :func:`freeze` requires of a program it stores)."""
    rets = {r.uop.base for j in jits for r in _tensors(j.captured.ret)}
    return not _holds_other_tensors(jits, {t.uop.base for t in tensors.values()} | rets)


def replayer(j: TinyJit, args: tuple, kernels: KernelCache | None = None):
    """A function of the step index replaying a captured loop step on the same buffers
    (see :class:`Replay`), or calling the TinyJit where a replay cannot be planned."""
    rep = Replay(j, args, kernels=kernels)
    if rep.ok:
        return rep
    return lambda var_vals: j(*_rebind(args, var_vals))


def _plan(cap, ins, kernels=None) -> list | None:
    """Each kernel of a captured step as (program, buffers, launch info); other calls as
    they are. None where the plain replay must run (inputs it copies, several devices).
    ``kernels``: the kernel cache, where what a kernel computes is remembered."""
    if any(u in cap._written_uops for u in ins) or any(u.op is not Ops.BUFFER for u in ins):
        return None
    plan: list = []
    for call in cap.linear.src:
        ast = call.src[0]
        if ast.op is not Ops.PROGRAM:
            plan.append(lambda vv, c=call: pm_exec.rewrite(c, ExecContext(vv, tuple(ins),
                                                                           False, True)))
            continue
        resolved = resolve_params(call, tuple(ins))
        per_dev = list(unwrap_multi(call, [resolved[i] for i in ast.arg.globals]))
        devices = to_tuple(call.src[1].device)
        if len(per_dev) != 1 or per_dev[0][1] or len(devices) != 1:
            return None
        bufs = [b.ensure_allocated().get_buf(devices[0]) for b in per_dev[0][0]]
        rt = get_runtime(devices[0], ast)
        code = next((u.arg for u in ast.src if u.op is Ops.BINARY), None)
        plan.append(_gemm(rt, per_dev[0][0], bufs, ast.arg, code, kernels)
                    or _launcher(rt, bufs, ast.arg))
    return plan


def _gemm(rt, tbufs, bufs, prg, code: bytes | None, kernels):
    """A CPU kernel computing a matrix product of two inputs (and one of gemm.EPILOGUES), as
    numpy's on its buffers (engine/compile/gemm.py: found by running it on scratch arrays)."""
    if os.environ.get("DLGRAPH_BLAS") == "0" or type(rt).__name__ != "CPUProgram" or rt.lvp or \
            not 3 <= len(set(prg.globals)) <= 5 or \
            set(prg.outs) != {prg.globals[0]} or set(prg.ins) != set(prg.globals[1:]) or \
            any(v.expr != "core_id" for v in prg.vars) or len({b.va_addr for b in bufs}) < \
            len(bufs) or any(b.dtype != dtypes.float32 for b in tbufs):
        return None
    sizes = tuple(b.size for b in tbufs)
    run = lambda addrs: _launcher(rt, [_Addr(a) for a in addrs], prg)({})  # noqa: E731
    layout = gemm.remembered_layout(sizes, run, code, kernels) if code is not None \
        else gemm.find_layout(sizes, run)
    return None if layout is None else gemm.matmul_call([b.va_addr for b in bufs], sizes,
                                                        layout, bufs, code, kernels)


@dataclasses.dataclass
class _Addr:
    va_addr: int


def _launcher(rt, bufs: list, prg):
    """A function of the bound values that runs one compiled kernel on ``bufs``: what does
    not depend on the values (launch sizes, the CPU's argument words) worked out once."""
    names = [v.expr for v in prg.vars]
    dims = None if names else prg.launch_dims({})
    cpu = type(rt).__name__ == "CPUProgram" and not rt.lvp
    fixed = range(prg.global_size[0]) if isinstance(prg.global_size[0], int) else None
    if cpu and fixed is not None and prg.runtimevars and names == ["core_id"]:
        return Chunked(rt.fxn, [tuple(ctypes.c_uint64(w) for w in (
            *[b.va_addr for b in bufs], tid)) for tid in fixed])
    if cpu and not prg.runtimevars:
        words, fxn = tuple(ctypes.c_uint64(b.va_addr) for b in bufs), rt.fxn
        if dims is not None:            # no bound values: the bare ctypes calls
            reps = range(dims[0][0])

            def cpu_call(var_vals):
                for _ in reps:
                    fxn(*words)
            return cpu_call

        def cpu_call_vars(var_vals):
            args = words + tuple(ctypes.c_uint64(var_vals[n]) for n in names)
            for _ in fixed or range(prg.launch_dims(var_vals)[0][0]):
                fxn(*args)
        return cpu_call_vars

    def call(var_vals):
        gs, ls = dims or prg.launch_dims(var_vals)
        rt(*bufs, global_size=gs, local_size=ls, vals=prg.vals(var_vals), wait=False)
    return call


def _rebind(args: tuple, var_vals: dict) -> tuple:
    var = args[0].unbind()[0]
    return (var.bind(var_vals["step"]), *args[1:])


# ----------------------------------------------------------------- the kernel cache


class KernelCache:
    """Generated kernels kept across processes and specs, keyed by their kernel AST.

    tinygrad generates each kernel's code from its AST (``to_program``: most of a first
    step's wait) and keeps the result only in memory, under a key of the AST, the renderer
    and the code-generation settings. Here that table is backed by signed files: before
    tinygrad compiles a program's kernels, those it lacks are looked up on disk, and what it
    generates is written back. ``load(name) -> bytes | None``, ``store(name, bytes)`` and
    ``has(name)`` are a signed store (engine/compile/cache.py); entries are unpickled
    admitting tinygrad's own classes only. ``loaded`` and ``made`` count kernels since the
    last :meth:`take_counts`.
    """

    def __init__(self, load, store, salt: str, has):
        self.load, self.store, self.salt, self.has = load, store, salt, has
        self.loaded = self.made = self.beside = 0
        self.kept: set[str] = set()      # names known to be on disk

    def name(self, key: tuple) -> str:
        ast_key, ren, target, *config = key
        text = repr((ast_key.hex() if isinstance(ast_key, bytes) else repr(ast_key),
                     f"{ren.__module__}.{ren.__qualname__}", repr(target), config, self.salt))
        return "k" + hashlib.sha256(text.encode()).hexdigest()

    def fill(self, keys: list[tuple]) -> list[tuple]:
        """Load the kernels of ``keys`` that tinygrad lacks; returns those still missing."""
        missing = []
        for k in keys:
            name = self.name(k)
            if k in to_program_cache:    # generated earlier in this process: on disk too
                if name not in self.kept and not self.has(name):
                    missing.append(k)
                continue
            blob = self.load(name)
            prg = None
            if blob is not None:
                try:
                    prg = _Unpickler(io.BytesIO(blob)).load()
                except Exception:      # an entry that checks but does not load: rebuild it
                    prg = None
            if isinstance(prg, UOp) and prg.op is Ops.PROGRAM:
                to_program_cache[k] = prg
                self.kept.add(name)
                self.loaded += 1
            else:
                missing.append(k)
        return missing

    def keep(self, keys: list[tuple]) -> None:
        for k in keys:
            if (prg := to_program_cache.get(k)) is not None:
                self.store(self.name(k), pickle.dumps(prg, protocol=pickle.HIGHEST_PROTOCOL))
                self.kept.add(self.name(k))
                self.made += 1

    def take_counts(self) -> tuple[int, int, int]:
        """(kernels loaded, generated, generated by a helper process) since the last call."""
        out = (self.loaded, self.made, self.beside)
        self.loaded = self.made = self.beside = 0
        return out


_OFF = object()
_KERNELS: KernelCache | object | None = None    # None: the process's (keep_kernels_in)
_DEFAULT: list = [None]
_LOWER: dict = {}


def keep_kernels_in(cache: KernelCache | None) -> None:
    """Kernels compiled outside a program (a device's own helper programs, a probe, filling
    an optimizer's state) are looked up in and kept in ``cache`` too: tinygrad's CPU device
    generates four helper programs each time a process opens it (about 0.1-0.2 s)."""
    _DEFAULT[0] = cache
    _wrap_compilers()
    try:
        from tinygrad.runtime import ops_cpu
    except Exception:       # a backend this machine cannot load: nothing of it to keep
        return
    if ops_cpu.do_to_program is not _device_program:
        _LOWER["device"], ops_cpu.do_to_program = ops_cpu.do_to_program, _device_program


def _compiled_code_for_every_thread() -> None:
    """tinygrad keeps the C compiler's output in SQLite through one connection that only
    the thread that opened it may use: a model compiled from a second thread of the user's
    program failed (a connection per thread, swapped as threads took :data:`LOCK`, missed
    one opened by a thread outside the lock). One connection serves every thread instead,
    opened before tinygrad's own compiles (sqlite serialises its use)."""
    if helpers._db_connection is _SHARED_DB[0] is not None or helpers.CACHELEVEL < 1:
        return
    import sqlite3
    os.makedirs(os.path.dirname(helpers.CACHEDB), exist_ok=True)
    db = sqlite3.connect(helpers.CACHEDB, timeout=60, isolation_level="IMMEDIATE",
                         check_same_thread=False)
    with contextlib.suppress(sqlite3.OperationalError):
        db.execute("PRAGMA journal_mode=WAL").fetchone()
    db.execute("PRAGMA synchronous=NORMAL")
    helpers._db_connection = _SHARED_DB[0] = db


_SHARED_DB: list = [None]


def _device_program(ast: UOp, renderer) -> UOp:
    """tinygrad's ``do_to_program`` for a device's own programs, through the kernel cache."""
    key = to_program_key(ast, renderer)
    if key not in to_program_cache:
        _compiled_code_for_every_thread()
        cache = _current()
        if cache is None or cache.fill([key]):
            to_program_cache[key] = _LOWER["device"](ast, renderer)
            if cache is not None:
                cache.keep([key])
    return to_program_cache[key]


def _current() -> KernelCache | None:
    cache = _DEFAULT[0] if _KERNELS is None else _KERNELS
    return None if cache is _OFF else cache


def _wrap_compilers() -> None:
    if not _LOWER.get("realize"):          # tinygrad's compile entry points, wrapped once
        from tinygrad.runtime.support import hcq2
        _LOWER.update(realize=realize.lower_and_compile, hcq2=hcq2.lower_and_compile)
        realize.lower_and_compile = hcq2.lower_and_compile = _lower_and_compile
        from tinygrad.runtime.support.compiler_cpu import ClangCompiler
        _LOWER["compile"], ClangCompiler.compile_cached = \
            ClangCompiler.compile_cached, _compile_cached
        _LOWER["hand coded"], heuristic.hand_coded_optimizations = \
            heuristic.hand_coded_optimizations, _hand_coded


class kernels_from:
    """``with kernels_from(cache):`` the kernels tinygrad compiles meanwhile are looked up in
    and kept in ``cache`` (None: neither)."""

    def __init__(self, cache: KernelCache | None):
        self.cache, self.before = cache, None

    def __enter__(self):
        global _KERNELS
        _wrap_compilers()
        self.before, _KERNELS = _KERNELS, _OFF if self.cache is None else self.cache
        return self

    def __exit__(self, *exc):
        global _KERNELS
        _KERNELS = self.before


def _lower_and_compile(linear: UOp) -> UOp:
    _compiled_code_for_every_thread()
    linear = _plain_loops(linear)
    cache = _current()
    todo = dict((to_program_key(*a), a) for c in linear.toposort() if c.op is Ops.CALL
                 and (a := realize._get_call_to_compile(c)) is not None)
    missing = list(todo) if cache is None else cache.fill(list(todo))
    beside = _generate_beside([(k, todo[k]) for k in missing if k not in to_program_cache])
    out = _LOWER["realize"](linear)
    if cache is not None:
        cache.keep(missing)
        cache.beside += beside
    return out


_WAITING = b"dlgraph: to be compiled with others\n"
_TOGETHER = threading.local()   # .waiting while _gather runs: {mark: (compiler, source)}


def _compile_cached(self, src: str) -> bytes:
    """tinygrad's ``compile_cached`` for C kernels: while :func:`_gather` runs, a source
    the compiled-code database lacks waits, marked, to be compiled with the others."""
    waiting = getattr(_TOGETHER, "waiting", None)
    if waiting is None or self.arch != "x86_64":
        return _LOWER["compile"](self, src)
    if self.cachekey is not None and (lib := helpers.diskcache_get(self.cachekey, src)):
        return lib
    mark = _WAITING + hashlib.sha256(src.encode()).digest()
    waiting[mark] = (self, src)
    return mark


def _gather(todo: list[tuple], taken) -> list[tuple[int, UOp]]:
    """``(index, program)`` for each kernel of ``todo`` that ``taken`` generates, its code
    generated as tinygrad does, but the C compiler run once for all of them
    (engine/compile/together.py: a run costs about 30 ms whatever it compiles); a kernel
    that cannot be cut out of the one object is compiled alone. Each is put where tinygrad
    looks programs up; a program whose code is still to come is never left there. Not
    under a BEAM search (it runs the candidates it compiles), nor with
    ``DLGRAPH_COMPILE_TOGETHER=0``."""
    apart = os.environ.get("DLGRAPH_COMPILE_TOGETHER") == "0" or BEAM.value >= 1 or any(
        isinstance(a[0].arg, KernelInfo) and a[0].arg.beam >= 1 for _, a in todo)
    _TOGETHER.waiting = waiting = None if apart else {}
    try:
        made = list(taken)
        _TOGETHER.waiting = None
        libs = _compile_waiting(waiting or {})
    except BaseException:
        for k, _ in todo:
            if (prg := to_program_cache.get(k)) is not None and _waits(prg):
                del to_program_cache[k]
        raise
    finally:
        _TOGETHER.waiting = None
    out = []
    for i, prg in made:
        if _waits(prg):
            prg = prg.replace(src=(*prg.src[:-1], UOp(Ops.BINARY, arg=libs[prg.src[-1].arg])))
        to_program_cache[todo[i][0]] = prg
        out.append((i, prg))
    return out


def _waits(prg: UOp) -> bool:
    last = prg.src[-1] if prg.src else None
    return last is not None and last.op is Ops.BINARY and isinstance(last.arg, bytes) and \
        last.arg.startswith(_WAITING)


def _compile_waiting(waiting: dict) -> dict[bytes, bytes]:
    """Each waiting mark's compiled code: one run of the C compiler per compiler, a kernel
    it could not cut out compiled alone; each kept in tinygrad's compiled-code database."""
    libs: dict[bytes, bytes] = {}
    groups: dict[int, list] = {}
    for mark, (compiler, _) in waiting.items():
        groups.setdefault(id(compiler), []).append(mark)
    for marks in groups.values():
        c = waiting[marks[0]][0]
        srcs = [waiting[m][1] for m in marks]
        pieces = together.compile_together(_clang_command(c), srcs) if len(marks) > 1 \
            else [None]
        for m, src, lib in zip(marks, srcs, pieces, strict=True):
            if lib is None:
                lib = _LOWER["compile"](c, src)
            elif c.cachekey is not None:
                helpers.diskcache_put(c.cachekey, src, lib)
            libs[m] = lib
    return libs


def _clang_command(c) -> list[str]:
    """The command tinygrad's ``ClangCompiler.compile`` runs (tinygrad 0.14.0)."""
    return [helpers.getenv("CC", "clang"), "-c", "-x", "c", "-O2", "-fPIC", "-ffreestanding",
            "-fno-math-errno", "-nostdlib", "-fno-ident", f"--target={c.arch}-none-unknown-elf",
            *c.args, "-", "-o", "-"]


_HELPER = [False]
HELPER_FROM = 2
"""Kernels to generate before a helper process is forked for half of them (a fork costs
about 7 ms here; one kernel's code generation 0.05-0.9 s)."""


def _generate_beside(todo: list[tuple]) -> int:
    """Generate the code of ``todo``'s kernels (``(key, (ast, renderer))``) in this process
    and in a forked copy of it at once, each taking the next kernel not yet taken: on two
    cores a cold transformer's first step waited for about 140 kernels one after another.
    The two share a counter of kernels taken and done; the helper's programs come back
    pickled through an unnamed file and are loaded admitting tinygrad's classes only.
    Kernels it did not finish are generated here by tinygrad as usual, and a helper that
    finishes none for :data:`HELPER_STALL` seconds is stopped. CPU kernels only (other
    devices' compilers are unmeasured after a fork), never under BEAM (it times on the
    device), and only from a main thread whose other threads are known (a lock that a
    server's or Ray's thread holds at the fork would stay held in the copy); otherwise this
    process generates them alone (:func:`_alone`). Either way a process's kernels come out
    of one run of the C compiler (:func:`_gather`). Returns how many kernels the helper
    generated."""
    if not _HELPER[0] or len(todo) < HELPER_FROM or BEAM.value >= 1 or not _fork_safe() or \
            not all(a[1].target.device.startswith("CPU") for _, a in todo):
        return _alone(todo)
    import multiprocessing
    import tempfile
    counts = multiprocessing.get_context("fork").Array("i", 2)     # taken, done by the helper
    with tempfile.TemporaryFile() as out:
        try:
            pid = os.fork()
        except OSError:                 # no memory or process left for it: compile alone
            return _alone(todo)
        if pid == 0:                                   # the helper: never returns
            _helper_main(todo, counts, out)
        try:
            _gather(todo, _taken(todo, counts))
        finally:
            _await_helper(pid, counts)
        out.seek(0)
        made = _helper_results(out, len(todo))
    for i, prg in made:
        to_program_cache.setdefault(todo[i][0], prg)
    return len(made)


def _alone(todo: list[tuple]) -> int:
    """``todo``'s kernels generated here, where tinygrad would generate them one by one in
    this process too (``PARALLEL`` 0); left to tinygrad's pool of workers where it has one."""
    if PARALLEL.value == 0:
        _gather(todo, ((i, to_program(*a)) for i, (_, a) in enumerate(todo)))
    return 0


HELPER_STALL = 60.0
_QUIET_THREADS = ("tqdm_monitor", "dlgraph-kernel")   # tqdm's clock; idle between kernels


def _fork_safe() -> bool:
    main = threading.main_thread()
    return threading.current_thread() is main and all(
        t is main or t.name.startswith(_QUIET_THREADS) for t in threading.enumerate())


def _taken(todo: list[tuple], counts):
    """``(index, program)`` for each kernel of ``todo`` this process takes, in turn."""
    while True:
        with counts.get_lock():
            i, counts[0] = counts[0], counts[0] + 1
        if i >= len(todo):
            return
        yield i, to_program(*todo[i][1])


def _helper_main(todo: list[tuple], counts, out) -> None:
    made: list = []
    # tinygrad's compiled-code database: a connection of the helper's own; the parent's is
    # held, never closed here, until the helper exits
    _inherited, helpers._db_connection = helpers._db_connection, None
    try:
        with contextlib.suppress(Exception):
            made = _gather(todo, _counted(_taken(todo, counts), counts))
        pickle.dump(made, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
    finally:
        os._exit(0)


def _counted(taken, counts):
    for i, prg in taken:
        with counts.get_lock():
            counts[1] += 1
        yield i, prg


def _await_helper(pid: int, counts) -> None:
    done, since = -1, time.monotonic()
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if counts[1] != done:
            done, since = counts[1], time.monotonic()
        elif time.monotonic() - since > HELPER_STALL:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return
        time.sleep(0.002)


def _helper_results(out, n: int) -> list[tuple[int, UOp]]:
    """The helper's ``(index, program)`` pairs that name one of the ``n`` kernels."""
    try:
        made = _Unpickler(out).load()
    except Exception:                 # the helper stopped early: tinygrad generates the rest
        return []
    return [(i, prg) for i, prg in (m for m in made if isinstance(m, tuple) and len(m) == 2)
            if isinstance(i, int) and 0 <= i < n and isinstance(prg, UOp)
            and prg.op is Ops.PROGRAM] if isinstance(made, list) else []


_TRANSCENDENTAL = {"EXP2", "LOG2", "SIN"}


def kernel_ops(call: UOp) -> set[str]:
    """The names of the operations of a call's kernel yet to be compiled (``REDUCE``,
    ``EXP2``, ...); empty for any other call."""
    root = call.src[0]
    return {u.op.name for u in root.toposort()} if root.op is Ops.SINK else set()


def _plain_loops(linear: UOp) -> UOp:
    """CPU kernels that compute exponentials or logarithms elementwise (a gate's sigmoid, a
    gelu) compiled as the plain loop they are, without tinygrad's hand-coded optimisations:
    its float4 upcast leaves C that handles each lane of the exp2 polynomial apart, while
    the plain loop is vectorised by the C compiler (an LSTM step's gate kernel 31 -> 4 us;
    lstm inference 1.09 -> 0.43 ms, training 2.5 -> 1.8; gru 1.14 -> 0.34 and 2.35 -> 1.97,
    measured). Reductions keep them (without, the cnn's and transformer's steps took twice
    as long), as do elementwise kernels without those (all plain: cnn step 42 -> 67 ms),
    other devices and a BEAM search."""
    if BEAM.value >= 1:
        return linear
    calls = [_plain_call(c) if c.op is Ops.CALL else c for c in linear.src]
    if all(a is b for a, b in zip(calls, linear.src, strict=True)):
        return linear
    return linear.replace(src=tuple(calls))


def _plain_call(c: UOp) -> UOp:
    a = realize._get_call_to_compile(c)
    ast = a[0] if a is not None else None
    if ast is None or c.src[0] is not ast or ast.op is not Ops.SINK or \
            not isinstance(ast.arg, KernelInfo) or ast.arg.opts_to_apply is not None or \
            not a[1].target.device.startswith("CPU"):
        return c
    ops = kernel_ops(c)
    if "REDUCE" in ops or not ops & _TRANSCENDENTAL:
        return c
    plain = ast.replace(arg=dataclasses.replace(ast.arg, opts_to_apply=()))
    return c.replace(src=(plain, *c.src[1:]))


def _product_like(ast: UOp) -> bool:
    """Whether a kernel may be a matrix product that the host's BLAS computes from its
    replay on (engine/compile/gemm.py decides, on the compiled kernel): one sum, over one
    range, of the product of two of its float32 buffers whose sizes fit ``[m, k] @ [k, n]``
    for the sum's length ``k``, no other range read by both, written to its first buffer
    with at most sums, a relu or a mask after the sum."""
    topo = ast.toposort()
    reduces = [u for u in topo if u.op is Ops.REDUCE]
    stores = [u for u in topo if u.op is Ops.STORE]
    params = sorted((u for u in topo if u.op is Ops.PARAM), key=lambda p: p.arg.slot)
    if len(reduces) != 1 or len(stores) != 1 or not 3 <= len(params) <= 5:
        return False
    red = reduces[0]
    mul = red.src[0]
    if red.arg[0] is not Ops.ADD or mul.op is not Ops.MUL or \
            any(s.op is not Ops.INDEX or s.src[0].op is not Ops.PARAM for s in mul.src) or \
            [p.arg.slot for p in params] != list(range(len(params))) or \
            any(p.dtype != dtypes.float32 or p.src[0].op is not Ops.CONST for p in params):
        return False
    if len(red.src) != 2 or (r := red.src[1]).op is not Ops.RANGE or \
            r.src[0].op is not Ops.CONST:
        return False            # a sum over ranges tinygrad could not merge: not contiguous
    a, b = ({u for u in s.src[1].toposort() if u.op is Ops.RANGE} for s in mul.src)
    if a & b != {r} or not _epilogue_only(stores[0], red):
        return False            # a range both operands read besides the sum's: a batch
    return gemm.could_be(tuple(p.src[0].arg for p in params), r.src[0].arg,
                         tuple(s.src[0].arg.slot for s in mul.src))


_EPILOGUE_OPS = {Ops.ADD, Ops.MAX, Ops.WHERE, Ops.CMPLT, Ops.CONST, Ops.CAST}


def _epilogue_only(store: UOp, red: UOp) -> bool:
    """Whether what a kernel stores is its sum with at most sums, a relu or a mask after it
    (what gemm.EPILOGUES may be), apart from the indices it reads at."""
    todo, seen = [store.src[1]], set()
    while todo:
        u = todo.pop()
        if u is red or u.op is Ops.INDEX or u in seen:
            continue
        if u.op not in _EPILOGUE_OPS:
            return False
        seen.add(u)
        todo += u.src
    return True


def _hand_coded(k):
    """tinygrad's hand-coded optimisations, without the unrolled sum for a CPU kernel that
    may be a product for the BLAS (:func:`_product_like`): its code runs in the capturing
    step and once on scratch arrays to be recognised, then never again, while unrolling
    made it the costliest to generate (graphs/cnn.yaml's 14 products: 0.2-1.7 s each, 40%
    of its code generation; upcast outputs and threads kept: as fast within 25%)."""
    light = k.copy() if not k.ren.has_local and BEAM.value < 1 and \
        os.environ.get("DLGRAPH_BLAS") != "0" and _product_like(k.ast) else None
    k = _LOWER["hand coded"](k)
    if light is None:
        return k
    try:
        for opt in k.applied_opts:
            if opt.op in (OptOps.UPCAST, OptOps.THREAD):
                light.apply_opt(opt)
    except KernelOptError:          # an axis the dropped unroll had moved: keep them all
        return k
    return light


# --------------------------------------------------------- captured programs as bytes


def cacheable(state: dict) -> bool:
    """Whether every state tensor is one plain realised buffer (not sharded over devices):
    only those are swapped for placeholders, so only then may a capture be kept."""
    return all(t.uop.base.op is Ops.BUFFER and t.uop.base.is_realized for t in state.values())


def freeze(jits: list, state: dict) -> bytes | None:
    """Captured TinyJits as bytes, the ``state`` tensors (name -> Tensor) swapped for
    placeholders; None when that cannot be done faithfully: state that is not a plain
    buffer, a capture that returns live state, or one that holds the buffer of any other
    live tensor (its values would be stored and later read as constants)."""
    if not cacheable(state):
        return None
    live = {k: t.uop.base for k, t in state.items()}
    rets = {r.uop.base for j in jits for r in _tensors(j.captured.ret)}   # kept whole
    if rets & set(live.values()) or not touches_only(jits, state):
        return None
    ph = {k: UOp.new_buffer(u.device, u.max_numel(), u.dtype) for k, u in live.items()}
    sub = {live[k]: ph[k] for k in live}
    caps = [CapturedJit(c.ret, _lean(c._linear.substitute(sub, walk=True)), c.expected_names,
                        c.expected_input_info) for c in (j.captured for j in jits)]
    written = [list(c._written_uops) for c in caps]     # worked out here, not at each load
    out = io.BytesIO()
    _Pickler(out, _scratch(caps) - rets).dump((FORMAT, caps, ph, written))
    return out.getvalue()


def _lean(linear: UOp) -> UOp:
    """A captured linear whose compiled kernels keep what running them needs: the machine
    code, the C source, the launch information and the parameters' signature. A kernel's
    AST and its linearised instructions (about 150 operations a kernel, three quarters of
    what a cnn step stored) are dropped: unpickled at every start, then hashed again by
    tinygrad to look the kernel up."""
    def lean(call: UOp) -> UOp:
        p = call.src[0] if call.op is Ops.CALL else None
        if p is None or p.op is not Ops.PROGRAM or len(p.src) != 4 or \
                [u.op for u in p.src] != [Ops.SINK, Ops.LINEAR, Ops.SOURCE, Ops.BINARY]:
            return call
        sink, lin, source, binary = p.src
        params = tuple(u for u in lin.src if u.op is Ops.PARAM)     # to_elf's signature
        prog = p.replace(src=(UOp(Ops.SINK, sink.dtype, (), sink.arg),
                              UOp(Ops.LINEAR, lin.dtype, params, lin.arg), source, binary))
        return call.replace(src=(prog, *call.src[1:]))
    return linear.replace(src=tuple(lean(c) for c in linear.src))


class _Pickler(pickle.Pickler):
    """Stores the ``scratch`` buffers without their contents (tinygrad pickles every
    allocated buffer's bytes): they come back unallocated and the first run allocates them."""

    def __init__(self, f, scratch: set):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.scratch = scratch

    def reducer_override(self, obj):
        if type(obj) is UOp and obj in self.scratch:
            return UOp, (obj.op, obj.dtype, obj.src, obj.arg, obj.tag, obj.metadata)
        return NotImplemented


def _scratch(caps: list) -> set:
    """The buffers whose stored contents no capture reads: every byte a call reads was
    written by an earlier call of the same run (a capture's intermediates, which tinygrad
    packs into one arena of views, overwritten at every run). Stored with their contents,
    the cnn's training step was a 43 MB cache entry, read, checked and copied back at every
    start. Conservative: a call whose reads are unknown (not a kernel or a copy) reads all
    it is given, and a view whose place is unknown reads its whole buffer."""
    held, read = set(), set()
    for c in caps:
        done: dict = {}                                 # buffer -> byte spans written so far
        for call in c._linear.src:
            known = call.op is Ops.CALL and call.src[0].op in (Ops.PROGRAM, Ops.COPY)
            outs, ins = realize.get_call_outs_ins(call) if known else ((), ())
            args = realize.get_call_arg_uops(call) if call.op is Ops.CALL else call.src
            for i, u in enumerate(args):
                for b in (x for x in u.toposort() if x.op is Ops.BUFFER and _allocated(x)):
                    held.add(b)
                    span = _span(u, b)
                    if (not known or i in ins or span is None) and \
                            not _covered(done.get(b, []), span or (0, b.realized.nbytes)):
                        read.add(b)
                    if known and i in outs and span is not None:
                        done.setdefault(b, []).append(span)
    return held - read


def _allocated(b: UOp) -> bool:
    r = b.realized
    return r is not None and not isinstance(r, MultiBuffer) and r.is_allocated()


def _span(u: UOp, b: UOp) -> tuple[int, int] | None:
    """The bytes of buffer ``b`` that argument ``u`` (``b`` or a view of it) covers."""
    if u is b:
        return 0, b.realized.nbytes
    try:
        buf = u.buffer
    except Exception:       # not a view tinygrad can place: unknown
        return None
    if isinstance(buf, MultiBuffer) or buf.base is not b.realized:
        return None
    return buf.offset, buf.offset + buf.nbytes


def _covered(spans: list, want: tuple[int, int]) -> bool:
    """Whether the byte spans together cover ``want``."""
    at, end = want
    for lo, hi in sorted(spans):
        if lo > at:
            break
        at = max(at, hi)
        if at >= end:
            return True
    return at >= end


def thaw(payload: bytes, state: dict) -> list:
    """TinyJits from :func:`freeze`'s bytes, running on this process's ``state`` tensors
    (plain buffers: see :func:`cacheable`).
    Raises ValueError when the entry does not fit (other state names, sizes or dtypes)."""
    fmt, caps, ph, written = _Unpickler(io.BytesIO(payload)).load()
    if fmt != FORMAT or set(ph) != set(state) or len(written) != len(caps):
        raise ValueError("the entry was made for other state")
    sub = {}
    for k, u in ph.items():
        base = state[k].uop.base
        if (base.max_numel(), base.dtype, base.device) != (u.max_numel(), u.dtype, u.device):
            raise ValueError(f"state '{k}' has another size or dtype")
        sub[u] = base
    jits = []
    for c, w in zip(caps, written, strict=True):
        cap = CapturedJit(c.ret, c._linear.substitute(sub, walk=True), c.expected_names,
                          c.expected_input_info)
        cap.__dict__["_written_uops"] = {sub.get(u, u) for u in w}   # tinygrad's, as frozen
        jits.append(_TinyJit(None, cap))
    return jits


def held_bytes(jits: list, skip: list, more: list = ()) -> int:
    """The bytes of the device buffers the captures hold besides those of ``skip`` (the
    parameters), each base buffer once, plus the buffers of the tensors ``more``."""
    mine, seen = {t.uop.base for t in skip}, {}
    for j in (j for j in jits if has_captured(j)):
        for u in j.captured.linear.toposort():
            if u.op is Ops.BUFFER and u not in mine and u in buffers:
                b = buffers[u]._base or buffers[u]
                seen[id(b)] = b.nbytes
    return sum(seen.values()) + sum(t.uop.base.buffer.nbytes for t in more)


def stored_captures(payload: bytes) -> list[dict]:
    """What an entry :func:`freeze` wrote holds, per capture: the buffers it says the program
    writes (``written``), those tinygrad finds in the loaded program itself (``found``), and
    per kernel the operations kept of its AST and the bytes of its machine code
    (``kernels``). Raises ValueError for an entry of another format."""
    fmt, caps, _, written = _Unpickler(io.BytesIO(payload)).load()
    if fmt != FORMAT or len(written) != len(caps):
        raise ValueError("not an entry of this format")
    out = []
    for c, w in zip(caps, written, strict=True):
        again = CapturedJit(c.ret, c._linear, c.expected_names, c.expected_input_info)
        progs = [call.src[0] for call in c._linear.src if call.src[0].op is Ops.PROGRAM]
        out.append({"written": set(w), "found": again._written_uops,
                    "kernels": [(len(p.src[0].src), len(p.src[3].arg)) for p in progs]})
    return out


def _holds_other_tensors(jits: list, allowed: set) -> bool:
    """Whether a capture uses the buffer of a live tensor that is not ``allowed``."""
    used = {u for j in jits for u in j.captured._linear.toposort() if u.op is Ops.BUFFER}
    for ref in list(all_tensors):
        t = ref()
        if t is not None and (u := t.uop.base) in used and u not in allowed:
            return True
    return False


def _tensors(ret) -> list:
    if isinstance(ret, Tensor):
        return [ret]
    return [t for t in (ret or []) if isinstance(t, Tensor)]


class _Unpickler(pickle.Unpickler):
    """Admits tinygrad's classes and plain builtins only. Every device buffer gets a fresh
    number here: tinygrad interns UOps by value, so a stored buffer's number must never meet
    a live buffer of this process."""

    SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray", "tuple", "list",
                     "dict", "int", "float", "bool", "str", "bytes", "range"}

    def __init__(self, f):
        super().__init__(f)
        self.slots: dict[int, int] = {}

    def find_class(self, module: str, name: str):
        if module == "tinygrad.uop.ops" and name == "UOp":
            return self._uop
        if module == "builtins" and name in self.SAFE_BUILTINS:
            return super().find_class(module, name)
        if (module == "tinygrad" or module.startswith("tinygrad.")) and "." not in name:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a program cache entry names {module}.{name}")

    def _uop(self, op, dtype, src=(), arg=None, tag=None, metadata=None, buffer=None):
        if op is Ops.BUFFER and getattr(arg, "device", None) is not None:
            if arg.slot not in self.slots:
                self.slots[arg.slot] = next(UOp.unique_num)
            arg = dataclasses.replace(arg, slot=self.slots[arg.slot])
        return UOp(op, dtype, src, arg, tag, metadata, buffer)
