"""``ganflow demo``: the whole chain on the embedded default, in minutes on a laptop CPU.

simulate a measurement from a truth -> fit the flow posterior -> write posterior.h5 -> figures -> a table.
The default problem is ``linear_gaussian`` (exact posterior known, so the table also reports the flow's
error against it).
"""

from __future__ import annotations

import os
import time

import numpy as np

from .plots import plot_posterior
from .solve import solve
from .config import Config
from .io import write_obs
from .simulate import simulate

__all__ = ["run_demo"]


def run_demo(outdir: str = "demo_output", seed: int = 0, progress: bool = True, echo=print) -> dict:
    """Run the linear-Gaussian demo; returns the numbers printed in its table."""
    from problems.linear_gaussian import LinearGaussianProblem, exact_posterior

    t0 = time.perf_counter()
    os.makedirs(outdir, exist_ok=True)
    problem = LinearGaussianProblem()
    G = problem.generator()
    obs = simulate("linear_gaussian", prior=G, noise_relative=0.05, seed=seed,
                   prior_label="problems.linear_gaussian:generator")
    obs_path = os.path.join(outdir, "obs.h5")
    write_obs(obs_path, obs)
    obs.path = obs_path
    cfg = Config({"flow": {"progress": progress}}, known=("flow", "solve"))
    result = solve(obs, G, method="flow", config=cfg, seed=seed, progress=progress)
    post_path = result.save(os.path.join(outdir, "posterior.h5"), force=True)
    figures = plot_posterior(result, os.path.join(outdir, "figures"))

    exact = exact_posterior(G, problem.make_operator(), obs.y, obs.noise_sigma)
    z = result.latent_samples.astype(np.float64)
    mean_err = float(np.max(np.abs(z.mean(0) - exact.latent_mean) / exact.latent_std))
    sd_err = float(np.max(np.abs(z.std(0) / exact.latent_std - 1)))
    field_std_err = float(np.max(np.abs(result.std / exact.field_std - 1)))
    row = {
        "problem": "linear_gaussian",
        "method": "flow",
        "rel_l2_error": result.attrs["rel_l2_error"],
        "coverage_95": result.attrs["coverage_95"],
        "chi2_per_dof": result.attrs["chi2_per_dof"],
        "latent_mean_err_sd": mean_err,
        "latent_sd_rel_err": sd_err,
        "field_std_rel_err": field_std_err,
        "n_forward_evals": result.attrs["n_forward_evals"],
        "fit_s": result.attrs["fit_wall_time_s"],
        "total_s": time.perf_counter() - t0,
    }
    echo("")
    echo("ganflow demo: linear-Gaussian problem (16x16 field, k = 16, blur + subsampling, 5 % noise)")
    echo(f"{'quantity':34s} value")
    echo(f"{'relative L2 error of the mean':34s} {row['rel_l2_error']:.4f}")
    echo(f"{'95 % coverage of the truth':34s} {row['coverage_95']:.3f}")
    echo(f"{'chi^2 per dof (predictive mean)':34s} {row['chi2_per_dof']:.3f}")
    echo(f"{'max latent-mean error [post. sd]':34s} {mean_err:.3f}   (vs exact posterior)")
    echo(f"{'max latent-sd relative error':34s} {sd_err:.3f}   (vs exact posterior)")
    echo(f"{'forward-model evaluations':34s} {row['n_forward_evals']}")
    echo(f"{'flow fit time [s]':34s} {row['fit_s']:.1f}")
    echo(f"{'total time [s]':34s} {row['total_s']:.1f}")
    echo(f"wrote {obs_path}, {post_path} and {len(figures)} figures in {os.path.join(outdir, 'figures')}")
    return row


