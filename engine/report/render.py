"""Draw a graph as graphviz DOT: the entry point, and the files it writes.

:func:`render` checks its arguments, has the graph folded (:mod:`.render_fold`: which boxes,
clusters and edges are drawn), has it written as DOT (:mod:`.render_dot`, with the looks
of :mod:`.render_style`) and writes ``.dot``/``.gv`` as they are and ``.svg``, ``.png``,
``.pdf`` through graphviz's ``dot`` program. The text depends only on the graph, so it is
byte-identical between runs.
"""

from __future__ import annotations

from pathlib import Path

from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.outputs import check_output, write_output
from dlgraph.engine.report.render_dot import Drawing
from dlgraph.engine.report.render_fold import what_to_draw

FORMATS = (".dot", ".gv", ".svg", ".png", ".pdf")
RANKDIRS = ("TB", "LR", "BT", "RL")


def render(graph: Graph, path: str | Path | None = None, *, expand: bool | list[str] = False,
           backward: bool | str = False, rankdir: str = "TB", depth: int | None = None,
           shapes: bool = True, dtypes: bool = False, force: bool = False) -> str:
    """The DOT text of a graph; also written to ``path`` when given (.dot, .gv, .svg, .png, .pdf).

    ``expand`` opens nodes as clusters: ``True`` for all, or a list of spec node ids and
    paths of nodes inside modules (``"b/c1"``: the module call ``b`` opens on the way);
    ``depth`` levels below each are drawn open too (default: all, down to primitives;
    ``depth=1``: a module's layers, each one box). ``backward`` draws
    the training graph: each forward box gets a ``∇`` box, parameter gradients flow into
    the optimizer; with ``train.phases`` the first phase is drawn, or the phase named by
    ``backward="<phase name>"``. Edges carry shapes (``batch×64``); dtypes show when
    ``dtypes`` is set, and always for non-float tensors. A file already at ``path`` is
    replaced only if dlgraph wrote it, or with ``force`` (engine/io/outputs.py).

    >>> import dlgraph                                                   # doctest: +SKIP
    >>> dot = render(dlgraph.load("graphs/mlp.yaml"), "mlp.svg", backward=True)  # doctest: +SKIP
    >>> dot.splitlines()[0]                                             # doctest: +SKIP
    'digraph "mlp-spirals" {'
    """
    if rankdir not in RANKDIRS:
        raise DlgraphError(f"unknown rankdir '{rankdir}'",
                           help=f"use one of: {', '.join(RANKDIRS)}")
    if depth is not None and depth < 0:
        raise DlgraphError(f"depth must be 0 or more, got {depth}")
    suffix = _check_path(path) if path is not None else None
    if path is not None:
        check_output(path, force=force)
    g, objectives, optimizer = what_to_draw(graph, backward)
    drawing = Drawing(g, expand=expand, backward=bool(backward), depth=depth, shapes=shapes,
                      dtypes=dtypes, objectives=objectives, optimizer=optimizer)
    text = drawing.dot(rankdir)
    if path is not None:
        _write(drawing, rankdir, text, Path(path), suffix, force)
    return text


# ----------------------------------------------------------------------------- output files


def _check_path(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DlgraphError(f"cannot write {path}: unknown format '{suffix or Path(path).name}'",
                           help=f"use one of: {', '.join(FORMATS)}")
    return suffix


def _write(drawing: Drawing, rankdir: str, text: str, path: Path, suffix: str,
           force: bool) -> None:
    if suffix in (".dot", ".gv"):
        data = text.encode()
    else:
        import graphviz
        # a sharper PNG than graphviz's 96 dpi; vector formats stay as they are
        # a sharper PNG than graphviz's 96 dpi, where the picture is small enough that
        # rasterising it stays quick
        sharp = suffix == ".png" and len(drawing.items) <= 120
        src = drawing.dot(rankdir, dpi=144) if sharp else text
        try:
            data = graphviz.pipe("dot", suffix[1:], src.encode(), quiet=True)
        except graphviz.ExecutableNotFound:
            raise DlgraphError(f"cannot write {path}: graphviz's `dot` program is not installed",
                               help="install graphviz (apt-get install graphviz), or write .dot"
                               ) from None
    write_output(path, data, force=force)


__all__ = ["render", "FORMATS"]
