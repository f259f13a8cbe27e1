"""Short-run Langevin posterior with a variationally chosen step size.

A batch of chains starts from ``q_0`` (the prior ``N(0, I_k)``, or any initial sampler such as a fitted flow)
and runs ``K`` unadjusted Langevin steps on the latent posterior (Nijkamp et al., ECCV 2020; Pang et al., EACL
2021):

    z_{t+1} = z_t + (s_t^2 / 2) grad log p(z_t | y) + s_t eps_t,     eps_t ~ N(0, I_k),

with no accept/reject; each chain's end point ``z_K`` is one draw of ``q_s``.

The chains run in an affine frame ``z = mu + L u`` (`WhitenedTarget`: the recursion above on ``u`` with ``log
p(y, mu + L u) + log|det L|``, so every KL below is the same in either frame). ``init = "laplace"`` (default)
takes ``mu`` and ``L L^T = (-Hessian)^-1`` from the flow's Laplace approximation and starts from ``u ~ N(0, I)``:
the posterior of ``u`` has unit scale in every direction, so one step size suits all of them, where unpreconditioned
chains from the prior cannot reach a posterior hundreds of times narrower in 20 steps. ``init = "flow"`` starts from
a fitted flow, in the frame of its draws' moments (`moment_frame`; the refiner); ``init = "prior"`` is the seed's
method (identity frame). An unadjusted step that is divergent (non-finite, or a Metropolis log ratio below
``-DIVERGENCE_NATS``) is refused and that chain's step halved. The step size ``s`` (``s_t = s``, or a geometric
decrease ``s_t = s * decay^(t / (K-1))``) is chosen by minimising an estimate of

    KL(q_s || p(z|y)) - log p(y) = E_q[log q_s(z_K) - log p(y, z_K)] = -H(q_s) - E_q[log p(y, z_K)]

(``log p(y)`` is unknown in general and does not depend on ``s``; the stored ``kl_estimates`` are this
negative ELBO). ``E_q[log p(y, z_K)]`` is a plain Monte-Carlo average; the entropy ``H(q_s)`` has no closed
form and is estimated in one of three ways (``LangevinSettings.entropy``):

``"path"`` -- condition on the noise.  Given ``eps_{0..K-1}`` the chain is a bijection ``z_0 -> z_K`` with
    Jacobian ``prod_t J_t``, ``J_t = I + (s_t^2/2) Hess log p(z_t|y)``, so
    ``log q(z_K | eps) = log q_0(z_0) - sum_t log|det J_t|`` exactly.  But ``E[-log q(z_K|eps)] = H(z_K | eps)
    = H(z_K) - I(z_K; eps)``: the entropy is *under*-estimated by the mutual information between the end point
    and the noise path, so the estimate is an upper bound on the KL (it is the KL between the joint laws of
    ``(z_K, eps)``).  The bias is not constant in ``s``: it grows as the chain forgets ``z_0`` (the injected
    noise then carries all of ``z_K``'s spread), so this estimator systematically picks too small a step size
    exactly when the chain mixes well (measured in docs/posteriors.md: about half the optimal ``s`` on
    linear_gaussian).  Kept as a diagnostic and a guaranteed bound (``trace["kl_path_bound"]``).
``"linearized"`` (default for ``k <= hessian_max_dim``) -- the same Jacobians, but the noise enters the
    entropy too: along each chain the step is linearised, ``z_{t+1} ~ J_t z_t + s_t eps_t``, and a covariance
    is propagated, ``C_0 = Cov(q_0)``, ``C_{t+1} = J_t C_t J_t^T + s_t^2 I``; ``H ~ mean_i 1/2 log det(2 pi e
    C_K^(i))``. Exact when ``log p(z|y)`` is quadratic (then ``q_s`` is Gaussian with covariance ``C_K``);
    otherwise a local Gaussian approximation, neither a bound (it ignores the entropy between modes, which
    errs towards a larger KL) nor exact.
``"gaussian"`` (default beyond ``hessian_max_dim``) -- the entropy of the Gaussian with the chains' sample
    covariance: an upper bound on ``H(q_s)`` (maximum entropy), so the KL is under-estimated for non-Gaussian
    ``q_s``; needs no Hessians and more chains than dimensions.

The Hessians are exact (``k`` double-backward passes per step), so ``"path"`` and ``"linearized"`` are limited
to ``k <= hessian_max_dim`` (64 by default).  A Hutchinson / power-series estimate of ``log det(I + h Hess)``
was not adopted: the series converges only for ``h |lambda_max| < 1`` while the KL-optimal step sits near the
stability limit ``h |lambda_max| ~ 1..2``, where it diverges.

The search is done with common random numbers (the same ``z_0`` and ``eps`` for every ``s``, so the estimated
curve is a smooth function of ``s``): a log-spaced grid over ``[search_min, search_max]``, then golden-section
refinement in ``log s`` between the grid neighbours of the best point.  Step sizes whose chains overflow count
as ``+inf``.  With ``mala = true`` each step is a Metropolis-adjusted Langevin proposal (asymptotically exact;
run longer chains); the step size is then still chosen on the unadjusted chain and the acceptance rate is
recorded.

With ``mala`` and ``leapfrog = L > 1`` each step is a Hamiltonian Monte Carlo transition instead: ``L`` leapfrog
steps of size ``s`` from a fresh momentum ``p ~ N(0, I)``, then one Metropolis test on the energy (``L = 1`` is
MALA). Where the local curvature varies across the posterior (phase retrieval: the local Hessian's eigenvalues
in the frame of the flow's moments span 0.1 .. 30, up to 130), MALA's step is set by the stiffest
direction and its moves are diffusive, so a soft direction takes ``~ 1 / (s^2 lambda)`` steps to relax; an HMC
trajectory moves ``~ L`` steps' distance for its ``L`` gradients. The KL of the unadjusted one-step chain says
nothing about an ``L``-step trajectory, so its step size is chosen by acceptance instead (`HMC_TARGET_ACCEPT`,
`_acceptance_step_size`).

Example:
    >>> import torch
    >>> from ganflow.problems.linear_gaussian import LinearGaussianProblem
    >>> from ganflow.posterior import LatentTarget
    >>> p = LinearGaussianProblem(latent_dim=4)
    >>> target = LatentTarget(p.generator(), p.make_operator(), torch.zeros(p.obs_shape), 0.5)
    >>> fit = run_langevin(target, LangevinSettings(n_samples=100, search_chains=64, search_grid=7,
    ...                    search_refine=4), torch.Generator().manual_seed(0))
    >>> fit.samples.shape
    torch.Size([100, 4])
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import GanflowError
from ..progress import Progress
from .base import LatentFit
from .target import LatentTarget

__all__ = ["LangevinSettings", "run_langevin", "langevin_kl_estimate", "HAND_SET_STEP_SIZE", "WhitenedTarget",
           "identity_frame", "laplace_frame", "moment_frame"]

# A typical hand-set short-run step size (K = 20 .. 40 steps of s = 0.1 in the short-run inference
# literature); what one would ship without the search, and the baseline the search is tested against.
HAND_SET_STEP_SIZE = 0.1

InitSampler = Callable[[int, torch.Generator], Tensor]


@dataclass(frozen=True)
class LangevinSettings:
    """Settings of `run_langevin` (TOML table ``[langevin]``).

    Args:
        n_steps: ``K``, Langevin steps per chain (20; use a few hundred with ``mala``).
        n_samples: number of chains in the final run = number of posterior draws.
        batch_size: chains run at once in the final run.
        step_size: a fixed ``s`` (skips the search); unset = choose ``s`` by minimising the KL estimate.
        step_decay: ``s_K-1 / s_0`` of a geometric step schedule, in ``(0, 1]`` (1 = constant step).
        search_min, search_max: the search interval for ``s``.
        search_grid: log-spaced grid points of the coarse search.
        search_refine: golden-section iterations after the grid (each shrinks the bracket by 0.618).
        search_chains: chains per KL estimate (common random numbers across step sizes).
        entropy: ``"auto"`` | ``"linearized"`` | ``"path"`` | ``"gaussian"`` (see the module docstring).
        hessian_max_dim: largest latent dimension for which exact Hessians are used.
        init: ``"laplace"`` (default: chains run in the whitened Laplace frame ``z = mu + L u``, started from
            ``u ~ N(0, I)``), ``"flow"`` (chains start from a fitted flow; the caller passes its sampler and
            may pass a frame, e.g. `moment_frame`) or ``"prior"`` (the seed's method: identity frame, prior
            start).
        map_starts, map_iter, map_restarts: the MAP search of ``init = "laplace"`` (as `FlowSettings`).
        mala: Metropolis-adjust every step (asymptotically exact; records the acceptance rate).
        leapfrog: with ``mala``, leapfrog steps per Metropolis test: 1 = MALA; ``L > 1`` = each of ``n_steps``
            is a Hamiltonian Monte Carlo trajectory of ``L`` gradients, its step size chosen by acceptance
            (module docstring).
        resample: with a start sampler whose density is known (the refiner: ``init_log_prob``), draw
            ``resample_pool`` times the chains from it and importance-resample them by ``p(y, z) / q(z)``
            (Pareto-smoothed weights, systematic resampling) before the chains run: a flow that is too narrow
            or off-centre is corrected by the weights, and the chains then separate the duplicates. Skipped
            (the raw draws are used, with a warning) when the weights' PSIS ``k_hat`` exceeds 0.7.
        resample_pool: the pool of start draws per chain (costs ``resample_pool`` forward evaluations per
            chain, without gradients).
    """

    n_steps: int = 20
    n_samples: int = 2000
    batch_size: int = 500
    step_size: float | None = None
    step_decay: float = 1.0
    search_min: float = 1e-3
    search_max: float = 2.0  # the Laplace frame has unit scale; its KL-optimal steps reach ~1
    search_grid: int = 13
    search_refine: int = 10
    search_chains: int = 256
    entropy: Literal["auto", "linearized", "path", "gaussian"] = "auto"
    hessian_max_dim: int = 64
    init: Literal["laplace", "flow", "prior"] = "laplace"
    map_starts: int = 8
    map_iter: int = 300
    map_restarts: int = 0
    mala: bool = False
    leapfrog: int = 1
    resample: bool = True
    resample_pool: int = 4

    def validate(self) -> None:
        """Raise `GanflowError` (one line) on an impossible setting."""
        if self.n_steps < 1:
            raise GanflowError(f"langevin.n_steps must be >= 1, got {self.n_steps}")
        if self.n_samples < 1:
            raise GanflowError(f"langevin.n_samples must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise GanflowError(f"langevin.batch_size must be >= 1, got {self.batch_size}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise GanflowError(f"langevin.step_size must be > 0, got {self.step_size}")
        if not (0 < self.step_decay <= 1):
            raise GanflowError(f"langevin.step_decay must be in (0, 1], got {self.step_decay}")
        if not (0 < self.search_min < self.search_max):
            raise GanflowError(
                "langevin.search_min and search_max need 0 < min < max, "
                f"got {self.search_min}, {self.search_max}"
            )
        if self.search_grid < 3:
            raise GanflowError(f"langevin.search_grid must be >= 3, got {self.search_grid}")
        if self.search_refine < 0:
            raise GanflowError(f"langevin.search_refine must be >= 0, got {self.search_refine}")
        if self.search_chains < 2:
            raise GanflowError(f"langevin.search_chains must be >= 2, got {self.search_chains}")
        if self.entropy not in ("auto", "linearized", "path", "gaussian"):
            raise GanflowError(
                f"langevin.entropy must be auto, linearized, path or gaussian, got {self.entropy!r}"
            )
        if self.hessian_max_dim < 1:
            raise GanflowError(f"langevin.hessian_max_dim must be >= 1, got {self.hessian_max_dim}")
        if self.init not in ("laplace", "flow", "prior"):
            raise GanflowError(f"langevin.init must be 'laplace', 'flow' or 'prior', got {self.init!r}")
        if self.map_starts < 1 or self.map_iter < 1:
            raise GanflowError("langevin.map_starts and langevin.map_iter must be >= 1")
        if self.map_restarts < 0:
            raise GanflowError(f"langevin.map_restarts must be >= 0, got {self.map_restarts}")
        if self.leapfrog < 1:
            raise GanflowError(f"langevin.leapfrog must be >= 1, got {self.leapfrog}")
        if self.leapfrog > 1 and not self.mala:
            raise GanflowError("langevin.leapfrog > 1 (Hamiltonian Monte Carlo) needs mala = true")
        if self.resample_pool < 1:
            raise GanflowError(f"langevin.resample_pool must be >= 1, got {self.resample_pool}")


class WhitenedTarget:
    """The latent posterior in an affine frame ``z = loc + L u``: ``log p(y, loc + L u) + log|det L|``.

    The Jacobian term makes this the density of ``u``, so KL estimates (and ``-ELBO``) computed in ``u`` equal
    those in ``z``. With the Laplace frame (``L L^T`` the inverse Hessian at the MAP) the posterior of ``u`` is
    ``N(0, I)`` up to its non-Gaussian part: every direction has unit scale, so one step size suits all of them
    (unpreconditioned chains from the prior cannot reach a posterior hundreds of times narrower in 20 steps).
    Every evaluation is one of the wrapped target's (``n_forward_evals`` is the target's own counter).

    Args:
        target: the latent posterior (`LatentTarget`).
        loc: ``[k]``; scale_tril: ``[k, k]`` lower triangular with a positive diagonal.
    """

    def __init__(self, target: LatentTarget, loc: Tensor, scale_tril: Tensor):
        dtype = target.y.dtype if target.y.is_floating_point() else torch.get_default_dtype()
        self.target = target
        self.loc = loc.detach().to(dtype).reshape(-1)
        self.scale_tril = scale_tril.detach().to(dtype)
        k = target.latent_dim
        if self.loc.shape != (k,) or self.scale_tril.shape != (k, k):
            raise GanflowError(f"langevin frame must be loc [{k}] and scale_tril [{k}, {k}], got "
                               f"{tuple(self.loc.shape)} and {tuple(self.scale_tril.shape)}")
        diag = torch.diagonal(self.scale_tril)
        if not (_finite(self.loc, self.scale_tril) and bool((diag > 0).all())):
            raise GanflowError("langevin frame: scale_tril needs a finite, positive diagonal")
        self.log_det = float(torch.log(diag.double()).sum())
        self.latent_dim = k
        self.y = target.y

    @property
    def n_forward_evals(self) -> int:
        return self.target.n_forward_evals

    def to_latent(self, u: Tensor) -> Tensor:
        """``z = loc + L u`` for ``u`` ``[N, k]``."""
        return self.loc + u @ self.scale_tril.T

    def to_frame(self, z: Tensor) -> Tensor:
        """``u = L^-1 (z - loc)`` for ``z`` ``[N, k]``."""
        return torch.linalg.solve_triangular(self.scale_tril, (z - self.loc).T, upper=False).T

    def log_joint(self, u: Tensor) -> Tensor:
        return self.target.log_joint(self.to_latent(u)) + self.log_det

    def log_joint_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            lp = self.log_joint(u)
            (g,) = torch.autograd.grad(lp.sum(), u)
        return lp.detach(), g


def identity_frame(target: LatentTarget) -> WhitenedTarget:
    """``z = u``: the unpreconditioned chain (``init = "prior"``, the seed's method)."""
    k = target.latent_dim
    return WhitenedTarget(target, torch.zeros(k), torch.eye(k))


def laplace_frame(target: LatentTarget, settings: LangevinSettings, generator: torch.Generator) -> WhitenedTarget:
    """The Laplace frame: the flow's screened multi-start MAP search and finite-difference Hessian
    (`ganflow.posterior.flow.laplace_approximation`), ``L L^T = (-Hessian)^-1`` at the most massive mode."""
    from .flow import FlowSettings, laplace_approximation

    fs = FlowSettings(map_starts=settings.map_starts, map_iter=settings.map_iter,
                      map_restarts=settings.map_restarts, progress=False)
    loc, scale_tril, _ = laplace_approximation(target, fs, generator)
    return WhitenedTarget(target, loc, scale_tril)


def moment_frame(sampler: InitSampler, generator: torch.Generator, n: int = 4000) -> tuple[Tensor, Tensor]:
    """``(loc, scale_tril)``: the sample mean and the Cholesky factor of the sample covariance of ``n`` draws of
    ``sampler`` (a fitted flow's; no target evaluations), the frame for chains that refine it.

    A flow is fitted to the whole posterior, its Laplace affine map only to the curvature at the MAP: on the
    non-Gaussian phase-retrieval posterior the reference covariance in the flow's Laplace frame has variances
    0.085 .. 46 (the chains' step is set by the narrowest direction, so the widest does not mix in hundreds of
    steps), in the frame of the flow's own moments 0.77 .. 3.5."""
    z = torch.as_tensor(sampler(n, generator)).detach().double()
    if z.ndim != 2 or z.shape[0] <= z.shape[1] or not _finite(z):
        raise GanflowError(f"langevin moment frame: need finite [n, k] draws with n > k, got {tuple(z.shape)}")
    k = z.shape[1]
    cov = torch.cov(z.T).reshape(k, k)
    # relative jitter: a (nearly) degenerate sampler still gives a usable factor
    cov = cov + 1e-10 * float(torch.diagonal(cov).mean()) * torch.eye(k, dtype=cov.dtype)
    return z.mean(0), torch.linalg.cholesky(cov)


def _schedule(step_size: float, n_steps: int, decay: float) -> list[float]:
    """``s_t = s * decay^(t / (K-1))``, t = 0..K-1."""
    if n_steps == 1:
        return [step_size]
    return [step_size * decay ** (t / (n_steps - 1)) for t in range(n_steps)]


def _grad_and_hessian(target: LatentTarget, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log p(y, z)`` ``[N]``, its gradient ``[N, k]`` and Hessian ``[N, k, k]`` (exact, ``k`` backward
    passes; rows of the batch are independent so one backward per coordinate serves every chain)."""
    k = z.shape[1]
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        lp = target.log_joint(z)
        (g,) = torch.autograd.grad(lp.sum(), z, create_graph=True)
        rows = [torch.autograd.grad(g[:, j].sum(), z, retain_graph=j < k - 1)[0] for j in range(k)]
    return lp.detach(), g.detach(), torch.stack(rows, 1).detach()


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _gaussian_logdet_cov(x: Tensor) -> float:
    """``log det`` of the sample covariance of ``x`` ``[N, k]`` (float64); ``-inf`` if singular."""
    c = torch.cov(x.double().T).reshape(x.shape[1], x.shape[1])
    sign, logdet = torch.linalg.slogdet(c)
    return float(logdet) if sign > 0 else -math.inf


def _start_law(z0: Tensor, init_is_prior: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Mean ``[k]``, covariance ``[k, k]`` and log-density ``[N]`` at ``z0`` of ``q_0`` (float64): ``N(0, I)``, or
    the Gaussian with ``z0``'s sample moments (a sampler's density is not available)."""
    k = z0.shape[1]
    eye = torch.eye(k, dtype=torch.float64)
    if init_is_prior:
        log_q0 = -0.5 * (z0.double() ** 2).sum(1) - 0.5 * k * math.log(2 * math.pi)
        return torch.zeros(k, dtype=torch.float64), eye, log_q0
    mean0 = z0.double().mean(0)
    # the jitter keeps a (nearly) degenerate initial sampler from giving log det = -inf
    cov0 = torch.cov(z0.double().T).reshape(k, k) + 1e-10 * eye
    return mean0, cov0, torch.distributions.MultivariateNormal(mean0, cov0).log_prob(z0.double())


def _value_grad_hessian(target: LatentTarget, z: Tensor, use_hessian: bool):
    """``(lp, g, hess or None, finite [N] bool)``, with the non-finite rows zeroed (a dead chain)."""
    if use_hessian:
        lp, g, hess = _grad_and_hessian(target, z)
    else:
        (lp, g), hess = target.log_joint_and_grad(z), None
    ok = torch.isfinite(lp) & torch.isfinite(g).all(1)
    if hess is not None:
        ok &= torch.isfinite(hess).flatten(1).all(1)
        hess = torch.where(ok[:, None, None], hess, 0.0)
    return torch.where(ok, lp, 0.0), torch.where(ok[:, None], g, 0.0), hess, ok


def _kl_from_chains(entropy: str, lp: Tensor, z: Tensor, cov: Tensor, dev: Tensor, path: Tensor) -> tuple:
    """``(kl, kl_path, log_w, terms)`` from the surviving chains' end points and linearised laws (float64);
    ``terms`` ``[N]``: each chain's contribution, whose mean is ``kl`` (for its Monte-Carlo error)."""
    k = z.shape[1]
    kl_path = float((path - lp).mean()) if entropy != "gaussian" else math.nan
    log_w = None
    if entropy == "path":
        terms = path - lp
    elif entropy == "linearized":
        sign, logdet = torch.linalg.slogdet(cov)
        terms = -0.5 * (logdet + k * math.log(2 * math.pi * math.e)) - lp
        if not bool((sign > 0).all()):
            terms = torch.full_like(lp, math.inf)
        else:
            quad = (dev[:, None, :] @ torch.linalg.solve(cov, dev[:, :, None]))[:, 0, 0]
            log_w = (lp + 0.5 * (logdet + k * math.log(2 * math.pi)) + 0.5 * quad).numpy()
    else:
        terms = -0.5 * (_gaussian_logdet_cov(z) + k * math.log(2 * math.pi * math.e)) - lp
    kl = float(terms.mean())
    return (kl if math.isfinite(kl) else math.inf), kl_path, log_w, terms


def langevin_kl_estimate(
    target: LatentTarget,
    step_size: float,
    z0: Tensor,
    noise: Tensor,
    step_decay: float = 1.0,
    entropy: Literal["linearized", "path", "gaussian"] = "linearized",
    init_is_prior: bool = True,
    max_lost: float = 0.0,
) -> dict:
    """Estimate ``KL(q_s || p(z|y)) - log p(y)`` from given start points and noise (common random numbers).

    Args:
        target: the latent posterior.
        step_size: ``s`` (the first step of the schedule).
        z0: ``[N, k]`` start points drawn from ``q_0``.
        noise: ``[K, N, k]`` standard normal ``eps_t``.
        step_decay: see `LangevinSettings`.
        entropy: ``"linearized"``, ``"path"`` or ``"gaussian"`` (module docstring).
        init_is_prior: ``q_0 = N(0, I)``; otherwise ``q_0`` is replaced by the Gaussian with ``z0``'s sample
            mean and covariance in the entropy term (its density is not available from a sampler).
        max_lost: the fraction of chains that may be lost to a non-finite value or a divergent step (see
            `DIVERGENCE_NATS`; the final run backs those off) before the estimate is ``inf``; the estimate is
            over the others.

    Returns:
        ``{"kl", "kl_path", "failed_step", "log_w", "lost"}``: the estimate with the chosen entropy, the
        noise-conditioned upper bound (``nan`` for ``"gaussian"``, which computes no Hessians), the step at
        which too many chains were lost (then both are ``inf``; else None), with ``"linearized"`` each
        surviving chain's log importance weight ``log p(y, z_K) - log q(z_K)``, where ``q`` is the chain's
        linearised law ``N(z_K + d_K, C_K)``: ``d_0 = mean(q_0) - z_0``, ``d_{t+1} = J_t d_t - s_t eps_t``
        (exact on a linear-Gaussian target), for the PSIS ``k_hat`` of the draws; and the chains lost.
    """
    N, k = z0.shape
    steps = _schedule(step_size, noise.shape[0], step_decay)
    use_hessian = entropy in ("linearized", "path")
    eye = torch.eye(k, dtype=torch.float64)
    mean0, cov0, log_q0 = _start_law(z0, init_is_prior)
    cov, dev = cov0.expand(N, k, k).clone(), mean0 - z0.double()  # linearised law: covariance, mean - chain
    path_logdet = torch.zeros(N, dtype=torch.float64)
    alive, z, prev = torch.ones(N, dtype=torch.bool), z0.clone(), None
    for t in range(len(steps) + 1):
        lp, g, hess, ok = _value_grad_hessian(target, z, use_hessian and t < len(steps))
        if prev is not None:  # was the step into z divergent?
            ok &= torch.nan_to_num(_log_mh_ratio(*prev[:2], lp, g, prev[2], z, noise[t - 1], steps[t - 1]),
                                   nan=-math.inf) > -DIVERGENCE_NATS
        alive &= ok
        if int((~alive).sum()) > max_lost * N:
            return {"kl": math.inf, "kl_path": math.inf, "failed_step": t, "log_w": None,
                    "lost": int((~alive).sum()), "terms": None}
        if t == len(steps):
            break
        s = steps[t]
        if use_hessian:
            J = eye + 0.5 * s * s * hess.double()
            cov = J @ cov @ J.transpose(1, 2) + (s * s) * eye
            dev = (J @ dev[:, :, None])[:, :, 0] - s * noise[t].double()
            path_logdet += torch.linalg.slogdet(J).logabsdet
        prev = (lp, g, torch.where(alive[:, None], z, 0.0))
        z = prev[2] + 0.5 * s * s * g + s * noise[t]
    a = alive
    kl, kl_path, log_w, terms = _kl_from_chains(entropy, lp.double()[a], z[a], cov[a], dev[a],
                                                (log_q0 - path_logdet)[a])
    per_chain = torch.full((N,), math.nan, dtype=torch.float64)
    per_chain[a] = terms
    return {"kl": kl, "kl_path": kl_path, "failed_step": None, "log_w": log_w, "lost": int((~a).sum()),
            "terms": per_chain.numpy()}


def _golden_section(f: Callable[[float], float], a: float, b: float, n_iter: int) -> None:
    """Shrink ``[a, b]`` around a minimum of ``f`` (values are recorded by ``f`` itself)."""
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(n_iter):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)


def _draw_start(n: int, frame: WhitenedTarget, init: InitSampler | None, generator: torch.Generator,
                dtype) -> Tensor:
    """Start points in the chain's frame: ``N(0, I)`` there, or ``init``'s draws mapped into it."""
    k = frame.latent_dim
    if init is None:
        return torch.randn(n, k, generator=generator, dtype=dtype)
    z0 = torch.as_tensor(init(n, generator)).detach().to(dtype)
    if z0.shape != (n, k):
        raise GanflowError(f"langevin init sampler returned shape {tuple(z0.shape)}, expected ({n}, {k})")
    if not _finite(z0):
        raise GanflowError("langevin init sampler returned non-finite latent vectors")
    return frame.to_frame(z0)


# PSIS's reliability limit (Vehtari et al. 2024): above it the smoothed weights do not give a usable estimate
RESAMPLE_MAX_KHAT = 0.7
# Defensive importance sampling (Hesterberg 1995): a quarter of the pool comes from the frame's Gaussian widened
# 1.5x, and every draw is weighted against the mixture of the two laws. A reverse-KL flow errs narrow, and weights
# p/q from a too-narrow q have infinite variance (measured: a start 30 % too narrow in 8 dimensions gave PSIS
# k_hat 0.76-0.87, unusable); the wide component bounds them.
DEFENSIVE_FRACTION = 0.25
DEFENSIVE_WIDEN = 1.5


def _systematic_resample(log_w: np.ndarray, n: int, generator: torch.Generator) -> Tensor:
    """``n`` indices drawn by systematic resampling with normalised weights ``exp(log_w)``."""
    cdf = torch.as_tensor(np.cumsum(np.exp(log_w - log_w.max())), dtype=torch.float64)
    u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    return torch.searchsorted(cdf / cdf[-1], u).clamp_max(len(cdf) - 1)


def _defensive_pool(init: InitSampler, log_prob: Callable[[Tensor], Tensor], frame: WhitenedTarget, m: int,
                    generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
    """``m`` pool draws and their log density under the deterministic mixture of ``init`` and the frame's
    Gaussian widened ``DEFENSIVE_WIDEN`` times (``DEFENSIVE_FRACTION`` of the draws)."""
    m_wide = int(round(DEFENSIVE_FRACTION * m))
    z = torch.as_tensor(init(m - m_wide, generator)).detach()
    u = DEFENSIVE_WIDEN * torch.randn(m_wide, frame.latent_dim, generator=generator, dtype=frame.loc.dtype)
    z = torch.cat([z.to(frame.loc.dtype), frame.to_latent(u)])
    wide = torch.distributions.MultivariateNormal(frame.loc.double(), scale_tril=DEFENSIVE_WIDEN
                                                  * frame.scale_tril.double())
    with torch.no_grad():
        lq = torch.cat([log_prob(c) for c in z.split(batch_size)]).double()
    a = (m - m_wide) / m
    log_mix = torch.logaddexp(math.log(a) + lq, math.log1p(-a) + wide.log_prob(z.double()))
    return z, log_mix


def importance_resampler(target: LatentTarget, init: InitSampler, log_prob: Callable[[Tensor], Tensor],
                         frame: WhitenedTarget, pool: int, batch_size: int, record: dict) -> InitSampler:
    """A start sampler that draws a pool of ``pool * n`` points (`_defensive_pool`: ``init``, density
    ``log_prob``, and the frame's widened Gaussian) and keeps ``n`` by systematic resampling with PSIS-smoothed
    weights ``p(y, z) / q_mix(z)``; ``init``'s raw draws when ``k_hat > RESAMPLE_MAX_KHAT`` (with a warning).
    ``record`` receives the last call's ``khat`` and ``ess_ratio`` (of the smoothed weights) and whether it
    ``resampled``."""
    from ..diagnostics import psis

    def sample(n: int, generator: torch.Generator) -> Tensor:
        z, lq = _defensive_pool(init, log_prob, frame, pool * n, generator, batch_size)
        with torch.no_grad():
            lp = torch.cat([target.log_joint(c) for c in z.split(batch_size)]).double()
        log_w = torch.nan_to_num(lp - lq, nan=-math.inf, posinf=-math.inf).numpy()
        if not np.isfinite(log_w).any():
            raise GanflowError("langevin resample: no start draw has a finite posterior density")
        ps = psis(log_w)
        ok = ps.khat <= RESAMPLE_MAX_KHAT
        record.update({"khat": float(ps.khat), "ess_ratio": float(ps.ess_ratio), "resampled": bool(ok)})
        if not ok:
            warnings.warn(f"langevin resample: PSIS k_hat {ps.khat:.2f} > {RESAMPLE_MAX_KHAT} (the start "
                          "sampler misses the posterior); the chains start from its raw draws",
                          RuntimeWarning, stacklevel=2)
            return z[:n]
        return z[_systematic_resample(ps.log_weights, n, generator)]

    return sample


def _largest_within_one_se(curve: dict[float, dict]) -> float:
    """The largest step size whose KL estimate is within one Monte-Carlo standard error of the smallest one
    (the error of the per-chain difference, common random numbers). Where the start is already close (the
    Laplace frame) the curve is flat within its noise, and its argmin a random pick; the largest of the
    indistinguishable steps mixes the most, so it corrects the most of the start's error. Used with MALA only:
    an unadjusted chain's variance grows with the step (measured: 20 % too wide a sd on linear_gaussian)."""
    best = min(curve, key=lambda s: curve[s]["kl"])
    chosen = best
    for s, c in curve.items():
        if s <= chosen or not math.isfinite(c["kl"]) or c["terms"] is None:
            continue
        diff = c["terms"] - curve[best]["terms"]
        diff = diff[np.isfinite(diff)]
        if len(diff) > 1 and c["kl"] - curve[best]["kl"] <= diff.std(ddof=1) / math.sqrt(len(diff)):
            chosen = s
    return chosen


def _psis_khat(log_w) -> float | None:
    if log_w is None:
        return None
    from ..diagnostics import psis

    return float(psis(np.where(np.isnan(log_w), -np.inf, log_w)).khat)


def _search_step_size(target: WhitenedTarget, settings: LangevinSettings, entropy: str,
                      init: InitSampler | None, generator: torch.Generator, dtype,
                      warn_low: bool = True) -> tuple[float, dict]:
    """Minimise the KL estimate over ``log s`` with common random numbers; returns ``s`` and the curve.
    ``warn_low``: warn when the minimum is at ``search_min`` (not for a start that is already the chain's best
    approximation, e.g. the Laplace start on a Gaussian posterior)."""
    k, K, N = target.latent_dim, settings.n_steps, settings.search_chains
    z0 = _draw_start(N, target, init, generator, dtype)
    noise = torch.randn(K, N, k, generator=generator, dtype=dtype)
    curve: dict[float, dict] = {}

    def objective(s: float) -> float:
        if s not in curve:
            curve[s] = langevin_kl_estimate(target, s, z0, noise, settings.step_decay, entropy, init is None,
                                            max_lost=SEARCH_MAX_LOST)
        return curve[s]["kl"]

    if settings.step_size is not None:
        objective(settings.step_size)
        chosen = settings.step_size
    else:
        grid = np.linspace(math.log(settings.search_min), math.log(settings.search_max), settings.search_grid)
        values = [objective(math.exp(x)) for x in grid]
        if not any(math.isfinite(v) for v in values):
            t = min(c["failed_step"] for c in curve.values() if c["failed_step"] is not None)
            raise GanflowError(
                f"langevin: non-finite gradient at step {t} for every step size in "
                f"[{settings.search_min:g}, {settings.search_max:g}] (check the target, or lower search_min)"
            )
        i = int(np.argmin(values))
        if i == len(grid) - 1 or (i == 0 and warn_low):
            warnings.warn(
                f"langevin: the KL estimate is smallest at the search bound s = {math.exp(grid[i]):.3g}; "
                "widen [langevin] search_min / search_max",
                RuntimeWarning,
                stacklevel=3,
            )
        lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
        if settings.search_refine > 0:
            _golden_section(lambda log_s: objective(math.exp(log_s)), lo, hi, settings.search_refine)
        # with MALA a larger step costs no bias (the Metropolis test corrects it), only acceptance
        chosen = _largest_within_one_se(curve) if settings.mala else min(curve, key=lambda s: curve[s]["kl"])
    ordered = sorted(curve)
    info = {
        "step_sizes": np.array(ordered, dtype=np.float64),
        "kl_estimates": np.array([curve[s]["kl"] for s in ordered], dtype=np.float64),
        "kl_path_bound": np.array([curve[s]["kl_path"] for s in ordered], dtype=np.float64),
        # the search objective in evaluation order (dicts keep insertion order)
        "loss": np.array([c["kl"] for c in curve.values()], dtype=np.float64),
        "kl_estimate": curve[chosen]["kl"],
        # the search's chains at the chosen s are independent draws of q_s: their PSIS k_hat costs nothing more
        "psis_khat": _psis_khat(curve[chosen]["log_w"]),
    }
    return chosen, info


# An unadjusted step is *divergent* when its proposal is not finite or when its Metropolis log ratio (the
# MALA acceptance the step would get) is below -DIVERGENCE_NATS: the energy-error threshold of Stan's NUTS
# divergences. At a usable step size the ratio is O(1) in the bulk; prior-tail chains on a stiff, curved
# posterior overshoot by thousands of nats and then overflow. A divergent chain keeps its state and halves its
# own step; if more than MAX_BACKOFF_FRACTION of the chains needed that, the step size itself is wrong and the
# run stops with an error.
DIVERGENCE_NATS = 1000.0
MAX_BACKOFF_FRACTION = 0.05
# the step-size search tolerates half that (an estimate over the surviving chains), so that the final run,
# with more chains, rarely crosses the limit
SEARCH_MAX_LOST = 0.5 * MAX_BACKOFF_FRACTION


def _log_mh_ratio(lp, g, lp_new, g_new, z, proposal, eps, s: Tensor | float) -> Tensor:
    """``log alpha`` of the Langevin proposal ``z' = z + (s^2/2) g + s eps`` (``s`` a float or ``[N, 1]``)."""
    h = 0.5 * s * s
    fwd = (eps * eps).sum(1)  # |z' - z - h g|^2 / s^2
    back = ((z - proposal - h * g_new) ** 2 / (s * s)).sum(1)
    return lp_new - lp - 0.5 * back + 0.5 * fwd


def _ula_step(target: WhitenedTarget, z: Tensor, lp: Tensor, g: Tensor, s: Tensor, generator: torch.Generator):
    """One unadjusted step with per-chain step sizes ``s`` ``[N]``; a divergent chain (see `DIVERGENCE_NATS`)
    keeps its state and halves its step. Returns ``(z, lp, g, s, divergent [N] bool)``."""
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    sc = s[:, None]
    proposal = z + 0.5 * sc * sc * g + sc * eps
    lp_new, g_new = target.log_joint_and_grad(proposal)
    log_alpha = _log_mh_ratio(lp, g, lp_new, g_new, z, proposal, eps, sc)
    ok = torch.isfinite(g_new).all(1) & torch.isfinite(proposal).all(1) & (
        torch.nan_to_num(log_alpha, nan=-math.inf) > -DIVERGENCE_NATS)
    z = torch.where(ok[:, None], proposal, z)
    lp, g = torch.where(ok, lp_new, lp), torch.where(ok[:, None], g_new, g)
    return z, lp, g, torch.where(ok, s, 0.5 * s), ~ok


def _mala_step(target: WhitenedTarget, z: Tensor, lp: Tensor, g: Tensor, s: float, generator: torch.Generator):
    """One Metropolis-adjusted step. Returns ``(z, lp, g, accepted [N] bool)``."""
    h = 0.5 * s * s
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    proposal = z + h * g + s * eps
    lp_new, g_new = target.log_joint_and_grad(proposal)
    u = torch.rand(z.shape[0], generator=generator, dtype=z.dtype)
    log_alpha = _log_mh_ratio(lp, g, lp_new, g_new, z, proposal, eps, s)
    # a proposal with a non-finite density or gradient is rejected, as Metropolis-Hastings prescribes
    ok = torch.isfinite(lp_new) & torch.isfinite(g_new).all(1)
    accept = ok & (torch.log(u) < torch.nan_to_num(log_alpha, nan=-math.inf))
    z = torch.where(accept[:, None], proposal, z)
    return z, torch.where(accept, lp_new, lp), torch.where(accept[:, None], g_new, g), accept


def _trajectory(target: WhitenedTarget, z: Tensor, g: Tensor, p: Tensor, s: Tensor | float, n_leapfrog: int):
    """``n_leapfrog`` leapfrog steps of size ``s`` (a float or ``[N, 1]``) from ``(z, p)`` (``g`` the gradient at
    ``z``): the end point, its log density, gradient and momentum."""
    q, gq, lq = z, g, None
    for _ in range(n_leapfrog):
        p = p + 0.5 * s * gq
        q = q + s * p
        lq, gq = target.log_joint_and_grad(q)
        p = p + 0.5 * s * gq
    return q, lq, gq, p


def _hmc_log_ratio(lp: Tensor, p: Tensor, lp_end: Tensor, p_end: Tensor) -> Tensor:
    """``log`` of the Metropolis ratio of a trajectory: minus the change of the energy ``-log p + |p|^2 / 2``."""
    return lp_end - lp - 0.5 * ((p_end * p_end).sum(1) - (p * p).sum(1))


def _hmc_step(target: WhitenedTarget, z: Tensor, lp: Tensor, g: Tensor, s: float, n_leapfrog: int,
              generator: torch.Generator):
    """One Hamiltonian Monte Carlo transition (fresh momentum, ``n_leapfrog`` leapfrog steps of each chain's
    jittered step, see `HMC_STEP_JITTER`; Metropolis test on the energy). Returns ``(z, lp, g, accepted [N]
    bool)``."""
    p = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    u = torch.rand(z.shape[0], 1, generator=generator, dtype=z.dtype)
    q, lq, gq, p_end = _trajectory(target, z, g, p, s * (1 + HMC_STEP_JITTER * (2 * u - 1)), n_leapfrog)
    u = torch.rand(z.shape[0], generator=generator, dtype=z.dtype)
    log_alpha = _hmc_log_ratio(lp, p, lq, p_end)
    ok = torch.isfinite(lq) & torch.isfinite(gq).all(1)
    accept = ok & (torch.log(u) < torch.nan_to_num(log_alpha, nan=-math.inf))
    z = torch.where(accept[:, None], q, z)
    return z, torch.where(accept, lq, lp), torch.where(accept[:, None], gq, g), accept


# HMC's acceptance rate at its optimal step is 0.651 on product targets as k -> inf (Beskos et al., Bernoulli 2013);
# rough targets want more (Stan's NUTS adapts to 0.8). Measured on phase retrieval (L = 16): 0.70 at s = 0.12 in
# the flow's moment frame, 0.61 at s = 0.15.
HMC_TARGET_ACCEPT = 0.7
# A fixed trajectory length turns a near-Gaussian direction by the same angle every transition and can come back
# where it started (measured: 8-d linear Gaussian, L = 8 at s = 3.0, still 0.29 sd off after 20 transitions
# where MALA was 0.05): each chain's step is drawn uniformly within +-HMC_STEP_JITTER of ``s`` (Neal 2011, 5.4.2.2).
HMC_STEP_JITTER = 0.2
# the bisection stops when its bracket is this narrow (relative): ~8 trajectories per chain from [1e-3, 2]
ACCEPT_SEARCH_TOL = 0.05


def _acceptance_step_size(target: WhitenedTarget, settings: LangevinSettings, init: InitSampler | None,
                          generator: torch.Generator, dtype) -> tuple[float, dict]:
    """The HMC step size whose mean Metropolis acceptance probability over one trajectory from
    ``search_chains`` start points is `HMC_TARGET_ACCEPT`: bisection in ``log s`` over ``[search_min,
    search_max]`` with common random numbers (the same starts and momenta for every ``s``, so the acceptance is
    a smooth and, up to its Monte-Carlo noise, decreasing function of ``s``); returns the lower end of the final
    bracket and the curve."""
    z0 = _draw_start(settings.search_chains, target, init, generator, dtype)
    p0 = torch.randn(z0.shape, generator=generator, dtype=dtype)
    lp0, g0 = target.log_joint_and_grad(z0)
    curve: dict[float, float] = {}

    def acceptance(s: float) -> float:
        _, lq, _, p = _trajectory(target, z0, g0, p0, s, settings.leapfrog)
        log_alpha = torch.nan_to_num(_hmc_log_ratio(lp0, p0, lq, p), nan=-math.inf)
        curve[s] = float(torch.exp(log_alpha.clamp(max=0.0)).double().mean())
        return curve[s]

    if settings.step_size is not None:
        acceptance(settings.step_size)
        chosen = settings.step_size
    else:
        lo, hi = math.log(settings.search_min), math.log(settings.search_max)
        while hi - lo > math.log1p(ACCEPT_SEARCH_TOL):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if acceptance(math.exp(mid)) >= HMC_TARGET_ACCEPT else (lo, mid)
        chosen = math.exp(lo)
    ordered = sorted(curve)
    info = {"step_sizes": np.array(ordered, dtype=np.float64),
            "search_acceptance": np.array([curve[s] for s in ordered], dtype=np.float64),
            "kl_estimate": math.nan, "psis_khat": None}
    return chosen, info


def _run_chains(target: WhitenedTarget, z: Tensor, steps: list[float], mala: bool, generator: torch.Generator,
                sums: dict[str, np.ndarray], leapfrog: int = 1) -> tuple[Tensor, int]:
    """Run one batch of chains; accumulate the per-step sums of the log joint, (MALA) acceptances and
    non-finite proposals in ``sums``. Returns the end points and the number of chains that backed off."""
    lp, g = target.log_joint_and_grad(z)
    if not _finite(lp, g):
        raise GanflowError(f"langevin: non-finite gradient at step 0 (step size {steps[0]:.3g})")
    scale = torch.ones(z.shape[0], dtype=z.dtype)  # per-chain step multiplier (halved on a non-finite step)
    for t, s in enumerate(steps):
        if mala:
            if leapfrog > 1:
                z, lp, g, accept = _hmc_step(target, z, lp, g, s, leapfrog, generator)
            else:
                z, lp, g, accept = _mala_step(target, z, lp, g, s, generator)
            sums["accept"][t] += float(accept.double().sum())
        else:
            z, lp, g, step, failed = _ula_step(target, z, lp, g, s * scale, generator)
            scale = step / s
            sums["nonfinite"][t] += float(failed.double().sum())
        sums["log_joint"][t] += float(lp.double().sum())
    return z, int((scale < 1).sum())


def _check_backoff(n_backed: int, n: int, sums: dict[str, np.ndarray], steps: list[float]) -> None:
    """Stop when more than `MAX_BACKOFF_FRACTION` of the chains needed a smaller step."""
    if n_backed > MAX_BACKOFF_FRACTION * n:
        t = int(np.flatnonzero(sums["nonfinite"])[0])
        raise GanflowError(
            f"langevin: non-finite gradient at step {t} (or a divergent step) in {n_backed} of {n} chains "
            f"(step size {steps[t]:.3g}); lower step_size or search_max"
        )


def _resolve_entropy(settings: LangevinSettings, k: int) -> str:
    entropy = settings.entropy
    if entropy == "auto":
        entropy = "linearized" if k <= settings.hessian_max_dim else "gaussian"
    if entropy in ("linearized", "path") and k > settings.hessian_max_dim:
        raise GanflowError(
            f"langevin.entropy = '{entropy}' needs exact Hessians, but latent_dim {k} > hessian_max_dim "
            f"{settings.hessian_max_dim}; use entropy = 'gaussian' or raise hessian_max_dim"
        )
    if entropy == "gaussian" and settings.search_chains <= 2 * k:
        raise GanflowError(
            f"langevin.entropy = 'gaussian' needs search_chains > 2 * latent_dim = {2 * k}, "
            f"got {settings.search_chains}"
        )
    return entropy


def _chain_frame(target: LatentTarget, settings: LangevinSettings, init: InitSampler | None,
                 frame: tuple[Tensor, Tensor] | None, generator: torch.Generator) -> tuple[WhitenedTarget, str]:
    """The frame the chains run in, and its name: a given one, the Laplace frame, or the identity."""
    if settings.init == "flow" and init is None:
        raise GanflowError("langevin.init = 'flow' needs a fitted flow's sampler (`solve` fits the [flow] first)")
    if frame is not None:
        if init is None and settings.init == "prior":
            raise GanflowError("langevin: a frame applies to init 'laplace' or 'flow', not 'prior'")
        return WhitenedTarget(target, *frame), "given"
    if init is None and settings.init == "laplace":
        return laplace_frame(target, settings, generator), "laplace"
    return identity_frame(target), "identity"


def run_langevin(target: LatentTarget, settings: LangevinSettings | None = None,
                 generator: torch.Generator | None = None, init: InitSampler | None = None,
                 frame: tuple[Tensor, Tensor] | None = None,
                 init_log_prob: Callable[[Tensor], Tensor] | None = None, progress: bool = True) -> LatentFit:
    """Short-run Langevin posterior draws with a KL-optimal step size (see the module docstring); ``progress``
    reports the final run's chains on stderr (`ganflow.progress`).

    Args:
        target: the latent posterior.
        settings: `LangevinSettings` (defaults if None).
        generator: the source of all randomness (MAP starts, start points, search noise, chain noise).
        init: ``init(n, generator) -> [n, k]`` start points (e.g. a fitted flow's sampler); None = ``N(0, I)``
            in the chain's frame (the Laplace approximation for ``init = "laplace"``, the prior for ``"prior"``).
        frame: ``(loc [k], scale_tril [k, k])``: run the chains in ``z = loc + L u`` (e.g. `moment_frame` of a
            flow's sampler, or its Laplace affine map ``flow.loc, flow.scale_tril``); None = the Laplace frame
            for ``init = "laplace"`` without a sampler, else the identity.
        init_log_prob: ``log q(z)`` ``[n]`` of ``init``'s draws (e.g. ``flow.log_prob``); with
            ``settings.resample`` the starts are importance-resampled from a pool (`importance_resampler`).

    Returns:
        A `LatentFit` with ``samples`` ``[n_samples, k]``; ``trace``: ``step_sizes``, ``kl_estimates``,
        ``kl_path_bound`` (sorted by ``s``), ``loss`` (the search objective in evaluation order; with
        ``leapfrog > 1`` ``step_sizes`` and ``search_acceptance`` instead), ``mean_log_joint`` per step of the
        final run (and ``acceptance`` per step with MALA); ``attrs``: ``step_size``, ``n_steps``,
        ``kl_estimate`` (``KL - log p(y)`` at the chosen ``s``; nan with ``leapfrog > 1``), ``entropy``,
        ``step_decay``, ``mala``, ``leapfrog``, ``init`` (``"sampler"`` when one is given), ``frame`` (``"laplace"``,
        ``"given"``, ``"identity"``), ``backed_off_chains`` (and ``acceptance_rate`` with MALA; ``psis_khat``
        with the linearised entropy: the PSIS shape of the search's chains at the chosen ``s``, weights from
        their linearised laws; with resampled starts ``start_khat``, ``start_ess_ratio`` and
        ``start_resampled`` of the final run's last batch). ``n_forward_evals`` counts the evaluations made by
        this call (MAP search, step-size search and final run), not those made on ``target`` before it.
    """
    settings = settings or LangevinSettings()
    settings.validate()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    entropy = _resolve_entropy(settings, target.latent_dim)
    dtype = target.y.dtype if target.y.is_floating_point() else torch.get_default_dtype()
    evals0 = target.n_forward_evals
    t0 = time.perf_counter()
    chain_target, frame_name = _chain_frame(target, settings, init, frame, generator)
    resampling: dict = {}
    if init is not None and init_log_prob is not None and settings.resample:
        init = importance_resampler(target, init, init_log_prob, chain_target, settings.resample_pool,
                                    settings.batch_size, resampling)
    if settings.leapfrog > 1:
        step_size, info = _acceptance_step_size(chain_target, settings, init, generator, dtype)
    else:
        step_size, info = _search_step_size(chain_target, settings, entropy, init, generator, dtype,
                                            warn_low=frame_name == "identity" and init is None)
    steps = _schedule(step_size, settings.n_steps, settings.step_decay)
    samples, sums, n_backed = _final_run(chain_target, settings, steps, init, generator, dtype, progress)
    trace = {key: info[key] for key in ("step_sizes", "kl_estimates", "kl_path_bound", "loss",
                                        "search_acceptance") if key in info}
    trace["mean_log_joint"] = sums["log_joint"] / settings.n_samples - chain_target.log_det  # log p(y, z)
    attrs = {
        "step_size": float(step_size),
        "n_steps": settings.n_steps,
        "kl_estimate": float(info["kl_estimate"]),
        "entropy": entropy,
        "step_decay": settings.step_decay,
        "mala": settings.mala,
        "leapfrog": settings.leapfrog,
        "init": settings.init if init is None else "sampler",
        "frame": frame_name,
        "backed_off_chains": n_backed,
    }
    attrs.update({f"start_{key}": value for key, value in resampling.items()})
    if info["psis_khat"] is not None and not settings.mala:  # the weights are the unadjusted chain's
        attrs["psis_khat"] = info["psis_khat"]
    if settings.mala:
        trace["acceptance"] = sums["accept"] / settings.n_samples
        attrs["acceptance_rate"] = float(sums["accept"].sum() / (settings.n_samples * settings.n_steps))
    return LatentFit(
        method="langevin",
        samples=chain_target.to_latent(samples).detach(),
        trace=trace,
        attrs=attrs,
        settings=dataclasses.asdict(settings),
        n_forward_evals=target.n_forward_evals - evals0,
        wall_time_s=time.perf_counter() - t0,
    )


def _final_run(target: WhitenedTarget, settings: LangevinSettings, steps: list[float], init: InitSampler | None,
               generator: torch.Generator, dtype, progress: bool = True) -> tuple[Tensor, dict, int]:
    """The ``n_samples`` chains in batches: end points in the frame, the per-step sums, chains backed off."""
    K = settings.n_steps
    sums = {"log_joint": np.zeros(K), "accept": np.zeros(K), "nonfinite": np.zeros(K)}
    draws, n_backed = [], 0
    with Progress(settings.n_samples, "langevin", enabled=progress, unit="chain") as bar:
        for start in range(0, settings.n_samples, settings.batch_size):
            n = min(settings.batch_size, settings.n_samples - start)
            u0 = _draw_start(n, target, init, generator, dtype)
            u, backed = _run_chains(target, u0, steps, settings.mala, generator, sums, settings.leapfrog)
            draws.append(u)
            n_backed += backed
            if settings.mala:
                bar.set_postfix(acceptance=f"{sums['accept'].sum() / ((start + n) * K):.2f}")
            bar.update(n)
    _check_backoff(n_backed, settings.n_samples, sums, steps)
    return torch.cat(draws), sums, n_backed
