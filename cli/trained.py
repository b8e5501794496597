"""Commands over what training leaves: `evaluate`, `predict` and `sample` with a run's
weights, `plot` of its curves, and `export` / `import` to and from ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import click

import dlgraph
from dlgraph.cli.options import DEVICE, FORCE, SPEC, WEIGHTS, load_graph


@click.command("evaluate")
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
@FORCE
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@DEVICE
def evaluate(spec, weights, data, batch, as_json, output, force, quiet, device):
    """Score trained weights: the spec's metrics, per-class precision/recall/F1 and a
    confusion matrix for a classifier, MSE/MAE/R² for a regression."""
    g = load_graph(spec)
    if output:
        dlgraph.api.check_output(output, force=force)     # before the work, not after
    ev = dlgraph.evaluate(g, weights, data, batch=batch, device=device, quiet=quiet)
    click.echo(json.dumps(ev.to_json(), indent=2) if as_json else ev.table())
    if output:
        click.echo(f"wrote {dlgraph.draw_confusion(ev, output, force)}", err=as_json)


@click.command("predict")
@SPEC
@WEIGHTS
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the rows to predict: .csv (the spec's csv columns), .npy or .npz")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="file to write: .csv or .npz")
@click.option("--batch", type=click.IntRange(min=1), help="samples per batch (default: the "
                                                          "spec's)")
@FORCE
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@DEVICE
def predict(spec, weights, data, output, batch, force, quiet, device):
    """Predict every row of a data file; a classifier also gets probabilities and classes."""
    g = load_graph(spec)
    click.echo(dlgraph.predict(g, weights, data, output, batch=batch, device=device,
                               quiet=quiet, force=force).line())


@click.command("sample")
@SPEC
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="weights.safetensors of a training run")
@click.option("--prompt", default="", help="text to continue")
@click.option("--length", type=click.IntRange(min=1), default=200, show_default=True,
              help="tokens to generate")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@DEVICE
def sample(spec, weights, prompt, length, temperature, seed, device):
    """Generate text from a language model trained on a text source."""
    click.echo(dlgraph.generate_text(load_graph(spec), weights, prompt=prompt, length=length,
                                     temperature=temperature, seed=seed, device=device))


@click.command("plot")
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("curves.png"), show_default=True)
@FORCE
def plot(runs, output, force):
    """Draw the training curves of one or more run directories."""
    click.echo(f"wrote {dlgraph.plot_curves(list(runs), output, force)}")


@click.command("export")
@SPEC
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="file to write, e.g. model.onnx (the suffix picks the format)")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="weights.safetensors of a training run (default: initialised under --seed)")
@click.option("--opset", type=int, help="ONNX opset (default 21)")
@click.option("--seed", type=int, default=0, show_default=True)
@FORCE
def export_cmd(spec, output, weights, opset, seed, force):
    """Export SPEC's inference graph with its weights, e.g. to ONNX."""
    dlgraph.export(load_graph(spec), output, weights=weights, opset=opset, seed=seed,
                   force=force)
    click.echo(f"wrote {output}")


@click.command("import")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="spec file to write (.yaml); the weights go beside it (.safetensors)")
@FORCE
def import_cmd(model, output, force):
    """Import an ONNX MODEL as a readable spec and its weights."""
    spec, weights = dlgraph.import_onnx(model, output, force=force)
    click.echo(f"wrote {spec} and {weights}")
