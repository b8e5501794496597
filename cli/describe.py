"""Commands that check and describe a spec without training it: `validate`, `summary`,
`render`, `gradcheck`, and the format itself: `schema`, `ops`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import dlgraph
from dlgraph.api import schema_json
from dlgraph.cli.options import DEVICE, FORCE, SPEC, load_graph, options


@click.command("validate")
@SPEC
@click.option("--backward", is_flag=True, help="also describe each training phase's "
              "backward graph: its nodes by op and the parameters it differentiates")
def validate(spec, backward):
    """Check SPEC without running it; print a summary."""
    g = load_graph(spec)
    click.echo(dlgraph.validate(g, backward=backward))
    click.echo(f"ok: {spec} is valid")


@click.command("summary")
@SPEC
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="batch size for the activation memory estimate")
def summary(spec, batch):
    """A table of nodes, output shapes and parameters (like Keras' model.summary)."""
    g = load_graph(spec)
    s = dlgraph.validate(g)
    click.echo(s)
    if s.activation_floats is not None and batch > 1:
        click.echo(f"activations at batch {batch}: {s.activations_at(batch)}")


RENDER_OPTIONS = options(
    click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                 help="file to write: .dot, .svg, .png or .pdf (default: DOT on stdout)"),
    click.option("--expand", "expand", multiple=True, metavar="NODE",
                 help="draw this node opened up, as a cluster: a spec node id, or a node "
                      "inside a module by its path (b/c1); repeatable; --expand-all for all"),
    click.option("--expand-all", is_flag=True, help="draw every composite expanded"),
    click.option("--backward", is_flag=True,
                 help="draw the training graph with backward nodes"),
    click.option("--rankdir", type=click.Choice(["TB", "LR", "BT", "RL"]), default="TB",
                 show_default=True),
    click.option("--depth", type=click.IntRange(min=1),
                 help="levels drawn open below each expanded node (1: its layers, each one "
                      "box); default: all the way down to primitives"),
    click.option("--phase", metavar="NAME", help="with --backward: the training phase to "
                 "draw (default: the first)"),
    click.option("--dtypes", is_flag=True, help="label edges with dtypes too"),
    click.option("--no-shapes", is_flag=True, help="no shapes on edges"),
    FORCE,
)


@click.command("render")
@SPEC
@RENDER_OPTIONS
def render(spec, output, expand, expand_all, backward, rankdir, depth, phase, dtypes,
           no_shapes, force):
    """Draw SPEC with graphviz."""
    g = load_graph(spec)
    dot = dlgraph.render(g, output, expand=True if expand_all else list(expand),
                         backward=(phase or True) if backward or phase else False,
                         rankdir=rankdir, depth=depth, dtypes=dtypes, shapes=not no_shapes,
                         force=force)
    click.echo(dot if output is None else f"wrote {output}")


@click.command("gradcheck")
@SPEC
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@DEVICE
def gradcheck(spec, batch, seed, device):
    """Check SPEC's derived gradients against finite differences (float64)."""
    rows = dlgraph.gradcheck(load_graph(spec), batch=batch, seed=seed, device=device)
    worst = max(r[1] for r in rows) if rows else 0.0
    for name, err, kinks in rows:
        skipped = f" ({kinks} coordinate{'s' * (kinks != 1)} at a kink skipped)" if kinks else ""
        click.echo(f"{name:<40} max relative error {err:.2e}{skipped}")
    click.echo(f"worst: {worst:.2e} ({'ok' if worst < 1e-4 else 'TOO LARGE'})")
    if worst >= 1e-4:
        sys.exit(1)


@click.command("schema")
def schema():
    """Print the JSON Schema of the spec format."""
    click.echo(schema_json())


@click.command("ops")
@click.argument("name", required=False)
def ops(name):
    """List every op with its inputs and fields (or one op in detail)."""
    if name:
        op = dlgraph.describe_op(name)
        kind = "composite" if op.composite else "primitive"
        click.echo(f"{op.name} ({op.family}, {kind}): {op.doc}\n  in: [{op.inputs}]")
        for f in op.fields:
            default = "" if f.required else f" = {f.default!r}"
            click.echo(f"  {f.name}{default}: {f.doc}")
        return
    by_family: dict[str, list] = {}
    for op in dlgraph.list_ops():
        by_family.setdefault(op.family, []).append(op)
    for fam in sorted(by_family):
        click.echo(f"{fam}:")
        for op in sorted(by_family[fam], key=lambda op: op.name):
            fields = ", ".join(f.name for f in op.fields)
            click.echo(f"  {op.name:<22} in: [{op.inputs}]" + (f"  fields: {fields}"
                                                               if fields else ""))
            click.echo(f"  {'':<22} {op.doc}")
