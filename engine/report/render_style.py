"""How a drawing looks and how DOT is spelt: the palette of op families, the edge colours,
the font, and the text helpers (DOT quoting, attribute lists, HTML-like labels, shapes as
``batch×64``). No graph logic: the other render modules read these.
"""

from __future__ import annotations

import html

from dlgraph.engine.graph.ir import Node

FONT = "Helvetica,Arial,sans-serif"

# (fill, border) per op family: soft fills, a darker border of the same hue
PALETTE = {
    "nn": ("#dbe8f7", "#4a78b0"),
    "recurrent": ("#d4eeee", "#2a8a8a"),
    "attention": ("#f5dcec", "#a64d86"),
    "activation": ("#dff0d8", "#5a9a4a"),
    "loss": ("#fadcd9", "#c0392b"),
    "linalg": ("#e7e0f3", "#7a5ca8"),
    "elementwise": ("#fbf0cf", "#a88a1c"),
    "reduce": ("#fce3cf", "#c2691f"),
    "shape": ("#ececec", "#858585"),
    "param": ("#f2f2f2", "#9a9a9a"),
    "": ("#ffffff", "#707070"),
}
GRAD_EDGE = "#c0392b"           # cotangents flowing back
SAVED_EDGE = "#a0a0a0"          # forward values the backward pass reads
PARAM_EDGE = "#7a5ca8"          # gradients into the optimizer


def dims(shape) -> str:
    """``('batch', 64)`` -> ``batch×64``; a scalar is ``scalar``."""
    return "×".join(str(d) for d in shape) if shape else "scalar"


def const_text(n: Node) -> str:
    """A constant's value as a label shows it (``0.5``, ``2``)."""
    value = getattr(n.attrs, "value", "?")
    return f"{value:g}" if isinstance(value, float) else str(value)


def tint(color: str) -> str:
    """A much lighter version of a ``#rrggbb`` colour, for cluster backgrounds."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{c + (255 - c) * 2 // 3:02x}" for c in (r, g, b))


def quote(s: str) -> str:
    """A DOT string: quoted, with quotes and backslashes escaped."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Html(str):
    """An HTML-like label, written ``<...>`` instead of quoted."""


def dot_attrs(attrs: dict[str, str]) -> str:
    return ", ".join(f"{k}={v if isinstance(v, Html) else quote(v)}" for k, v in attrs.items())


def html_label(lines: list[tuple[str, str | None, int | None]]) -> str:
    """An HTML-like label: one (text, tag, point size) per line, text escaped."""
    out = []
    for text, tag, size in lines:
        s = html.escape(text, quote=True)
        if tag:
            s = f"<{tag}>{s}</{tag}>"
        if size:
            s = f'<font point-size="{size}" color="#444444">{s}</font>'
        out.append(s)
    return Html("<" + "<br/>".join(out) + ">")


__all__ = ["FONT", "GRAD_EDGE", "PALETTE", "PARAM_EDGE", "SAVED_EDGE", "Html",
           "const_text", "dims", "dot_attrs", "html_label", "quote", "tint"]
