"""`dlgraph run` (train a spec, or run it forward), `dlgraph sweep` and `dlgraph cache`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import numpy as np

import dlgraph
from dlgraph.api import save_arrays
from dlgraph.cli.options import DEVICE, SPEC, load_graph, options
from dlgraph.engine.errors import DataError, Source

RUN_OPTIONS = options(
    click.option("--input", "inputs", multiple=True, metavar="NAME=FILE",
                 help="an input array from .npy (or all arrays of a .npz); repeatable"),
    click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
                 help="size of named dims for random inputs"),
    click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
                 help="write the outputs to this .npz"),
    click.option("--force", is_flag=True, help="replace --output even if dlgraph did not "
                                               "write it"),
    click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
                 help="run inference with trained weights (weights.safetensors of a run)"),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                 help="training: the run directory (default runs/<name>/<time>)"),
    click.option("--resume", is_flag=True, help="training: continue from the last checkpoint "
                                                "in --out"),
    click.option("--epochs", type=click.IntRange(min=1), help="training: override epochs"),
    click.option("--steps", type=click.IntRange(min=1), help="training: stop after N steps"),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="inference: parameter init and random inputs"),
    click.option("--init-from", type=click.Path(dir_okay=False, path_type=Path),
                 help="training: start from the parameters of this weights file that match by "
                      "name and shape (transfer; see `init_from:` in the spec)"),
    click.option("--quiet", "-q", is_flag=True, help="no progress output"),
    click.option("--debug", is_flag=True, help="on a NaN loss, find the first non-finite node"),
    click.option("--no-cache", is_flag=True,
                 help="compile afresh: neither read nor write the program cache "
                      "($DLGRAPH_CACHE_DIR, default ~/.cache/dlgraph/programs)"),
    click.option("--devices", metavar="D1,D2,...",
                 help="training: split each batch over these devices of this machine "
                      "(e.g. cpu:0,cpu:1 or cuda:0,cuda:1), parameters replicated"),
    click.option("--workers", type=click.IntRange(min=1),
                 help="training: data parallel over N Ray Train workers (needs dlgraph[ray])"),
    click.option("--address", metavar="ADDR",
                 help="with --workers: the Ray cluster to join (default: a local Ray)"),
    click.option("--tensorboard", is_flag=False, flag_value="", default=None, metavar="[DIR]",
                 help="training: write TensorBoard event files to DIR (default "
                      "RUN_DIR/tensorboard; needs tensorboardX), as "
                      "`train: {log: {tensorboard: ...}}`"),
)


@click.command("run")
@SPEC
@RUN_OPTIONS
@DEVICE
def run(spec, **opts):
    """Train SPEC by its `train:` section, or run it forward (no `train:`, or --weights)."""
    g = load_graph(spec)
    if g.spec.train is not None and opts["weights"] is None and not opts["inputs"]:
        _train(g, **opts)
    else:
        _forward(g, **opts)


def _train(g, *, out, resume, epochs, steps, quiet, debug, init_from, no_cache, devices,
           workers, address, tensorboard, device, **_) -> None:
    """Train by the spec's `train:` section; exit 1 when a target is set and missed."""
    if resume and out is None:
        raise click.UsageError("--resume needs --out RUN_DIR")
    if address and not workers:
        raise click.UsageError("--address needs --workers N")
    more = {"workers": workers, "address": address} if workers else {"started": launched()}
    res = dlgraph.train(g, out=out, resume=resume, device=device, epochs=epochs, steps=steps,
                        quiet=quiet, debug=debug, init_from=init_from, cache=not no_cache,
                        devices=devices, tensorboard=None if tensorboard is None
                        else tensorboard or True, **more)
    click.echo(res.line())
    if res.target_met is False:
        sys.exit(1)


