"""Posteriors on the built-in problems with their bundled demo priors (truths drawn from the prior, so the
model is well specified and z_true is known). Issue 4 and 5 acceptance; small flow budgets keep them fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganflow import load_prior, load_problem, simulate, solve
from ganflow.config import Config

# Truths here are draws from the prior itself, exactly in the range of G: the plain likelihood is the exact model,
# so the representation error (on by default, for real fields) is off.
# Held-out truths: tests/test_representation_error.py.
SOLVE_FAST = {"solve": {"n_samples": 2000, "n_quantile": 2000, "n_field_samples": 8, "representation_error": "off"},
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
    # What the data buy, against the prior alone (an independent baseline: 4,000 draws of G with no data). If the
    # solve ignored the data, the posterior would be the prior: the predictive mean would misfit the data as the
    # prior mean does, and the channel layout (the sign of m - mid-level) in the sensed lower half (y < 0.5) would
    # agree with the truth no better than the prior mean's. Pressure data are smooth functionals of the
    # conductivity, so several layouts fit them: the posterior mean's L2 error need not beat the prior mean's.
    # Measured (seed 2, hippylib sensors): chi2/dof 1.44 (prior mean 35.9), agreement 0.62 (prior mean 0.45); the
    # flow is over-confident on this prior (coverage 0.58 with a prior truth, PSIS k-hat > 1): see issue 17.
    op = problem.make_operator(**op_kw)
    mid = 0.5 * (np.log(12.0) + np.log(3.0))
    lower = slice(0, 16)  # rows i <-> y = (i + 0.5) / 32: the sensed half
    with torch.no_grad():
        prior_mean = G(torch.randn(4000, G.latent_dim, generator=torch.Generator().manual_seed(99))).mean(0)
        chi2_prior = float(((op(prior_mean[None])[0] - obs.y) ** 2).mean() / obs.noise_sigma**2)
    prior_mean = prior_mean.numpy()

    def agreement(mean):
        return np.mean((mean[lower] > mid) == (result.x_true[lower] > mid))

    print(f"chi2/dof {m['chi2_per_dof']:.2f} (prior mean {chi2_prior:.1f}); sensed-half agreement "
          f"{agreement(result.mean):.2f} (prior mean {agreement(prior_mean):.2f})")
    assert m["chi2_per_dof"] < 2.0 and chi2_prior > 5 * m["chi2_per_dof"]
    assert agreement(result.mean) > agreement(prior_mean) + 0.1
    # the posterior std is larger away from the sensors than near them
    sensors = op.sensor_xy.numpy()  # [S, 2] (x, y)
    n = 32
    centers = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(centers, centers)  # [i, j] -> x = centers[j], y = centers[i]
    d = np.min(np.hypot(xx[..., None] - sensors[:, 0], yy[..., None] - sensors[:, 1]), axis=-1)
    near, far = result.std[d < np.quantile(d, 0.25)].mean(), result.std[d > np.quantile(d, 0.75)].mean()
    assert far > near
