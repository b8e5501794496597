"""The table of export formats: one record per target format.

A second format is one more record (and the file holding its writer); the API and the
CLI pick a format from this table by name or by the output file's suffix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlgraph.engine.errors import DlgraphError, GraphError, Source, SpecError
from dlgraph.engine.graph.ir import Graph


def require_onnx(what: str = "ONNX export"):
    """The onnx module, or one error line saying what to install."""
    try:
        import onnx
    except ImportError:
        raise DlgraphError(f"{what} needs the onnx package: pip install 'dlgraph[onnx]'") \
            from None
    return onnx


def _write_onnx(graph: Graph, params: dict[str, np.ndarray], path: Path, *,
                opset: int | None = None, force: bool = False) -> None:
    from dlgraph.engine.io.onnx.export import OPSET, OPSETS, to_onnx
    from dlgraph.engine.io.outputs import write_output
    onnx = require_onnx()
    opset = OPSET if opset is None else opset
    if opset not in OPSETS:
        raise SpecError(f"opset {opset} is not offered",
                        help=f"choose an opset from {OPSETS[0]} to {OPSETS[-1]} "
                             f"(default {OPSET})")
    model = to_onnx(graph, params, opset=opset)
    try:           # nothing is written that onnx's own checker refuses
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise GraphError(f"the ONNX model of '{graph.name}' fails onnx's checker: {first}",
                         source=Source(graph.source),
                         help="this is a bug in dlgraph's ONNX export: please report it "
                              "with the spec; nothing was written") from None
    write_output(path, model.SerializeToString(), force=force)


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffixes: tuple[str, ...]
    doc: str
    write: Callable      # (graph, params by checkpoint name, path, **options) -> None


FORMATS = {f.name: f for f in [
    ExportFormat("onnx", (".onnx",), "ONNX (opsets 17-26): onnxruntime, Netron, ...",
                 _write_onnx),
]}


def pick_format(path: Path, name: str | None) -> ExportFormat:
    if name is not None:
        if name not in FORMATS:
            raise SpecError(f"unknown export format '{name}'",
                            help=f"formats: {', '.join(FORMATS)}")
        return FORMATS[name]
    for f in FORMATS.values():
        if path.suffix.lower() in f.suffixes:
            return f
    known = ", ".join(s for f in FORMATS.values() for s in f.suffixes)
    raise SpecError(f"cannot tell the export format from '{path.name}'",
                    help=f"name the file {path.stem}.onnx (known suffixes: {known})")


def graph_params(graph: Graph, weights=None, seed: int = 0) -> dict[str, np.ndarray]:
    """The graph's parameters as numpy arrays: from a weights file, a dict, or the seed."""
    if weights is None:
        from dlgraph.engine.spec.init import init_param
        return {n: init_param(p, seed) for n, p in graph.params.items()}
    if isinstance(weights, dict):
        return {k: np.asarray(v, np.float32) for k, v in weights.items()}
    from dlgraph.engine.train.checkpoint import load_weights
    return {k: v.numpy() for k, v in load_weights(graph, Path(weights)).items()}


def export(graph: Graph, path, *, weights=None, format: str | None = None, seed: int = 0,
           **options) -> Path:
    """Write ``graph`` (with its weights) to ``path`` in a format of :data:`FORMATS`; a file
    already there is replaced only if dlgraph wrote it, or with ``force=True``."""
    from dlgraph.engine.io.outputs import check_output
    path = Path(path)
    fmt = pick_format(path, format)
    check_output(path, force=options.get("force", False))
    fmt.write(graph, graph_params(graph, weights, seed), path, **options)
    return path
