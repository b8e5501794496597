"""Weights and checkpoints as safetensors, written atomically.

A file is written to a temporary name in the same folder, flushed to disk and renamed
over the target, so a crash leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from dlgraph.engine.errors import DataError, Source
from dlgraph.engine.graph.ir import Graph


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Save named arrays (and JSON-able metadata) as one safetensors file, atomically."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(Path(path), save(arrays, metadata={"dlgraph": json.dumps(meta or {})}))


def load_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of a safetensors file; a :class:`DataError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such weights file: {path}", source=Source(str(path)),
                        help="give the weights.safetensors or checkpoint.safetensors of a run")
    try:
        arrays = load_file(str(path))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (SafetensorError, ValueError, OSError, MemoryError) as e:
        raise DataError(f"not a readable safetensors file: {e}", source=Source(str(path)),
                        help="the file may be truncated; use another checkpoint") from None
    try:
        meta = json.loads((header.get("__metadata__") or {}).get("dlgraph", "{}"))
        if not isinstance(meta, dict):
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise DataError("the file's dlgraph metadata is damaged", source=Source(str(path)),
                        help="use another checkpoint, or the weights.safetensors of the run") \
            from None
    return arrays, meta


def read_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """A training checkpoint's arrays and metadata, checked against the graph's parameter
    ``shapes`` (a smaller array is never broadcast into a parameter) and its metadata
    (``step``, ``epoch`` and ``history`` present and of the right kind)."""
    from dlgraph.engine.errors import TrainingError
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist",
                            help="give --out the run directory of an earlier run")
    arrays, meta = load_tensors(path)
    for key, kind in (("step", int), ("epoch", int), ("history", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise TrainingError(f"the checkpoint's metadata has no valid '{key}'",
                                source=Source(str(path)),
                                help="the run's checkpoint is damaged; start a new run")
    for name, shape in shapes.items():
        a = arrays.get(f"param.{name}")
        if a is None:
            raise TrainingError(f"the checkpoint has no parameter '{name}'",
                                source=Source(str(path)),
                                help="resume with the spec the run was started with")
        if tuple(a.shape) != tuple(shape):
            raise TrainingError(f"parameter '{name}' has shape {list(a.shape)} in the "
                                f"checkpoint, {list(shape)} in the graph",
                                source=Source(str(path)),
                                help="resume with the spec the run was started with")
    return arrays, meta


def load_weights(graph: Graph, path: Path) -> dict:
    """Parameter tensors for ``graph`` from a weights or checkpoint file, shapes checked."""
    from tinygrad import Tensor
    arrays, _ = load_tensors(path)
    if not any(n in arrays for n in graph.params):  # a run's checkpoint: param.<name>
        arrays = {k.removeprefix("param."): v for k, v in arrays.items()
                  if k.startswith("param.")} or arrays
    missing = [n for n in graph.params if n not in arrays]
    if missing:
        raise DataError(f"{path} lacks {len(missing)} parameter(s) of this graph: "
                        f"{', '.join(missing[:6])}", source=Source(str(path)),
                        help="were these weights trained from the same spec?")
    out = {}
    for name, p in graph.params.items():
        a = arrays[name]
        if tuple(a.shape) != p.shape:
            raise DataError(f"parameter '{name}' has shape {list(a.shape)} in the file, "
                            f"{list(p.shape)} in the graph", source=Source(str(path)),
                            help="were these weights trained from the same spec?")
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise DataError(f"parameter '{name}' in the file is not all finite floats",
                            source=Source(str(path)), help="use the weights of a healthy run")
        out[name] = Tensor(a.astype(np.float32)).realize()
    return out
