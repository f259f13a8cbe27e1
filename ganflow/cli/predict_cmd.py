"""``ganflow predict`` (QoI statistics and diagnostics into posterior.h5) and ``ganflow calibrate`` (SBC)."""

import click

from ..solve import METHODS
from .common import config_option, seed_option

__all__ = ["predict", "calibrate"]


def _fmt(a) -> str:
    import numpy as np

    a = np.asarray(a)
    if a.size == 1:
        return f"{float(a.reshape(())):.4g}"
    return f"[{a.size} values, mean {float(a.mean()):.4g}]"


@click.command("predict")
@click.argument("posterior", type=click.Path(dir_okay=False))
@click.option(
    "--qoi",
    "qois",
    multiple=True,
    metavar="NAME|SPEC",
    help="A QoI of the problem by name, or path/file.py:attr / module:attr (NAME=SPEC renames); "
    "repeatable. Default: all of the problem's qois().",
)
@click.option(
    "--n",
    "n",
    type=int,
    default=None,
    help="Posterior draws: fresh flow draws [default 4000]; sample-based methods: stored draws [all].",
)
@click.option("--reweight", is_flag=True, help="PSIS-reweighted statistics (flow only).")
@click.option(
    "--prior", default=None, help="Generator (checkpoint or spec); default: the posterior's prior attr."
)
@click.option("--problem", default=None,
              help="Problem spec for the QoIs and the diagnostics; default: the posterior's problem attr when it is "
                   "a registered problem (a recorded module:attr or file.py:attr is run only when given here).")
@click.option("--operator", default=None,
              help="Operator spec for the diagnostics; default: the posterior's operator attr under the same rule.")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option(
    "--diag-draws",
    type=int,
    default=2000,
    show_default=True,
    help="Draws used for k-hat / ESS / predictive check (all --n draws with --reweight).",
)
@seed_option()
def predict(posterior, qois, n, reweight, prior, problem, operator, batch_size, diag_draws, seed):
    """Posterior-predictive statistics of quantities of interest, and diagnostics, written into POSTERIOR.

    Writes /qoi/NAME/{mean,std,q025,q25,q50,q75,q975,samples[,truth,error,inside_95]} and the attributes
    psis_khat, is_ess_ratio (flow), ppc_p_value, ppc_chi2_per_dof (every method). posterior.h5 is updated
    atomically and is left unchanged on any error.
    """
    from ..qoi import predict as run_predict

    report = run_predict(
        posterior,
        qois,
        n=n,
        seed=seed,
        reweight=reweight,
        prior=prior,
        problem=problem,
        operator=operator,
        batch_size=batch_size,
        diag_draws=diag_draws,
    )
    click.echo(f"{report.method}: {report.n} posterior draws, weighting {report.weighting}")
    for name, s in report.qois.items():
        lo, hi = s.credible_interval(0.95)
        line = f"  {name}: mean {_fmt(s.mean)}, std {_fmt(s.std)}, 95% [{_fmt(lo)}, {_fmt(hi)}]"
        if s.truth is not None:
            inside = _fmt(s.inside_95.astype(float))
            line += f", truth {_fmt(s.truth)}, error {_fmt(s.error)}, inside 95% {inside}"
        click.echo(line)
    d = report.diagnostics
    parts = []
    if "psis_khat" in d:
        parts.append(f"PSIS k-hat {d['psis_khat']:.3g}, ESS/N {d['is_ess_ratio']:.3g}")
    if "ppc_p_value" in d:
        parts.append(
            f"predictive check chi2/dof {d['ppc_chi2_per_dof']:.3g} (replicated "
            f"{d['ppc_chi2_rep_per_dof']:.3g}), p {d['ppc_p_value']:.3g}"
        )
    if parts:
        click.echo("  diagnostics: " + "; ".join(parts))
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"updated {report.path}")


@click.command("calibrate")
@click.option("--problem", required=True, help="Problem spec (name, module:attr or file.py:attr).")
@click.option(
    "--prior", required=True, help="Prior checkpoint or generator spec (truths are G(z), z ~ N(0, I))."
)
@click.option("--n-truths", type=int, default=None, help="Number of simulated truths T [default 20].")
@click.option(
    "--truths",
    "truths",
    type=click.Path(dir_okay=False),
    default=None,
    help="Held-out fields (fields.h5, .npy or .npz) to use as truths instead of draws from the prior: "
    "the first T of them (field coverage only).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=None,
    help="Posterior method [default flow]; smc takes its [smc] table (start = \"flow\" tempers from the flow).",
)
@click.option("--noise-sigma", type=float, default=None, help="Absolute noise sigma.")
@click.option(
    "--noise-relative",
    type=float,
    default=None,
    help="Noise sigma as a fraction of max |A(x_true)| [default 0.1 when neither is given].",
)
@click.option(
    "--shrink",
    type=float,
    default=None,
    help="Diagnostic aid: scale latent posterior draws about their mean by this factor (< 1 makes the "
    "posterior overconfident) to check that the calibration detects it [default 1].",
)
@click.option(
    "-o",
    "--output",
    "outdir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for calibration.json and calibration.png.",
)
@click.option(
    "--recalibrate",
    is_flag=True,
    help="With --truths: learn a split-conformal scale of the field intervals on half the truths, check it on "
    "the other half, and store it in the prior checkpoint (docs/posteriors.md#recalibration).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the calibration interrupted in -o (its calibration.ckpt keeps every truth done).",
)
@config_option()
@seed_option()
@click.option("--quiet", is_flag=True, help="No progress report.")
def calibrate(
    problem, prior, n_truths, truths, method, noise_sigma, noise_relative, shrink, outdir, recalibrate, resume,
    config_path, seed, quiet
):
    """Simulation-based calibration: coverage of 50/90/95 % intervals and rank histograms over T truths.

    Config tables: [calibrate] (n_truths, method, noise_sigma, noise_relative, shrink, n_rank_draws, ...),
    and the solve tables ([solve], [flow], [langevin], [nuts], [smc], [operator], [problem]); by default a
    cheaper flow (max_iter 500) and 1,000 posterior draws per truth.
    """
    from ..calibrate import run_calibration_cli

    report = run_calibration_cli(
        problem=problem,
        prior=prior,
        n_truths=n_truths,
        truths=truths,
        method=method,
        noise_sigma=noise_sigma,
        noise_relative=noise_relative,
        shrink=shrink,
        outdir=outdir,
        config_path=config_path,
        seed=seed,
        progress=not quiet,
        recalibrate=recalibrate,
        resume=resume,
    )
    for kind in report["coverage"]:
        cov = report["coverage"][kind]
        click.echo(
            f"{kind} coverage: "
            + ", ".join(f"{lvl}% {cov[lvl]:.3f}" for lvl in ("50", "90", "95"))
            + f"  (uniformity p = {report['rank_test'][kind]['p_value']:.3g})"
        )
    if report.get("warning"):
        click.echo(f"warning: {report['warning']}", err=True)
    rec = report.get("recalibration")
    if rec is not None:
        before, after = rec["check_coverage_before"], rec["check_coverage_after"]
        click.echo(f"recalibration: interval scale {rec['scale']:.3f} learned on {rec['n_learn']} truths; on the "
                   f"other {rec['n_check']}: 95% coverage {before['95']:.3f} -> {after['95']:.3f}, "
                   f"90% {before['90']:.3f} -> {after['90']:.3f}; stored in {prior}")
    click.echo(f"wrote {report['json']} and {report['figure']}")
