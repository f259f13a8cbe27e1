"""Posteriors on the built-in problems with their bundled demo priors (truths drawn from the prior, so the
model is well specified and z_true is known). Issue 4 and 5 acceptance; small flow budgets keep them fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganflow import load_prior, load_problem, simulate, solve
from ganflow.config import Config

SOLVE_FAST = {"solve": {"n_samples": 2000, "n_quantile": 2000, "n_field_samples": 8},
              "diagnostics": {"n_draws": 300}}


def _bundled(problem):
    path = problem.bundled_prior()
    if path is None:
        pytest.fail(f"bundled prior for {problem.name} is missing from problems/data/")
    return load_prior(path)


def test_phase_retrieval_posterior_with_bundled_prior():
    """Three truths drawn from the bundled prior (z_true known), each observed through half the frequencies
    with 2 % noise: the posterior mean is close modulo the twin and the 95 % bands hold the truth at about
    the nominal rate (pixel fraction, averaged over the truths: Bayesian calibration is a statement about
    truths drawn from the prior, not about one field)."""
    from ganflow.problems.phase_retrieval import error_modulo_twin, twin

    problem = load_problem("phase_retrieval", n=32)
    G = _bundled(problem)
    op_kw = {"oversampling": 2, "mask_fraction": 0.5, "mask_seed": 0}
    cfg = dict(SOLVE_FAST, flow={"batch_size": 16, "max_iter": 600, "patience": 150, "map_starts": 64,
                                 "progress": False})
    errs, covs, cov_twins, chi2s = [], [], [], []
    for seed in (4, 5, 6):
        obs = simulate("phase_retrieval", prior=G, operator_kwargs=op_kw, problem_kwargs={"n": 32},
                       noise_relative=0.02, seed=seed)
        result = solve(obs, G, method="flow", config=Config(cfg), seed=0, progress=False)
        x_true = torch.as_tensor(result.x_true)
        errs.append(float(error_modulo_twin(torch.as_tensor(result.mean), x_true)))
        lo, hi = result.credible_interval(0.95)
        covs.append(np.mean((result.x_true >= lo) & (result.x_true <= hi)))
        tw = twin(x_true).numpy()
        cov_twins.append(np.mean((tw >= lo) & (tw <= hi)))
        chi2s.append(result.attrs["chi2_per_dof"])
    print(f"phase retrieval: err mod twin {np.round(errs, 3)}, coverage {np.round(covs, 2)} "
          f"(of the twin {np.round(cov_twins, 2)}), chi2/dof {np.round(chi2s, 2)}")
    # Measured (bundled prior, 64 screened MAP starts): err mod twin 0.08 / 0.05 / 0.08, coverage
    # 0.89 / 0.95 / 0.80 (mean 0.88; seeds 7 and 8 give 0.85 and 0.92), of the twin 0.23-0.52: the posterior
    # sits on the truth's orientation. With 16 unscreened starts seed 4 fell into a poorer mode (coverage 0.41).
    assert max(errs) < 0.2
    assert np.mean(covs) > 0.75
    assert np.mean(covs) > np.mean(cov_twins) + 0.3  # one mode, the truth's, not a blur of both
    assert max(chi2s) < 1.5


def test_elliptic_posterior_with_bundled_prior():
    problem = load_problem("elliptic", n=32)
    G = _bundled(problem)
    # hIPPYlib's layout: 50 sensors in the lower part of the domain [0.1, 0.9] x [0.1, 0.5], so "far from the
    # sensors" (the upper part) is a real region and the std should grow there.
    op_kw = {"sensors": "hippylib"}
    obs = simulate("elliptic", prior=G, operator_kwargs=op_kw, problem_kwargs={"n": 32}, noise_relative=0.01,
                   seed=2)
    cfg = dict(SOLVE_FAST, flow={"batch_size": 16, "max_iter": 400, "patience": 150, "progress": False})
    result = solve(obs, G, method="flow", config=Config(cfg), seed=0, progress=False)
    m = result.attrs
    print(f"elliptic: rel err {m['rel_l2_error']:.3f}, coverage {m['coverage_95']:.3f}, chi2 {m['chi2_per_dof']:.2f}")
    # the mean recovers the channel layout: the sign pattern of m - mid-level matches the truth's
    mid = 0.5 * (np.log(12.0) + np.log(3.0))
    agreement = np.mean((result.mean > mid) == (result.x_true > mid))
    # Measured (hippylib sensors): rel err 0.17, coverage 0.62, 77 % agreement, chi2/dof 0.66 with the Laplace start
    # at the most massive of the best modes (at the highest-density one: 0.22 / 0.44 / 65 %); earlier, with
    # 8 unscreened MAP starts: 0.16 / 0.66 (grid:8 sensors: 0.19 / 0.71, 74 %
    # of cells on the right side of the channel threshold; the bundled prior's fields are not fully binary).
    # Coverage is below nominal (how to read the diagnostics: docs/posteriors.md).
    assert agreement > 0.65
    assert m["rel_l2_error"] < 0.3
    assert m["coverage_95"] > 0.6
    # the posterior std is larger away from the sensors than near them
    op = problem.make_operator(**op_kw)
    sensors = op.sensor_xy.numpy()  # [S, 2] (x, y)
    n = 32
    centers = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(centers, centers)  # [i, j] -> x = centers[j], y = centers[i]
    d = np.min(np.hypot(xx[..., None] - sensors[:, 0], yy[..., None] - sensors[:, 1]), axis=-1)
    near, far = result.std[d < np.quantile(d, 0.25)].mean(), result.std[d > np.quantile(d, 0.75)].mean()
    assert far > near
