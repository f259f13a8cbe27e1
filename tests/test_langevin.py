"""Short-run Langevin against the closed-form linear-Gaussian answer.

On linear_gaussian the unadjusted chain is a linear Gaussian recursion: with posterior precision P and mean
mu,
    z_{t+1} = (I - h_t P) z_t + h_t P mu + s_t eps_t,   h_t = s_t^2 / 2,
so q_s after K steps is N(m_K, C_K) with m, C propagated below, and KL(q_s || N(mu, P^-1)) is closed-form.
Everything here is numpy, independent of ganflow.posterior.langevin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ganflow import GanflowError
from ganflow.bench.exact import curved_problem, quadrature_moments
from ganflow.config import parse_settings
from ganflow.posterior import LatentTarget
from ganflow.posterior.langevin import HAND_SET_STEP_SIZE, LangevinSettings, WhitenedTarget, run_langevin
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior
from tests.conftest import NaNGradGenerator

# a fast search for the tests: fewer chains and grid points than the shipped defaults
# init "prior": the identity frame, whose exact chain law _chain_law below propagates
FAST = dict(search_chains=128, search_grid=9, search_min=0.01, search_max=1.0, search_refine=8, init="prior")


def _problem(k: int, sigma: float, seed: int = 0):
    p = LinearGaussianProblem(n=16, latent_dim=k)
    G, A = p.generator(), p.make_operator()
    g = torch.Generator().manual_seed(seed)
    z_true = torch.randn(1, k, generator=g)
    with torch.no_grad():
        y = A(G(z_true))[0] + sigma * torch.randn(A.obs_shape, generator=g)
    post = exact_posterior(G, A, y, sigma)
    # log p(y) = log N(y; M b, sigma^2 I + H H^T), for turning the estimated -ELBO into a KL
    M, W, b = A.M.double().numpy(), G.W.double().numpy(), G.b.double().numpy()
    H = M @ W
    cov_y = sigma**2 * np.eye(H.shape[0]) + H @ H.T
    r = y.double().numpy() - M @ b
    quad = r @ np.linalg.solve(cov_y, r)
    log_py = -0.5 * (quad + np.linalg.slogdet(cov_y)[1] + len(r) * math.log(2 * math.pi))
    return LatentTarget(G, A, y, sigma), post, log_py


def _chain_law(post, s: float, K: int = 20, decay: float = 1.0, m0=None, C0=None):
    """Mean and covariance of z_K after K unadjusted steps from a start with mean m0 and covariance C0 (default
    the prior). Exact for any start distribution: the recursion is linear in z and in the noise."""
    mu, C = post.latent_mean, post.latent_cov
    k = len(mu)
    P = np.linalg.inv(C)
    m = np.zeros(k) if m0 is None else np.array(m0, dtype=float)
    S = np.eye(k) if C0 is None else np.array(C0, dtype=float)
    for t in range(K):
        st = s * decay ** (t / (K - 1)) if K > 1 else s
        h = 0.5 * st * st
        B = np.eye(k) - h * P
        m = B @ m + h * P @ mu
        S = B @ S @ B.T + st * st * np.eye(k)
    return m, S


def _exact_kl(post, s: float, K: int = 20, decay: float = 1.0, m0=None, C0=None) -> float:
    """KL(q_s || p(z|y)) after K unadjusted steps from N(m0, C0) (default the prior)."""
    mu, C = post.latent_mean, post.latent_cov
    k = len(mu)
    P = np.linalg.inv(C)
    m, S = _chain_law(post, s, K, decay, m0, C0)
    if not (np.all(np.isfinite(S)) and np.all(np.isfinite(m))):
        return math.inf
    d = m - mu
    sign, logdet_S = np.linalg.slogdet(S)
    if sign <= 0:
        return math.inf
    kl = 0.5 * (np.trace(P @ S) + d @ P @ d - k + np.linalg.slogdet(C)[1] - logdet_S)
    return kl if math.isfinite(kl) else math.inf


def _exact_optimum(post, K=20, decay=1.0) -> float:
    grid = np.exp(np.linspace(np.log(1e-3), np.log(2.0), 2000))
    kls = np.array([_exact_kl(post, s, K, decay) for s in grid])
    return float(grid[int(np.argmin(kls))])


@pytest.mark.parametrize("k, sigma, decay", [(8, 1.0, 1.0), (4, 0.5, 1.0), (8, 1.0, 0.5)])
def test_chosen_step_size_near_exact_kl_optimum(k, sigma, decay):
    target, post, log_py = _problem(k, sigma)
    assert 0.05 <= post.latent_std.min() and post.latent_std.max() <= 0.6  # clearly narrower than the prior
    fit = run_langevin(target, LangevinSettings(n_samples=200, step_decay=decay, **FAST),
                       torch.Generator().manual_seed(1))
    s_hat = fit.attrs["step_size"]
    s_opt = _exact_optimum(post, decay=decay)
    assert s_opt / 1.5 <= s_hat <= 1.5 * s_opt, (s_hat, s_opt)
    kl_hat = _exact_kl(post, s_hat, decay=decay)
    assert kl_hat < _exact_kl(post, HAND_SET_STEP_SIZE, decay=decay)
    # the estimated -ELBO + log p(y) is the KL itself on a Gaussian problem (Monte-Carlo error only) ...
    assert abs(fit.attrs["kl_estimate"] + log_py - kl_hat) < 0.6
    # ... and the noise-conditioned estimate bounds it from above at every step size it evaluated
    for s, bound in zip(fit.trace["step_sizes"], fit.trace["kl_path_bound"], strict=True):
        exact = _exact_kl(post, s, decay=decay)
        if math.isfinite(exact):  # past the stability limit both blow up; numpy overflows first
            assert bound + log_py >= exact - 0.6
    assert fit.trace["loss"].shape == (len(fit.trace["step_sizes"]),)
    assert fit.samples.shape == (200, k) and torch.isfinite(fit.samples).all()


def test_path_entropy_is_biased_towards_small_steps():
    """The documented bias: conditioning on the noise drops I(z_K; eps), which grows with s once the chain
    mixes, so the 'path' estimator picks a step well below the exact optimum on a well-mixing problem."""
    target, post, _ = _problem(8, 1.0)
    fit = run_langevin(target, LangevinSettings(n_samples=50, entropy="path", **FAST),
                       torch.Generator().manual_seed(1))
    assert fit.attrs["step_size"] < 0.75 * _exact_optimum(post)


def _moment_errors(x: np.ndarray, post) -> tuple[float, float]:
    sd = post.latent_std
    return (float(np.max(np.abs(x.mean(0) - post.latent_mean) / sd)),
            float(np.max(np.abs(x.std(0) / sd - 1))))


def _check_chain_law_and_step(fit, post, m0, C0, n0: int | None = None):
    """The draws against the exact law of K = 20 steps from a start of mean m0, covariance C0, at the chosen
    step size, and that step size against the exact KL optimum for that start.

    Draws: each mean within 4 standard errors (sd_K / sqrt(n), inflated when m0, C0 are themselves estimated
    from n0 draws) and each sd within 4 se (sd_K / sqrt(2 n)), both directions. Step: the exact KL at the chosen
    s within 0.05 nats of its minimum over s (the search minimises a 128-chain estimate; with common random
    numbers its argmin lands on the curve's flat bottom: measured 0.003 and 2e-5 nats above it)."""
    x = fit.samples.double().numpy()
    n = x.shape[0]
    s = fit.attrs["step_size"]
    m_K, C_K = _chain_law(post, s, m0=m0, C0=C0)
    sd_K = np.sqrt(np.diag(C_K))
    extra = 0.0 if n0 is None else 1 / n0  # Var(A m0_hat) <= diag(C_K) / n0 since C_K >= A C0 A^T
    mean_z = (x.mean(0) - m_K) / (sd_K * np.sqrt(1 / n + extra))
    sd_z = (x.std(0) / sd_K - 1) / np.sqrt(1 / (2 * n) + extra / 2)
    assert np.abs(mean_z).max() < 4 and np.abs(sd_z).max() < 4, (mean_z, sd_z)
    grid = np.exp(np.linspace(np.log(0.02), np.log(1.0), 400))
    kl_min = min(_exact_kl(post, g, m0=m0, C0=C0) for g in grid)
    kl_chosen = _exact_kl(post, s, m0=m0, C0=C0)
    assert kl_chosen - kl_min < 0.05, (s, kl_chosen, kl_min)
    return kl_chosen


def test_biased_initial_sampler_is_corrected():
    target, post, _ = _problem(8, 1.0)
    m0, sd0 = post.latent_mean + 2.0 * post.latent_std, 3.0 * post.latent_std
    mean, scale = torch.tensor(m0, dtype=torch.float32), torch.tensor(sd0, dtype=torch.float32)

    def init(n, generator):  # a deliberately wrong Gaussian: shifted by 2 sd, 3x too wide
        return mean + scale * torch.randn(n, len(mean), generator=generator)

    fit = run_langevin(target, LangevinSettings(n_samples=2000, **FAST), torch.Generator().manual_seed(2),
                       init=init)
    assert fit.attrs["init"] == "sampler"
    kl = _check_chain_law_and_step(fit, post, m0, np.diag(sd0**2))
    # the correction: KL to the posterior from 36.8 nats at the start to what 20 steps can reach (0.65)
    assert _exact_kl(post, 1e-12, K=1, m0=m0, C0=np.diag(sd0**2)) > 30 and kl < 1.0


def test_under_trained_flow_initialisation_is_corrected():
    flow_mod = pytest.importorskip("ganflow.posterior.flow")
    target, post, _ = _problem(8, 1.0)
    # identity start (not the Laplace one) and 100 steps: deliberately short of the posterior (25 steps leave
    # it so close to the prior that a chain ignoring its start could not be told apart). The two-net couplings
    # ("realnvp"), which learn more slowly here than the default "affine" ones (0.25 sd off after 100 steps).
    flow_settings = flow_mod.FlowSettings(kind="realnvp", init="identity", max_iter=100, min_iter=0, warmup=0,
                                          n_layers=2, hidden=16, progress=False)
    flow_fit = flow_mod.fit_flow(target, flow_settings, torch.Generator().manual_seed(3))
    # The chain's moments depend on the start only through its mean and covariance (the recursion is linear),
    # which 20,000 draws of the flow give to well within the test's Monte-Carlo error.
    n0 = 20_000
    x0 = flow_fit.sampler(n0, torch.Generator().manual_seed(4)).double().numpy()
    m0, C0 = x0.mean(0), np.cov(x0.T)
    mean_err0, std_err0 = _moment_errors(x0, post)
    assert mean_err0 > 0.5 and std_err0 > 0.3  # the flow really is under-trained (0.82 sd, 44 %)
    fit = run_langevin(target, LangevinSettings(n_samples=2000, **dict(FAST, init="flow")),
                       torch.Generator().manual_seed(2), init=flow_fit.sampler)
    kl = _check_chain_law_and_step(fit, post, m0, C0, n0=n0)
    kl0 = _exact_kl(post, 1e-12, K=1, m0=m0, C0=C0)  # the flow's own KL (Gaussian with its moments)
    assert kl0 > 1.0 and kl < 0.25 * kl0  # 1.52 nats -> 0.13


def test_mala_is_asymptotically_exact():
    target, post, _ = _problem(4, 0.5)
    fit = run_langevin(target, LangevinSettings(n_samples=1000, n_steps=300, step_size=0.08, mala=True),
                       torch.Generator().manual_seed(0))
    mean_err, std_err = _moment_errors(fit.samples.double().numpy(), post)
    assert mean_err < 0.2 and std_err < 0.1, (mean_err, std_err)
    assert 0.2 < fit.attrs["acceptance_rate"] < 1.0
    assert fit.trace["acceptance"].shape == (300,)


@pytest.mark.parametrize(
    "table",
    [{"n_steps": 0}, {"step_size": 0.0}, {"step_size": -0.1}, {"n_samples": 0}, {"step_decay": 0.0},
     {"search_min": 1.0, "search_max": 0.1}, {"entropy": "exact"}, {"init": "map"}, {"stepsize": 0.1},
     {"leapfrog": 0}, {"leapfrog": 4}],  # leapfrog > 1 (HMC) needs mala
)
def test_bad_settings_raise(table):
    with pytest.raises(GanflowError):
        parse_settings(LangevinSettings, table, "langevin")


def test_settings_parse_from_toml_table():
    s = parse_settings(LangevinSettings, {"step_size": 1, "n_steps": 5, "mala": True}, "langevin")
    assert s.step_size == 1.0 and s.n_steps == 5 and s.mala


def test_flow_init_without_sampler_is_an_error():
    target, _, _ = _problem(2, 0.5)
    with pytest.raises(GanflowError, match="flow"):
        run_langevin(target, LangevinSettings(init="flow"), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("step_size", [None, 0.05])
def test_non_finite_gradient_is_an_error_not_nan(step_size):
    p = LinearGaussianProblem(n=16, latent_dim=3)
    target = LatentTarget(NaNGradGenerator(p.generator()), p.make_operator(), torch.zeros(p.obs_shape), 0.5)
    with pytest.raises(GanflowError, match="non-finite gradient at step 0"):
        run_langevin(target, LangevinSettings(step_size=step_size, n_samples=10, **FAST),
                     torch.Generator().manual_seed(0))


def test_divergent_fixed_step_is_an_error_not_nan():
    target, _, _ = _problem(4, 0.5)
    with pytest.raises(GanflowError, match="non-finite gradient at step"):
        run_langevin(target, LangevinSettings(step_size=5.0, n_steps=200, n_samples=10, search_chains=8),
                     torch.Generator().manual_seed(0))


def test_same_seed_same_draws():
    target, _, _ = _problem(3, 0.5)
    settings = LangevinSettings(n_samples=64, search_chains=32, search_grid=5, search_refine=3)
    a = run_langevin(target, settings, torch.Generator().manual_seed(7))
    b = run_langevin(target, settings, torch.Generator().manual_seed(7))
    c = run_langevin(target, settings, torch.Generator().manual_seed(8))
    assert torch.equal(a.samples, b.samples) and a.attrs["step_size"] == b.attrs["step_size"]
    assert not torch.equal(a.samples, c.samples)
    assert a.method == "langevin" and a.n_forward_evals > 0 and a.settings["n_samples"] == 64


# --- issue 18: the whitened Laplace frame, the refiner, robustness of the prior-frame chains ----------------

def _stiff_problem():
    """The issue's held-out case: 10 latent dims, 36 data (12x12 field, stride 2), sigma = 0.05: the posterior is
    up to hundreds of times narrower than the prior, which 20 unpreconditioned steps from the prior cannot reach
    (measured on this case: 7.6 posterior sd off in the mean, 350 % in the sd)."""
    p = LinearGaussianProblem(n=12, latent_dim=10)
    G, A = p.generator(), p.make_operator()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        y = A(G(torch.randn(1, 10, generator=g)))[0] + 0.05 * torch.randn(A.obs_shape, generator=g)
    return LatentTarget(G, A, y, 0.05), exact_posterior(G, A, y, 0.05)


def test_laplace_frame_on_a_stiff_linear_gaussian_is_the_exact_posterior_up_to_the_step_bias():
    """In the Laplace frame ``u = L^-1 (z - MAP)`` the posterior of a linear-Gaussian problem is exactly N(0, I)
    (its finite-difference Hessian is exact), the chains start there, and K unadjusted steps of size s keep the
    mean and scale every variance by ``v_K = (1-h)^2K + (1 - (1-h)^2K) / (1 - h/2)``, ``h = s^2/2`` (numpy below,
    independent of ganflow). Draws: each mean within 4 se of the exact mean (se = sd sqrt(v_K / n)), each sd
    within 4 se (sd sqrt(v_K / 2n)) of sd sqrt(v_K), both directions; and that law within the issue's
    targets of the posterior (0.2 sd, 15 %). Checked by hand to fail with the identity preconditioner (from the
    prior, or from the Laplace start: no step size survives the stiff directions) and with the drift's sign
    flipped."""
    target, post = _stiff_problem()
    assert target.obs_shape == (36,) and post.latent_std.min() < 0.01  # hundreds of times narrower
    n = 2000
    fit = run_langevin(target, LangevinSettings(n_samples=n, search_chains=64, search_grid=7, search_refine=3,
                                                search_min=0.05, search_max=2.0), torch.Generator().manual_seed(0))
    assert fit.attrs["frame"] == "laplace" and fit.attrs["init"] == "laplace"
    h, K = 0.5 * fit.attrs["step_size"] ** 2, fit.attrs["n_steps"]
    decay = (1 - h) ** (2 * K)
    v_K = decay + (1 - decay) / (1 - h / 2)
    x = fit.samples.double().numpy()
    sd = post.latent_std * math.sqrt(v_K)
    mean_z = (x.mean(0) - post.latent_mean) / (sd / math.sqrt(n))
    sd_z = (x.std(0) / sd - 1) * math.sqrt(2 * n)
    assert np.abs(mean_z).max() < 4 and np.abs(sd_z).max() < 4, (mean_z, sd_z)
    assert math.sqrt(v_K) - 1 < 0.15
    mean_err, sd_err = _moment_errors(x, post)
    assert mean_err < 0.2 and sd_err < 0.15, (mean_err, sd_err)
    assert fit.attrs["psis_khat"] < 0.5  # the search chains' linearised weights: q_s is close to the posterior


def test_laplace_frame_on_the_curved_problem_against_quadrature():
    """The non-Gaussian exact problem (ganflow.bench.exact): the Laplace frame with MALA (the bench's
    settings) within the issue's targets of the quadrature, 0.2 sd in the mean and 15 % in the sd (4,000 draws:
    the Monte-Carlo se is 0.016 sd and 1.1 %, so the tolerance is the method's bias; measured 0.06 sd, 6 %), and
    closer in the mean of z_1 than the Laplace start it corrects (0.22 sd off), by more than 4 se. Checked by
    hand to fail with a transposed Cholesky factor (z = MAP + L^T u: sd of z_2 48 % off), with the identity
    preconditioner from the prior, and with the drift's sign flipped."""
    p = curved_problem()
    ref = quadrature_moments(p)
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    settings = LangevinSettings(n_samples=4000, batch_size=4000, mala=True, search_chains=64, search_grid=5,
                                search_refine=2, search_min=0.05, search_max=2.0)
    fit = run_langevin(target, settings, torch.Generator().manual_seed(1))
    z = fit.samples.double().numpy()
    mean_err = np.abs(z.mean(0) - ref["mean"]) / ref["sd"]
    sd_err = np.abs(z.std(0) / ref["sd"] - 1)
    assert mean_err.max() < 0.2 and sd_err.max() < 0.15, (mean_err, sd_err)
    assert mean_err[0] < 0.22 - 4 / math.sqrt(4000), mean_err


def test_refiner_does_not_worsen_an_under_trained_flow():
    """flow + langevin: a flow stopped at its Laplace start (0 steps, 0.22 sd off in the mean of z_1 on the
    curved problem) refined by MALA in the flow's own affine frame. Against the quadrature: every mean and sd
    error after refinement no worse than before plus 4 Monte-Carlo se (0.063 sd, 4.5 % at 4,000 draws), and
    within 0.15 sd and 10 % (measured ~0.06 sd, ~6 %). Checked by hand to fail with the drift's sign flipped
    (the refined mean stays 0.17 sd off)."""
    from ganflow.posterior.flow import FlowSettings, fit_flow

    p = curved_problem()
    ref = quadrature_moments(p)
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    flow = fit_flow(target, FlowSettings(max_iter=0, min_iter=0, progress=False), torch.Generator().manual_seed(0))
    n = 4000
    errors = []
    before = flow.sampler(n, torch.Generator().manual_seed(3)).double().numpy()
    settings = LangevinSettings(n_samples=n, batch_size=n, init="flow", mala=True, search_chains=64,
                                search_grid=5, search_refine=2, search_min=0.05, search_max=2.0)
    fit = run_langevin(target, settings, torch.Generator().manual_seed(1), init=flow.sampler,
                       frame=(flow.model.loc, flow.model.scale_tril))
    assert fit.attrs["frame"] == "given"
    for z in (before, fit.samples.double().numpy()):
        errors.append((np.abs(z.mean(0) - ref["mean"]) / ref["sd"], np.abs(z.std(0) / ref["sd"] - 1)))
    (m0, s0), (m1, s1) = errors
    assert m0[0] > 0.15  # the flow really is off
    assert np.all(m1 <= m0 + 4 / math.sqrt(n)) and np.all(s1 <= s0 + 4 / math.sqrt(2 * n)), errors
    assert m1.max() < 0.15 and s1.max() < 0.10, errors


def test_prior_frame_tail_chains_back_off_instead_of_raising():
    """The seed's method (init "prior") on the curved problem, seed 0: chains started in the prior's tail, where
    the curvature is ~400 times the bulk's, overshot and overflowed ("non-finite gradient at step 5" before). A
    divergent step (Metropolis log ratio below -1000 nats, or a non-finite value) is now refused and that chain's
    step halved: the run finishes, few chains backed off, and no draw is left far out. Without the divergence
    test (finite checks only) the backed-off chains sit at |z| ~ 1e6 (checked by hand)."""
    p = curved_problem()
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    fit = run_langevin(target, LangevinSettings(n_samples=2000, init="prior"), torch.Generator().manual_seed(0))
    z = fit.samples
    assert torch.isfinite(z).all() and float(z.abs().max()) < 10
    assert 0 < fit.attrs["backed_off_chains"] <= 0.05 * 2000


def _gaussian_start(post, shift: float, scale: float):
    """A start sampler, its exact log density and its own affine frame ``(loc, scale_tril)`` (as a flow's is its
    own Laplace estimate): the posterior's marginals moved by ``shift`` sd and scaled by ``scale``."""
    mean = torch.tensor(post.latent_mean + shift * post.latent_std)
    sd = torch.tensor(scale * post.latent_std)
    law = torch.distributions.Independent(torch.distributions.Normal(mean, sd), 1)

    def sample(n, generator):
        return (mean + sd * torch.randn(n, len(mean), generator=generator, dtype=torch.float64)).float()

    return sample, lambda z: law.log_prob(z.double()), (mean.float(), torch.diag(sd).float())


def test_importance_resampled_starts_have_the_posterior_moments():
    """The refiner's start: a pool of 4 x 2,000 draws (3/4 from a start that is 0.5 sd off and 25 % too wide,
    1/4 from its frame's Gaussian widened 1.5x), resampled by p/q, against the exact linear-Gaussian
    posterior: means within 4 se (sd / sqrt(ESS) with the smoothed weights' ESS) and sds within 4 se. The raw
    start fails the same check (its mean is 0.5 sd off)."""
    from ganflow.posterior.langevin import importance_resampler

    target, post, _ = _problem(8, 1.0)
    start, log_q, frame = _gaussian_start(post, 0.5, 1.25)
    record: dict = {}
    draw = importance_resampler(target, start, log_q, WhitenedTarget(target, *frame), pool=4, batch_size=1000,
                                record=record)
    z = draw(2000, torch.Generator().manual_seed(5)).double().numpy()
    assert record["resampled"] and record["khat"] < 0.7, record
    ess = record["ess_ratio"] * 8000
    se = 1 / math.sqrt(min(ess, 2000))
    mean_z = (z.mean(0) - post.latent_mean) / post.latent_std
    sd_z = z.std(0) / post.latent_std - 1
    assert np.abs(mean_z).max() < 4 * se and np.abs(sd_z).max() < 4 * se / math.sqrt(2), (mean_z, sd_z)


def test_importance_resampling_is_skipped_when_the_start_misses():
    """A start 6 sd off: PSIS k_hat > 0.7, so the raw draws are kept (and a warning says so)."""
    from ganflow.posterior.langevin import importance_resampler

    target, post, _ = _problem(8, 1.0)
    start, log_q, frame = _gaussian_start(post, 6.0, 0.5)
    record: dict = {}
    draw = importance_resampler(target, start, log_q, WhitenedTarget(target, *frame), pool=2, batch_size=1000,
                                record=record)
    with pytest.warns(RuntimeWarning, match="k_hat"):
        z = draw(500, torch.Generator().manual_seed(5))
    assert not record["resampled"] and record["khat"] > 0.7
    raw = start(750, torch.Generator().manual_seed(5))[:500]  # the pool's init part: 3/4 of 2 x 500
    assert torch.equal(z, raw)


def test_refiner_with_resampling_repairs_a_narrow_start_the_chains_alone_do_not():
    """flow + langevin as the refiner runs it: a start 0.3 sd off and 30 % too narrow (the way a reverse-KL flow
    errs; its own p/q weights alone give PSIS k_hat 0.76-0.87), in its own affine frame, one MALA step. With
    resampled starts (the defensive pool) the worst mean and sd errors against the exact posterior are 0.04 sd
    and 3 % (bounds 0.12 sd, 10 %); without them one step keeps the start's error (0.24 sd, 18 %: the same
    bounds fail)."""
    target, post, _ = _problem(8, 1.0)
    start, log_q, frame = _gaussian_start(post, 0.3, 0.7)
    errors = {}
    for resample in (True, False):
        settings = LangevinSettings(n_samples=2000, n_steps=1, init="flow", mala=True, resample=resample,
                                    search_chains=64, search_grid=5, search_refine=2, search_min=0.05,
                                    search_max=2.0)
        fit = run_langevin(target, settings, torch.Generator().manual_seed(1), init=start, frame=frame,
                           init_log_prob=log_q)
        x = fit.samples.double().numpy()
        errors[resample] = _moment_errors(x, post)
        assert ("start_khat" in fit.attrs) == resample
    for resample, (mean_err, sd_err) in errors.items():
        assert (mean_err < 0.12 and sd_err < 0.10) == resample, errors


def test_moment_frame_is_the_samplers_mean_and_covariance():
    """`moment_frame` of a correlated Gaussian sampler against its known mean and covariance: every entry within 5
    Monte-Carlo standard errors (mean: sqrt(C_ii / n); covariance: sqrt((C_ii C_jj + C_ij^2) / n))."""
    from ganflow.posterior.langevin import moment_frame

    rng = np.random.default_rng(0)
    k, n = 5, 4000
    A = rng.standard_normal((k, k))
    C, m = A @ A.T + 0.5 * np.eye(k), rng.standard_normal(k)
    chol = torch.tensor(np.linalg.cholesky(C))

    def sample(size, generator):
        return torch.tensor(m) + torch.randn(size, k, generator=generator, dtype=torch.float64) @ chol.T

    loc, scale_tril = moment_frame(sample, torch.Generator().manual_seed(1), n)
    d = np.diag(C)
    assert np.all(np.abs(loc.numpy() - m) < 5 * np.sqrt(d / n))
    assert torch.equal(scale_tril, torch.tril(scale_tril)) and bool((torch.diagonal(scale_tril) > 0).all())
    cov = (scale_tril @ scale_tril.T).numpy()
    assert np.all(np.abs(cov - C) < 5 * np.sqrt((np.outer(d, d) + C**2) / n)), (cov, C)


def test_hmc_refiner_is_exact_from_an_off_centre_narrow_start():
    """flow + langevin with HMC transitions (leapfrog 8, 20 transitions): a start 2 sd off and half as wide as the
    exact linear-Gaussian posterior, in the frame of its own moments (`moment_frame`), no resampling. The draws'
    means and sds within 4 Monte-Carlo se of the exact posterior's (0.09 sd, 6 %; the start is 2 sd, 50 % off),
    and the acceptance-chosen step's acceptance from the starts near `HMC_TARGET_ACCEPT`. Without the step
    jitter (`HMC_STEP_JITTER` = 0) the fixed trajectory comes back near its start: 0.29 sd, 19 % (checked by
    hand)."""
    from ganflow.posterior.langevin import HMC_TARGET_ACCEPT, moment_frame

    target, post, _ = _problem(8, 1.0)
    start, _, _ = _gaussian_start(post, 2.0, 0.5)
    frame = moment_frame(start, torch.Generator().manual_seed(0))
    n = 2000
    settings = LangevinSettings(n_samples=n, batch_size=n, n_steps=20, init="flow", mala=True, leapfrog=8,
                                resample=False, search_chains=64, search_min=0.01, search_max=4.0)
    fit = run_langevin(target, settings, torch.Generator().manual_seed(1), init=start, frame=frame)
    # the search measures the acceptance from the starts (here 2 sd off and narrow; on the posterior ~0.45)
    chosen = fit.trace["search_acceptance"][fit.trace["step_sizes"] == fit.attrs["step_size"]]
    assert abs(chosen[0] - HMC_TARGET_ACCEPT) < 0.1 and 0.3 < fit.attrs["acceptance_rate"] < 1, fit.attrs
    assert fit.attrs["leapfrog"] == 8
    mean_err, sd_err = _moment_errors(fit.samples.double().numpy(), post)
    assert mean_err < 4 / math.sqrt(n) and sd_err < 4 / math.sqrt(2 * n), (mean_err, sd_err)


def test_auto_entropy_avoids_hessians_a_target_cannot_take():
    """On a target whose log density refuses a second derivative (the elliptic solver), ``entropy = "auto"``
    takes the sample-covariance entropy instead of exact Hessians (which there would be wrong, not absent), and an
    explicit ``"linearized"`` is a one-line error; a twice-differentiable target keeps the Hessians."""
    from ganflow.posterior.langevin import _resolve_entropy
    from ganflow.problems.elliptic import EllipticOperator

    class Linear(torch.nn.Module):
        latent_dim, field_shape = 3, (5, 5)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(0.3 * torch.randn(3, 25, generator=torch.Generator().manual_seed(0)))

        def forward(self, z):
            return (z @ self.w).reshape(-1, 5, 5)

    op = EllipticOperator(n=5, bc="hippylib", sensors="grid:2")
    target = LatentTarget(Linear(), op, op(torch.zeros(1, 5, 5)).float()[0], 0.1)
    assert _resolve_entropy(LangevinSettings(), target) == "gaussian"
    with pytest.raises(GanflowError, match="differentiated twice"):
        _resolve_entropy(LangevinSettings(entropy="linearized"), target)
    p = curved_problem()
    smooth = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    assert _resolve_entropy(LangevinSettings(), smooth) == "linearized"
