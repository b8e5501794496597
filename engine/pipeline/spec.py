"""The pipeline file: its pydantic models and reading it with the line of every key.

A pipeline names stages; each stage is one dlgraph command (its key: ``train``,
``evaluate``, ``predict``, ``export``, ``sweep``, ``sample``) over a spec, and its other
fields are that command's options. A field that takes an artifact names it as
``STAGE.ARTIFACT`` (``pretrain.weights``)::

    dlgraph: 1
    pipeline: transfer
    stages:
      pretrain: {train: ../transfer/pretrain.yaml, epochs: 3}
      classify: {train: ../transfer/classify.yaml, init_from: pretrain.weights}
      report:   {evaluate: ../transfer/classify.yaml, weights: classify.best}

Nothing in a pipeline file runs a command of its own: each stage is one of the commands
of :data:`KINDS`, run through the same functions as the command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlgraph.engine.errors import Source, SpecError, suggest
from dlgraph.engine.spec.parse import line_of, parse_text, read_spec_text

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage(Strict):
    """What every stage may have besides its command. Each kind of stage is a subclass
    whose field named after the command takes the spec, with ``artifacts``: what it
    writes, ``{name: (artifact kind, file in the stage's folder)}``; its runner is in
    engine/pipeline/stages.py's ``RUNNERS``."""

    artifacts: ClassVar[dict[str, tuple[str, str]]] = {}
    doc: str | None = None


class TrainStage(Stage):
    artifacts: ClassVar = {"weights": ("weights", "weights.safetensors"),
                         "best": ("weights", "best.safetensors"),   # with validation only
                         "metrics": ("metrics", "metrics.json"), "spec": ("spec", "spec.yaml")}
    train: str = Field(description="the spec to train: a file, or a `spec` artifact")
    init_from: str | None = Field(None, description="weights artifact to start from")
    params: list[str] | None = Field(None, description="init_from: parameter globs "
                                     "(default: the spec's init_from.params, else all)")
    rename: dict[str, str] | None = Field(None, description="init_from: scope renames")
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    set: dict[str, Any] = Field(default_factory=dict,
                                description="spec fields by dotted path, e.g. train.seed: 1")


class EvaluateStage(Stage):
    artifacts: ClassVar = {"metrics": ("metrics", "metrics.json")}
    evaluate: str
    weights: str
    data: str | dict | None = Field(None, description="a data file, a data source, or a "
                                    "predictions/samples artifact (default: the "
                                    "validation split)")
    batch: int | None = Field(None, ge=1)


class PredictStage(Stage):
    artifacts: ClassVar = {"predictions": ("arrays", "predictions.npz")}
    predict: str
    weights: str
    data: str = Field(description="a .csv/.npy/.npz file or a predictions/samples artifact")
    batch: int | None = Field(None, ge=1)


class ExportStage(Stage):
    artifacts: ClassVar = {"onnx": ("onnx", "model.onnx")}
    export: str
    weights: str | None = None
    format: Literal["onnx"] = "onnx"
    opset: int | None = Field(None, ge=7)
    seed: int = 0


class SweepStage(Stage):
    artifacts: ClassVar = {"best": ("weights", "best.safetensors"), "spec": ("spec", "spec.yaml"),
                         "table": ("table", "sweep.csv"), "metrics": ("metrics", "metrics.json")}
    sweep: str
    params: list[str] = Field(default_factory=list, description="as `dlgraph sweep --param`")
    search: Literal["grid", "random", "optuna"] | None = None
    samples: int | None = Field(None, ge=1)
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    concurrency: int | None = Field(None, ge=1)
    cpus_per_trial: float | None = Field(None, gt=0)


class SampleStage(Stage):
    artifacts: ClassVar = {"samples": ("arrays", "samples.npz")}     # a text model: samples.txt
    sample: str
    weights: str
    count: int = Field(1024, ge=1, description="rows of random inputs (not for text)")
    outputs: list[str] | None = None
    seed: int = 0
    prompt: str = ""
    length: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0)


#: the stage kinds: the command key -> its model
KINDS: dict[str, type[Stage]] = {"train": TrainStage, "evaluate": EvaluateStage,
                                 "predict": PredictStage, "export": ExportStage,
                                 "sweep": SweepStage, "sample": SampleStage}
#: the fields of each kind that name artifacts, and the artifact kinds each accepts
REF_FIELDS: dict[str, tuple[str, ...]] = {"init_from": ("weights",), "weights": ("weights",),
                                          "data": ("arrays",), "spec": ("spec",)}


@dataclass
class StageDef:
    """A stage as written: its name, kind, model, the file it is in and its lines."""

    name: str
    kind: str
    model: Stage
    file: str
    lines: dict
    order: int

    @property
    def spec_field(self) -> str:
        return getattr(self.model, self.kind)

    def source(self, key: str | None = None) -> Source:
        loc = ("stages", self.name) + ((key,) if key else ())
        return Source(self.file, line_of(self.lines, loc))

    def error(self, cls, message: str, key: str | None = None, help: str | None = None):
        """A ``cls`` error located at this stage's ``key`` (or the stage), naming it."""
        return cls(f"stage '{self.name}' ({self.kind}): {message}", source=self.source(key),
                   help=help)


@dataclass
class PipelineFile:
    """A read pipeline file: its name, folder, stages in file order."""

    file: str
    name: str
    doc: str | None
    stages: dict[str, StageDef] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.file).parent


