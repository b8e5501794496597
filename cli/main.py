"""The `dlgraph` command: thin commands over the public API.

Exit status: 0 ok, 1 a dlgraph error (printed as ``file:line: node 'x' (op): ...`` with a
``help:`` line, no traceback), 2 a usage error. A traceback means a bug in dlgraph.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
import numpy as np

from dlgraph.engine.errors import DataError, DlgraphError, Source

SPEC = click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
DEVICE = click.option("--device", metavar="NAME",
                      help="tinygrad device: cpu, cuda, nv, amd, metal, cl (default: "
                           "tinygrad's choice, or $DEV)")


def errors(fn):
    """Turn a DlgraphError into its message on stderr and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except DlgraphError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dlgraph")
def main():
    """Neural networks as declarative YAML/JSON computation graphs.

    \b
    dlgraph run graphs/lstm.yaml          train it (or run it forward without `train:`)
    dlgraph evaluate graphs/mlp.yaml --weights runs/mlp/weights.safetensors
    dlgraph predict graphs/mlp.yaml --weights W --data new.csv -o pred.csv
    dlgraph validate graphs/mlp.yaml      check a spec and summarise it
    dlgraph render graphs/cnn.yaml -o cnn.svg
    """


def _load(spec: Path):
    import dlgraph
    g = dlgraph.load(spec)
    for w in g.warnings:
        click.echo(f"warning: {w}", err=True)
    return g


def _check_fits(g, batch: int) -> None:
    """Refuse a graph that cannot fit in memory at ``batch`` samples, with the figure (train
    and compile check too; this covers the batch of random inputs and gradcheck)."""
    from dlgraph.engine.spec.checks import check_fits
    check_fits(g, batch)


def _check_inputs(g, arrays: dict[str, np.ndarray]) -> None:
    """--input arrays must name graph inputs and fit them (no 1.7 silently read as 1)."""
    from dlgraph.engine.io.data.ids import check_feeds
    for name in arrays:
        if name not in g.inputs:
            raise DataError(f"--input names '{name}', which is not an input of the graph",
                            help=f"the inputs are: {', '.join(g.inputs)}")
    check_feeds(g, arrays, "--input")


def _read_inputs(pairs: tuple[str, ...]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for pair in pairs:
        name, eq, path = pair.partition("=")
        if not eq and pair.endswith(".npz"):
            name, path = "", pair
        elif not eq:
            raise click.BadParameter(f"'{pair}': use NAME=FILE.npy or FILE.npz",
                                     param_hint="--input")
        p = Path(path)
        if not p.is_file():
            raise DataError(f"no such input file: {p}", source=Source(str(p)))
        if p.suffix not in (".npy", ".npz"):
            raise DataError(f"--input reads only .npy and .npz files, not {p.name}",
                            source=Source(str(p)), help="save the array with np.save")
        try:
            data = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"cannot read {p} as .npy/.npz: {e}", source=Source(str(p))) \
                from None
        if isinstance(data, np.lib.npyio.NpzFile):
            if name:
                if name not in data:
                    raise DataError(f"{p} has no array '{name}'; it has: {', '.join(data)}",
                                    source=Source(str(p)))
                out[name] = data[name]
            else:
                out.update({k: data[k] for k in data.files})
        else:
            out[name] = data
    return out


@main.command()
@SPEC
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE",
              help="an input array from .npy (or all arrays of a .npz); repeatable")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="size of named dims for random inputs")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="write the outputs to this .npz")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="run inference with trained weights (weights.safetensors of a run)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="training: the run directory (default runs/<name>/<time>)")
@click.option("--resume", is_flag=True, help="training: continue from the last checkpoint "
                                             "in --out")
@click.option("--epochs", type=click.IntRange(min=1), help="training: override epochs")
@click.option("--steps", type=click.IntRange(min=1), help="training: stop after N steps")
@click.option("--seed", type=int, default=0, show_default=True,
              help="inference: parameter init and random inputs")
@click.option("--init-from", type=click.Path(dir_okay=False, path_type=Path),
              help="training: start from the parameters of this weights file that match by "
                   "name and shape (transfer; see `init_from:` in the spec)")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
@click.option("--debug", is_flag=True, help="on a NaN loss, find the first non-finite node")
@click.option("--no-cache", is_flag=True,
              help="compile afresh: neither read nor write the program cache "
                   "($DLGRAPH_CACHE_DIR, default ~/.cache/dlgraph/programs)")
@click.option("--devices", metavar="D1,D2,...",
              help="training: split each batch over these devices of this machine "
                   "(e.g. cpu:0,cpu:1 or cuda:0,cuda:1), parameters replicated")
@click.option("--workers", type=click.IntRange(min=1),
              help="training: data parallel over N Ray Train workers (needs dlgraph[ray])")
