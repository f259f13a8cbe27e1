"""Issue 38: the amortised posterior's rare wild draws. A q with injected far draws is flagged by the tail check
and its reported statistics stay within the bounds; the default q(z|y) on a linear-Gaussian problem unlike the
tuned one (1-D field, kernel-average operator, other latent size and noise) meets the bounds on >= 18 of 20
observations; the check's attributes reach posterior.h5 for flow and amortised solves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ganflow
from ganflow.bench.amortized_tails import LINE_SIGMA, MEAN_TOL_SD, SD_TOL, line_problem
from ganflow.diagnostics import psis
from ganflow.io import Observation
from ganflow.posterior.amortized import AmortizedPosterior, AmortizedSettings, train_amortized
from ganflow.posterior.base import LatentFit
from ganflow.problems.linear_gaussian import exact_posterior
from ganflow.tails import tail_attrs

FAR = 0.005  # the fraction of wild draws
FAR_SCALE = 40.0  # their spread in exact posterior sds (the squared Mahalanobis 3,000-7,000)
FAST = {"solve": {"n_samples": 4000, "n_quantile": 4000, "n_field_samples": 4}, "diagnostics": {"n_draws": 2000}}


def _observation(G, A, seed: int) -> Observation:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, G.latent_dim, generator=g)
    with torch.no_grad():
        y = A(G(z))[0] + LINE_SIGMA * torch.randn(A.obs_shape, generator=g)
    return Observation(y=y, noise_sigma=LINE_SIGMA, z_true=z[0])


class _ContaminatedQ:
    """The exact Gaussian posterior with a fraction ``far`` of its draws from the same Gaussian ``FAR_SCALE``
    times wider: ``sample(n, generator) -> (z, log q)`` with the mixture's exact log density."""

    def __init__(self, ex, far: float):
        self.mean = torch.from_numpy(ex.latent_mean)
        self.L = torch.linalg.cholesky(torch.from_numpy(ex.latent_cov))
        self.far = far

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn(n, self.L.shape[0], generator=generator, dtype=torch.float64)
        wide = torch.rand(n, generator=generator, dtype=torch.float64) < self.far
        eps = torch.where(wide[:, None], FAR_SCALE * eps, eps)
        z = self.mean + eps @ self.L.T
        u2 = (eps * eps).sum(1)  # squared Mahalanobis distance of z under the bulk
        k = eps.shape[1]
        base = -0.5 * k * math.log(2 * math.pi) - torch.log(torch.diagonal(self.L)).sum()
        log_q = torch.logaddexp(math.log1p(-self.far) + base - 0.5 * u2,
                                math.log(max(self.far, 1e-300)) + base - k * math.log(FAR_SCALE)
                                - 0.5 * u2 / FAR_SCALE**2)
        return z.float(), log_q.float()


class _ContaminatedPosterior(AmortizedPosterior):
    """An amortised posterior whose q(.|y) is `_ContaminatedQ` (what `solve --amortized` would get from a q with
    wild draws)."""

    def __init__(self, G, A, far: float):
        super().__init__(model=None, meta={}, path=None)
        self.G, self.A, self.far = G, A, far

    def check(self, generator, operator, noise_sigma, y) -> None:
        pass

    def fit(self, y: torch.Tensor) -> LatentFit:
        q = _ContaminatedQ(exact_posterior(self.G, self.A, y, LINE_SIGMA), self.far)
        return LatentFit(method="amortized", sampler=lambda n, g: q.sample(n, g)[0], model=q,
                         trace={"loss": np.zeros(0)})


def _errors(res, ex) -> tuple[float, float, float]:
    """Max latent-mean error (exact sds), max relative latent-sd error, max relative field-sd error."""
    zs = res.latent_samples.astype(np.float64)
    mean_err = np.max(np.abs(zs.mean(0) - ex.latent_mean) / ex.latent_std)
    sd_err = np.max(np.abs(zs.std(0) / ex.latent_std - 1))
    field_err = np.max(np.abs(res.std / ex.field_std - 1))
    return float(mean_err), float(sd_err), float(field_err)


