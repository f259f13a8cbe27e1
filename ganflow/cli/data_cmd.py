"""``ganflow data``: example fields from a problem's prior sampler, written to ``fields.h5``."""

from __future__ import annotations

import click

from ..config import Config
from ..data import make_fields
from .common import config_option, force_option, kw_option, parse_kv, seed_option

__all__ = ["data"]


@click.command("data")
@click.option(
    "--problem", "problem", required=True, help="Problem spec (registered name, module:attr, file.py:attr)."
)
@click.option("--n", "n", type=int, required=True, help="Number of fields.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="Output fields.h5.")
@seed_option()
@config_option()
@kw_option("the problem factory")
@force_option()
def data(
    problem: str, n: int, out: str, seed: int, config_path: str | None, kw: tuple[str, ...], force: bool
):
    """Draw N example fields from the problem's sampler and write them to an HDF5 file (/fields)."""
    # One config file serves every command of a problem, so tables owned by other commands are allowed here.
    cfg = Config.from_file(config_path)
    # --kw overrides the config's [problem] table key by key.
    problem_kwargs = {**cfg.table("problem"), **parse_kv(kw)}
    path = make_fields(problem, n, out, seed=seed, problem_kwargs=problem_kwargs, force=force)
    click.echo(f"wrote {n} fields from {problem} to {path}")
