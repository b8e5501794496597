"""ONNX in and out: export, import and the conformance runner.

>>> import dlgraph                                                   # doctest: +SKIP
>>> dlgraph.export(dlgraph.load("graphs/mlp.yaml"), "mlp.onnx")      # doctest: +SKIP
>>> dlgraph.import_onnx("mlp.onnx", "mlp_imported.yaml")             # doctest: +SKIP

onnx and onnxruntime are an optional extra (``pip install 'dlgraph[onnx]'``), imported only
by the functions that need them.
"""

from __future__ import annotations

from pathlib import Path

from dlgraph.engine.io.onnx.formats import FORMATS, export


def import_onnx(path, out_spec, *, name: str | None = None, force: bool = False):
    """Turn an ONNX model into a spec YAML ``out_spec`` and its weights beside it
    (``<out_spec stem>.safetensors``); returns the two paths.

    Unsupported operators are listed in one error and nothing is written; files already
    there are replaced only if dlgraph wrote them, or with ``force``.
    """
    from dlgraph.engine.io.onnx.importer import import_model
    return import_model(Path(path), Path(out_spec), name=name, force=force)


__all__ = ["FORMATS", "export", "import_onnx"]
