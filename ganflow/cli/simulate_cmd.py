"""``ganflow simulate``: a synthetic measurement from a problem's operator."""

import click

from ..config import Config
from ..io import check_output_path, write_obs, write_obs_stack
from ..plugins import normalize_spec
from ..simulate import SimulateSettings, read_truth, simulate_stack
from ..simulate import simulate as simulate_obs
from ..solve import load_prior
from .common import config_option, device_option, force_option, kw_option, parse_kv, seed_option


@click.command("simulate")
@click.option("--problem", "problem", required=True, help="Problem spec (name, module:attr or file.py:attr).")
@click.option("--prior", "prior", default=None,
              help="Prior checkpoint or generator spec: the truth is G(z), z ~ N(0,I).")
@click.option("--truth", "truth", type=click.Path(dir_okay=False), default=None, help="HDF5 file with the truth field.")
@click.option("--noise-sigma", type=float, default=None, help="Absolute noise standard deviation.")
@click.option("--noise-relative", type=float, default=None, help="Noise sigma as a fraction of max |A(x_true)|.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output obs.h5.")
@kw_option()
@config_option()
@seed_option()
@force_option()
@click.option("--n-obs", "n_obs", type=int, default=None,
              help="Write a stack of N observations (/y [N, *obs_shape]); observation i uses seed + i.")
@device_option()
def simulate(problem, prior, truth, noise_sigma, noise_relative, output, kw, config_path, seed, force, n_obs,
             device):
    """Simulate y = A(x_true) + noise and write obs.h5 (with /x_true and, from a prior, /z_true)."""
    check_output_path(output, force, "observation")
    cfg = Config.from_file(config_path)
    operator_kwargs = cfg.table("operator")
    operator_kwargs.update(parse_kv(kw))
    if noise_sigma is None and noise_relative is None:
        sim = cfg.section(SimulateSettings, "simulate")
        noise_sigma, noise_relative = sim.noise_sigma, sim.noise_relative
    gen = load_prior(prior) if prior is not None else None
    x = read_truth(truth) if truth is not None else None
    common = dict(prior=gen, truth=x, operator_kwargs=operator_kwargs, problem_kwargs=cfg.table("problem"),
                  noise_sigma=noise_sigma, noise_relative=noise_relative, device=device,
                  prior_label=normalize_spec(prior) if prior and ":" in prior else prior)
    if n_obs is not None:  # --- issue 10: a stack of observations
        stack = simulate_stack(problem, n_obs, seed=seed, **common)
        write_obs_stack(output, stack)
        click.echo(f"wrote {output}: {n_obs} observations y {tuple(stack[0].y.shape)}, problem {stack[0].problem}")
        return
    obs = simulate_obs(problem, seed=seed, **common)
    write_obs(output, obs)
    click.echo(f"wrote {output}: y {tuple(obs.y.shape)}, noise_sigma {obs.noise_sigma:.4g}, problem {obs.problem}")
