"""A small builder of ONNX graphs: nodes, initializers and helper sub-graphs for shapes.

Every helper returns the name of the value it made, so exporters read like the
primitives they replace: ``w.op("Add", a, b)``.
"""

from __future__ import annotations

import numpy as np

from dlgraph.engine.types import TType

INT64_MAX = 2**63 - 1


def onnx_dtype(dtype: str) -> int:
    from onnx import TensorProto
    return {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32,
            "bool": TensorProto.BOOL, "int64": TensorProto.INT64}[dtype]


NP = {"float32": np.float32, "int32": np.int32, "bool": np.bool_, "int64": np.int64}


class Writer:
    """Collects the nodes and initializers of one ONNX graph.

    ``dims`` maps each named dim to a graph input and axis that carries it, so shapes with
    named dims can be computed at run time.
    """

    def __init__(self, dims: dict[str, tuple[str, int]] | None = None):
        self.nodes: list = []
        self.inits: dict[str, object] = {}
        self.dims = dims or {}
        self._n = 0
        self.prefix = ""            # the spec layer being written: its values are named after it

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}" if self.prefix else f"{hint}__{self._n}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, name: str | None = None,
           outputs: int = 1, **attrs) -> str:
        """Append one node; returns its (first) output name. ``outputs`` > 1: a list."""
        from onnx import helper
        if outputs > 1:
            outs = [f"{out or self.fresh(op_type)}_{k}" for k in range(outputs)]
        else:
            outs = [out or self.fresh(op_type)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=name or outs[0], **attrs))
        return outs if outputs > 1 else outs[0]

    def init(self, name: str, value: np.ndarray) -> str:
        """An initializer (a weight or a constant tensor); returns its name. A scalar stays
        a scalar (``np.ascontiguousarray`` would make it [1]: Range wants scalars)."""
        from onnx import numpy_helper
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.array(value, order="C"), name)
        return name

    def const(self, value, dtype: str = "int64") -> str:
        """A constant tensor (ints default to int64, the type of ONNX's shape inputs)."""
        arr = np.asarray(value, dtype=NP[dtype])
        return self.init(self.fresh("const"), arr)

    # -- shapes ---------------------------------------------------------------------------
    def dim(self, d) -> str:
        """A 1-element int64 tensor holding a dim: a constant, or read from an input."""
        if isinstance(d, int):
            return self.const([d])
        src, axis = self.dims[d]
        return self.op("Shape", src, start=axis, end=axis + 1)

    def shape(self, dims) -> str:
        """An int64 shape tensor for dims that may include names (and -1)."""
        if all(isinstance(d, int) for d in dims):
            return self.const(list(dims))
        return self.op("Concat", *[self.dim(d) for d in dims], axis=0)

    def reshape(self, x: str, dims, out: str | None = None) -> str:
        return self.op("Reshape", x, self.shape(dims), out=out)

    def cast_to(self, x: str, have: str, want: str) -> str:
        return x if have == want else self.op("Cast", x, to=onnx_dtype(want))


def value_info(name: str, t: TType):
    """An ONNX ValueInfo of a dlgraph type: named dims become ``dim_param``s."""
    from onnx import helper
    return helper.make_tensor_value_info(name, onnx_dtype(t.dtype), list(t.shape))
