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
import json
import os
import platform
import secrets
import stat
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from dlgraph.engine.compile.tinygrad_door import (
    CODEGEN,
    FORMAT,
    KernelCache,
    tinygrad_settings,
)
from dlgraph.engine.graph.ir import Graph

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

    def has(self, key: str) -> bool:
        """Whether an entry is stored under ``key`` (not whether it checks)."""
        return self.enabled and self._path(key).is_file()

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
        """The entries kept: regular files named like one. A link or a folder of that name
        is not one of ours (the cache writes files only), so it is neither counted nor
        removed; an entry another process removes meanwhile is simply gone."""
        return [p for p, _ in self._sized()]

    def _sized(self) -> list[tuple[Path, os.stat_result]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in sorted(self.root.glob("*.prog")):
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((p, st))
        return found

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) kept."""
        found = self._sized()
        return len(found), sum(st.st_size for _, st in found)

    def clear(self) -> tuple[int, int]:
        """Remove every entry (the key stays); returns (entries, bytes) removed."""
        removed, size = 0, 0
        for p, st in self._sized():
            try:
                p.unlink()
            except OSError:
                continue
            removed, size = removed + 1, size + st.st_size
        return removed, size

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self.secret, payload, hashlib.sha256).digest()

    def _prune(self) -> None:
        entries = sorted(self._sized(), key=lambda e: e[1].st_mtime, reverse=True)
        total = 0
        for p, st in entries:
            total += st.st_size
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


def kernel_cache(programs: ProgramCache) -> KernelCache | None:
    """The generated kernels kept beside a program cache (in its folder ``kernels/``): a
    spec shares each kernel it has in common with any spec compiled before on this machine.
    Entries are signed and checked like programs; kernels depend on tinygrad, the device and
    its settings and the optimisations dlgraph asks of it (``CODEGEN``), not on the rest of
    dlgraph's code."""
    root = programs.root / "kernels"
    if root not in _KERNEL_CACHES:
        store = ProgramCache(root, programs.warn)
        env = {k: v for k, v in _environment().items() if k != "dlgraph"} | {"codegen": CODEGEN}
        _KERNEL_CACHES[root] = KernelCache(store.load, store.store,
                                           json.dumps(env, sort_keys=True), store.has) \
            if store.enabled else None
    return _KERNEL_CACHES[root]


_KERNEL_CACHES: dict[Path, KernelCache | None] = {}


# ------------------------------------------------------------------------ tuned specs


def tuned_key(graph: Graph) -> str | None:
    """What a tuning belongs to: the spec's inputs, nodes and modules (not its `train:`
    section: a changed learning rate keeps its kernels) in this environment (like every key
    here: another device, tinygrad or dlgraph compiles untuned); None without a spec."""
    spec = getattr(graph, "spec", None)
    if spec is None:
        return None
    return digest(spec.model_copy(update={"train": None}))


def tuning(programs: ProgramCache, key: str | None) -> dict | None:
    """``{"beam": N, "dims": {...}}`` if the spec of ``key`` was tuned (``dlgraph tune``)."""
    if key is None:
        return None
    try:
        data = json.loads((programs.root / "tuned.json").read_text())
    except (OSError, ValueError):
        return None
    got = data.get(key) if isinstance(data, dict) else None
    ok = isinstance(got, dict) and isinstance(got.get("beam"), int) and 0 < got["beam"] <= 8 \
        and isinstance(got.get("dims"), dict)
    return got if ok else None


def remember_tuning(programs: ProgramCache, key: str, beam: int | None,
                    dims: dict[str, int]) -> None:
    """Record (``beam`` None: forget) that the spec of ``key`` was tuned at ``dims``."""
    path = programs.root / "tuned.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    if beam is None:
        data.pop(key, None)
    else:
        data[key] = {"beam": beam, "dims": dims}
    _write_json(path, data)


def _write_json(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a reader never sees half of it)."""
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


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
            _write_json(path, {"device": device, "hardware": _hardware()})
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
    from tinygrad import Device
    settings = {k: v for k, v in tinygrad_settings().items() if k not in NOT_IN_KEY}
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