@click.option("--address", metavar="ADDR",
              help="with --workers: the Ray cluster to join (default: a local Ray)")
@click.option("--tensorboard", is_flag=False, flag_value="", default=None, metavar="[DIR]",
              help="training: write TensorBoard event files to DIR (default RUN_DIR/tensorboard;"
                   " needs tensorboardX), as `train: {log: {tensorboard: ...}}`")
@DEVICE
@errors
def run(spec, inputs, batch, output, weights, out, resume, epochs, steps, init_from, seed,
        quiet, debug, no_cache, devices, workers, address, tensorboard, device):
    """Train SPEC by its `train:` section, or run it forward (no `train:`, or --weights)."""
    import dlgraph
    g = _load(spec)
    if g.spec.train is not None and weights is None and not inputs:
        if resume and out is None:
            raise click.UsageError("--resume needs --out RUN_DIR")
        if tensorboard is not None:
            from dlgraph.engine.spec.train import LogSpec
            g.spec.train.log = LogSpec(tensorboard=tensorboard or True)
        if address and not workers:
            raise click.UsageError("--address needs --workers N")
        more = {"workers": workers, "address": address} if workers else {}
        res = dlgraph.train(g, out=out, resume=resume, device=device, epochs=epochs,
                            steps=steps, quiet=quiet, debug=debug, init_from=init_from,
                            cache=not no_cache, devices=devices, **more)
        click.echo(res.line())
        if res.target_met is False:
            sys.exit(1)
        return
    if g.spec.train is not None and weights is None:
        click.echo("warning: running with untrained (freshly initialised) weights; pass "
                   "--weights RUN/weights.safetensors for a trained model", err=True)
    _check_fits(g, batch)
    model = dlgraph.compile(g, weights=weights, seed=seed, device=device, cache=not no_cache)
    arrays = _read_inputs(inputs) if inputs else model.random_inputs(batch, seed)
    _check_inputs(g, arrays)
    if inputs and weights is not None:      # raw data: the run's standardize.json applies
        from dlgraph.engine.io.data import scaling
        arrays = scaling.apply(arrays, scaling.stats_for(g, weights))
    outs = model(**arrays)
    for name, a in outs.items():
        stats = (f"mean {a.mean():.4g}  std {a.std():.4g}  min {a.min():.4g}  max {a.max():.4g}"
                 if a.size and a.dtype.kind == "f" else "")
        click.echo(f"{name}: {list(a.shape)} {a.dtype}  {stats}".rstrip())
    if output:
        import io

        from dlgraph.engine.train.checkpoint import atomic_write
        buf = io.BytesIO()
        np.savez(buf, **outs)
        atomic_write(output, buf.getvalue())
        click.echo(f"wrote {output}")


WEIGHTS = click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
                       required=True, help="weights.safetensors (or best.safetensors) of a run")


@main.command()
@SPEC
@WEIGHTS
@click.option("--data", metavar="FILE|SOURCE",
              help="a .csv/.npy/.npz file, or a data source: a name or a mapping like "
                   "'{source: spirals, samples: 500}' (default: the spec's validation split)")
@click.option("--batch", type=click.IntRange(min=1), help="samples per batch (default: the "
                                                          "spec's)")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="draw the confusion matrix to this picture (.png, .svg, .pdf)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@DEVICE
@errors
def evaluate(spec, weights, data, batch, as_json, output, quiet, device):
    """Score trained weights: the spec's metrics, per-class precision/recall/F1 and a
    confusion matrix for a classifier, MSE/MAE/R² for a regression."""
    import json

    import dlgraph
    g = _load(spec)
    ev = dlgraph.evaluate(g, weights, data, batch=batch, device=device, quiet=quiet)
    click.echo(json.dumps(ev.to_json(), indent=2) if as_json else ev.table())
    if output:
        from dlgraph.engine.report.evaluate import confusion_picture
        click.echo(f"wrote {confusion_picture(ev, output)}", err=as_json)


