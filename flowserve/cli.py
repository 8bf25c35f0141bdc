"""The `flowserve` command: one typer app whose subcommands live beside the code they drive."""

from __future__ import annotations

import typer

from export.cli import export
from server.cli import loglik, models, push, push_for_training, sample, serve
from training.cli import train_command

app = typer.Typer(
    help="Serve flow-matching and diffusion generators: train, export, serve, sample.",
    no_args_is_help=True,
    add_completion=False,
)
app.command(name="train")(train_command(push_for_training))
app.command()(export)
for _command in (serve, sample, loglik, models, push):
    app.command()(_command)


if __name__ == "__main__":
    app()
