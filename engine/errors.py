"""The one error tree of dlgraph.

Every error a user can cause is a :class:`DlgraphError`. It carries where the problem is
(file, line, node id, op) and how to fix it, and prints as::

    graphs/mlp.yaml:14: node 'fc2' (matmul): inner dimensions differ: [32, 64] @ [32, 10]
      help: the output of 'fc1' has 64 features; set fc2.in to a 64-feature input

The CLI prints that text and exits with status 1; anything else escaping is a bug.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """Where something was written: a file (or ``<string>``) and a 1-based line."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


def suggest(word: str, choices) -> str | None:
    """The ``did you mean`` help line for a misspelt name, or None when nothing is close.

    >>> suggest("lienar", ["linear", "conv2d"])
    "did you mean 'linear'?"
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


class DlgraphError(Exception):
    """Base of every error a user can cause.

    >>> str(DlgraphError("bad", node="fc1", op="linear", help="fix it"))
    "node 'fc1' (linear): bad\\n  help: fix it"
    """

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None,
                 source: Source | None = None, help: str | None = None):
        super().__init__(message)
        self.message, self.node, self.op, self.source, self.help = message, node, op, source, help
        self.also: list[DlgraphError] = []   # independent mistakes found with this one

    def located(self, *, node: str | None = None, op: str | None = None,
                source: Source | None = None) -> DlgraphError:
        """Fill in what is still unknown of the location; returns self, for ``raise``."""
        self.node = self.node or node
        self.op = self.op or op
        self.source = self.source or source
        return self

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        what = ""
        if self.node:
            what = f"node '{self.node}'" + (f" ({self.op})" if self.op else "") + ": "
        text = f"{where}{what}{self.message}" + (f"\n  help: {self.help}" if self.help else "")
        more = [f"error: {e}" for e in self.also[:MAX_REPORTED - 1]]
        if len(self.also) >= MAX_REPORTED:
            more.append(f"error: ... and {len(self.also) - MAX_REPORTED + 1} more")
        return "\n".join([text, *more])


MAX_REPORTED = 10
"""Independent mistakes in one spec are reported together, as a compiler does, up to this
many: a node whose input failed is not checked (its error would only repeat the first)."""


class SpecError(DlgraphError):
    """The spec file itself is wrong: syntax, unknown op or field, bad value."""


class GraphError(DlgraphError):
    """The graph's structure is wrong: dangling reference, bad output."""


class CycleError(GraphError):
    """The graph has a cycle."""


class ShapeError(DlgraphError):
    """Shapes or dtypes do not fit together."""


class GradientError(DlgraphError):
    """A gradient cannot be derived: unreachable parameter, op without a VJP."""


class DataError(DlgraphError):
    """A data file or data source is missing or malformed."""


class DeviceError(DlgraphError):
    """No usable device, or the requested device cannot be opened."""


class TrainingError(DlgraphError):
    """Training diverged (NaN/Inf) or cannot go on; checkpoint problems."""


class OutputError(DlgraphError):
    """A file cannot be written: it is the user's (dlgraph never replaces it unasked), or
    the disk refuses it (full, read-only, no permission, a folder gone)."""
