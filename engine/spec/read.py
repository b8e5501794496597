"""A spec read and validated: text (:mod:`~dlgraph.engine.spec.parse`) to the GraphSpec
model (:mod:`~dlgraph.engine.spec.models`), with names and ops checked by hand first so that
an error suggests the close match, and pydantic's errors told with file and line
(:mod:`~dlgraph.engine.spec.explain`).

>>> spec, lines = read_spec("graphs/mlp.yaml")                       # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from dlgraph.engine.errors import Source, SpecError
from dlgraph.engine.io.data.text import bind_vocab
from dlgraph.engine.spec.base import IDENT
from dlgraph.engine.spec.explain import explain_validation
from dlgraph.engine.spec.library import library
from dlgraph.engine.spec.models import spec_model
from dlgraph.engine.spec.parse import parse_text, read_spec_text
from dlgraph.ops import REGISTRY
from dlgraph.ops.registry import op_suggestion


def read_spec(path: str | Path):
    """Read and validate a spec file; returns ``(GraphSpec, lines)``."""
    p = Path(path)
    data, lines = parse_text(read_spec_text(p), str(p))
    return validate_data(data, lines, str(p)), lines


def validate_data(data: dict, lines: dict[tuple, int], file: str, base: Path | None = None):
    """Validate plain data against the GraphSpec model, raising a located :class:`SpecError`.

    ``base`` is where `include:` paths start (default: the file's folder, or the cwd).
    """
    data = bind_vocab(data, lines, file, base)      # `num: vocab`: a text source's size
    _precheck_nodes(data, lines, file, base)
    try:
        return spec_model().model_validate(data)
    except ValidationError as exc:
        raise explain_validation(exc, data, lines, file) from None


def _precheck_nodes(data: dict, lines: dict, file: str, base: Path | None = None):
    """Names and ops, checked by hand so that errors suggest the close match."""
    if data.get("dlgraph") not in (1, None) or isinstance(data.get("dlgraph"), bool | float):
        raise SpecError(f"unsupported spec version {data.get('dlgraph')!r}",
                        source=Source(file, lines.get(("dlgraph",))),
                        help="this dlgraph reads `dlgraph: 1`")
    for section, what in (("inputs", "input name"), ("nodes", "node id"),
                          ("modules", "module name")):
        for k in data.get(section) or {} if isinstance(data.get(section), dict) else {}:
            if not isinstance(k, str) or not IDENT.match(k):
                raise SpecError(f"{what} '{k}' is not a valid name",
                                source=Source(file, lines.get((section, k))),
                                help="use letters, digits and _, not starting with a digit")
    inputs, nodes = data.get("inputs"), data.get("nodes")
    if isinstance(inputs, dict) and isinstance(nodes, dict):
        for k in nodes:
            if k in inputs:
                raise SpecError(f"'{k}' is both an input and a node id",
                                source=Source(file, lines.get(("nodes", k))),
                                help=f"rename the node (or the input on line "
                                     f"{lines.get(('inputs', k))}): a name means one value")
    modules = set(library(data, file, lines, base))
    _check_ops(data.get("nodes"), ("nodes",), modules, lines, file)
    for name, m in (data.get("modules") or {}).items():
        if isinstance(m, dict):
            _check_ops(m.get("nodes"), ("modules", name, "nodes"), modules, lines, file)


def _check_ops(nodes, path: tuple, modules: set[str], lines: dict, file: str):
    if not isinstance(nodes, dict):
        return
    for nid, nd in nodes.items():
        src = Source(file, lines.get(path + (nid,)))
        if not isinstance(nd, dict):
            raise SpecError(f"a node is a mapping with an `op`, got {nd!r}", node=str(nid),
                            source=src, help=f"write e.g. `{nid}: {{op: relu, in: x}}`")
        op = nd.get("op")
        if op is None:
            raise SpecError("missing `op`", node=str(nid), source=src,
                            help="every node names its op; `dlgraph ops` lists them")
        if not isinstance(op, str):
            raise SpecError(f"`op` is the name of one op, not {op!r}"[:160], node=str(nid),
                            source=Source(file, lines.get(path + (nid, "op")) or src.line),
                            help="write e.g. `op: relu`; `dlgraph ops` lists them")
        if op not in REGISTRY and op not in modules:
            raise SpecError(f"unknown op '{op}'", node=str(nid),
                            source=Source(file, lines.get(path + (nid, "op")) or src.line),
                            help=op_suggestion(str(op), modules)
                            or "`dlgraph ops` lists the ops there are")
