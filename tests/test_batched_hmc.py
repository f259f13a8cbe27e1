"""Batched HMC (the GPU reference sampler) against an analytic Gaussian posterior."""

from __future__ import annotations

import math

import numpy as np
import torch

from ganflow.bench.batched_hmc import HmcSettings, run_batched_hmc


def _gaussian(k: int, seed: int):
    """A correlated Gaussian ``N(m, S)`` with sds from 0.05 to 3 (a bad starting frame on purpose)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    sd = torch.logspace(math.log10(0.05), math.log10(3.0), k, dtype=torch.float64)
    cov = q @ torch.diag(sd**2) @ q.T
    mean = torch.randn(k, generator=g, dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def f(z):
        d = z - mean
        return -0.5 * ((d @ prec) * d).sum(1), -(d @ prec)

    return mean, cov, f


def test_batched_hmc_matches_an_analytic_gaussian():
    """From the identity frame (sds off by up to 20x), the adapted chains' mean and covariance match the
    analytic ones within their Monte-Carlo error; the draws are reproducible from the seed."""
    k, C = 6, 64
    mean, cov, f = _gaussian(k, 0)
    z0 = mean + torch.randn(C, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    frame = (torch.zeros(k, dtype=torch.float64), torch.eye(k, dtype=torch.float64))
    settings = HmcSettings(windows=(60, 60, 40), num_samples=150)
    out = run_batched_hmc(f, z0, frame, settings, torch.Generator().manual_seed(2))
    z = out["draws"].double().reshape(-1, k)
    sd = cov.diagonal().sqrt()
    # ESS >= 0.3 per draw in the whitened frame (checked: ~0.6-1.0), so the mean's MC sd is sd / sqrt(0.3 * N)
    n_eff = 0.3 * z.shape[0]
    assert ((z.mean(0) - mean).abs() / sd).max() < 4.5 / math.sqrt(n_eff)
    # the sd of each coordinate: relative MC sd ~ 1 / sqrt(2 n_eff)
    assert ((z.std(0) / sd - 1).abs()).max() < 4.5 / math.sqrt(2 * n_eff)
    # whitened by the true covariance, the draws' covariance is the identity
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), (z - mean).T, upper=False).T
    assert torch.allclose(torch.cov(w.T), torch.eye(k, dtype=torch.float64), atol=0.12)
    assert 0.6 < float(out["accept"].mean()) < 0.95 and out["divergences"] == 0
    again = run_batched_hmc(f, z0, frame, settings, torch.Generator().manual_seed(2))
    assert torch.equal(again["draws"], out["draws"])


def test_batched_hmc_rejects_nonfinite_proposals():
    """A target that is -inf beyond a wall: no chain ever stands there, and the walls' draws are divergent."""
    k, C = 2, 32

    def f(z):
        lp = -0.5 * (z * z).sum(1)
        lp = torch.where(z[:, 0] > 1.0, torch.full_like(lp, -math.inf), lp)
        return lp, -z

    z0 = torch.zeros(C, k, dtype=torch.float64)
    frame = (torch.zeros(k, dtype=torch.float64), torch.eye(k, dtype=torch.float64))
    out = run_batched_hmc(f, z0, frame, HmcSettings(windows=(30, 30), num_samples=60),
                          torch.Generator().manual_seed(0))
    assert (out["draws"][..., 0] <= 1.0).all() and out["divergences"] > 0
    assert np.isfinite(out["log_joint"].numpy()).all()


def test_batched_hmc_deadline_keeps_what_was_drawn():
    """A deadline passed before the sampling phase leaves no draws (and no error), with the shapes kept."""
    mean, cov, f = _gaussian(3, 1)
    out = run_batched_hmc(f, mean.repeat(8, 1), (mean, torch.eye(3, dtype=torch.float64)),
                          HmcSettings(windows=(10,), num_samples=50, deadline_s=0.0),
                          torch.Generator().manual_seed(0))
    assert out["draws"].shape == (8, 0, 3) and out["log_joint"].shape == (8, 0)
