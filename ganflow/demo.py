"""``ganflow demo``: the whole chain on an embedded default, in minutes on a laptop CPU.

    simulate a measurement of a held-out example field -> fit the flow posterior -> posterior.h5 -> figures
    -> a summary table.

The default demo is Fourier phase retrieval of a 32x32 phantom with the bundled prior; ``--problem
linear_gaussian`` runs the known-answer problem instead (and reports the error against the exact posterior).
ganflow knows no physics: a demo is data (a problem spec and its options) plus optional problem hooks,
``bundled_prior()``, ``metrics(x_est, x_true)`` and ``figures(result, operator, outdir)``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import Config
from .errors import GanflowError
from .io import write_obs
from .plots import plot_posterior, save_figure
from .plugins import load_problem
from .simulate import simulate
from .solve import load_prior, solve

__all__ = ["DemoSpec", "DEMOS", "run_demo"]


@dataclass(frozen=True)
class DemoSpec:
    problem: str
    problem_kwargs: dict = field(default_factory=dict)
    operator_kwargs: dict = field(default_factory=dict)
    prior: str | None = None  # None: the problem's bundled_prior()
    noise_relative: float = 0.02
    truth: str = "heldout"  # "heldout": a fresh example field; "prior": G(z), z ~ N(0, I)
    config: dict = field(default_factory=dict)
    title: str = ""


DEMOS = {
    "phase_retrieval": DemoSpec(
        "phase_retrieval", {"n": 32}, {"oversampling": 2, "mask_fraction": 0.5, "mask_seed": 0},
        noise_relative=0.02, truth="heldout",
        # The conv generator dominates a flow step (~40 ms CPU for 16 draws at 32x32): small batches, a
        # Laplace start and early stopping keep the demo within minutes on 2 cores.
        # 256 screened MAP starts with warm restarts: with 16 starts the Laplace start often sits in a poorer mode
        # (see docs/problems.md); with the clipped-read-out prior 64 starts, or 256 without restarts, still missed
        # the truth's mode on some prior truths (tests/test_builtin_posteriors.py).
        config={"flow": {"batch_size": 16, "max_iter": 1000, "patience": 150, "map_starts": 256,
                         "map_restarts": 8}},
        title="Fourier phase retrieval, 32x32 phantom, 2x oversampling, half the frequencies, 2 % noise",
    ),
    "elliptic": DemoSpec(
        "elliptic", {"n": 32, "prior": "channels"}, {"sensors": "grid:8"}, noise_relative=0.01, truth="heldout",
        config={"flow": {"batch_size": 16, "max_iter": 1000, "patience": 150}, "diagnostics": {"n_draws": 500}},
        title="Darcy flow, 32x32 channelized log-conductivity, 8x8 pressure sensors, 1 % noise",
    ),
    "linear_gaussian": DemoSpec(
        "linear_gaussian", {}, {}, prior="ganflow.problems.linear_gaussian:generator", noise_relative=0.05,
        truth="prior", title="linear-Gaussian problem (16x16 field, k = 16, blur + subsampling, 5 % noise)",
    ),
}

# Held-out truths come from a seed stream the bundled priors' training data (seed 0) never used.
HELDOUT_SEED_OFFSET = 1_000_003


def run_demo(outdir: str = "demo_output", problem: str = "phase_retrieval", seed: int = 0, progress: bool = True,
             echo=print) -> dict:
    """Run one embedded demo; returns the numbers printed in its table."""
    if problem not in DEMOS:
        raise GanflowError(f"no demo for '{problem}' (choose from {', '.join(DEMOS)})")
    spec = DEMOS[problem]
    t0 = time.perf_counter()
    os.makedirs(outdir, exist_ok=True)
    prob = load_problem(spec.problem, **spec.problem_kwargs)
    prior_ref = _demo_prior(spec, prob, problem)
    G = load_prior(prior_ref)
    obs = _demo_observation(spec, prob, G, prior_ref, seed, os.path.join(outdir, "obs.h5"))
    tables = {"flow": {"progress": progress}}
    for key, value in spec.config.items():
        tables.setdefault(key, {}).update(value)
    result = solve(obs, G, method="flow", config=Config(tables), seed=seed, progress=progress)
    post_path = result.save(os.path.join(outdir, "posterior.h5"), force=True)
    figdir = os.path.join(outdir, "figures")
    operator = prob.make_operator(**spec.operator_kwargs)
    figures = plot_posterior(result, figdir, force=True)  # a demo rerun replaces its own outputs
    figures += _problem_figures(prob, result, operator, figdir)
    row = _demo_row(problem, prob, result, G, operator, obs)
    row["total_s"] = time.perf_counter() - t0
    _print_table(spec, row, echo)
    echo(f"wrote {obs.path}, {post_path} and {len(figures)} figures in {figdir}")
    return row


def _demo_prior(spec: DemoSpec, prob, problem: str) -> str:
    """The demo's prior: the spec's, else the problem's bundled one."""
    if spec.prior is not None:
        return spec.prior
    hook = getattr(prob, "bundled_prior", None)
    prior_ref = hook() if hook else None
    if prior_ref is None:
        raise GanflowError(f"the {problem} demo needs its bundled prior, which is not installed")
    return prior_ref


