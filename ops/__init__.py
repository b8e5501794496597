"""Every op of dlgraph, registered in one table: ``REGISTRY[name] -> OpDef``."""

from . import attention, control, conv, elementwise, linalg, losses, nn, recurrent, reduce, shape  # noqa: F401
from .registry import NO_GRAD, OPS, PICK, REGISTRY, OpDef, register

__all__ = ["REGISTRY", "OpDef", "NO_GRAD", "PICK", "OPS", "register"]
