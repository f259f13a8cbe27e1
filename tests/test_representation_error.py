"""The representation-error model against the exact posterior of a linear-Gaussian problem whose generator is
deliberately truncated: the truth has ``K = 12`` latent modes, the prior's generator only the first ``k = 6``.

Then ``x = G z + r`` with ``r`` the dropped modes is exactly the full model, whose posterior is Gaussian in closed
form (`problems.linear_gaussian.exact_posterior` with the full generator): an independent reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganflow.config import Config
from ganflow.io import Observation
from ganflow.posterior.flow import FlowSettings, laplace_approximation
from ganflow.posterior.target import LatentTarget
from ganflow.prior.residuals import estimate_representation_error
from ganflow.problems.linear_gaussian import BlurSubsample, LinearGenerator, _cosine_basis, exact_posterior
from ganflow.solve import SolveSettings, field_sampler, solve, with_representation_error

N, K_FULL, K = 16, 12, 6
SIGMA = 0.05


@pytest.fixture(scope="module")
def setup():
    W = torch.from_numpy(_cosine_basis(N, K_FULL)).float()
    b = torch.zeros(N * N)
    full = LinearGenerator(W, b, (N, N))
    trunc = LinearGenerator(W[:, :K], b, (N, N))
    op = BlurSubsample(N, stride=2, blur_sigma=1.0)
    g = torch.Generator().manual_seed(123)  # held-out fields: never the truths below
    held_out = full(torch.randn(300, K_FULL, generator=g))
    trunc.representation_error = estimate_representation_error(trunc, held_out, seed=0, n_iter=400)
    return full, trunc, op


def _observe(full, op, seed):
    g = torch.Generator().manual_seed(seed)
    x = full(torch.randn(1, K_FULL, generator=g))[0]
    y = op(x[None])[0] + SIGMA * torch.randn(op.obs_shape, generator=g)
    return x, y


def test_residual_statistics_span_the_dropped_modes(setup):
    full, trunc, _ = setup
    stats = trunc.representation_error
    # The residuals of a least-squares projection are the dropped modes: rank K_FULL - K at most.
    assert stats["rank"] <= K_FULL - K
    W_drop = full.W[:, K:].double()
    cov_true = W_drop @ W_drop.T
    B = stats["basis"].reshape(stats["rank"], -1).double()
    cov_est = B.T @ B + torch.diag(stats["diag"].reshape(-1).double())
    # 300 fields: a sample covariance has relative error ~ sqrt(2 / 300) ~ 8 % per mode.
    assert float((cov_est - cov_true).norm() / cov_true.norm()) < 0.25


def test_flow_with_representation_error_matches_exact_posterior(setup):
    full, trunc, op = setup
    x, y = _observe(full, op, seed=7)
    obs = Observation(y=y, noise_sigma=SIGMA)
    exact = exact_posterior(full, op, y, SIGMA)
    res = solve(obs, trunc, operator=op, seed=0, progress=False,
                config={"solve": {"n_samples": 8000, "n_quantile": 2000}})
    sd = exact.field_std
    # 8,000 draws: the Monte-Carlo error of the mean is ~0.011 sd, of the sd ~0.8 %.
    assert np.abs(res.summary.mean - exact.field_mean).max() / sd.min() < 0.1
    assert np.abs(res.summary.std / sd - 1).max() < 0.1
    off = solve(obs, trunc, operator=op, seed=0, progress=False,
                config={"solve": {"n_samples": 2000, "representation_error": "off"}})
    assert np.abs(off.summary.std / sd - 1).max() > 0.3  # without the term the spread is far too small


def _coverage(trunc, op, x, y, on: bool, seed: int) -> float:
    """95 % coverage of ``x`` from the Laplace approximation (exact here) of the latent target."""
    target = LatentTarget(trunc, op, y, SIGMA)
    cfg = Config({"flow": {"map_starts": 2, "map_iter": 200}})
    ss = SolveSettings(representation_error="on" if on else "off")
    target, _ = with_representation_error(target, cfg, ss, seed)
    fs = cfg.section(FlowSettings, "flow")
    z_map, L, _ = laplace_approximation(target, fs, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    z = z_map + torch.randn(2000, K, generator=g) @ L.T
    with torch.no_grad():
        xs = field_sampler(target, g)(z)
    lo, hi = torch.quantile(xs, 0.025, dim=0), torch.quantile(xs, 0.975, dim=0)
    return float(((x >= lo) & (x <= hi)).float().mean())


def test_coverage_on_held_out_truths(setup):
    full, trunc, op = setup
    on, off = [], []
    for seed in range(1000, 1050):
        x, y = _observe(full, op, seed)
        on.append(_coverage(trunc, op, x, y, True, seed))
        off.append(_coverage(trunc, op, x, y, False, seed))
    # 50 truths x 256 correlated pixels: the sd of the mean coverage is ~0.01-0.02.
    assert abs(np.mean(on) - 0.95) < 0.05, np.mean(on)
    assert np.mean(off) < 0.8, np.mean(off)
