"""dlgraph: neural networks as declarative YAML/JSON computation graphs.

>>> import dlgraph                                                   # doctest: +SKIP
>>> g = dlgraph.load("graphs/mlp.yaml")                              # doctest: +SKIP
>>> dlgraph.validate(g).params                                       # doctest: +SKIP
>>> model = dlgraph.compile(g)                                       # doctest: +SKIP
"""

from dlgraph.api import (
    CacheUsage,
    OpField,
    OpInfo,
    cache_usage,
    clear_cache,
    compile,
    describe_op,
    draw_confusion,
    evaluate,
    generate_text,
    gradcheck,
    list_ops,
    load,
    pipeline_artifact,
    pipeline_status,
    plot_curves,
    predict,
    render,
    render_pipeline,
    run_forward,
    run_pipeline,
    schema,
    sweep,
    train,
    tune,
    validate,
    validate_pipeline,
)
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
           "export", "import_onnx", "run_forward", "generate_text", "draw_confusion",
           "gradcheck", "plot_curves", "sweep", "cache_usage", "clear_cache", "list_ops",
           "describe_op", "tune", "CacheUsage", "OpInfo", "OpField",
           "run_pipeline", "validate_pipeline", "pipeline_status", "render_pipeline",
           "pipeline_artifact",
           "DlgraphError", "SpecError", "GraphError", "CycleError", "ShapeError",
           "GradientError", "DataError", "DeviceError", "TrainingError"]