def is_ref(value) -> bool:
    """``stage.artifact`` rather than a file name (a spec file ends in .yaml/.yml/.json;
    a data file has a suffix of its own or a folder)."""
    return (isinstance(value, str) and "/" not in value and "\\" not in value
            and not value.endswith(SPEC_SUFFIXES + (".csv", ".npy", ".npz"))
            and re.fullmatch(rf"{NAME.pattern}\.{NAME.pattern}", value) is not None)


def read_pipeline(path: str | Path) -> PipelineFile:
    """Read and validate a pipeline file's format (not yet its stages' specs or edges).

    >>> p = read_pipeline("graphs/pipelines/transfer.yaml")             # doctest: +SKIP
    >>> list(p.stages)                                                  # doctest: +SKIP
    ['pretrain', 'classify', 'report', 'onnx']
    """
    file = str(path)
    data, lines = parse_text(read_spec_text(Path(path), "pipeline"), file)
    if not isinstance(data, dict):
        raise SpecError("a pipeline file is a mapping with `dlgraph: 1`, `pipeline:` and "
                        "`stages:`", source=Source(file, 1))
    head = {"dlgraph", "pipeline", "doc", "stages"}
    for key in data:
        if key not in head:
            raise SpecError(f"unknown field '{key}' in a pipeline file",
                            source=Source(file, lines.get((key,))),
                            help=suggest(str(key), head) or "the fields are: "
                            + ", ".join(sorted(head)))
    if data.get("dlgraph") != 1:
        raise SpecError("a pipeline file starts with `dlgraph: 1`",
                        source=Source(file, lines.get(("dlgraph",), 1)),
                        help="add `dlgraph: 1` (the format's version) at the top")
    name = data.get("pipeline")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SpecError(f"`pipeline:` names the pipeline with letters, digits, '-' and '_', "
                        f"not {name!r}"[:200], source=Source(file, lines.get(("pipeline",), 1)),
                        help="e.g. `pipeline: transfer`")
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise SpecError("`stages:` is a mapping of stage names to stages, and not empty",
                        source=Source(file, lines.get(("stages",), 1)),
                        help="e.g. `stages: {pretrain: {train: pretrain.yaml}}`")
    doc = data.get("doc") if isinstance(data.get("doc"), str) else None
    out = PipelineFile(file, name, doc)
    for k, (sname, raw) in enumerate(stages.items()):
        out.stages[sname] = _stage(str(sname), raw, file, lines, k)
    return out


def _stage(name: str, raw, file: str, lines: dict, order: int) -> StageDef:
    at = Source(file, lines.get(("stages", name)))
    if not NAME.fullmatch(name):
        raise SpecError(f"stage name '{name}' may hold letters, digits, '-' and '_' only",
                        source=at, help="rename the stage")
    if not isinstance(raw, dict):
        raise SpecError(f"stage '{name}' is a mapping like {{train: spec.yaml}}, not "
                        f"{raw!r}"[:200], source=at)
    kinds = [k for k in raw if k in KINDS]
    if len(kinds) != 1:
        close = next((suggest(str(k), KINDS) for k in raw if suggest(str(k), KINDS)), None)
        what = "names no command" if not kinds else f"names {len(kinds)} commands"
        raise SpecError(f"stage '{name}' {what}; a stage is one of: {', '.join(KINDS)}",
                        source=at, help=close or "e.g. `train: spec.yaml`; one command per "
                                                 "stage, a stage per command")
    kind = kinds[0]
    try:
        model = KINDS[kind].model_validate(raw)
    except ValidationError as e:
        raise _explain(e, name, kind, file, lines) from None
    return StageDef(name, kind, model, file, lines, order)


def _explain(e: ValidationError, name: str, kind: str, file: str, lines: dict) -> SpecError:
    """Pydantic's first error as a located SpecError naming the field."""
    err = e.errors()[0]
    loc = tuple(err["loc"])
    key = str(loc[0]) if loc else kind
    fields = list(KINDS[kind].model_fields)
    msg = err["msg"].removeprefix("Value error, ")
    hint = None
    if err["type"] == "extra_forbidden":
        msg = f"{kind} stage has no field '{key}'"
        hint = suggest(key, fields) or f"its fields are: {', '.join(fields)}"
    elif err["type"] == "missing":
        msg = f"{kind} stage needs '{key}'"
        hint = KINDS[kind].model_fields[key].description
    else:
        msg = f"'{'.'.join(map(str, loc))}': {msg}"
    return SpecError(f"stage '{name}' ({kind}): {msg}",
                     source=Source(file, line_of(lines, ("stages", name) + loc)), help=hint)


__all__ = ["KINDS", "REF_FIELDS", "PipelineFile", "StageDef", "is_ref", "read_pipeline"]
