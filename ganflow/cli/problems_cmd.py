"""``ganflow problems``: list the registered problems."""

import click

from ..plugins import registered_problems


@click.command("problems")
def problems() -> None:
    """List registered problems (entry-point group ganflow.problems)."""
    for name, target in registered_problems().items():
        click.echo(f"{name:20s} {target}")