def launched() -> float:
    """When this command was launched, on ``time.perf_counter``'s clock: what the user waited
    for includes Python's start and the imports (Linux: the process's start time; elsewhere
    now)."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return time.perf_counter() - max(0.0, up - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


def _forward(g, *, inputs, batch, output, weights, seed, no_cache, device, force,
             **_) -> None:
    """Run forward once on --input arrays (or a random batch); print each output's shape
    and statistics, and write them to --output."""
    if g.spec.train is not None and weights is None:
        click.echo("warning: running with untrained (freshly initialised) weights; pass "
                   "--weights RUN/weights.safetensors for a trained model", err=True)
    if output:
        dlgraph.api.check_output(output, force=force)     # before the work, not after
    arrays = _read_inputs(inputs) if inputs else None
    outs = dlgraph.run_forward(g, arrays, weights=weights, batch=batch, seed=seed,
                               device=device, cache=not no_cache,
                               where="--input " + " ".join(inputs) if inputs else "--input")
    for name, a in outs.items():
        stats = (f"mean {a.mean():.4g}  std {a.std():.4g}  min {a.min():.4g}  max {a.max():.4g}"
                 if a.size and a.dtype.kind == "f" else "")
        click.echo(f"{name}: {list(a.shape)} {a.dtype}  {stats}".rstrip())
    if output:
        save_arrays(output, outs, force=force)
        click.echo(f"wrote {output}")


def _read_inputs(pairs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """--input NAME=FILE.npy (or FILE.npz: all its arrays, NAME=FILE.npz: one) as arrays."""
    out: dict[str, np.ndarray] = {}
    for pair in pairs:
        name, eq, path = pair.partition("=")
        if not eq and pair.endswith(".npz"):
            name, path = "", pair
        elif not eq:
            raise click.BadParameter(f"'{pair}': use NAME=FILE.npy or FILE.npz",
                                     param_hint="--input")
        p = Path(path)
        data = _load_array_file(p)
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


def _load_array_file(p: Path):
    if not p.is_file():
        raise DataError(f"no such input file: {p}", source=Source(str(p)))
    if p.suffix not in (".npy", ".npz"):
        raise DataError(f"--input reads only .npy and .npz files, not {p.name}",
                        source=Source(str(p)), help="save the array with np.save")
    return dlgraph.api.read_arrays(p)      # declared sizes checked before anything is read


SWEEP_OPTIONS = options(
    click.option("--param", "params", multiple=True, metavar="PATH=V1,V2,...",
                 help="a field to vary by dotted path, with its values (YAML scalars), or a "
                      "range LOW:HIGH / log:LOW:HIGH for random and optuna search; repeatable"),
    click.option("--search", type=click.Choice(["grid", "random", "optuna"]),
                 help="grid (default), random, or optuna (needs optuna)"),
    click.option("--samples", type=click.IntRange(min=1), help="random/optuna: trials "
                 "(default 8); grid: times the grid is run, with the next seed each time "
                 "(default 1)"),
    click.option("--metric", help="the logged value that ranks trials (default: the target's "
                                  "metric, else val_loss)"),
    click.option("--mode", type=click.Choice(["min", "max"]), help="lower or higher is better"),
    click.option("--address", metavar="HOST:PORT", help="a Ray cluster to run on (default: a "
                                                        "local Ray sized to this machine)"),
    click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True),
                 help="CPUs each trial reserves (default 1)"),
    click.option("--gpus-per-trial", type=click.FloatRange(min=0), help="GPUs each trial "
                                                                        "reserves (default 0)"),
    click.option("--concurrency", type=click.IntRange(min=1), help="trials at once (default: "
                                                                   "as many as fit)"),
    click.option("--time-budget", type=click.FloatRange(min=0, min_open=True),
                 metavar="SECONDS", help="stop the sweep's trials after this many seconds"),
    click.option("--max-trials", type=click.IntRange(min=1), metavar="N",
                 help="refuse a sweep of more trials than N (default 10000)"),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                 help="the sweep directory (default runs/<name>-sweep/<time>)"),
)


@click.command("sweep")
@SPEC
@SWEEP_OPTIONS
@DEVICE
def sweep(spec, params, **settings):
    """Train SPEC once per combination of --param values (or the spec's `sweep:` section)
    on Ray Tune; print the results table and the best trial, write sweep.csv."""
    res = dlgraph.sweep(spec, params, echo=lambda s: click.echo(s, err=True), **settings)
    click.echo(res.table())
    if res.best is None:
        sys.exit(1)


@click.command("cache")
@click.option("--clear", is_flag=True, help="remove every compiled program kept")
def cache(clear):
    """Where compiled programs are kept between runs, how many and how big (or --clear)."""
    if clear:
        gone = dlgraph.clear_cache()
        click.echo(gone.note if gone.root is None else
                   f"removed {gone.programs} compiled program{'s' * (gone.programs != 1)} "
                   f"({gone.bytes / 2**20:.1f} MiB) and {gone.kernels} kernel"
                   f"{'s' * (gone.kernels != 1)} ({gone.kernel_bytes / 2**20:.1f} MiB) "
                   f"from {gone.root}")
        return
    kept = dlgraph.cache_usage()
    click.echo(kept.note if kept.root is None else
               f"program cache {kept.root}: {kept.programs} compiled program"
               f"{'s' * (kept.programs != 1)}, {kept.bytes / 2**20:.1f} MiB; {kept.kernels} "
               f"generated kernel{'s' * (kept.kernels != 1)}, {kept.kernel_bytes / 2**20:.1f} "
               f"MiB (each kept within 1 GiB, newest first; `dlgraph cache --clear` empties "
               f"them, `run --no-cache` bypasses them)")


@click.command("tune")
@SPEC
@click.option("--beam", type=click.IntRange(1, 8), default=2, show_default=True,
              help="BEAM width: how many candidates of each kernel tinygrad keeps while searching")
@click.option("--batch", type=click.IntRange(min=1),
              help="the batch size to tune for (default: the spec's training batch)")
@DEVICE
def tune(spec, beam, batch, device):
    """Search faster kernels for SPEC once (tinygrad's BEAM search, minutes); every later
    run, evaluate and predict of SPEC at that batch size uses them."""
    res = dlgraph.tune(load_graph(spec), beam=beam, batch=batch, device=device,
                       echo=lambda s: click.echo(s, err=True))
    click.echo(res.line())
