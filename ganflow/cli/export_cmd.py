"""``ganflow export``: a posterior.h5 in another tool's format (ArviZ netCDF)."""

import click

from .common import force_option, seed_option


@click.command("export")
@click.argument("posterior", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["arviz"]), default="arviz", show_default=True,
              help="arviz: netCDF groups posterior, log_likelihood, posterior_predictive, observed_data, "
                   "sample_stats (needs pip install 'ganflow[arviz]').")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Output file (.nc).")
@click.option("--prior", default=None, help="The generator (default: the posterior's recorded prior).")
@click.option("--problem", default=None, help="Problem spec for the operator (default: the recorded one).")
@click.option("--operator", default=None, help="Operator spec (default: the recorded one).")
@click.option("--max-draws", type=click.IntRange(min=1), default=4000, show_default=True,
              help="At most this many draws in all (evenly thinned within each chain).")
@seed_option()
@force_option()
def export(posterior, fmt, out, prior, problem, operator, max_draws, seed, force):
    """Export POSTERIOR (posterior.h5) for ArviZ: draws with chain/draw dimensions, per-observation
    log-likelihoods (PSIS-LOO), posterior-predictive draws, the data and the sampler's statistics."""
    from ..arviz_export import export_arviz

    idata = export_arviz(posterior, out, force=force, prior=prior, problem=problem, operator=operator,
                         max_draws=max_draws, seed=seed)
    z = idata["posterior"]["z"]
    click.echo(f"wrote {out} ({fmt}: {z.sizes['chain']} chain(s) x {z.sizes['draw']} draws)")
