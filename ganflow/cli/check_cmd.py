"""``ganflow check-operator SPEC``: shapes, VJP-vs-finite-difference convergence table, time per batch."""

from __future__ import annotations

import click

from ..gradcheck import DEFAULT_EPS, format_report, operator_from_spec
from ..gradcheck import check_operator as run_check
from .common import kw_option, parse_kv, seed_option, set_seed


@click.command("check-operator")
@click.argument("spec")
@kw_option()
@seed_option()
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Batch size.")
@click.pass_context
def check_operator(ctx: click.Context, spec: str, kw: tuple[str, ...], seed: int, batch: int) -> None:
    """Check the operator named by SPEC (a problem: its make_operator(**kw), checked at its own fields).

    Prints the shapes, a table of the VJP against central finite differences at shrinking steps (float64 when
    the operator supports it) and the time per batch. Exit status 1 when the check fails, 2 on bad input.
    """
    generator = set_seed(seed)
    op, x = operator_from_spec(spec, parse_kv(kw), generator, batch)
    report = run_check(op, generator, batch=batch, eps_list=DEFAULT_EPS, x=x)
    click.echo(format_report(report, spec))
    if not report["passed"]:
        ctx.exit(1)
