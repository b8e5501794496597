"""dlgraph: neural networks as declarative YAML/JSON computation graphs.

>>> import dlgraph                                                   # doctest: +SKIP
>>> g = dlgraph.load("graphs/mlp.yaml")                              # doctest: +SKIP
>>> dlgraph.validate(g).params                                       # doctest: +SKIP
>>> model = dlgraph.compile(g)                                       # doctest: +SKIP
"""

from dlgraph.api import compile, evaluate, load, predict, render, schema, train, validate
from dlgraph.engine.errors import (
    CycleError,
    DataError,
    DeviceError,
    DlgraphError,
    GradientError,
    GraphError,
    ShapeError,
    SpecError,
    TrainingError,
)
from dlgraph.engine.io.onnx import export, import_onnx

__version__ = "0.1.0"
__all__ = ["load", "validate", "compile", "train", "evaluate", "predict", "render", "schema",
           "export", "import_onnx",
           "DlgraphError", "SpecError", "GraphError", "CycleError", "ShapeError",
           "GradientError", "DataError", "DeviceError", "TrainingError"]
