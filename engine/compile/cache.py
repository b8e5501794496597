"""Compiled programs kept across processes, so a second run of a spec skips tinygrad's
scheduling and code generation (most of the wait before the first step).

An entry is what ``TinyJit`` captured for one stage of a :class:`~.lower.Program`:
the kernels (compiled, with their binaries), the buffers they use and how inputs map to them.
The live state a capture touches (parameters, optimizer state, the random generator) is swapped
for placeholders before an entry is written and for this process's tensors when it is read, so
an entry never carries weights and always runs on the current ones.

Trust. An entry is machine code to run, so it is only read from a directory this user owns and
nobody else may write (created 0700), and only when its HMAC-SHA256 under a per-user secret key
(0600, made on first use) checks; an entry that is short, damaged, signed with another key or of
another format is deleted and rebuilt, never unpickled. Unpickling then admits only tinygrad's
own classes. A directory or key that fails these checks turns the cache off with one warning.

Keys: a SHA-256 over the program's graph (every node's op, attributes, inputs and type, loop
bodies included), the stage, the named dims, what the caller adds (the optimizer's settings),
the device and CPU, tinygrad's settings and the versions of Python, numpy, tinygrad and
dlgraph's own source files: a changed spec, setting or dlgraph never reuses another's program.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import io
import json
import os
import pickle
import platform
import secrets
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from dlgraph.engine.graph.ir import Graph

FORMAT = b"dlgraph-program-1\n"
MAX_BYTES = 1 << 30            # the cache keeps its newest entries within this size
# tinygrad settings that do not change a program (DEV: the device itself is in the key)
NOT_IN_KEY = {"DEBUG", "VIZ", "PROFILE", "PARALLEL", "TRACK_MATCH_STATS", "CAPTURE_PROCESS_REPLAY",
              "DEV"}


class ProgramCache:
    """Signed entries in a private directory (see the module docstring)."""

    def __init__(self, root: str | Path, warn=None):
        self.root = Path(root).expanduser()
        self.warn = warn or (lambda s: print(f"warning: {s}", file=sys.stderr))
        self.hits = self.misses = self.rebuilt = 0
        self.secret = self._open()

    def _open(self) -> bytes | None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.root.stat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                self.warn(f"program cache {self.root} is not private to this user (owner or "
                          f"permissions); running without it")
                return None
            return _secret(self.root / "key")
        except OSError as e:
            self.warn(f"program cache {self.root} is unusable ({e.strerror}); running without it")
            return None

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.prog"

    def load(self, key: str) -> bytes | None:
        """The payload stored under ``key`` if its signature checks; a bad entry is removed."""
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        head = len(FORMAT) + 32
        if len(blob) > head and blob.startswith(FORMAT) and hmac.compare_digest(
                blob[len(FORMAT):head], self._sign(blob[head:])):
            self.hits += 1
            os.utime(path)       # the newest entries survive pruning
            return blob[head:]
        self.discard(key)
        return None

    def discard(self, key: str) -> None:
        """Forget an entry that did not check or did not load (it will be rebuilt)."""
        self.rebuilt += 1
        self._path(key).unlink(missing_ok=True)

    def store(self, key: str, payload: bytes) -> None:
        """Write an entry atomically (a reader never sees half of one), then prune."""
        if not self.enabled:
            return
        tmp = self.root / f".{key}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(FORMAT + self._sign(payload) + payload)
            os.replace(tmp, self._path(key))
            self._prune()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.warn(f"could not write to the program cache {self.root}: {e.strerror}")

    def entries(self) -> list[Path]:
        return sorted(self.root.glob("*.prog")) if self.root.is_dir() else []

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) kept."""
        found = self.entries()
        return len(found), sum(p.stat().st_size for p in found)

    def clear(self) -> tuple[int, int]:
        """Remove every entry (the key stays); returns (entries, bytes) removed."""
        kept = self.usage()
        for p in self.entries():
            p.unlink(missing_ok=True)
        return kept

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self.secret, payload, hashlib.sha256).digest()

    def _prune(self) -> None:
        entries = sorted(self.root.glob("*.prog"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for p in entries:
            total += p.stat().st_size
            if total > MAX_BYTES:
                p.unlink(missing_ok=True)


def _secret(path: Path) -> bytes:
    """The per-user signing key, made on first use; refused if others may read it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    except FileExistsError:
        pass
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077 or st.st_size != 32:
        raise OSError(0, "its key file is not private or not a key")
    return path.read_bytes()


def default_cache(warn=None) -> ProgramCache | None:
    """The cache at $DLGRAPH_CACHE_DIR, else $XDG_CACHE_HOME/dlgraph/programs (~/.cache);
    ``DLGRAPH_CACHE_DIR=off`` turns it off."""
    root = os.environ.get("DLGRAPH_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "0", "off", "none"):
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "dlgraph" / "programs"
    cache = ProgramCache(root, warn)
    return cache if cache.enabled else None


# --------------------------------------------------------------------- the device chosen


def _hardware() -> str:
    """What decides tinygrad's choice of device: accelerator nodes, OS, tinygrad, settings."""
    found = sorted(str(p) for pat in ("nvidia*", "kfd", "dri/renderD*", "accel/*")
                   for p in Path("/dev").glob(pat))
    keys = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
    return hashlib.sha256(json.dumps([found, platform.system(), platform.machine(),
                                      _dist_version("tinygrad"),
                                      [os.environ.get(k) for k in keys]]).encode()).hexdigest()


def remembered_device() -> str | None:
    """The device tinygrad chose last time on this hardware (probing every backend takes
    about a second), or None."""
    cache = default_cache(warn=lambda s: None)
    try:
        data = json.loads((cache.root / "device.json").read_text()) if cache else {}
    except (OSError, ValueError):
        return None
    dev = data.get("device") if isinstance(data, dict) else None
    ok = isinstance(dev, str) and dev.replace(":", "").isalnum() and len(dev) < 32
    return dev if ok and data.get("hardware") == _hardware() else None


def remember_device(device: str | None) -> None:
    """Keep (or with None forget) the device tinygrad chose on this hardware."""
    cache = default_cache(warn=lambda s: None)
    if cache is None:
        return
    path = cache.root / "device.json"
    try:
        if device is None:
            path.unlink(missing_ok=True)
        else:
            tmp = cache.root / f".device.{secrets.token_hex(4)}.tmp"
            tmp.write_text(json.dumps({"device": device, "hardware": _hardware()}))
            os.replace(tmp, path)
    except OSError:
        pass


# -------------------------------------------------------------------------------- keys


def digest(*parts) -> str:
    """A SHA-256 over ``parts`` (graphs, pydantic models, plain values) and the environment."""
    text = json.dumps([_environment(), *map(canon, parts)], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def canon(x):
    """A JSON-able, deterministic description of what a program is built from."""
    if isinstance(x, Graph):
        return {"nodes": [[n.id, n.op, canon(n.attrs), list(n.inputs), str(n.type), n.role,
                           n.cut] for n in x.nodes.values()],
                "inputs": {k: str(t) for k, t in x.inputs.items()},
                "outputs": dict(x.outputs), "grads": dict(x.grads), "objective": x.objective}
    if hasattr(type(x), "model_fields"):                         # a pydantic model
        return [type(x).__name__, {k: canon(getattr(x, k)) for k in type(x).model_fields}]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [type(x).__name__, {f.name: canon(getattr(x, f.name))
                                   for f in dataclasses.fields(x)}]
    if isinstance(x, dict):
        return [[canon(k), canon(v)] for k, v in x.items()]
    if isinstance(x, (list, tuple)):
        return [canon(v) for v in x]
    if isinstance(x, np.ndarray):
        return ["array", x.dtype.str, list(x.shape), hashlib.sha256(x.tobytes()).hexdigest()]
    if isinstance(x, enum.Enum):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return [type(x).__qualname__, repr(x)]


@lru_cache(maxsize=1)
def _environment() -> dict:
    from tinygrad import Device, helpers
    from tinygrad.helpers import ContextVar
    # tinygrad's core settings, and any other set in the environment (backends define
    # their own only once imported, so "every setting" would depend on what was probed)
    core = {v.key for v in vars(helpers).values() if isinstance(v, ContextVar)}
    settings = {k: repr(v.value) for k, v in sorted(ContextVar._cache.items())
                if (k in core or k in os.environ) and k not in NOT_IN_KEY}
    return {"python": sys.version, "numpy": np.__version__,
            "tinygrad": _dist_version("tinygrad"),
            "dlgraph": _source_digest(), "device": Device.DEFAULT, "machine": platform.machine(),
            "cpu": _cpu_flags(), "settings": settings}


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def _source_digest() -> str:
    """A hash of dlgraph's own source files: an edited dlgraph never reuses old programs."""
    from importlib.util import find_spec
    top, ops = (Path(find_spec(m).origin).parent for m in ("dlgraph", "dlgraph.ops"))
    files = sorted(top.glob("*.py"))
    for d in (Path(__file__).parent.parent, ops):     # the whole engine, not this folder
        files += sorted(d.rglob("*.py"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _cpu_flags() -> str:
    """What the CPU can do (kernels are compiled for this one, -march=native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return hashlib.sha256(flags.encode()).hexdigest()


# ------------------------------------------------------------------ captures to bytes


def cacheable(state: dict) -> bool:
    """Whether every state tensor is one plain realised buffer (not sharded over devices):
    only those are swapped for placeholders, so only then may a capture be kept."""
    from tinygrad.uop.ops import Ops
    return all(t.uop.base.op is Ops.BUFFER and t.uop.base.is_realized for t in state.values())


def freeze(jits: list, state: dict) -> bytes | None:
    """Captured TinyJits as bytes, the ``state`` tensors (name -> Tensor) swapped for
    placeholders; None when that cannot be done faithfully: state that is not a plain
    buffer, a capture that returns live state, or one that holds the buffer of any other
    live tensor (its values would be stored and later read as constants)."""
    from tinygrad.engine.jit import CapturedJit
    from tinygrad.uop.ops import UOp
    if not cacheable(state):
        return None
    live = {k: t.uop.base for k, t in state.items()}
    held = set(live.values())
    rets = {r.uop.base for j in jits for r in _tensors(j.captured.ret)}
    if rets & held or _holds_other_tensors(jits, held | rets):
        return None
    ph = {k: UOp.new_buffer(u.device, u.max_numel(), u.dtype) for k, u in live.items()}
    sub = {live[k]: ph[k] for k in live}
    caps = [CapturedJit(c.ret, c._linear.substitute(sub, walk=True), c.expected_names,
                        c.expected_input_info) for c in (j.captured for j in jits)]
    return pickle.dumps((FORMAT, caps, ph), protocol=pickle.HIGHEST_PROTOCOL)


def thaw(payload: bytes, state: dict) -> list:
    """TinyJits from :func:`freeze`'s bytes, running on this process's ``state`` tensors
    (plain buffers: see :func:`cacheable`).
    Raises ValueError when the entry does not fit (other state names, sizes or dtypes)."""
    from tinygrad.engine.jit import CapturedJit, _TinyJit
    fmt, caps, ph = _Unpickler(io.BytesIO(payload)).load()
    if fmt != FORMAT or set(ph) != set(state):
        raise ValueError("the entry was made for other state")
    sub = {}
    for k, u in ph.items():
        base = state[k].uop.base
        if (base.max_numel(), base.dtype, base.device) != (u.max_numel(), u.dtype, u.device):
            raise ValueError(f"state '{k}' has another size or dtype")
        sub[u] = base
    return [_TinyJit(None, CapturedJit(c.ret, c._linear.substitute(sub, walk=True),
                                       c.expected_names, c.expected_input_info)) for c in caps]


def _holds_other_tensors(jits: list, allowed: set) -> bool:
    """Whether a capture uses the buffer of a live tensor that is not ``allowed``."""
    from tinygrad.tensor import all_tensors
    from tinygrad.uop.ops import Ops
    used = {u for j in jits for u in j.captured._linear.toposort() if u.op is Ops.BUFFER}
    for ref in list(all_tensors):
        t = ref()
        if t is not None and (u := t.uop.base) in used and u not in allowed:
            return True
    return False


def _tensors(ret) -> list:
    from tinygrad import Tensor
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
        from tinygrad.uop.ops import Ops, UOp
        if op is Ops.BUFFER and getattr(arg, "device", None) is not None:
            if arg.slot not in self.slots:
                self.slots[arg.slot] = next(UOp.unique_num)
            arg = dataclasses.replace(arg, slot=self.slots[arg.slot])
        return UOp(op, dtype, src, arg, tag, metadata, buffer)
