"""The stage graph as DOT: a box per stage (its name, command and spec) filled by its state,
an edge per producer and consumer labelled with the artifacts it carries. Stages and edges
are written in run order, so the text is the same every time for the same pipeline and
states."""

from __future__ import annotations

from pathlib import Path

from dlgraph.engine.errors import DlgraphError
from dlgraph.engine.pipeline.plan import Plan
from dlgraph.engine.pipeline.state import Status
from dlgraph.engine.report.render_style import FONT, PALETTE, dot_attrs, quote

#: (fill, border) per stage state, from the drawings' palette
STATE_COLOURS = {
    "up to date": PALETTE["activation"],      # green
    "stale": PALETTE["elementwise"],          # yellow
    "failed": PALETTE["loss"],                # red
    "interrupted": PALETTE["reduce"],         # orange
    "never run": PALETTE["shape"],            # grey
}


def pipeline_dot(plan: Plan, states: dict[str, Status]) -> str:
    """The DOT text of the stage graph, coloured by ``states``.

    >>> print(pipeline_dot(plan, {s: Status("never run") for s in plan.order}))
    ... # doctest: +SKIP
    """
    name = plan.pipeline.name
    head = {"rankdir": "LR", "fontname": FONT, "labelloc": "t", "label": f"pipeline {name}"}
    box = {"shape": "box", "style": "rounded,filled", "fontname": FONT, "fontsize": "11"}
    arrow = {"fontname": FONT, "fontsize": "10", "color": "#707070"}
    lines = [f"digraph {quote(name)} {{", f"  graph [{dot_attrs(head)}];",
             f"  node [{dot_attrs(box)}];", f"  edge [{dot_attrs(arrow)}];"]
    for stage in plan.order:
        sd = plan.stage(stage)
        st = states.get(stage, Status("never run"))
        fill, border = STATE_COLOURS[st.state]
        attrs = {"label": f"{stage}\n{sd.kind} {Path(sd.spec_field).name}\n{st.state}",
                 "fillcolor": fill, "color": border, "tooltip": st.text()}
        lines.append(f"  {quote(stage)} [{dot_attrs(attrs)}];")
    for stage in plan.order:
        for consumer in sorted(plan.dag.successors(stage), key=lambda n: plan.stage(n).order):
            label = ", ".join(plan.dag.edges[stage, consumer]["label"])
            lines.append(f"  {quote(stage)} -> {quote(consumer)} [{dot_attrs({'label': label})}];")
    return "\n".join(lines + ["}"]) + "\n"


def write_drawing(text: str, path: Path, force: bool = False) -> Path:
    """The DOT text to ``path``: .dot/.gv as is, .svg/.png/.pdf drawn by graphviz. A file
    there is replaced only if dlgraph wrote it, or with ``force``."""
    from dlgraph.engine.io.outputs import check_output, write_output
    check_output(path, force=force)     # a file dlgraph did not write is never replaced
    suffix = path.suffix.lower()
    if suffix in (".dot", ".gv"):
        data = text.encode()
    elif suffix in (".svg", ".png", ".pdf"):
        import graphviz
        try:
            data = graphviz.pipe("dot", suffix[1:], text.encode(), quiet=True)
        except graphviz.ExecutableNotFound:
            raise DlgraphError(f"cannot write {path}: graphviz's `dot` program is not "
                               "installed", help="install graphviz, or write .dot") from None
    else:
        raise DlgraphError(f"cannot write {path}: unknown format '{suffix or path.name}'",
                           help="use one of: .dot, .gv, .svg, .png, .pdf")
    return write_output(path, data, force=force)


__all__ = ["STATE_COLOURS", "pipeline_dot", "write_drawing"]
