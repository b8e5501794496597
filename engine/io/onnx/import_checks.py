"""What an ONNX file declares, checked before any of it is read into arrays.

A model file is data from anywhere: a tensor's dims are numbers it states, not memory it
holds (a 16-byte initializer may declare [3, 2**40]). So every declared size — initializers,
Constant nodes, graph inputs, outputs and intermediate values, in subgraphs too — is held
against this machine's memory before numpy or onnx's converters touch it, and dtypes
dlgraph would narrow (float64 to float32) are refused where the narrowing loses values.
Each refusal is a :class:`DataError` located at the ONNX file and naming the tensor.
"""

from __future__ import annotations

import os

import numpy as np

from dlgraph.engine.errors import DataError, Source

ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
            14: 8, 15: 16, 16: 2}
"""ONNX elem type -> bytes per element (unknown types count as 1: the dims still do)."""

FLOAT32_MAX = float(np.finfo(np.float32).max)


def memory_bytes() -> int:
    """This machine's physical memory: no tensor dlgraph reads or makes may be larger."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _graphs(graph):
    """A graph and every subgraph of its nodes (If branches, Loop and Scan bodies)."""
    from onnx import AttributeProto
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def _tensors(graph):
    """(what, TensorProto) of a graph's initializers and Constant nodes' values."""
    for t in graph.initializer:
        yield f"initializer '{t.name}'", t
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name in ("value", "sparse_value") and a.HasField("t"):
                    yield f"Constant '{node.output[0] if node.output else node.name}'", a.t


def check_declared(model, path) -> None:
    """Refuse a model whose declared sizes exceed this machine's memory, or whose stored
    data disagree with its declared dims, before anything is allocated.

    >>> check_declared(onnx.load("model.onnx"), "model.onnx")        # doctest: +SKIP
    """
    have = memory_bytes()
    where = Source(str(path))
    for graph in _graphs(model.graph):
        for what, t in _tensors(graph):
            _check_tensor(what, t, have, where)
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
            need = ITEMSIZE.get(vi.type.tensor_type.elem_type, 1) * _product(dims)
            if need > have:
                per = " per sample" if len(dims) < len(vi.type.tensor_type.shape.dim) else ""
                raise DataError(f"'{vi.name}' is declared {_shape(vi.type.tensor_type.shape)}: "
                                f"{_size_text(need)}{per}, more than the "
                                f"{_size_text(have)} of memory here", source=where,
                                help="the model's declared shapes are wrong or too large "
                                     "for this machine; nothing was read")


def check_ranges(model, path) -> None:
    """Refuse a Range of constants longer than memory holds: onnx's shape inference computes
    a Range's values (1e12 of them would take the machine's memory and minutes)."""
    from onnx import numpy_helper
    have, where = memory_bytes(), Source(str(path))
    consts = {}
    for graph in _graphs(model.graph):
        consts.update({t.name: t for t in graph.initializer})
        consts.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                       for a in n.attribute if a.name == "value" and n.output})
    ranges = [n for graph in _graphs(model.graph) for n in graph.node if n.op_type == "Range"]
    for node in ranges:
        if not all(i in consts for i in node.input[:3]):
            continue
        try:
            start, limit, delta = (float(numpy_helper.to_array(consts[i]).reshape(()))
                                   for i in node.input[:3])
        except ValueError:          # not scalars: shape inference says so itself
            continue
        n = max(np.ceil((limit - start) / delta), 0) if delta else float("inf")
        if not np.isfinite(n) or 8 * n > have:
            raise DataError(f"Range '{node.output[0]}' from {start:g} to {limit:g} by {delta:g} "
                            f"makes {n:g} values, more than the {_size_text(have)} of memory "
                            "here hold", source=where,
                            help="the model's constants are wrong or too large for this "
                                 "machine; nothing was read")


def _product(dims) -> int:
    n = 1
    for d in dims:
        n *= max(int(d), 0)
    return n


def _shape(shape) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else
                           (d.dim_param or "?") for d in shape.dim) + "]"


def _check_tensor(what: str, t, have: int, where: Source) -> None:
    dims = [int(d) for d in t.dims]
    shown = "[" + ", ".join(map(str, dims)) + "]"
    if any(d < 0 for d in dims):
        raise DataError(f"{what} declares the negative dims {shown}", source=where,
                        help="the file is damaged or not written by an ONNX exporter")
    need = ITEMSIZE.get(t.data_type, 1) * _product(dims)
    if need > have:
        raise DataError(f"{what} is declared {shown}: {_size_text(need)}, more than the "
                        f"{_size_text(have)} of memory here", source=where,
                        help="the file is damaged or the model too large for this machine; "
                             "nothing was read")
    stored = len(t.raw_data) if t.HasField("raw_data") else None
    external = t.data_location == 1
    if stored is not None and not external and stored != need:
        raise DataError(f"{what} is declared {shown} ({need:,} bytes) but stores {stored:,} "
                        "bytes", source=where,
                        help="the file is damaged or truncated; export the model again")


def check_float64(model, path) -> None:
    """Refuse float64 values that float32 cannot hold (dlgraph computes in float32, where
    1e198 is inf): initializers and Constant nodes, named with the dtype.

    A float64 model whose values fit is read as float32, as ONNX's float64 inputs are."""
    from onnx import TensorProto, numpy_helper
    for graph in _graphs(model.graph):
        for what, t in _tensors(graph):
            if t.data_type != TensorProto.DOUBLE:
                continue
            v = numpy_helper.to_array(t)
            finite = v[np.isfinite(v)]
            if finite.size and float(np.abs(finite).max()) > FLOAT32_MAX:
                raise DataError(f"{what} is float64 and holds {float(np.abs(finite).max()):.4g}"
                                f", beyond float32's {FLOAT32_MAX:.4g}: dlgraph computes in "
                                "float32 and would read it as inf", source=Source(str(path)),
                                help="dlgraph has float32, int32 and bool; scale the model's "
                                     "values into float32's range and export it as float32")


def check_graph(model, path) -> None:
    """A model with no outputs has nothing to import (an empty or zero-byte file)."""
    if not model.graph.output:
        empty = not model.graph.node and not model.graph.input
        raise DataError("the ONNX model is empty: its graph has no outputs" if empty else
                        "the ONNX graph declares no outputs: nothing to import",
                        source=Source(str(path)),
                        help="pass a model exported with its outputs (torch.onnx.export's "
                             "output_names, say)")