@main.command()
@SPEC
@WEIGHTS
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the rows to predict: .csv (the spec's csv columns), .npy or .npz")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="file to write: .csv or .npz")
@click.option("--batch", type=click.IntRange(min=1), help="samples per batch (default: the "
                                                          "spec's)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@DEVICE
@errors
def predict(spec, weights, data, output, batch, quiet, device):
    """Predict every row of a data file; a classifier also gets probabilities and classes."""
    import dlgraph
    g = _load(spec)
    click.echo(dlgraph.predict(g, weights, data, output, batch=batch, device=device,
                               quiet=quiet).line())


@main.command()
@SPEC
@click.option("--backward", is_flag=True, help="also describe each training phase's "
              "backward graph: its nodes by op and the parameters it differentiates")
@errors
def validate(spec, backward):
    """Check SPEC without running it; print a summary."""
    import dlgraph
    g = _load(spec)
    click.echo(dlgraph.validate(g, backward=backward))
    click.echo(f"ok: {spec} is valid")


@main.command()
@SPEC
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="batch size for the activation memory estimate")
@errors
def summary(spec, batch):
    """A table of nodes, output shapes and parameters (like Keras' model.summary)."""
    import dlgraph
    g = _load(spec)
    s = dlgraph.validate(g)
    click.echo(s)
    if s.activation_floats is not None and batch > 1:
        from dlgraph.engine.report.summary import _bytes
        click.echo(f"activations at batch {batch}: {_bytes(s.activation_floats * 4 * batch)}")


@main.command()
@SPEC
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="file to write: .dot, .svg, .png or .pdf (default: DOT on stdout)")
@click.option("--expand", "expand", multiple=True, metavar="NODE",
              help="draw these composites expanded; --expand-all for all")
@click.option("--expand-all", is_flag=True, help="draw every composite expanded")
@click.option("--backward", is_flag=True, help="draw the training graph with backward nodes")
@click.option("--rankdir", type=click.Choice(["TB", "LR", "BT", "RL"]), default="TB",
              show_default=True)
@click.option("--depth", type=click.IntRange(min=1), help="nesting depth of expanded scopes")
@click.option("--phase", metavar="NAME", help="with --backward: the training phase to draw "
              "(default: the first)")
@click.option("--dtypes", is_flag=True, help="label edges with dtypes too")
@click.option("--no-shapes", is_flag=True, help="no shapes on edges")
@errors
def render(spec, output, expand, expand_all, backward, rankdir, depth, phase, dtypes,
           no_shapes):
    """Draw SPEC with graphviz."""
    import dlgraph
    g = _load(spec)
    dot = dlgraph.render(g, output, expand=True if expand_all else list(expand),
                         backward=(phase or True) if backward or phase else False,
                         rankdir=rankdir, depth=depth, dtypes=dtypes, shapes=not no_shapes)
    if output is None:
        click.echo(dot)
    else:
        click.echo(f"wrote {output}")


@main.command()
@click.option("--clear", is_flag=True, help="remove every compiled program kept")
@errors
def cache(clear):
    """Where compiled programs are kept between runs, how many and how big (or --clear)."""
    from dlgraph.engine.compile.cache import default_cache
    said: list[str] = []
    store = default_cache(said.append)
    if store is None:
        click.echo(said[0] if said else "the program cache is off (DLGRAPH_CACHE_DIR=off)")
        return
    if clear:
        n, size = store.clear()
        click.echo(f"removed {n} compiled program{'s' * (n != 1)} ({size / 2**20:.1f} MiB) "
                   f"from {store.root}")
        return
    n, size = store.usage()
    click.echo(f"program cache {store.root}: {n} compiled program"
               f"{'s' * (n != 1)}, {size / 2**20:.1f} MiB (newest kept within "
               f"1 GiB; `dlgraph cache --clear` empties it, `run --no-cache` bypasses it)")


@main.command()
@errors
def schema():
    """Print the JSON Schema of the spec format."""
    from dlgraph.api import schema_json
    click.echo(schema_json())


@main.command()
@click.argument("name", required=False)
@errors
def ops(name):
    """List every op with its inputs and fields (or one op in detail)."""
    from dlgraph.engine.errors import suggest
    from dlgraph.ops import REGISTRY
    if name:
        if name not in REGISTRY:
            raise DlgraphError(f"unknown op '{name}'", help=suggest(name, REGISTRY)
                               or "`dlgraph ops` lists them")
        d = REGISTRY[name]
        kind = "composite" if d.composite else "primitive"
        click.echo(f"{d.name} ({d.family}, {kind}): {d.doc}\n  in: [{d.signature()}]")
        for k, f in d.fields().items():
            default = "" if f.is_required() else \
                f" = {f.get_default(call_default_factory=True)!r}"
            click.echo(f"  {f.alias or k}{default}: {f.description or ''}")
        return
    by_family: dict[str, list] = {}
    for d in REGISTRY.values():
        by_family.setdefault(d.family, []).append(d)
    for fam in sorted(by_family):
        click.echo(f"{fam}:")
        for d in sorted(by_family[fam], key=lambda d: d.name):
            fields = ", ".join(f.alias or k for k, f in d.fields().items())
            click.echo(f"  {d.name:<22} in: [{d.signature()}]" + (f"  fields: {fields}"
                                                                  if fields else ""))
            click.echo(f"  {'':<22} {d.doc}")


