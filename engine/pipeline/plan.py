"""A pipeline checked before anything runs: every stage's spec loaded, every artifact it
consumes produced by an earlier stage, the stage graph ordered (networkx, file order breaking
ties), and the graphs on both sides of each edge held against each other (``init_from``
parameters by name and shape, predictions against the next spec's inputs, evaluation data
against the spec's inputs).

A stage whose spec is an artifact (``train: search.spec``, the best trial of a sweep) is
checked with the producing stage's spec, the one the artifact is made from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from dlgraph.engine.errors import CycleError, DlgraphError, SpecError, suggest
from dlgraph.engine.graph.build import build
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.pipeline.spec import (
    KINDS,
    REF_FIELDS,
    PipelineFile,
    StageDef,
    is_ref,
    read_pipeline,
)
from dlgraph.engine.spec.parse import parse_text, read_spec_text
from dlgraph.engine.spec.read import validate_data


@dataclass
class SpecSource:
    """A stage's spec as plain data, where it was read and where its relative paths start."""

    data: dict
    lines: dict
    file: str
    base: Path


@dataclass
class Plan:
    """A checked pipeline: its stages in run order, their graphs and specs, what each
    writes and reads, and the stage graph (edges labelled with artifacts)."""

    pipeline: PipelineFile
    order: list[str]
    dag: nx.DiGraph
    outputs: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    refs: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)  # field -> ref
    specs: dict[str, SpecSource] = field(default_factory=dict)
    graphs: dict[str, Graph] = field(default_factory=dict)

    def stage(self, name: str) -> StageDef:
        return self.pipeline.stages[name]

    def path(self, value: str) -> Path:
        """A file named in the pipeline file, from the pipeline file's folder."""
        return Path(os.path.normpath(self.pipeline.folder / value))


def plan_pipeline(path: str | Path) -> Plan:
    """Read a pipeline file and check everything that can be checked before a stage runs.

    >>> plan = plan_pipeline("graphs/pipelines/transfer.yaml")          # doctest: +SKIP
    >>> plan.order                                                      # doctest: +SKIP
    ['pretrain', 'classify', 'report', 'onnx']
    """
    pf = read_pipeline(path)
    plan = Plan(pf, [], nx.DiGraph())
    for sd in pf.stages.values():
        plan.refs[sd.name] = _refs(sd)
    for sd in pf.stages.values():
        plan.dag.add_node(sd.name)
        for fld, (producer, art) in plan.refs[sd.name].items():
            _check_producer(pf, sd, fld, producer)
            label = plan.dag.edges[producer, sd.name]["label"] + [art] \
                if plan.dag.has_edge(producer, sd.name) else [art]
            plan.dag.add_edge(producer, sd.name, label=label)
    plan.order = _order(plan)
    for name in plan.order:                     # producers first: a spec artifact's stand-in
        _load_stage(plan, pf.stages[name])
        for fld, (producer, art) in plan.refs[name].items():
            _check_artifact(plan, pf.stages[name], fld, producer, art)
    for name in plan.order:
        _check_edges(plan, pf.stages[name])
    return plan


def _refs(sd: StageDef) -> dict[str, tuple[str, str]]:
    """The artifact references of a stage, by field (its spec as ``spec``)."""
    out = {}
    if is_ref(sd.spec_field):
        out["spec"] = tuple(sd.spec_field.split("."))
    for fld in ("init_from", "weights", "data"):
        value = getattr(sd.model, fld, None)
        if fld == "data" and not is_ref(value):
            continue
        if value is not None:
            if not is_ref(value):
                raise sd.error(SpecError, f"{fld}: '{value}' is not an artifact", fld,
                               help="name an artifact as STAGE.ARTIFACT, e.g. train.weights")
            out[fld] = tuple(value.split("."))
    return out


def _check_producer(pf: PipelineFile, sd: StageDef, fld: str, producer: str) -> None:
    if producer not in pf.stages:
        raise sd.error(SpecError, f"no stage '{producer}' to take {fld} from",
                       sd.kind if fld == "spec" else fld,
                       help=suggest(producer, pf.stages) or "the stages are: "
                       + ", ".join(pf.stages))


def _order(plan: Plan) -> list[str]:
    """The stages in run order: producers first, file order breaking ties; a cycle named."""
    pf = plan.pipeline
    try:
        return list(nx.lexicographical_topological_sort(
            plan.dag, key=lambda n: pf.stages[n].order))
    except nx.NetworkXUnfeasible:
        cycle = [u for u, _ in nx.find_cycle(plan.dag)]
        first = min(cycle, key=lambda n: pf.stages[n].order)
        k = cycle.index(first)
        cycle = cycle[k:] + cycle[:k]
        sd = pf.stages[first]
        raise CycleError(f"the stages form a cycle: {' -> '.join(cycle + [first])}",
                         source=sd.source(), help="a stage can only consume artifacts of "
                                                  "stages that run before it") from None


