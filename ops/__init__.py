"""Every op of dlgraph, registered in one table: ``REGISTRY[name] -> OpDef``."""

from dlgraph.ops import (  # noqa: F401
    attention,
    control,
    conv,
    elementwise,
    linalg,
    losses,
    nn,
    recurrent,
    reduce,
    shape,
)
from dlgraph.ops.registry import NO_GRAD, OPS, PICK, REGISTRY, OpDef, register

__all__ = ["REGISTRY", "OpDef", "NO_GRAD", "PICK", "OPS", "register"]
