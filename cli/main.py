"""The `dlgraph` command: thin commands over the public API (``dlgraph``, ``dlgraph.api``).

Exit status: 0 ok, 1 a dlgraph error (printed as ``file:line: node 'x' (op): ...`` with a
``help:`` line, no traceback), 2 a usage error. A traceback means a bug in dlgraph.

The commands live in :mod:`~dlgraph.cli.run` (run, sweep, cache, tune),
:mod:`~dlgraph.cli.describe` (validate, summary, render, gradcheck, schema, ops) and
:mod:`~dlgraph.cli.trained` (evaluate, predict, sample, plot, export, import).
"""

from __future__ import annotations

import sys

import click

from dlgraph.cli import describe, pipeline, run, trained
from dlgraph.engine.errors import DlgraphError


class Commands(click.Group):
    """The command group: every command's DlgraphError becomes its message on stderr and
    exit status 1, an interrupt 'interrupted' and 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DlgraphError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
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


for command in (run.run, run.sweep, run.cache, run.tune,
                describe.validate, describe.summary, describe.render, describe.gradcheck,
                describe.schema, describe.ops,
                trained.evaluate, trained.predict, trained.sample, trained.plot,
                trained.export_cmd, trained.import_cmd, pipeline.pipeline):
    main.add_command(command)


if __name__ == "__main__":
    main()


__all__ = ["main"]