@main.command()
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("curves.png"), show_default=True)
@errors
def plot(runs, output):
    """Draw the training curves of one or more run directories."""
    from dlgraph.engine.report.plot import plot_runs
    click.echo(f"wrote {plot_runs(list(runs), output)}")


@main.command()
@SPEC
@click.option("--param", "params", multiple=True, metavar="PATH=V1,V2,...",
              help="a field to vary by dotted path, with its values (YAML scalars), or a range "
                   "LOW:HIGH / log:LOW:HIGH for random and optuna search; repeatable")
@click.option("--search", type=click.Choice(["grid", "random", "optuna"]),
              help="grid (default), random, or optuna (needs optuna)")
@click.option("--samples", type=click.IntRange(min=1), help="random/optuna: trials "
              "(default 8); grid: times the grid is run, with the next seed each time (default 1)")
@click.option("--metric", help="the logged value that ranks trials (default: the target's "
                               "metric, else val_loss)")
@click.option("--mode", type=click.Choice(["min", "max"]), help="lower or higher is better")
@click.option("--address", metavar="HOST:PORT", help="a Ray cluster to run on (default: a "
                                                     "local Ray sized to this machine)")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True),
              help="CPUs each trial reserves (default 1)")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), help="GPUs each trial "
                                                                     "reserves (default 0)")
@click.option("--concurrency", type=click.IntRange(min=1), help="trials at once (default: "
                                                                "as many as fit)")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="stop the sweep's trials after this many seconds")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="the sweep directory (default runs/<name>-sweep/<time>)")
@DEVICE
@errors
def sweep(spec, params, search, samples, metric, mode, address, cpus_per_trial,
          gpus_per_trial, concurrency, time_budget, out, device):
    """Train SPEC once per combination of --param values (or the spec's `sweep:` section)
    on Ray Tune; print the results table and the best trial, write sweep.csv."""
    from dlgraph.engine.train.sweep import plan_sweep, run_sweep
    plan = plan_sweep(spec, params, out=out, device=device, address=address, search=search,
                      samples=samples, metric=metric, mode=mode, concurrency=concurrency,
                      cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                      time_budget=time_budget)
    res = run_sweep(plan, echo=lambda s: click.echo(s, err=True))
    click.echo(res.table())
    if res.best is None:
        sys.exit(1)


@main.command()
@SPEC
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@DEVICE
@errors
def gradcheck(spec, batch, seed, device):
    """Check SPEC's derived gradients against finite differences (float64)."""
    from dlgraph.engine.report.gradcheck import gradcheck as check
    g = _load(spec)
    _check_fits(g, batch)
    rows = check(g, batch=batch, seed=seed, device=device)
    worst = max(r[1] for r in rows) if rows else 0.0
    for name, err, kinks in rows:
        skipped = f" ({kinks} coordinate{'s' * (kinks != 1)} at a kink skipped)" if kinks else ""
        click.echo(f"{name:<40} max relative error {err:.2e}{skipped}")
    click.echo(f"worst: {worst:.2e} ({'ok' if worst < 1e-4 else 'TOO LARGE'})")
    if worst >= 1e-4:
        sys.exit(1)


@main.command()
@SPEC
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="weights.safetensors of a training run")
@click.option("--prompt", default="", help="text to continue")
@click.option("--length", type=click.IntRange(min=1), default=200, show_default=True,
              help="tokens to generate")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@DEVICE
@errors
def sample(spec, weights, prompt, length, temperature, seed, device):
    """Generate text from a language model trained on a text source."""
    import dlgraph
    from dlgraph.engine.report.sample import sample as generate
    g = _load(spec)
    model = dlgraph.compile(g, weights=weights, device=device)
    click.echo(generate(g, model, prompt=prompt, length=length, temperature=temperature,
                        seed=seed))


@main.command("export")
@SPEC
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="file to write, e.g. model.onnx (the suffix picks the format)")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="weights.safetensors of a training run (default: initialised under --seed)")
@click.option("--opset", type=int, help="ONNX opset (default 21)")
@click.option("--seed", type=int, default=0, show_default=True)
@errors
def export_cmd(spec, output, weights, opset, seed):
    """Export SPEC's inference graph with its weights, e.g. to ONNX."""
    import dlgraph
    dlgraph.export(_load(spec), output, weights=weights, opset=opset, seed=seed)
    click.echo(f"wrote {output}")


@main.command("import")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="spec file to write (.yaml); the weights go beside it (.safetensors)")
@errors
def import_cmd(model, output):
    """Import an ONNX MODEL as a readable spec and its weights."""
    import dlgraph
    spec, weights = dlgraph.import_onnx(model, output)
    click.echo(f"wrote {spec} and {weights}")


if __name__ == "__main__":
    main()


__all__ = ["main"]
