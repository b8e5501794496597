"""Data checked against the graph it feeds: dtypes that fit, class labels and token ids in
range (:func:`check_feeds`).

A label >= the number of classes (or < 0) makes its row of the cross-entropy silently 0, and
an id outside an embedding's vocabulary a zero vector; both are refused here, when the data
is loaded, with the row and value. A loss's ``ignore_index`` label is allowed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlgraph.engine.errors import DataError, DlgraphError, Source

#: op -> (which input holds ids, what they are)
_ID_INPUTS = {"cross_entropy": (1, "label"), "nll": (1, "label"), "embedding": (0, "id")}


def _limits(graph: Any) -> list[tuple[str, str, str, int, int | None]]:
    """(graph input, node id, op, how many ids, ignored id) for each id-taking node fed
    straight from a graph input."""
    out = []
    for nid, nd in (graph.spec.nodes.items() if graph.spec is not None else []):
        if nd.op not in _ID_INPUTS or len(nd.in_) <= _ID_INPUTS[nd.op][0]:
            continue
        ref = nd.in_[_ID_INPUTS[nd.op][0]]
        if ref not in graph.inputs:
            continue
        if nd.op == "embedding":
            n = nd.num
        else:
            n = graph[graph.aliases.get(nd.in_[0], nd.in_[0])].type.shape[-1] \
                if nd.in_[0] in graph.aliases else graph.inputs[nd.in_[0]].shape[-1]
        if isinstance(n, int):
            out.append((ref, nid, nd.op, n, getattr(nd, "ignore_index", None)))
    return out


def check_feeds(graph: Any, feeds: dict[str, np.ndarray], where: str | None = None) -> None:
    """Refuse arrays that a graph input cannot take without changing them: strings, complex
    numbers, fractions fed to an int32 input (1.7 would be read as 1), and out-of-range
    labels or ids (:func:`check_ids`). ``feeds`` maps graph input names to arrays."""
    source = Source(where) if where else None
    for name, a in feeds.items():
        if name not in graph.inputs:
            continue
        if a.dtype.kind not in "fiub":
            raise DataError(f"input '{name}' gets {a.dtype} values", source=source,
                            help="feed numbers (floats, integers or booleans)")
        if graph.inputs[name].dtype == "int32" and a.dtype.kind == "f" and \
                not np.array_equal(a, np.round(a)):
            row = int(np.flatnonzero((a != np.round(a)).reshape(len(a), -1).any(1))[0])
            raise DataError(f"input '{name}' is int32, but row {row} of its data holds a "
                            "fraction", source=source,
                            help="feed integer ids or labels, or declare the input float32")
    check_shapes(graph, feeds, where)
    check_ids(graph, feeds, where)


def check_shapes(graph: Any, feeds: dict[str, np.ndarray], where: str | None = None) -> None:
    """The arrays' shapes against the inputs' declared ones (named dims consistent), the
    error located at ``where`` (the file or flag the arrays came from)."""
    from dlgraph.engine.compile.interpret import input_dims
    try:
        input_dims(graph, {k: np.asarray(v) for k, v in feeds.items() if k in graph.inputs})
    except DlgraphError as e:
        raise e.located(source=Source(where) if where else None) from None


def check_ids(graph: Any, feeds: dict[str, np.ndarray], where: str | None = None) -> None:
    """Refuse labels or ids in ``feeds`` (graph input -> array) that the graph cannot take.

    ``where`` names the data (a file, or the data source) in the error.
    """
    for name, nid, op, n, ignore in _limits(graph):
        a = feeds.get(name)
        if a is None or a.dtype.kind not in "iuf" or not a.size:   # 4.0 is a label too
            continue
        bad = (a < 0) | (a >= n)
        if ignore is not None:
            bad &= a != ignore
        if bad.any():
            row = int(np.flatnonzero(bad.reshape(len(a), -1).any(1))[0])
            value = int(a[row][bad[row]].flat[0]) if a.ndim > 1 else int(a[row])
            what = _ID_INPUTS[op][1]
            raise DataError(
                f"row {row} of '{name}' holds the {what} {value}, but node '{nid}' ({op}) "
                f"takes {what}s 0 to {n - 1}", source=Source(where) if where else None,
                help=("set ignore_index on the loss for a padding label (PyTorch uses -100)"
                      if what == "label" else f"make num at least {int(a.max()) + 1}"))
