"""The amortised-posterior record (issue 19) on linear_gaussian, where every posterior is known exactly.

Train ``q(z | y)`` once, then over ``n_obs`` fresh observations (``z_true ~ N(0, I)``): latent-mean error in
exact posterior sds and sd error (averaged over observations and coordinates), 95 % SBC coverage of
``z_true``; the per-observation time of the amortised posterior against a flow fit from the Laplace start;
the break-even number of observations; and, on a few observations, the flow fit started from ``q(. | y)``
(``--refine``) against the one from the Laplace start: steps to the flow accuracy targets (max mean error
0.1 sd, max sd error 10 %) and to the stopping rule.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .plan import TARGET_MEAN_ERR_SD, TARGET_SD_REL_ERR

__all__ = ["bench_amortized"]

TARGET_AMORTIZED_MEAN_ERR_SD = 0.2
TARGET_AMORTIZED_SD_ERR = 0.15
TARGET_COVERAGE_TOL = 0.05
TARGET_REFINE_STEP_RATIO = 0.2
TARGET_TIME_RATIO = 0.01


def _problem(seed: int, n_obs: int, sigma: float):
    from ..problems.linear_gaussian import LinearGaussianProblem

    p = LinearGaussianProblem()
    G, A = p.generator(), p.make_operator()
    g = torch.Generator().manual_seed(seed + 1000)
    z = torch.randn(n_obs, G.latent_dim, generator=g)
    with torch.no_grad():
        y = A(G(z)) + sigma * torch.randn(n_obs, *A.obs_shape, generator=g)
    return G, A, z, y


def _accuracy(post, G, A, z_true, y, sigma: float, n_draws: int, seed: int) -> dict:
    """Errors against the exact posteriors, SBC coverage, and the amortised seconds per observation."""
    from ..problems.linear_gaussian import exact_posterior

    g = torch.Generator().manual_seed(seed)
    mean_err, sd_err, inside, secs = [], [], [], []
    for i in range(len(y)):
        t0 = time.perf_counter()
        zs = post.sample(y[i], n_draws, g)[0]
        secs.append(time.perf_counter() - t0)
        zs = zs.double().numpy()
        ex = exact_posterior(G, A, y[i], sigma)
        mean_err.append(np.abs(zs.mean(0) - ex.latent_mean) / ex.latent_std)
        sd_err.append(np.abs(zs.std(0, ddof=1) / ex.latent_std - 1))
        lo, hi = np.quantile(zs, [0.025, 0.975], axis=0)
        inside.append((z_true[i].numpy() >= lo) & (z_true[i].numpy() <= hi))
    return {"latent_mean_err_sd": float(np.mean(mean_err)), "latent_mean_err_sd_max": float(np.max(mean_err)),
            "latent_sd_rel_err": float(np.mean(sd_err)), "latent_sd_rel_err_max": float(np.max(sd_err)),
            "sbc_coverage_95": float(np.mean(inside)), "amortized_s_per_obs": float(np.median(secs))}


def _fit_trace(target, fs, start, ex, seed: int) -> dict:
    """A flow fit (from ``start``, or the Laplace start) with its accuracy every 10 steps."""
    from ..posterior.flow import fit_flow

    reached = []

    def monitor(step, flow):
        zs = flow.sample(2000, torch.Generator().manual_seed(seed + 9))[0].double().numpy()
        ok = (np.max(np.abs(zs.mean(0) - ex.latent_mean) / ex.latent_std) <= TARGET_MEAN_ERR_SD
              and np.max(np.abs(zs.std(0, ddof=1) / ex.latent_std - 1)) <= TARGET_SD_REL_ERR)
        if ok and not reached:
            reached.append(step)

    fit = fit_flow(target, fs, torch.Generator().manual_seed(seed), monitor=monitor, monitor_every=10,
                   start=start)
    return {"steps_to_targets": reached[0] if reached else None, "iterations": int(fit.attrs["iterations"]),
            "n_forward_evals": int(fit.n_forward_evals), "wall_s": float(fit.wall_time_s)}


def _refine_vs_laplace(post, G, A, y, sigma: float, n_fits: int, seed: int) -> dict:
    from ..posterior.amortized import _ConditionedFlow
    from ..posterior.flow import FlowSettings
    from ..posterior.target import LatentTarget
    from ..problems.linear_gaussian import exact_posterior

    fs = FlowSettings(progress=False)
    rows = {"laplace": [], "amortized": []}
    for i in range(n_fits):
        ex = exact_posterior(G, A, y[i], sigma)
        for name in rows:
            target = LatentTarget(G, A, y[i], sigma)
            start = _ConditionedFlow(post.model, y[i]) if name == "amortized" else None
            rows[name].append(_fit_trace(target, fs, start, ex, seed + i))
    out = {}
    for name, r in rows.items():
        steps = [x["steps_to_targets"] for x in r]
        out[f"{name}_steps_to_targets"] = steps
        out[f"{name}_iterations"] = [x["iterations"] for x in r]
        out[f"{name}_fit_wall_s"] = float(np.mean([x["wall_s"] for x in r]))
        out[f"{name}_forward_evals"] = float(np.mean([x["n_forward_evals"] for x in r]))
    return out


def bench_amortized(n_obs: int = 1000, seed: int = 0, sigma: float = 0.05, settings=None, n_draws: int = 2000,
                    n_fits: int = 3, echo=print) -> dict:
    """The record: training, accuracy over ``n_obs`` observations, cost, break-even, refinement."""
    from ..posterior.amortized import AmortizedSettings, train_amortized

    s = settings or AmortizedSettings(n_layers=0, max_iter=5000, lr=3e-3, progress=False)
    G, A, z_true, y = _problem(seed, n_obs, sigma)
    echo(f"[amortized] training on linear_gaussian (sigma {sigma})")
    res = train_amortized(G, A, sigma, None, s, seed=seed)
    echo(f"[amortized] trained {res.steps} steps in {res.wall_time_s:.1f} s; {n_obs} observations")
    rec = {"problem": "linear_gaussian", "method": "amortized", "noise_sigma": sigma, "n_obs": n_obs,
           "n_draws": n_draws, "train_steps": res.steps, "train_wall_s": res.wall_time_s,
           "train_simulated_pairs": res.n_simulated, "settings": {k: v for k, v in vars(s).items()}}
    rec.update(_accuracy(res.posterior, G, A, z_true, y, sigma, n_draws, seed + 1))
    echo(f"[amortized] flow fits from the Laplace and the amortised start on {n_fits} observations")
    rec.update(_refine_vs_laplace(res.posterior, G, A, y, sigma, n_fits, seed + 2))
    flow_s = rec["laplace_fit_wall_s"]
    rec["time_ratio"] = rec["amortized_s_per_obs"] / flow_s
    rec["break_even_n_obs"] = res.wall_time_s / max(flow_s - rec["amortized_s_per_obs"], 1e-12)
    return rec
