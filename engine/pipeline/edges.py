"""The graphs on both sides of an edge, held against each other before anything runs:
weights passed by ``init_from`` (the parameters it selects, by name and shape), weights
for evaluate/predict/export/sample (every parameter of the consumer), and arrays passed as
data (a predict or sample stage's outputs against the next spec's inputs, or a data file
against the spec's inputs)."""

from __future__ import annotations

import fnmatch

from dlgraph.engine.errors import DlgraphError, ShapeError, SpecError
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.types import TType


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def init_selection(plan, sd) -> tuple[list[str], dict[str, str]]:
    """The parameter globs and renames of a train stage's init_from: the stage's own, else
    those of its spec's `init_from:`, else every parameter."""
    spec_init = plan.graphs[sd.name].spec.train.init_from
    params = sd.model.params or (spec_init.params if spec_init else ["*"])
    rename = sd.model.rename if sd.model.rename is not None else \
        (spec_init.rename if spec_init else {})
    return list(params), dict(rename)


def their_name(name: str, params: list[str], rename: dict[str, str]) -> str | None:
    """The name parameter ``name`` has in the producer's weights, or None when not selected
    (as engine/train/checkpoint.py's init_from maps names)."""
    if not any(fnmatch.fnmatchcase(name, p) for p in params):
        return None
    for mine, other in rename.items():
        if name.startswith(mine + "."):
            return other + name[len(mine):]
    return name


def check_init_from(plan, sd, producer: str) -> None:
    """Every parameter init_from selects that the producer has is of the same shape, and
    at least one is found."""
    mine, theirs = plan.graphs[sd.name].params, plan.graphs[producer].params
    params, rename = init_selection(plan, sd)
    found = 0
    for name, p in mine.items():
        other = their_name(name, params, rename)
        if other is None or other not in theirs:
            continue
        if tuple(theirs[other].shape) != tuple(p.shape):
            raise sd.error(ShapeError, f"init_from: parameter '{other}' is "
                           f"{_shape(theirs[other].shape)} in stage '{producer}' "
                           f"({plan.specs[producer].file}) but '{name}' is "
                           f"{_shape(p.shape)} here ({plan.specs[sd.name].file})",
                           "init_from",
                           help="make the two layers the same size, or leave the parameter "
                                "out with `params:` (or map it with `rename:`)")
        found += 1
    if not found:
        raise sd.error(SpecError, f"init_from: no parameter of {plan.specs[sd.name].file} "
                       f"(selected by {params}) is among stage '{producer}''s: "
                       + ", ".join(list(theirs)[:8]), "init_from",
                       help="select parameters with `params:`, map scopes with `rename:`")


def check_weights(plan, sd, producer: str) -> None:
    """Weights for evaluate/predict/export/sample hold every parameter of the spec."""
    mine, theirs = plan.graphs[sd.name].params, plan.graphs[producer].params
    for name, p in mine.items():
        if name not in theirs:
            raise sd.error(SpecError, f"weights: stage '{producer}' trains no parameter "
                           f"'{name}' of {plan.specs[sd.name].file}", "weights",
                           help="give the weights of a stage that trains this spec")
        if tuple(theirs[name].shape) != tuple(p.shape):
            raise sd.error(ShapeError, f"weights: parameter '{name}' is "
                           f"{_shape(theirs[name].shape)} in stage '{producer}', "
                           f"{_shape(p.shape)} in {plan.specs[sd.name].file}", "weights",
                           help="give the weights of a stage that trains this spec")


def produced_arrays(plan, producer: str) -> dict[str, TType]:
    """The arrays a predict or sample stage writes, by name, with their types."""
    from dlgraph.engine.report.evaluate import task_of
    g: Graph = plan.graphs[producer]
    sd = plan.stage(producer)
    names = sd.model.outputs if sd.kind == "sample" and sd.model.outputs else list(g.outputs)
    out = {n: g.nodes[g.outputs[n]].type for n in names}
    task = task_of(g) if sd.kind == "predict" and g.spec.train is not None else None
    if task and task[0] == "classification":
        for n in names:
            if g.outputs[n] == g.resolve(task[1]):
                t = out[n]
                out[f"{n}_prob"] = TType(t.shape, "float32")
                out[f"{n}_class"] = TType(t.shape[:-1], "int32")
    return out


def needed_inputs(g: Graph, targets: bool) -> list[str]:
    """The inputs a predict (the outputs' ancestors) or evaluate (all) stage reads."""
    if targets:
        return list(g.inputs)
    wanted = [g.outputs[o] for o in g.outputs]
    return [n for n in g.inputs if n in g.ancestors(wanted) or n in wanted]


def _fits(got: TType, want: TType) -> bool:
    if got.dtype != want.dtype or len(got.shape) != len(want.shape):
        return False
    return all(not (isinstance(a, int) and isinstance(b, int)) or a == b
               for a, b in zip(got.shape[1:], want.shape[1:], strict=True))


def check_data(plan, sd, producer: str | None) -> None:
    """Data for evaluate/predict fits the spec's inputs: a producer's arrays by their
    types, a file or data source by reading it as the command would."""
    g: Graph = plan.graphs[sd.name]
    if producer is None:
        from dlgraph.engine.report.evaluate import evaluation_data, read_file
        data = sd.model.data
        if isinstance(data, str):
            data = str(plan.path(data))
        try:
            if sd.kind == "evaluate":
                evaluation_data(g, data)
            else:
                read_file(g, data, targets=False)
        except DlgraphError as e:               # said at the stage that reads the data
            where = f" {sd.model.data}" if isinstance(sd.model.data, str) else ""
            raise sd.error(type(e), f"data{where}: {e.message}", "data", e.help) from None
        return
    arrays = produced_arrays(plan, producer)
    feed = g.spec.train.feed if g.spec.train is not None else {}
    needed = needed_inputs(g, sd.kind == "evaluate")
    for name in needed:
        key = feed.get(name, name)
        if key not in arrays and len(needed) == 1 and len(arrays) == 1:
            key = next(iter(arrays))
        want = g.inputs[name]
        if key not in arrays:
            raise sd.error(ShapeError, f"data: stage '{producer}' gives no array '{key}' for "
                           f"input '{name}' of {plan.specs[sd.name].file}; it gives: "
                           + ", ".join(arrays), "data",
                           help="name the producer's outputs after this spec's inputs, or "
                                "map them with `train.feed`")
        got = arrays[key]
        if not _fits(got, want):
            raise sd.error(ShapeError, f"data: stage '{producer}' gives '{key}' as "
                           f"{_shape(got.shape)} {got.dtype}, input '{name}' of "
                           f"{plan.specs[sd.name].file} is {_shape(want.shape)} "
                           f"{want.dtype}", "data",
                           help="the producing spec's output must match this input's shape "
                                "and dtype")


__all__ = ["check_data", "check_init_from", "check_weights", "init_selection", "needed_inputs",
           "produced_arrays", "their_name"]
