"""``ganflow train-posterior``: the amortised posterior q(z | y) for a prior, an operator and a noise level."""

from __future__ import annotations

import click

from ..amortize import train_posterior as _train_posterior
from ..config import Config
from ..solve import SOLVE_TABLES
from .common import config_option, device_option, force_option, kw_option, parse_kv, seed_option

__all__ = ["train_posterior"]


@click.command("train-posterior")
@click.option("--prior", required=True, help="Prior checkpoint (prior.pt) or generator spec.")
@click.option("--problem", default=None, help="Problem spec whose operator to train for.")
@click.option("--operator", default=None, help="Operator spec (module:attr or file.py:attr).")
@click.option("--noise-sigma", type=float, required=True, help="Absolute noise standard deviation of the data.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="Checkpoint (amortized.pt).")
@kw_option()
@config_option()
@seed_option()
@device_option()
@click.option("--resume", is_flag=True, help="Continue the checkpoint at -o.")
@force_option()
@click.option("--steps", type=int, default=None, help="Forward-KL steps at most (overrides [amortized] max_iter).")
@click.option("--quiet", "--no-progress", "no_progress", is_flag=True, help="No progress report.")
def train_posterior(prior, problem, operator, noise_sigma, out, kw, config_path, seed, device, resume, force, steps,
                    no_progress):
    """Train q(z|y) on simulated pairs (forward KL, then optional reverse KL); writes amortized.pt.

    Use it with `ganflow solve --amortized amortized.pt --obs obs.h5` (single or stacked observations).
    Under torchrun the pairs are simulated and the gradients averaged across processes.
    """
    cfg = Config.from_file(config_path, known=SOLVE_TABLES)
    if kw:
        cfg.data.setdefault("operator", {}).update(parse_kv(kw))
    res = _train_posterior(prior, noise_sigma, out, problem=problem, operator=operator, config=cfg, seed=seed,
                           resume=resume, force=force, steps=steps, device=device, progress=not no_progress)
    if res.rank != 0:  # torchrun: rank 0 speaks for the run
        return
    click.echo(f"trained {res.steps} forward-KL steps ({res.stopped}) and {res.reverse_steps} reverse-KL steps in "
               f"{res.wall_time_s:.1f} s on {res.world_size} process(es), {res.n_simulated} simulated pairs; "
               f"validation -log q {res.val_loss:.4g}; wrote {res.path}")
