"""The flow posterior: invertibility and log-determinant against autograd, and accuracy on linear_gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ganflow.posterior.flow import FlowSettings, LatentFlow, fit_flow
from ganflow.posterior.target import LatentTarget
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior


def _perturb(flow: LatentFlow, seed: int) -> None:
    """Random non-zero weights, so the test does not run on the identity map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["affine", "realnvp", "spline"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_flow_invertible_and_logdet_matches_autograd(kind, k):
    s = FlowSettings(kind=kind, n_layers=4, hidden=16)
    loc = torch.linspace(-1, 1, k)
    L = torch.tril(0.2 * torch.ones(k, k)) + torch.eye(k)
    flow = LatentFlow(k, s, loc, L).double()
    _perturb(flow, k)
    eps = torch.randn(6, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z, log_q = flow.transform(eps)
    # invertible: log_prob goes through the inverse and must give the same density
    assert torch.allclose(flow.log_prob(z), log_q, atol=1e-8, rtol=1e-8)
    # log q(z) = log N(eps) - log|det dT/deps|, with the Jacobian from autograd (independent of the flow code)
    for i in range(eps.shape[0]):
        J = torch.autograd.functional.jacobian(lambda e: flow.transform(e[None])[0][0], eps[i])
        logdet = torch.linalg.slogdet(J)[1]
        base = -0.5 * (eps[i] ** 2).sum() - 0.5 * k * np.log(2 * np.pi)
        assert torch.allclose(log_q[i], base - logdet, atol=1e-8), (float(log_q[i]), float(base - logdet))


def test_flow_starts_at_identity():
    flow = LatentFlow(6, FlowSettings())
    eps = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    z, _ = flow.transform(eps)
    assert torch.allclose(z, eps, atol=1e-6)
    assert sum(p.numel() for p in flow.flow.q0.parameters() if p.requires_grad) == 0  # fixed base


def _linear_case(sigma_rel=0.2, latent_dim=16, seed=3):
    problem = LinearGaussianProblem(latent_dim=latent_dim)
    G, A = problem.generator(), problem.make_operator()
    g = torch.Generator().manual_seed(seed)
    z_true = torch.randn(1, latent_dim, generator=g)
    clean = A(G(z_true))[0]
    sigma = sigma_rel * float(clean.abs().max())
    y = clean + sigma * torch.randn(clean.shape, generator=g)
    return G, A, y, sigma, exact_posterior(G, A, y, sigma)


@pytest.mark.parametrize("init", ["laplace", "identity"])
def test_flow_matches_exact_linear_gaussian_posterior(init):
    G, A, y, sigma, exact = _linear_case()
    # the posterior must be clearly narrower than the N(0, I) prior for the test to mean something
    assert exact.latent_std.max() < 0.6
    target = LatentTarget(G, A, y, sigma)
    settings = FlowSettings(init=init, progress=False, max_iter=2500 if init == "identity" else 1500)
    fit = fit_flow(target, settings, torch.Generator().manual_seed(0))
    z = fit.draw(20000, torch.Generator().manual_seed(1)).double().numpy()
    mean_err = np.abs(z.mean(0) - exact.latent_mean) / exact.latent_std
    sd_err = np.abs(z.std(0) / exact.latent_std - 1)
    assert mean_err.max() < 0.1, mean_err
    assert sd_err.max() < 0.10, sd_err
    x = G(torch.from_numpy(z[:5000]).float()).double().numpy()
    field_mean_err = np.abs(x.mean(0) - exact.field_mean) / exact.field_std
    field_sd_err = np.abs(x.std(0) / exact.field_std - 1)
    assert field_mean_err.max() < 0.1
    assert field_sd_err.max() < 0.1
    assert fit.n_forward_evals == target.n_forward_evals > 0


def test_nonfinite_steps_are_undone_and_reported():
    G, A, y, sigma, _ = _linear_case()

    class Flaky(torch.nn.Module):
        """The operator returns NaN on every 3rd call: the fit must survive and keep finite weights."""

        def __init__(self, op):
            super().__init__()
            self.op, self.calls = op, 0
            self.field_shape, self.obs_shape = op.field_shape, op.obs_shape

        def forward(self, x):
            self.calls += 1
            out = self.op(x)
            return out * float("nan") if self.calls % 3 == 0 else out

    target = LatentTarget(G, Flaky(A), y, sigma, check=False)
    fit = fit_flow(target, FlowSettings(init="identity", progress=False, max_iter=60, min_iter=60, max_failures=100),
                   torch.Generator().manual_seed(0))
    assert fit.attrs["nonfinite_steps"] >= 15
    assert all(torch.isfinite(v).all() for v in fit.state.values())

    class AlwaysNaN(Flaky):
        def forward(self, x):
            return self.op(x) * float("nan")

    from ganflow import GanflowError

    target = LatentTarget(G, AlwaysNaN(A), y, sigma, check=False)
    with pytest.raises(GanflowError, match="non-finite"):
        fit_flow(target, FlowSettings(init="identity", progress=False, max_iter=50, max_failures=5))


def test_same_seed_same_fit():
    G, A, y, sigma, _ = _linear_case()
    s = FlowSettings(progress=False, max_iter=100, min_iter=100, map_iter=50)
    draws = []
    for _ in range(2):
        fit = fit_flow(LatentTarget(G, A, y, sigma), s, torch.Generator().manual_seed(5))
        draws.append(fit.draw(50, torch.Generator().manual_seed(6)))
    assert torch.equal(draws[0], draws[1])


def test_monitor_sees_the_fit_without_changing_it():
    """The monitor is called at the Laplace start, every `monitor_every` steps and at the end, with the flow
    being trained; the fit with a monitor is bit-identical to the fit without."""
    G, A, y, sigma, _ = _linear_case()
    s = FlowSettings(progress=False, max_iter=23, min_iter=0, map_iter=20, n_layers=2, hidden=8)
    seen = []

    def monitor(step, flow):
        assert isinstance(flow, LatentFlow) and not torch.is_grad_enabled()
        seen.append((step, flow.sample(4, torch.Generator().manual_seed(0))[0]))

    with_mon = fit_flow(LatentTarget(G, A, y, sigma), s, torch.Generator().manual_seed(5), monitor=monitor,
                        monitor_every=10)
    plain = fit_flow(LatentTarget(G, A, y, sigma), s, torch.Generator().manual_seed(5))
    assert [st for st, _ in seen] == [0, 10, 20, 23]
    assert not torch.equal(seen[0][1], seen[-1][1])  # it saw the flow move
    g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    assert torch.equal(with_mon.draw(50, g1), plain.draw(50, g2))
    assert torch.equal(seen[-1][1], with_mon.draw(4, torch.Generator().manual_seed(0)))


class _Scalar(torch.nn.Module):
    """k = 1 latent, one observed value r(z) = c (z - a)(z - b) exp(s z): zero residual at a and b, with slopes
    |r'| = c |a - b| exp(s a) and c |a - b| exp(s b)."""

    latent_dim, field_shape, obs_shape = 1, (1,), (1,)

    def __init__(self, a, b, c, s):
        super().__init__()
        self.a, self.b, self.c, self.s = a, b, c, s

    def forward(self, z):
        return self.c * (z - self.a) * (z - self.b) * torch.exp(self.s * z)


def test_laplace_mode_is_the_most_massive_not_the_highest():
    """Two exact-fit modes: z = 0.8 (steep residual, narrow) has the higher density (the prior favours it by
    (1.2^2 - 0.8^2)/2 = 0.4 nats), z = -1.2 (flat residual, wide) the larger Laplace mass; analytically
    log mass = log p(y, z*) - 1/2 log(1 + r'(z*)^2 / sigma^2)."""
    from ganflow.posterior.flow import most_massive_mode

    a, b, s, sigma = -1.2, 0.8, math.log(10) / 2, 0.1
    c = 0.1 / (2.0 * math.exp(s * a))  # slope 0.1 at the wide mode, 1.0 at the narrow one
    op = _Scalar(a, b, c, s)
    identity = torch.nn.Identity()
    identity.latent_dim, identity.field_shape = 1, (1,)
    target = LatentTarget(identity, op, torch.zeros(1), sigma, check=False)
    z = torch.tensor([[b], [a]])
    with torch.no_grad():
        lp = target.log_joint(z)
    assert lp[0] > lp[1] + 0.39  # the narrow mode is the higher one
    curv = [1 + (c * abs(a - b) * math.exp(s * m)) ** 2 / sigma**2 for m in (b, a)]
    mass = [float(lp[i]) - 0.5 * math.log(curv[i]) for i in range(2)]
    assert mass[1] > mass[0] + 1  # ... and the wide one the more massive, analytically
    z_star, evals, _, lp_star = most_massive_mode(target, z, fd_step=1e-3)
    assert float(z_star) == pytest.approx(a)
    assert float(evals[0]) == pytest.approx(curv[1], rel=1e-3)
    assert float(lp_star) == pytest.approx(float(lp[1]))


def _two_component_mixture(weights=(0.7, 0.3)):
    """Two perturbed (non-Gaussian) flows at z_1 = -4 and +4, mixed with ``weights``, in float64."""
    from ganflow.posterior.mixture import MixtureFlow

    s = FlowSettings(n_layers=2, hidden=8)
    parts = []
    for i, x in enumerate((-4.0, 4.0)):
        flow = LatentFlow(2, s, torch.tensor([x, 0.0]), torch.tensor([[0.8, 0.0], [0.3, 0.6]]))
        with torch.no_grad():  # gentler than _perturb: skewed, bent, but with light tails that a grid holds
            g = torch.Generator().manual_seed(10 + i)
            for p in flow.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        parts.append(flow)
    return MixtureFlow(parts, torch.tensor(weights).log()).double()


def test_mixture_log_prob_is_normalised_and_matches_its_draws():
    """``log q = logsumexp_k(log w_k + log q_k)``: exp(log q) integrates to 1 on a grid (step 0.02 over
    [-12, 12]^2; grid and truncation error < 1e-3 for these smooth, light-tailed densities); the log q returned
    with the draws is log_prob's; the share of 20,000 draws with z_1 > 0 is the second weight, 0.3, within 4
    binomial se (0.013). Dropping the weights from log q (integral 2) or sampling the components equally (share
    0.5) fails."""
    q = _two_component_mixture()
    axis = torch.arange(-12, 12, 0.02, dtype=torch.float64) + 0.01
    z1, z2 = torch.meshgrid(axis, axis, indexing="ij")
    with torch.no_grad():
        dens = q.log_prob(torch.stack([z1.reshape(-1), z2.reshape(-1)], 1)).exp()
    assert float(dens.sum()) * 0.02**2 == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():
        z, log_q = q.sample(20_000, torch.Generator().manual_seed(0))
        assert torch.allclose(log_q, q.log_prob(z), atol=1e-10)
    share = float((z[:, 0] > 0).double().mean())
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20_000), share


def test_mixture_state_round_trips_through_flow_from_state():
    """What posterior.h5 stores (settings, state dict) rebuilds the same mixture density."""
    from ganflow.posterior.flow import flow_from_state

    q = _two_component_mixture().float()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    rebuilt = flow_from_state(2, {"n_layers": 2, "hidden": 8}, state)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        assert torch.equal(rebuilt.log_prob(z), q.log_prob(z))


@pytest.mark.parametrize("crash_at", [15, 45])
def test_mixture_fit_resumes_bit_identically(tmp_path, crash_at):
    """A two-mode fit interrupted in its first or second component (30 steps each) resumes from the checkpoint
    to the same mixture, attributes and evaluation count."""
    from exact_problems import twin_problem

    from ganflow.posterior.mixture import MixtureFlow

    p = twin_problem()
    s = FlowSettings(n_layers=2, hidden=8, max_iter=30, min_iter=0, warmup=5, weight_draws=64, progress=False,
                     checkpoint_every_s=0.0)

    def target():
        return LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)

    plain = fit_flow(target(), s, torch.Generator().manual_seed(0))
    assert plain.attrs["n_modes"] == 2 and isinstance(plain.model, MixtureFlow)

    def crash(step, flow):
        if step == crash_at:
            raise KeyboardInterrupt

    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_flow(target(), s, torch.Generator().manual_seed(0), checkpoint_path=ckpt, monitor=crash, monitor_every=5)
    resumed = fit_flow(target(), s, torch.Generator().manual_seed(99), checkpoint_path=ckpt, resume=True)
    assert resumed.attrs == plain.attrs and resumed.n_forward_evals == plain.n_forward_evals
    assert np.array_equal(resumed.trace["loss"], plain.trace["loss"])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(resumed.draw(100, g1), plain.draw(100, g2))


