"""What `validate` checks in a `train:` section beyond its models, so that it catches what
`run` would only find later (after loading data, compiling, or a whole epoch): metric
references and their shapes, the target's metric being logged at all, `feed:` keys,
phase names, data files that are not there.

Every problem is a located :class:`SpecError` or :class:`DataError` with a ``help:`` line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path

from dlgraph.engine.errors import DataError, DeviceError, Source, SpecError, suggest
from dlgraph.engine.graph.ir import Graph
from dlgraph.engine.io.data.base import size_text
from dlgraph.engine.types import dim_parts, fmt, numel
from dlgraph.ops import OPS


def check_training(g: Graph) -> None:
    """Raise the first problem of ``g``'s `train:` section, or of a graph without one,
    that `run` would meet: memory (at the batch it trains or runs with), an inference
    graph with nothing to compute."""
    spec = g.spec.train if g.spec is not None else None
    check_fits(g, spec.batch if spec is not None else 1)
    if spec is None:
        if g.spec is not None and not g.outputs:
            raise SpecError("an inference spec (no `train:` section) needs `outputs:`; "
                            "this one computes nothing", source=Source(
                                g.source, g.lines.get(("outputs",)) or 1),
                            help="list the node ids to return, e.g. `outputs: [logits]`")
        return
    _phases(g, spec)
    _feed_keys(g, spec)
    for k, m in enumerate(spec.metrics):
        _metric(g, m, k)
    _target(g, spec)
    _watched(g, spec)
    _data_file(g, spec)
    _data_size(g, spec)
    _data_names(g, spec)
    check_batch_statistics(g, spec.batch)
    frozen_names(g, spec.freeze)
    if spec.init_from is not None:
        init_from_names(g, spec.init_from)
    _tensorboard(g, spec)


def _at(g: Graph, *path) -> Source:
    while path and g.lines.get(("train",) + path) is None:
        path = path[:-1]
    return Source(g.source, g.lines.get(("train",) + path) or g.lines.get(("train",)))


def _phases(g: Graph, spec) -> None:
    seen: set[str] = set()
    for k, ph in enumerate(spec.phases or []):
        if ph.name in seen:
            raise SpecError(f"two phases are named '{ph.name}'", source=_at(g, "phases", k),
                            help="give every phase its own `name:`")
        seen.add(ph.name)


def _feed_keys(g: Graph, spec) -> None:
    for name in spec.feed:
        if name not in g.inputs:
            raise SpecError(f"`feed:` names '{name}', which is not an input of the graph",
                            source=_at(g, "feed", name),
                            help=suggest(name, g.inputs) or f"inputs: {', '.join(g.inputs)}")


def _metric(g: Graph, m, k: int) -> None:
    names = [n for n in g.aliases if "." not in n] + list(g.inputs)
    for ref in m.in_:
        if ref not in g.aliases and ref not in g.inputs:
            raise SpecError(f"metric '{m.name or m.type}': '{ref}' is not a node or input",
                            source=_at(g, "metrics", k),
                            help=suggest(ref.split(".")[0], names) or f"nodes: {', '.join(names)}")
    if len(m.in_) == 1:             # `mean`: any node
        return
    pred, target = (g[g.resolve(r)].type for r in m.in_)
    if m.type == "accuracy":
        ok = pred.rank == target.rank + 1 and pred.shape[:-1] == target.shape
        want = "scores [..., classes] and integer labels [...]"
    else:
        ok = pred.shape == target.shape
        want = "two values of the same shape"
    if not ok:
        raise SpecError(f"metric '{m.name or m.type}' compares {m.in_[0]} {fmt(pred.shape)} "
                        f"with {m.in_[1]} {fmt(target.shape)}", source=_at(g, "metrics", k),
                        help=f"{m.type} takes {want}")


def logged_names(spec) -> list[str]:
    """The names an epoch row of this `train:` section carries (training losses, and the
    validation values when there is a validation split)."""
    phases = spec.all_phases()
    losses = ["loss"] if len(phases) == 1 else [f"loss_{p.name}" for p in phases]
    val = [f"val_{n}" for n in losses] + [f"{split}_{m.name or m.type}"
                                           for split in ("val", "train") for m in spec.metrics]
    return losses + (val if spec.validation.split > 0 else [])


def _target(g: Graph, spec) -> None:
    if spec.target is None:
        return
    logged = logged_names(spec)
    if spec.target.metric not in logged:
        hint = suggest(spec.target.metric, logged) or (
            f"did you mean 'val_{spec.target.metric}'?" if f"val_{spec.target.metric}" in logged
            else None)
        raise SpecError(f"target metric '{spec.target.metric}' is never logged; logged: "
                        f"{', '.join(logged)}", source=_at(g, "target", "metric"),
                        help=hint or "name one of the logged values, or add the metric "
                                     "under `metrics:` (validation needs `validation.split`)")


def _watched(g: Graph, spec) -> None:
    """What early stopping, best checkpoints and plateau schedules watch must be logged:
    the run would find out only after its first epoch, with a run folder begun."""
    logged = logged_names(spec)
    watched = [(spec.early_stopping, ("early_stopping", "metric"), "early_stopping"),
               (spec.best_checkpoint, ("best_checkpoint", "metric"), "best_checkpoint")]
    watched += [(ph.schedule, ("phases", k, "schedule", "metric") if spec.phases else
                 ("schedule", "metric"), "the plateau schedule")
                for k, ph in enumerate(spec.all_phases())
                if ph.schedule is not None and ph.schedule.type == "plateau"]
    for m, path, what in watched:
        if m is not None and m.metric not in logged:
            hint = suggest(m.metric, logged) or (
                f"did you mean 'val_{m.metric}'?" if f"val_{m.metric}" in logged else None)
            raise SpecError(f"{what} watches '{m.metric}', which is never logged; logged: "
                            f"{', '.join(logged)}", source=_at(g, *path),
                            help=hint or "watch one of the logged values (validation values "
                                         "need `validation.split`)")


def _tensorboard(g: Graph, spec) -> None:
    """`log.tensorboard: DIR` must be a folder (or not exist yet): event files go inside."""
    tb = spec.log.tensorboard if spec.log is not None else False
    if isinstance(tb, str) and Path(tb).exists() and not Path(tb).is_dir():
        raise SpecError(f"log.tensorboard names {tb}, which is a file, not a folder",
                        source=_at(g, "log", "tensorboard"),
                        help="name a folder for the event files, or `true` for "
                             "<run dir>/tensorboard")


def frozen_names(g: Graph, patterns: list[str]) -> list[str]:
    """The parameters ``freeze`` patterns select; a located SpecError when a pattern
    matches none (a typo would otherwise train everything) or a phase is left nothing to
    train. `validate` and `run` (train/prepare.py's ``frozen``) both call it."""
    for k, p in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(n, p) for n in g.params):
            raise SpecError(f"freeze: '{p}' matches no parameter",
                            source=_at(g, "freeze", k),
                            help=suggest(p, list(g.params)) or "parameter names: "
                            + ", ".join(list(g.params)[:12]))
    hit = [n for n in g.params if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    phases = g.spec.train.all_phases() if hit and g.spec is not None and g.spec.train else []
    for ph in phases:          # run freezes, then reverses each phase: leave it something
        if not any(p.trainable and n not in hit and any(fnmatch.fnmatchcase(n, pat)
                                                         for pat in ph.params)
                   for n, p in g.params.items()):
            raise SpecError(f"freeze leaves phase '{ph.name}' no parameter to train",
                            source=_at(g, "freeze"),
                            help="freeze fewer parameters: a phase trains those its `params:` "
                                 "select that are not frozen")
    return hit


def without_init_from(g: Graph) -> Graph:
    """``g`` as a caller trains it who gives its own ``init_from`` (``train(init_from=...)``, a
    pipeline's artifact): the spec's `init_from:` file is replaced, so it need not exist; the
    one given is checked as it is read."""
    train = g.spec.train.model_copy(update={"init_from": None})
    return dataclasses.replace(g, spec=g.spec.model_copy(update={"train": train}))


def init_from_names(g: Graph, spec, path: Path | None = None,
                    shapes: dict[str, list[int]] | None = None) -> dict[str, str]:
    """This graph's parameter -> its name in the ``init_from`` weights file (an
    InitFromSpec), from the file's header only: a missing file, a selection that copies
    nothing, two parameters renamed onto one, or a shape that differs is a located error.
    ``path``/``shapes``: the file and its tensors' shapes, when already known."""
    from dlgraph.engine.io.data.declared import safetensors_shapes
    where = _at(g, "init_from", "path") if g.spec.train and g.spec.train.init_from is spec \
        else Source(str(path))
    path = path or Path(g.base or Path.cwd()) / spec.path
    if not path.is_file():
        raise DataError(f"init_from: no such weights file: {path}", source=where,
                        help="give the weights.safetensors or checkpoint.safetensors of a run")
    shapes = shapes if shapes is not None else safetensors_shapes(path)
    if not any(k in shapes for k in g.params):        # a run's checkpoint: param.<name>
        shapes = {k.removeprefix("param."): v for k, v in shapes.items()} or shapes
    pairs: dict[str, str] = {}
    for name, p in g.params.items():
        theirs = _their_name(name, spec)
        if theirs is None or theirs not in shapes:
            continue
        twin = next((m for m, t in pairs.items() if t == theirs), None)
        if twin is not None:
            raise SpecError(f"init_from.rename maps both '{twin}' and '{name}' onto '{theirs}'"
                            f" of {path}", source=_at(g, "init_from", "rename"),
                            help="give each renamed scope its own prefix in the file")
        if list(shapes[theirs]) != list(p.shape):
            raise DataError(f"parameter '{theirs}' has shape {list(shapes[theirs])} in "
                            f"{path}, '{name}' has {list(p.shape)} here", source=where,
                            help="leave it out of init_from.params, or map it with rename")
        pairs[name] = theirs
    if not pairs:
        raise DataError(f"init_from: no parameter of this graph is in {path}; it holds: "
                        f"{', '.join(list(shapes)[:8])}", source=where,
                        help="map renamed scopes with init_from.rename, e.g. {enc: encoder}")
    return pairs


def _their_name(name: str, spec) -> str | None:
    """The name parameter ``name`` has in the init_from file (the longest ``rename`` prefix
    applied), or None when ``spec.params`` does not select it."""
    if not any(fnmatch.fnmatchcase(name, p) for p in spec.params):
        return None
    for mine in sorted(spec.rename, key=len, reverse=True):
        if name.startswith(mine + "."):
            return spec.rename[mine] + name[len(mine):]
    return name


def _data_size(g: Graph, spec) -> None:
    """Generated data over the memory cap, refused at its line (`samples: 1e9`) before
    `run` would generate it."""
    from dlgraph.engine.io.data.base import check_budget
    if spec.data is None or not spec.data.scratch_bytes():
        return
    try:
        check_budget(f"the '{spec.data.source}' data", spec.data.scratch_bytes())
    except DataError as e:
        sizes = [f for f in ("samples", "length", "size") if isinstance(
            getattr(spec.data, f, None), int)]
        field = max(sizes, key=lambda f: getattr(spec.data, f), default=None)
        raise e.located(source=_at(g, "data", field) if field else _at(g, "data")) from None


def _data_file(g: Graph, spec) -> None:
    path = getattr(spec.data, "path", None)
    if path is None:
        return
    full = Path(g.base or Path.cwd()) / path
    if not full.exists():
        where = "the current folder" if str(full.parent) == "." else str(full.parent)
        raise DataError(f"data file {path} does not exist (looked in {where})",
                        source=_at(g, "data", "path"),
                        help="fix `data.path`; relative paths start in the spec's folder")
    if spec.data.source == "npy" and full.is_file():     # headers only: cheap, and run's check
        from dlgraph.engine.io.data.declared import npy_sizes
        npy_sizes(full)


def _data_names(g: Graph, spec) -> None:
    """`standardize:` must name arrays that feed float inputs, `validation.stratify` an input
    of integer class labels."""
    from dlgraph.engine.io.data.scaling import inputs_to_standardize
    for name in inputs_to_standardize(g, spec):
        if g.inputs[name].dtype != "float32":
            raise DataError(f"cannot standardize '{name}': the input is {g.inputs[name].dtype} "
                            "(class labels or token ids)", source=_at(g, "data", "standardize"),
                            help="standardize only float features, e.g. `standardize: [x]`")
    name = spec.validation.stratify
    if name is not None and name not in g.inputs:
        raise SpecError(f"validation.stratify names '{name}', which is not an input of the "
                        "graph", source=_at(g, "validation", "stratify"),
                        help=suggest(name, g.inputs) or f"inputs: {', '.join(g.inputs)}")
    if name is not None and (g.inputs[name].dtype == "float32"
                             or any(d != 1 for d in g.inputs[name].shape[1:])):
        raise SpecError(f"validation.stratify needs one integer class label per sample; "
                        f"'{name}' is {g.inputs[name].dtype} of shape "
                        f"{fmt(g.inputs[name].shape)}", source=_at(g, "validation", "stratify"),
                        help="name the input that holds the class labels (e.g. y)")


def check_batch_statistics(g: Graph, batch: int, what: str = "") -> None:
    """batch_norm normalises by the batch's own statistics while training: one sample has
    none (its output would be all zeros; PyTorch refuses it too). ``batch``: the samples
    one step normalises over (a Ray worker's share of the batch); ``what`` says why."""
    if batch > 1:
        return
    users = sorted({n.user_id for n in g.nodes.values() if n.op == "moving_average"})
    if users:
        raise SpecError(f"batch 1{what} cannot train {', '.join(users)}: batch_norm needs more "
                        "than one sample per batch to compute its statistics",
                        source=_at(g, "batch"), help="use a batch of 2 or more, or layer_norm")


def activation_floats(g: Graph) -> int:
    """Floats per sample alive at once in the forward pass, as tinygrad runs it: only values
    a kernel writes are in memory (reductions, matmuls, loop buffers, `cut` values and the
    outputs; elementwise and shape ops fuse into the kernel that reads them), each until the
    last node that reads it, directly or through fused ops. Named dims count as 1 (a
    sequence length as its `dims:` maximum where declared); values
    without one (weight-sized) do not grow with the batch. Within 1.3x of what tinygrad
    allocates for the examples (tests/test_summary.py)."""
    named = {d: 1 for t in g.inputs.values() for d in t.shape if isinstance(d, str)}
    named.update((k, v.max) for k, v in (getattr(g.spec, "dims", None) or {}).items())
    outs = set(g.outputs.values())
    written = {n.id for n in g.nodes.values() if n.role == "forward"
               and any(isinstance(d, str) for d in n.type.shape)
               and (n.cut or n.id in outs or OPS[n.op].family in WRITTEN)}
    reads: dict[str, set[str]] = {}             # node -> the written values it reads
    last: dict[str, int] = {}
    for k, n in enumerate(g.nodes.values()):
        got = set().union(*(reads.get(i, set()) for i in n.inputs))
        last.update(dict.fromkeys(got, k))
        reads[n.id] = {n.id} if n.id in written else got
    at = {nid: k for k, nid in enumerate(g.nodes)}
    ends: dict[int, list[str]] = {}
    for m in written:
        ends.setdefault(len(g.nodes) if m in outs else last.get(m, at[m]), []).append(m)
    size = {m: numel(g.nodes[m].type.shape, named) or 0 for m in written}
    alive = peak = 0
    for k, nid in enumerate(g.nodes):
        alive += size.get(nid, 0)
        peak = max(peak, alive)
        alive -= sum(size[m] for m in ends.get(k, []))
    return peak


WRITTEN = ("reduce", "linalg", "control")
"""Op families whose results tinygrad writes to memory (the rest fuse into their reader)."""


def check_fits(g: Graph, batch: int) -> None:
    """Refuse, before anything is allocated, a graph whose float32 parameters and activations
    at ``batch`` samples exceed the machine's memory (e.g. `hidden: 1000000000000`): train,
    compile and the commands over them call it."""
    params = sum(numel(p.shape) or 0 for p in g.params.values())
    # the inputs too, per sample as activations are: one of fixed sizes ([2^40, 2^40], as an
    # imported model may declare) grows with nothing, and was made by numpy unchecked
    named = {dim_parts(d)[0]: 1 for t in g.inputs.values() for d in t.shape
             if isinstance(d, str)}
    named.update((k, v.max) for k, v in (getattr(g.spec, "dims", None) or {}).items())
    inputs = sum(numel(t.shape, named) or 0 for t in g.inputs.values())
    need = 4 * (params + (activation_floats(g) + inputs) * batch)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise DeviceError(f"this graph needs about {size_text(need)} at batch {batch:,} "
                          f"({size_text(4 * params)} of parameters), more than the "
                          f"{size_text(have)} of memory here",
                          source=Source(g.source, _largest_line(g, batch)),
                          help="use smaller layers or a smaller batch")


def _largest_line(g: Graph, batch: int) -> int | None:
    """The line of the layer or input that takes the most memory: its parameters, or its
    largest value at ``batch`` samples (named dims counted as 1)."""
    size: dict[str, float] = {}
    for n in g.nodes.values():
        if n.role in ("forward", "param", "input"):
            per = batch if n.role != "param" else 1
            need = (numel([1 if isinstance(d, str) else d for d in n.type.shape]) or 0) * per
            key = n.user_id.split("/")[0]
            size[key] = size.get(key, 0) + need if n.role == "param" else \
                max(size.get(key, 0), need)
    if not size:
        return None
    top = max(size, key=size.get)
    return g.lines.get(("nodes", top)) or g.lines.get(("inputs", top))


def unused_nodes(spec, file: str, lines: dict) -> list[str]:
    """A warning per node of a GraphSpec whose value nothing reads: no node, output,
    objective, metric or `share:` (as an unused input is warned of; often a typo in an
    `in:` elsewhere)."""
    used = {ref.split(".")[0] for nd in spec.nodes.values() for _, ref in nd.refs()}
    used |= {ref.split(".")[0] for ref in spec.outputs}
    used |= {getattr(nd, "share", None) for nd in spec.nodes.values()}
    if spec.train is None and not spec.outputs:
        return []           # refused for having no outputs: nothing to add to that
    if spec.train is not None:
        named = {ph.objective for ph in spec.train.all_phases()}
        named |= {ref.split(".")[0] for m in spec.train.metrics for ref in m.in_}
        if not named <= set(spec.nodes) | set(spec.inputs):
            return []       # a misspelt objective or metric: its error says more than this
        used |= named
    return [f"{Source(file, lines.get(('nodes', n)))}: node '{n}' is not used by any node, "
            "output, objective or metric" for n in spec.nodes if n not in used]
