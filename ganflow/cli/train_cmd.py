"""``ganflow train-prior`` (stage one) and ``ganflow prior-report``."""

from __future__ import annotations

import click

from ..io import check_output_path
from ..prior import report_from_checkpoint
from ..prior import train_prior as _train_prior
from ..prior.report import format_summary
from ..prior.trainer import load_train_settings, report_prefix
from .common import config_option, device_option, force_option, seed_option

__all__ = ["train_prior", "prior_report"]


@click.command("train-prior")
@click.option(
    "--data", "data_path", required=True, type=click.Path(dir_okay=False), help="fields.h5 to learn from."
)
@click.option(
    "-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="Checkpoint (prior.pt)."
)
@config_option()
@seed_option()
@device_option()
@click.option(
    "--resume", is_flag=True, help="Continue the checkpoint at -o (its settings, seed and RNG states)."
)
@force_option()
@click.option("--steps", type=int, default=None, help="Generator steps (overrides [train] steps).")
@click.option("--quiet", "--no-progress", "no_progress", is_flag=True, help="No progress report.")
@click.option(
    "--no-report", is_flag=True, help="Skip the quality report (ganflow prior-report makes it later)."
)
def train_prior(data_path, out, config_path, seed, device, resume, force, steps, no_progress, no_report):
    """Train a WGAN-GP prior on example fields; writes the checkpoint and <stem>_report.{h5,png}."""
    # On --resume without --config the checkpoint's own settings are used.
    settings = None if (resume and config_path is None) else load_train_settings(config_path, steps)
    res = _train_prior(
        data_path,
        out,
        settings,
        seed=seed,
        device=device,
        resume=resume,
        force=force,
        steps=steps,
        progress=not no_progress,
        report=not no_report,
    )
    if res.rank != 0:  # torchrun: rank 0 speaks for the run
        return
    click.echo(
        f"trained {res.steps_run} generator steps to step {res.step} in {res.wall_time_s:.1f} s "
        f"({res.steps_per_s:.2f} steps/s), Wasserstein estimate {res.wasserstein:.4g}; wrote {res.path}"
    )
    if res.report is not None:
        click.echo(format_summary(res.report))


@click.command("prior-report")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="fields.h5 (the training file gives the same held-out split).",
)
@click.option(
    "-o", "--out", "prefix", default=None, help="Report prefix (default: <checkpoint stem>_report)."
)
@click.option(
    "--seed", type=int, default=None, help="Seed for the generated samples (default: the training seed)."
)
@force_option()
def prior_report(checkpoint, data_path, prefix, seed, force):
    """Recompute a prior's quality report against held-out fields (<prefix>.h5 and <prefix>.png)."""
    prefix = prefix or report_prefix(checkpoint)
    # Both outputs are checked before any work, so a refused run leaves no half of a report behind.
    for suffix in (".h5", ".png"):
        check_output_path(prefix + suffix, force, "report")
    metrics = report_from_checkpoint(checkpoint, data_path, prefix, seed=seed)
    click.echo(format_summary(metrics))
    click.echo(f"wrote {prefix}.h5 and {prefix}.png")