def test_mixture_solve_writes_reloads_and_diagnoses(tmp_path):
    """A two-mode solve end to end: posterior.h5 records the modes and weights, /flow/state rebuilds the mixture
    (whose draws cover both modes), and the PSIS diagnostics run on its exact density."""
    from exact_problems import twin_problem

    from ganflow.io import Observation
    from ganflow.qoi import posterior_latent_draws
    from ganflow.results import PosteriorResult
    from ganflow.solve import solve

    p = twin_problem()
    cfg = {"flow": {"n_layers": 2, "hidden": 8, "max_iter": 40, "min_iter": 0, "warmup": 5, "weight_draws": 64},
           "solve": {"n_samples": 200, "n_quantile": 100}, "diagnostics": {"n_draws": 100}}
    res = solve(Observation(y=p.y, noise_sigma=p.noise_sigma), p.generator, operator=p.operator, config=cfg,
                progress=False)
    assert res.attrs["n_modes"] == 2 and "psis_khat" in res.attrs
    path = res.save(tmp_path / "posterior.h5")
    back = PosteriorResult.load(path)
    assert back.attrs["n_modes"] == 2
    z, log_q = posterior_latent_draws(back, 400, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(log_q, res.fit.model.log_prob(z), atol=1e-5)
    assert 0.3 < float((z[:, 0] > 0).float().mean()) < 0.7  # both mirror modes, about half each


def test_dreg_flow_matches_exact_linear_gaussian_posterior():
    """estimator "dreg" (the importance-weighted bound's doubly reparameterised gradient) reaches the exact
    linear-Gaussian posterior like the ELBO does: mean within 0.1 sd, sds within 10 % (20,000 draws)."""
    G, A, y, sigma, exact = _linear_case()
    target = LatentTarget(G, A, y, sigma)
    fit = fit_flow(target, FlowSettings(progress=False, estimator="dreg", max_iter=1500),
                   torch.Generator().manual_seed(0))
    z = fit.draw(20000, torch.Generator().manual_seed(1)).double().numpy()
    assert np.max(np.abs(z.mean(0) - exact.latent_mean) / exact.latent_std) < 0.1
    assert np.max(np.abs(z.std(0) / exact.latent_std - 1)) < 0.10


def test_dreg_surrogate_gradient():
    """The DReG surrogate's gradient is sum_k w~_k^2 grad log w_k per group (checked against that formula
    computed by hand), its value the negative ELBO; with groups of one it is the ELBO's own gradient."""
    from ganflow.posterior.objectives import dreg_surrogate

    theta = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    log_w = torch.sin(3 * theta) + theta**2  # any differentiable log-weights
    loss = dreg_surrogate(log_w, 4)
    assert torch.allclose(loss, -log_w.mean())
    (grad,) = torch.autograd.grad(loss, theta)
    w = torch.softmax(log_w.detach().reshape(2, 4), 1).reshape(-1)
    dlw = (3 * torch.cos(3 * theta) + 2 * theta).detach()
    assert torch.allclose(grad, -(w * w) * dlw / 2)  # the mean over the 2 groups
    (grad1,) = torch.autograd.grad(dreg_surrogate(torch.sin(3 * theta) + theta**2, 1), theta)
    assert torch.allclose(grad1, -dlw / 8)
