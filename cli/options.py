"""What the `dlgraph` commands share: the SPEC argument, --device and --weights, a spec
loaded with its warnings on stderr, and :func:`options` to apply a list of options as one
decorator."""

from __future__ import annotations

from pathlib import Path

import click

import dlgraph

SPEC = click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
DEVICE = click.option("--device", metavar="NAME",
                      help="tinygrad device: cpu, cuda, nv, amd, metal, cl (default: "
                           "tinygrad's choice, or $DEV)")
WEIGHTS = click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
                       required=True, help="weights.safetensors (or best.safetensors) of a run")
FORCE = click.option("--force", is_flag=True,
                     help="replace the output file even if dlgraph did not write it (a file "
                          "dlgraph wrote, unchanged since, is replaced without it)")


def options(*decorators):
    """One decorator applying ``decorators`` in the order listed, as if stacked above a
    command (``--help`` shows them in this order)."""
    def apply(fn):
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn
    return apply


def load_graph(spec: Path):
    """The graph of a spec file; its warnings go to stderr."""
    g = dlgraph.load(spec)
    for w in g.warnings:
        click.echo(f"warning: {w}", err=True)
    return g