def _demo_observation(spec: DemoSpec, prob, G, prior_ref: str, seed: int, path: str):
    """The demo's measurement, of a held-out field (a sampler seed never used in training) or a prior draw,
    written to ``path``."""
    truth = None
    if spec.truth == "heldout":
        truth = prob.sample_fields(1, torch.Generator().manual_seed(HELDOUT_SEED_OFFSET + seed))[0]
    obs = simulate(spec.problem, prior=G if truth is None else None, truth=truth,
                   operator_kwargs=spec.operator_kwargs, problem_kwargs=spec.problem_kwargs,
                   noise_relative=spec.noise_relative, seed=seed, prior_label=prior_ref)
    write_obs(path, obs)
    obs.path = path
    return obs


def _demo_row(problem: str, prob, result, G, operator, obs) -> dict:
    """The numbers of the demo's table: the result's metrics, the problem's own, and on linear_gaussian the
    errors against the exact posterior."""
    row = {"problem": problem, "method": "flow"}
    row.update(result.metrics)
    if hasattr(prob, "metrics") and result.x_true is not None:
        row.update(prob.metrics(result.mean, result.x_true))
    if problem == "linear_gaussian":
        from .problems.linear_gaussian import exact_posterior

        exact = exact_posterior(G, operator, obs.y, obs.noise_sigma)
        z = result.latent_samples.astype(np.float64)
        row["latent_mean_err_sd"] = float(np.max(np.abs(z.mean(0) - exact.latent_mean) / exact.latent_std))
        row["latent_sd_rel_err"] = float(np.max(np.abs(z.std(0) / exact.latent_std - 1)))
    for key in ("psis_khat", "ppc_p_value"):
        if key in result.attrs:
            row[key] = float(result.attrs[key])
    row["n_forward_evals"] = int(result.attrs["n_forward_evals"])
    row["fit_s"] = float(result.attrs["fit_wall_time_s"])
    return row


_TABLE_LABELS = {
    "rel_l2_error": "relative L2 error of the mean",
    "rel_l2_error_mod_twin": "  ... modulo the twin image",
    "rel_l2_error_mod_twin_shift": "  ... modulo twin and translations",
    "coverage_95": "95 % coverage of the truth",
    "chi2_per_dof": "chi^2 per dof (predictive mean)",
    "latent_mean_err_sd": "max latent-mean error [post. sd]",
    "latent_sd_rel_err": "max latent-sd relative error",
    "psis_khat": "PSIS k-hat (flow reliability)",
    "ppc_p_value": "posterior-predictive p-value",
    "n_forward_evals": "forward-model evaluations",
    "fit_s": "flow fit time [s]",
    "total_s": "total time [s]",
}


def _print_table(spec: DemoSpec, row: dict, echo) -> None:
    echo("")
    echo(f"ganflow demo: {spec.title}")
    echo(f"{'quantity':36s} value")
    for key, label in _TABLE_LABELS.items():
        if key in row:
            v = row[key]
            echo(f"{label:36s} {v:.4g}" if isinstance(v, float) else f"{label:36s} {v}")


def _problem_figures(prob, result, operator, figdir: str) -> list[str]:
    """The problem's own figures (optional hook ``figures(result, operator, outdir)``): a dict ``{file name:
    matplotlib Figure}`` that is written here (so a problem needs nothing of ganflow's plotting), or, as before,
    the list of paths the hook wrote itself."""
    if not hasattr(prob, "figures"):
        return []
    out = prob.figures(result, operator, figdir)
    if isinstance(out, dict):
        return [save_figure(fig, os.path.join(figdir, name)) for name, fig in out.items()]
    return list(out)
