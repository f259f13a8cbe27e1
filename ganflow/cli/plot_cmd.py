"""``ganflow plot``: figures of a posterior.h5."""

import click

from ..plots import plot_posterior
from ..results import PosteriorResult


@click.command("plot")
@click.argument("posterior", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Figure directory.")
def plot(posterior, outdir):
    """Write PNG figures (fields, samples, traces, data fit) of POSTERIOR into a directory."""
    result = PosteriorResult.load(posterior)
    for path in plot_posterior(result, outdir):
        click.echo(f"wrote {path}")
