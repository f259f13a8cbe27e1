"""Diagnostics: the GPD fit against scipy, PSIS k-hat and ESS on Gaussians with known answers, and the
posterior-predictive check against the exact linear-Gaussian posterior."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from ganflow.diagnostics import ess_ratio, gpd_fit, posterior_predictive_check, psis


def _gaussian_log_weights(scale: float, dim: int, n: int = 4000, seed: int = 0) -> np.ndarray:
    """log p - log q for z ~ q = N(0, scale^2 I), target p = N(0, I) (normalising constants dropped)."""
    z = np.random.default_rng(seed).normal(size=(n, dim)) * scale
    return -0.5 * (z**2).sum(1) + 0.5 * (z**2).sum(1) / scale**2


@pytest.mark.parametrize("k", [0.2, 0.5, 0.9])
def test_gpd_fit_agrees_with_scipy_and_truth(k):
    x = st.genpareto.rvs(k, scale=2.0, size=3000, random_state=1)
    k_hat, sigma_hat = gpd_fit(x, prior_k=0.0)
    k_sp, _, sigma_sp = st.genpareto.fit(x, floc=0)  # independent estimator (MLE)
    assert abs(k_hat - k_sp) < 0.03 and abs(sigma_hat / sigma_sp - 1) < 0.03
    assert abs(k_hat - k) < 0.1


def test_gpd_prior_pulls_towards_half():
    x = st.genpareto.rvs(0.1, size=50, random_state=2)
    k0, _ = gpd_fit(x, prior_k=0.0)
    k1, _ = gpd_fit(x, prior_k=10.0)
    assert k1 == pytest.approx((50 * k0 + 5) / 60)


def test_khat_low_when_proposal_equals_target():
    res = psis(np.zeros(4000))  # q == p exactly: constant weights
    assert res.khat < 0.5 and res.ess_ratio == pytest.approx(1.0)
    # a proposal that is the target up to a slightly wider scale: bounded weights
    res = psis(_gaussian_log_weights(1.1, 4))
    assert res.khat < 0.5, res.khat
    assert res.ess_ratio > 0.85


@pytest.mark.parametrize("scale,dim", [(0.5, 4), (0.3, 2)])
def test_khat_high_for_narrow_proposal(scale, dim):
    # the weights' tail index is 1 - scale^2 (0.75, 0.91): infinite variance, PSIS must flag it
    res = psis(_gaussian_log_weights(scale, dim))
    assert res.khat > 0.7, res.khat


def test_ess_ratio_matches_closed_form():
    # E_q[w^2] / E_q[w]^2 = (s / sqrt(2 - 1/s^2))^d for q = N(0, s^2 I), p = N(0, I)
    s, d = 1.2, 4
    expected = (s / np.sqrt(2 - 1 / s**2)) ** -d
    lw = _gaussian_log_weights(s, d, n=200_000)
    assert ess_ratio(lw) == pytest.approx(expected, abs=0.02)


def test_psis_weights_normalised_and_bounded():
    lw = _gaussian_log_weights(0.6, 3)
    res = psis(lw)
    assert np.exp(res.log_weights).sum() == pytest.approx(1.0)
    tail = np.argsort(lw)[-res.tail_len :]
    body = np.setdiff1d(np.arange(lw.size), tail)
    shift = res.log_weights[body] - lw[body]  # outside the tail the weights are only renormalised
    assert np.ptp(shift) < 1e-9
    assert (
        res.log_weights[tail] - shift[0]
    ).max() <= lw.max() + 1e-9  # smoothed tail never above the raw max
    assert np.all(np.diff(res.log_weights[tail]) >= -1e-12)  # GPD order statistics keep the ranking
    assert res.tail_len == int(np.ceil(min(4000 / 5, 3 * np.sqrt(4000))))


def test_predictive_check_detects_wrong_noise_level():
    from ganflow.diagnostics import discrepancies
    from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior

    p = LinearGaussianProblem()
    G, A = p.generator(), p.make_operator()
    g = torch.Generator().manual_seed(0)
    z_true = torch.randn(1, p.latent_dim, generator=g)
    sigma = 0.1
    y = A(G(z_true))[0] + sigma * torch.randn(64, generator=g)
    rng = np.random.default_rng(0)

    def check(assumed_sigma):
        post = exact_posterior(
            G, A, y, assumed_sigma
        )  # exact draws: the reference is not the code under test
        z = torch.from_numpy(rng.multivariate_normal(post.latent_mean, post.latent_cov, size=2000)).float()
        d_obs, d_rep = discrepancies(
            lambda zz: A(G(zz)), y, assumed_sigma, z, torch.Generator().manual_seed(1)
        )
        return posterior_predictive_check(d_obs, d_rep, y.numel())

    good = check(sigma)
    assert 0.05 < good["ppc_p_value"] < 0.95 and 0.7 < good["ppc_chi2_per_dof"] < 1.5
    assert good["ppc_chi2_rep_per_dof"] == pytest.approx(1.0, abs=0.05)
    bad = check(sigma / 3)  # noise under-estimated: the data cannot be explained
    assert bad["ppc_p_value"] < 0.01 and bad["ppc_chi2_per_dof"] > 3
