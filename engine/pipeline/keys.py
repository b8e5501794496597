"""Stage keys and states: what decides a stage's result, hashed, and compared with what the
manifest recorded when it last ran (see engine/pipeline/state.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dlgraph.engine.pipeline.plan import Plan
from dlgraph.engine.pipeline.state import PipelineDir, Status, dlgraph_version, file_hash, text_hash


def spec_hash(plan: Plan, name: str) -> str:
    """The resolved spec: its data with `set:` applied, its `include:` files and its data
    file, by content. A spec artifact's content is one of the stage's inputs instead."""
    if "spec" in plan.refs[name]:
        return "artifact"
    src = plan.specs[name]
    parts = [text_hash(src.data)]
    for inc in src.data.get("include") or []:
        p = src.base / str(inc)
        parts.append(file_hash(p) if p.is_file() else f"missing {inc}")
    train = src.data.get("train")
    data = train.get("data") if isinstance(train, dict) else None
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        p = src.base / data["path"]
        parts.append(file_hash(p) if p.is_file() else f"missing {data['path']}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def artifact_path(plan: Plan, pdir: PipelineDir, producer: str, art: str) -> Path:
    return pdir.stage_dir(producer) / plan.outputs[producer][art][1]


def input_hashes(plan: Plan, pdir: PipelineDir, name: str) -> dict[str, str]:
    """The content hash of every artifact and data file the stage reads."""
    out = {}
    for producer, art in plan.refs[name].values():
        p = artifact_path(plan, pdir, producer, art)
        out[f"{producer}.{art}"] = file_hash(p) if p.is_file() else "missing"
    data = getattr(plan.stage(name).model, "data", None)
    if isinstance(data, str) and "data" not in plan.refs[name]:
        p = plan.path(data)
        out[f"file {data}"] = file_hash(p) if p.is_file() else "missing"
    return out


def stage_parts(plan: Plan, pdir: PipelineDir, name: str) -> dict:
    """What the key hashes, part by part (so that `status` can say which changed)."""
    sd = plan.stage(name)
    return {"kind": sd.kind, "spec": spec_hash(plan, name),
            "inputs": input_hashes(plan, pdir, name),
            "options": text_hash(sd.model.model_dump(mode="json", exclude={"doc"})),
            "dlgraph": dlgraph_version()}


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def changed(old: dict, new: dict) -> str | None:
    """Which part of a key changed, in words; None when none did."""
    if old.get("spec") != new["spec"] or old.get("kind") != new["kind"]:
        return "its spec changed"
    for ref, h in new["inputs"].items():
        if old.get("inputs", {}).get(ref) != h:
            return f"input {ref} changed"
    if old.get("options") != new["options"]:
        return "its options changed"
    if old.get("dlgraph") != new["dlgraph"]:
        return f"dlgraph {old.get('dlgraph')} -> {new['dlgraph']}"
    return None


def artifacts_changed(pdir: PipelineDir, entry: dict) -> str | None:
    """An artifact of a finished stage that is gone or whose content changed since."""
    for art, rec in entry.get("artifacts", {}).items():
        p = pdir.root / rec["file"]
        if not p.is_file():
            return f"artifact {art} is missing"
        if file_hash(p) != rec["sha256"]:
            return f"artifact {art} changed"
    return None


def stage_status(plan: Plan, pdir: PipelineDir, name: str, upstream: dict[str, Status],
                 parts: dict | None = None) -> Status:
    """A stage's state, its producers' states known (``upstream``)."""
    entry = pdir.entry(name)
    if entry is None:
        return Status("never run")
    if entry.get("state") == "failed":
        return Status("failed", (entry.get("error") or "").splitlines()[0][:120])
    if entry.get("state") != "done":
        return Status("interrupted", "it did not finish")
    for producer in plan.dag.predecessors(name):
        if upstream[producer].state != "up to date":
            return Status("stale", f"'{producer}' is {upstream[producer].state}")
    why = artifacts_changed(pdir, entry) or changed(
        entry.get("parts", {}), parts or stage_parts(plan, pdir, name))
    return Status("stale", why) if why else Status("up to date")


def pipeline_status(plan: Plan, pdir: PipelineDir) -> dict[str, Status]:
    """Every stage's state, in run order."""
    out: dict[str, Status] = {}
    for name in plan.order:
        out[name] = stage_status(plan, pdir, name, out)
    return out


__all__ = ["artifact_path", "changed", "key_of", "pipeline_status", "stage_parts",
           "stage_status"]
