"""``ganflow demo``: the whole chain on the embedded default."""

import click

from ..demo import run_demo
from .common import seed_option


@click.command("demo")
@click.option("-o", "--output-dir", default="demo_output", show_default=True, type=click.Path(file_okay=False))
@seed_option()
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(output_dir, seed, quiet):
    """Run simulate -> solve -> plot on the embedded default problem and print a summary table."""
    run_demo(output_dir, seed=seed, progress=not quiet, echo=click.echo)
