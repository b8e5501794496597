"""Weights and checkpoints as safetensors, written atomically, and the parameters and
optimizer state they hold moved into and out of a run's tensors.

A file is written to a temporary name in the same folder, flushed to disk and renamed
over the target (engine/io/outputs.py), so a crash or a full disk leaves the previous file
or the new one, never half of one.
A training checkpoint holds ``param.<name>`` and ``optim.<phase>.<state>`` arrays and, as
metadata, the epoch, the step and the epoch rows so far (see :func:`checkpoint_arrays`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from dlgraph.engine.compile.tinygrad_door import read
from dlgraph.engine.errors import DataError, Source, TrainingError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data.declared import metadata_json, read_safetensors, read_safetensors_file
from dlgraph.engine.io.outputs import atomic_write  # noqa: F401 (here for its users)
from dlgraph.engine.spec.checks import init_from_names


def save_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Save named arrays (and JSON-able metadata) as one safetensors file, atomically."""
    atomic_write(Path(path), tensors_bytes(tensors, meta))


def tensors_bytes(tensors: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    """Named arrays (and JSON-able metadata) as the bytes of a safetensors file."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return save(arrays, metadata={"dlgraph": json.dumps(meta or {})})


def tensors_from_bytes(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of a safetensors file's bytes (``where`` names it in errors);
    every declared size is checked before anything is allocated (io/data/declared.py)."""
    arrays, header = read_safetensors(data, where)
    return arrays, _dlgraph_meta(header, where)


def load_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of a safetensors file; a :class:`DataError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such weights file: {path}", source=Source(str(path)),
                        help="give the weights.safetensors or checkpoint.safetensors of a run")
    arrays, header = read_safetensors_file(path)
    return arrays, _dlgraph_meta(header, str(path))


def _dlgraph_meta(header, where: str) -> dict:
    """The dlgraph metadata of a safetensors header (a dict), or a located DataError."""
    meta = metadata_json(header, "dlgraph", where)
    if not isinstance(meta, dict | None):
        raise DataError("the file's dlgraph metadata is damaged", source=Source(where),
                        help="use another checkpoint, or the weights.safetensors of the run")
    return meta or {}


def read_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """A training checkpoint's arrays and metadata, checked against the graph's parameter
    ``shapes`` (a smaller array is never broadcast into a parameter) and its metadata
    (``step``, ``epoch`` and ``history`` present and of the right kind)."""
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


# ------------------------------------------------------------- a run's tensors in and out


def checkpoint_arrays(params: dict, runners) -> dict[str, np.ndarray]:
    """What a training checkpoint holds: every parameter (``param.<name>``) and each phase's
    optimizer state (``optim.<phase>.<state>``), as arrays."""
    from tinygrad.nn.state import get_state_dict
    tensors = {f"param.{k}": read(v) for k, v in params.items()}
    for r in runners:
        for k, v in get_state_dict(r.opt).items():
            if not k.startswith("params."):
                tensors[f"optim.{r.phase.name}.{k}"] = read(v)
    return tensors


def restore_checkpoint(arrays: dict[str, np.ndarray], meta: dict, params: dict, runners,
                       path: Path) -> tuple[int, int, list]:
    """Parameters and optimizer state from a checkpoint's arrays (as :func:`read_checkpoint`
    returns them, from ``path``); returns (step, epoch, history). An optimizer state of another
    shape is a located TrainingError."""
    from tinygrad import Tensor
    from tinygrad.nn.state import get_state_dict
    for k, t in params.items():
        t.assign(Tensor(arrays[f"param.{k}"].astype(np.float32)).to(t.device)).realize()
    for r in runners:
        for k, v in get_state_dict(r.opt).items():
            key = f"optim.{r.phase.name}.{k}"
            if key in arrays:
                if arrays[key].size != math.prod(v.shape):
                    raise TrainingError(f"optimizer state '{key}' has shape "
                                        f"{list(arrays[key].shape)} in the checkpoint, "
                                        f"{list(v.shape)} here", source=Source(str(path)),
                                        help="resume with the spec the run was started with")
                v.assign(Tensor(arrays[key]).cast(v.dtype).reshape(v.shape).to(v.device)
                         ).realize()
    return meta["step"], meta["epoch"], list(meta["history"])


def apply_init_from(graph: Graph, params: dict, spec, echo) -> None:
    """Copy the parameters that ``spec`` (a path, or an InitFromSpec) selects from a weights
    file; names mapped by ``rename``, shapes checked; at least one must be found."""
    from tinygrad import Tensor

    from dlgraph.engine.spec.train import InitFromSpec
    from dlgraph.engine.train.progress import count
    path = Path(spec.path if isinstance(spec, InitFromSpec) else spec)
    if isinstance(spec, InitFromSpec):          # the spec's path starts at the spec's folder
        path = Path(graph.base or Path.cwd()) / path
    else:
        spec = InitFromSpec(path=str(spec))
    arrays, _ = load_tensors(path)
    if not any(k in arrays for k in params):        # a run's checkpoint: param.<name>
        arrays = {k.removeprefix("param."): v for k, v in arrays.items()} or arrays
    pairs = init_from_names(graph, spec, path, {k: list(v.shape) for k, v in arrays.items()})
    for name, theirs in pairs.items():          # names and shapes checked as validate does
        params[name].assign(Tensor(arrays[theirs].astype(np.float32))).realize()
    copied = list(pairs)
    echo(f"initialised {count(len(copied), 'parameter')} from {os.path.normpath(path)}")
