"""`dlgraph pipeline run|validate|status|render FILE`: a graph of dlgraph runs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import dlgraph
from dlgraph.cli.options import FORCE

FILE = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
DIR = click.option("--dir", "dir_", type=click.Path(file_okay=False, path_type=Path),
                   help="the pipeline directory (default runs/pipelines/<name>)")


@click.group("pipeline")
def pipeline():
    """Several runs as one graph: train, evaluate, predict, export, sweep and sample
    stages passing artifacts, each re-run only when what it reads changed.

    \b
    dlgraph pipeline validate graphs/pipelines/transfer.yaml
    dlgraph pipeline run graphs/pipelines/transfer.yaml --jobs 2
    dlgraph pipeline status graphs/pipelines/transfer.yaml
    dlgraph pipeline render graphs/pipelines/transfer.yaml -o transfer.svg
    """


@pipeline.command("validate")
@FILE
def validate(file):
    """Check FILE and every stage's spec before anything runs."""
    plan = dlgraph.validate_pipeline(file)
    edges = sum(len(plan.refs[s]) for s in plan.order)
    n = len(plan.order)
    click.echo(f"{file}: pipeline '{plan.pipeline.name}' is valid: {n} stage{'s' * (n != 1)} "
               f"({', '.join(plan.order)}), {edges} artifact{'s' * (edges != 1)} passed")


@pipeline.command("run")
@FILE
@DIR
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="independent stages at once, each in its own process")
@click.option("--address", metavar="ADDR", help="run the stages as Ray tasks on this cluster "
              "('auto' or HOST:PORT; needs dlgraph[ray] and a shared pipeline directory)")
@click.option("--force", multiple=True, metavar="STAGE", help="re-run STAGE even if it is "
              "up to date (its dependents re-run if its artifacts change); repeatable")
@click.option("--device", metavar="NAME", help="tinygrad device for every stage")
@click.option("--quiet", "-q", is_flag=True, help="only the table at the end (and errors)")
def run(file, dir_, jobs, address, force, device, quiet):
    """Run FILE's stages that are not up to date: a line as each stage starts, is skipped
    or ends (a train's epoch lines too), and a table at the end."""
    res = dlgraph.run_pipeline(file, dir=dir_, jobs=jobs, address=address, force=force,
                               device=device, verbose=not quiet,
                               echo=(lambda s: None) if quiet else
                               (lambda s: click.echo(s, err=True)))
    click.echo(res.table())
    for r in res.rows:
        if r.state == "failed":
            click.echo(f"error: stage '{r.stage}': {r.error}", err=True)
    if not res.ok:
        sys.exit(1)


@pipeline.command("status")
@FILE
@DIR
def status(file, dir_):
    """Each stage: up to date, stale (and why), failed, interrupted or never run."""
    states = dlgraph.pipeline_status(file, dir=dir_)
    width = max(len(s) for s in states)
    for stage, st in states.items():
        click.echo(f"{stage:<{width}}  {st.text()}")


@pipeline.command("render")
@FILE
@DIR
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="write the drawing: .dot, .svg, .png or .pdf (default: DOT on stdout)")
@FORCE
def render(file, dir_, output, force):
    """Draw FILE's stage graph, coloured by each stage's state."""
    text = dlgraph.render_pipeline(file, output, dir=dir_, force=force)
    click.echo(f"wrote {output}" if output else text, nl=output is not None)