def test_tail_check_agrees_on_exact_draws_and_flags_injected_ones():
    """Exact draws (constant weights) agree; 0.5 % injected far draws disagree and the check names them."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 5))
    assert tail_attrs(z, psis(np.zeros(2000)))["tail_check"] == "agree"
    wide = rng.random(2000) < FAR
    z[wide] *= FAR_SCALE
    log_w = np.where(wide, -0.5 * (z**2).sum(1), 0.0)  # the far draws: almost no weight
    attrs = tail_attrs(z, psis(log_w))
    assert attrs["tail_check"] == "resampled" and attrs["tail_sd_ratio"] > 1.5, attrs
    assert attrs["tail_far_fraction"] > 0.002 and "z[" in attrs["tail_worst"], attrs


def test_injected_far_draws_are_flagged_and_reported_stats_stay_within_bounds():
    """solve --amortized with a q whose 0.5 % far draws inflate the raw sds (by 1.3-3x on these draws, like the
    issue's): the tail check flags it, the statistics are importance-resampled, and the reported latent means,
    sds and field sds are within the issue's bounds (0.2 sd, 15 %) of the exact posterior. Without the check
    (or the resampling) the sds fail them. Monte-Carlo error of 4,000 draws of the resampled pool: ~0.02 sd on a
    mean, ~1.5 % on an sd."""
    G, A = line_problem()
    for seed in range(3):
        obs = _observation(G, A, seed)
        with pytest.warns(RuntimeWarning, match="tail check"):
            res = ganflow.solve(obs, G, operator=A, amortized=_ContaminatedPosterior(G, A, FAR), config=FAST,
                                seed=seed, progress=False)
        assert res.attrs["tail_check"] == "resampled" and res.attrs["tail_sd_ratio"] > 1.15, res.attrs
        mean_err, sd_err, field_err = _errors(res, exact_posterior(G, A, obs.y, LINE_SIGMA))
        assert mean_err < MEAN_TOL_SD and sd_err < SD_TOL and field_err < SD_TOL, (seed, mean_err, sd_err, field_err)


def test_clean_q_keeps_its_raw_draws():
    """The same q without far draws passes the check (no warning) and is reported as drawn."""
    G, A = line_problem()
    obs = _observation(G, A, 0)
    res = ganflow.solve(obs, G, operator=A, amortized=_ContaminatedPosterior(G, A, 0.0), config=FAST, seed=0,
                        progress=False)
    assert res.attrs["tail_check"] == "agree" and "resampled_pool" not in res.attrs, res.attrs
    mean_err, sd_err, _ = _errors(res, exact_posterior(G, A, obs.y, LINE_SIGMA))
    assert mean_err < 0.1 and sd_err < 0.06


def test_flow_solve_writes_the_tail_check(tmp_path):
    """A (short) flow fit runs the same check; its attributes reach posterior.h5."""
    G, A = line_problem()
    cfg = {**FAST, "flow": {"n_layers": 2, "hidden": 16, "batch_size": 16, "max_iter": 30, "min_iter": 0,
                            "warmup": 5, "patience": 10}}
    res = ganflow.solve(_observation(G, A, 0), G, operator=A, method="flow", config=cfg, seed=0, progress=False)
    res.save(tmp_path / "post.h5")
    back = ganflow.PosteriorResult.load(tmp_path / "post.h5").attrs
    assert back["tail_check"] in ("agree", "resampled", "disagree") and back["tail_sd_ratio"] > 0, back


# The >= 18 of 20 criterion at a smaller scale than `scripts/amortized_tails.py` (the 10-D problem with
# every default, 5,000 steps: docs/amortized.md): a 6-D latent, 20 observations of a 40-point field, sigma
# 0.05, the default network and learning rate, 600 steps instead of 5,000 (measured: 20 of 20, ~40 s).
SMALL_LINE = {"n_field": 40, "latent_dim": 6, "n_obs": 20}
STEPS = 600


def test_default_amortized_meets_the_bounds_on_18_of_20_observations():
    G, A = line_problem(**SMALL_LINE)
    post = train_amortized(G, A, LINE_SIGMA, None, AmortizedSettings(max_iter=STEPS, progress=False),
                           seed=0).posterior
    within = 0
    for seed in range(20):
        obs = _observation(G, A, 100 + seed)
        res = ganflow.solve(obs, G, operator=A, amortized=post, config=FAST, seed=seed, progress=False)
        mean_err, sd_err, _ = _errors(res, exact_posterior(G, A, obs.y, LINE_SIGMA))
        within += mean_err <= MEAN_TOL_SD and sd_err <= SD_TOL
    assert within >= 18, within
