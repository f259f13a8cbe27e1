"""``ganflow plot``: figures of a posterior.h5."""

import click

from ..plots import plot_posterior
from ..results import PosteriorResult
from .common import force_option


@click.command("plot")
@click.argument("posterior", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Figure directory.")
@force_option()
def plot(posterior, outdir, force):
    """Write PNG figures (fields, samples, traces, data fit) of POSTERIOR into a directory.

    Figures already in the directory are an error unless --force.
    """
    result = PosteriorResult.load(posterior)
    for path in plot_posterior(result, outdir, force=force):
        click.echo(f"wrote {path}")
