"""``ganflow solve``: stage two, the posterior of the field given obs.h5 and a prior."""

import click

from ..config import Config
from ..io import check_output_path
from ..solve import METHODS, SOLVE_TABLES, solve as solve_posterior
from .common import config_option, force_option, kw_option, parse_kv, seed_option


@click.command("solve")
@click.option("--obs", "obs_path", required=True, type=click.Path(dir_okay=False), help="Observation file obs.h5.")
@click.option("--prior", required=True, help="Prior checkpoint (prior.pt) or generator spec.")
@click.option("--problem", default=None, help="Problem spec; default: the one recorded in obs.h5.")
@click.option("--operator", default=None, help="Operator spec (module:attr or file.py:attr).")
@click.option("--method", type=click.Choice(METHODS), default=None, help="Posterior method [default: flow].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output posterior.h5.")
@kw_option()
@config_option()
@seed_option()
@force_option()
@click.option("--quiet", is_flag=True, help="No progress bar.")
def solve(obs_path, prior, problem, operator, method, output, kw, config_path, seed, force, quiet):
    """Fit the latent posterior and write posterior statistics to posterior.h5."""
    check_output_path(output, force, "posterior")
    cfg = Config.from_file(config_path, known=SOLVE_TABLES)
    if kw:
        cfg.data.setdefault("operator", {}).update(parse_kv(kw))
    result = solve_posterior(obs_path, prior, operator=operator, problem=problem, method=method, config=cfg,
                             seed=seed, progress=not quiet)
    result.save(output, force=force)
    a = result.attrs
    line = (f"{result.method}: {a['n_forward_evals']} forward evaluations, fit {a['fit_wall_time_s']:.1f} s, "
            f"total {a['wall_time_s']:.1f} s")
    m = result.metrics
    if m:
        line += ", " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())
    click.echo(line)
    click.echo(f"wrote {output}")
