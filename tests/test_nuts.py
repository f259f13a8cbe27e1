"""NUTS reference posterior against the closed-form linear-Gaussian posterior (ganflow.problems.linear_gaussian)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ganflow import GanflowError
from ganflow.config import parse_settings
from ganflow.posterior import LatentTarget
from ganflow.posterior.nuts import NutsSettings, run_nuts
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior
from tests.conftest import NaNGradGenerator


def _problem(k: int, sigma: float, seed: int = 0):
    p = LinearGaussianProblem(n=16, latent_dim=k)
    G, A = p.generator(), p.make_operator()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y = A(G(torch.randn(1, k, generator=g)))[0] + sigma * torch.randn(A.obs_shape, generator=g)
    return LatentTarget(G, A, y, sigma), exact_posterior(G, A, y, sigma)


def test_nuts_matches_exact_posterior():
    # k = 4, sigma = 0.5: posterior sds 0.06 .. 0.19, i.e. 5-16x narrower than the N(0, I) prior
    target, post = _problem(4, 0.5)
    assert post.latent_std.max() < 0.25
    fit = run_nuts(target, NutsSettings(num_chains=4, num_samples=300, warmup_steps=300),
                   torch.Generator().manual_seed(1))
    x = fit.samples.double().numpy()
    sd = post.latent_std
    assert x.shape == (1200, 4)
    assert np.all(np.abs(x.mean(0) - post.latent_mean) < 0.1 * sd), (x.mean(0) - post.latent_mean) / sd
    assert np.all(np.abs(x.std(0) / sd - 1) < 0.10), x.std(0) / sd
    assert fit.attrs["rhat_max"] < 1.01
    assert fit.attrs["ess_min"] > 400
    assert fit.attrs["mass_matrix"] == "dense" and fit.attrs["divergences"] == 0
    # every draw's potential is -log p(y, z), evaluated independently here
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(fit.trace["loss"]).float(), -target.log_joint(fit.samples),
                              rtol=1e-5, atol=1e-3)
    assert fit.n_forward_evals > 1200 and fit.trace["chain"].shape == (1200,)


# 20 draws after 20 warm-up steps: a high R-hat is expected and warned about
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_same_seed_same_draws():
    target, _ = _problem(2, 0.5)
    s = NutsSettings(num_chains=2, num_samples=20, warmup_steps=20)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run_nuts(target, s, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's global RNG is left alone
    b = run_nuts(target, s, torch.Generator().manual_seed(3))
    c = run_nuts(target, s, torch.Generator().manual_seed(4))
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, c.samples)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_parallel_chains_match_sequential_chains():
    """jobs=2 runs the chains in forked workers: the same start points and seeds, so the same draws (up to
    float summation order), in chain order, and the workers' forward evaluations are counted."""
    target, _ = _problem(2, 0.5)
    s = NutsSettings(num_chains=3, num_samples=20, warmup_steps=20)
    a = run_nuts(target, s, torch.Generator().manual_seed(3))
    b = run_nuts(target, dataclasses.replace(s, jobs=2), torch.Generator().manual_seed(3))
    assert torch.allclose(a.samples, b.samples, atol=1e-4)
    assert b.n_forward_evals == a.n_forward_evals


def test_unconverged_chains_warn():
    target, _ = _problem(4, 0.5)
    # no warm-up and a handful of draws from over-dispersed prior starts: R-hat is far above 1.01
    with pytest.warns(RuntimeWarning, match="R-hat"):
        fit = run_nuts(target, NutsSettings(num_chains=2, num_samples=8, warmup_steps=0, max_tree_depth=2),
                       torch.Generator().manual_seed(0))
    assert fit.attrs["rhat_max"] > 1.01


@pytest.mark.parametrize(
    "table",
    [{"num_chains": 0}, {"num_samples": 2}, {"warmup_steps": -1}, {"target_accept_prob": 1.0},
     {"mass_matrix": "full"}, {"init": "flow"}, {"chains": 4}],
)
def test_bad_settings_raise(table):
    with pytest.raises(GanflowError):
        parse_settings(NutsSettings, table, "nuts")


def test_non_finite_gradient_is_an_error_not_nan():
    p = LinearGaussianProblem(n=16, latent_dim=3)
    target = LatentTarget(NaNGradGenerator(p.generator()), p.make_operator(), torch.zeros(p.obs_shape), 0.5)
    with pytest.raises(GanflowError, match="non-finite"):
        run_nuts(target, NutsSettings(num_chains=1, num_samples=10, warmup_steps=10),
                 torch.Generator().manual_seed(0))


def test_laplace_init_draws_from_the_laplace_approximation():
    """init = "laplace" starts the chains at draws of the Laplace approximation, which on linear_gaussian is
    the exact posterior: 400 start points have its mean and sds (Monte Carlo tolerances)."""
    from ganflow.posterior.nuts import _initial_points, _laplace_frame

    target, post = _problem(8, 1.0)
    s = NutsSettings(num_chains=400, init="laplace", init_map_starts=8)
    gen = torch.Generator().manual_seed(3)
    frame = _laplace_frame(target, s, gen, torch.float32)
    z = _initial_points(target, s, gen, torch.float32, frame).double().numpy()
    sd = post.latent_std
    assert np.all(np.abs(z.mean(0) - post.latent_mean) < 4 * sd / np.sqrt(400)), (z.mean(0) - post.latent_mean) / sd
    assert np.all(np.abs(z.std(0) / sd - 1) < 0.2), z.std(0) / sd


def test_laplace_whitened_chains_match_exact_posterior():
    """With init = "laplace" the chains run in the Laplace frame's whitened coordinates and are mapped back:
    the draws must still be the exact posterior's (the map is linear, so nothing but the frame changes)."""
    target, post = _problem(8, 0.5)
    fit = run_nuts(target, NutsSettings(num_chains=2, num_samples=300, warmup_steps=100, init="laplace",
                                        init_map_starts=4), torch.Generator().manual_seed(2))
    x = fit.samples.double().numpy()
    sd = post.latent_std
    assert np.all(np.abs(x.mean(0) - post.latent_mean) < 0.15 * sd), (x.mean(0) - post.latent_mean) / sd
    assert np.all(np.abs(x.std(0) / sd - 1) < 0.15), x.std(0) / sd
    assert fit.attrs["rhat_max"] < 1.02
    with torch.no_grad():  # potentials are of the draws in z, not in the whitened frame
        assert torch.allclose(torch.from_numpy(fit.trace["loss"]).float(), -target.log_joint(fit.samples),
                              rtol=1e-5, atol=1e-3)