def _load_stage(plan: Plan, sd: StageDef) -> None:
    """The stage's spec (its file, or the producer's spec for a spec artifact) with `set:`
    applied, built into a graph; what it writes."""
    if "spec" in plan.refs[sd.name]:
        src = plan.specs[plan.refs[sd.name]["spec"][0]]
    else:
        p = plan.path(sd.spec_field)
        if not p.exists():
            raise sd.error(SpecError, f"no such spec file: {sd.spec_field}", sd.kind,
                           help=f"paths start at the pipeline file's folder "
                                f"({plan.pipeline.folder})")
        data, lines = parse_text(read_spec_text(p), str(p))
        src = SpecSource(data, lines, str(p), p.parent)
    overrides = getattr(sd.model, "set", {})
    if overrides:
        from dlgraph.engine.train.sweep_plan import with_override
        data = src.data
        for dotted, value in overrides.items():
            try:
                data = with_override(data, dotted, value)
            except SpecError as e:
                raise sd.error(SpecError, f"set {dotted}: {e.message}", "set", e.help) \
                    from None
        src = SpecSource(data, src.lines, src.file, src.base)
    plan.specs[sd.name] = src
    spec = validate_data(src.data, src.lines, src.file, src.base)
    g = build(spec, src.lines, src.file, src.base)
    g.base = src.base
    plan.graphs[sd.name] = g
    plan.outputs[sd.name] = _outputs(sd, g)
    _check_kind(plan, sd, g)


def _outputs(sd: StageDef, g: Graph) -> dict[str, tuple[str, str]]:
    out = dict(KINDS[sd.kind].artifacts)
    train = g.spec.train
    if sd.kind == "train" and (train is None or not train.validation.split):
        del out["best"]                     # best.safetensors is kept by validation only
    if sd.kind == "sample" and _is_text(g):
        out["samples"] = ("text", "samples.txt")
    return out


def _is_text(g: Graph) -> bool:
    from dlgraph.engine.io.data.text import TextTokens
    return g.spec.train is not None and isinstance(g.spec.train.data, TextTokens)


def _check_kind(plan: Plan, sd: StageDef, g: Graph) -> None:
    """What the command itself would refuse, before anything runs."""
    if sd.kind in ("train", "evaluate", "sweep") and g.spec.train is None:
        raise sd.error(SpecError, f"{sd.spec_field} has no `train:` section to "
                       f"{sd.kind} by", sd.kind, help="name a spec with a `train:` section")
    if sd.kind == "train":
        from dlgraph.engine.report.summary import summarize
        from dlgraph.engine.spec.checks import without_init_from
        summarize(without_init_from(g) if sd.model.init_from else g)   # as `dlgraph validate`
    if sd.kind == "sweep":
        from dlgraph.engine.train.sweep_plan import plan_sweep
        m = sd.model
        plan_sweep(plan.path(sd.spec_field), m.params, search=m.search, samples=m.samples,
                   metric=m.metric, mode=m.mode, concurrency=m.concurrency,
                   cpus_per_trial=m.cpus_per_trial)
    if sd.kind == "sample" and not _is_text(g):
        from dlgraph.engine.spec.checks import check_fits
        try:
            check_fits(g, sd.model.count)   # count rows at once: refused before it runs
        except DlgraphError as e:
            raise sd.error(type(e), f"count {sd.model.count}: {e.message}", "count",
                           "draw fewer samples") from None
    if sd.kind == "sample" and not _is_text(g) and sd.model.outputs:
        for o in sd.model.outputs:
            if o not in g.outputs:
                raise sd.error(SpecError, f"'{o}' is not an output of {sd.spec_field}",
                               "outputs", help=suggest(o, g.outputs) or "its outputs are: "
                               + ", ".join(g.outputs))


def _check_artifact(plan: Plan, sd: StageDef, fld: str, producer: str, art: str) -> None:
    """The named artifact exists and is of a kind the field takes."""
    made = plan.outputs[producer]
    key = sd.kind if fld == "spec" else fld
    if art not in made:
        note = " (best.safetensors is kept only with a validation split)" \
            if art == "best" and plan.stage(producer).kind == "train" else ""
        raise sd.error(SpecError, f"stage '{producer}' makes no artifact '{art}'{note}", key,
                       help=suggest(art, made) or f"it makes: {', '.join(made)}")
    kind = made[art][0]
    if kind not in REF_FIELDS[fld]:
        fits = [a for a, (k, _) in made.items() if k in REF_FIELDS[fld]]
        raise sd.error(SpecError, f"{key}: '{producer}.{art}' is {kind}, not "
                       f"{' or '.join(REF_FIELDS[fld])}", key,
                       help=f"use {producer}.{fits[0]}" if fits else
                       f"'{producer}' makes no {' or '.join(REF_FIELDS[fld])}")


def _check_edges(plan: Plan, sd: StageDef) -> None:
    from dlgraph.engine.pipeline.edges import check_data, check_init_from, check_weights
    refs = plan.refs[sd.name]
    if "init_from" in refs:
        check_init_from(plan, sd, refs["init_from"][0])
    if "weights" in refs:
        check_weights(plan, sd, refs["weights"][0])
    if sd.kind in ("evaluate", "predict"):
        check_data(plan, sd, refs.get("data", (None,))[0])


__all__ = ["Plan", "SpecSource", "plan_pipeline"]
