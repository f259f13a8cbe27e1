"""``ganflow demo``: the whole chain on the embedded default."""

import click

from ..demo import DEMOS, run_demo
from .common import seed_option


@click.command("demo")
@click.option("-o", "--output-dir", default="demo_output", show_default=True, type=click.Path(file_okay=False))
@click.option("--problem", type=click.Choice(sorted(DEMOS)), default="phase_retrieval", show_default=True,
              help="Which embedded demo to run.")
@seed_option()
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(output_dir, problem, seed, quiet):
    """Run simulate -> solve -> plot on an embedded default problem and print a summary table."""
    run_demo(output_dir, problem=problem, seed=seed, progress=not quiet, echo=click.echo)
