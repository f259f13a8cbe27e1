"""The step size of short-run chains. Langevin: the seed's variational choice, the ``s`` that minimises an
estimate of ``KL(q_K || p)`` of the ``K``-step chain (`langevin_kl_estimate`; a log grid, golden-section refinement,
then the largest ``s`` within one standard error of the best). HMC trajectories: the ``s`` whose acceptance is
`HMC_TARGET_ACCEPT` (the one-step KL says nothing about an ``L``-step trajectory).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import GanflowError
from .frames import WhitenedTarget, draw_start
from .kernels import DIVERGENCE_NATS, hmc_log_ratio, leapfrog, mh_log_ratio
from .resampling import psis_khat
from .target import LatentTarget

__all__ = ["langevin_kl_estimate", "search_step_size", "acceptance_step_size", "step_schedule", "HMC_TARGET_ACCEPT",
           "MAX_BACKOFF_FRACTION", "SEARCH_MAX_LOST"]

if TYPE_CHECKING:
    from .frames import InitSampler, WhitenedTarget
    from .langevin import LangevinSettings


def step_schedule(step_size: float, n_steps: int, decay: float) -> list[float]:
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


def twice_differentiable(target: LatentTarget) -> bool:
    """Whether autograd can take the Hessian of ``log p(y, z)``: False where a part of the model refuses a second
    derivative (a RuntimeError that says "twice": the elliptic solver's adjoint, whose Hessian would otherwise be
    wrong, not absent). One probe at ``z = 0``: a gradient with ``create_graph`` and one row of the Hessian, not
    all ``k``. (torch's ``once_differentiable`` cannot be detected this way: ``autograd.grad`` prunes its error.)"""
    evals = target.n_forward_evals  # the probe is not the method's work: it leaves the count as it was
    try:
        with torch.enable_grad():
            z = torch.zeros(1, target.latent_dim, requires_grad=True)
            (g,) = torch.autograd.grad(target.log_joint(z).sum(), z, create_graph=True)
            torch.autograd.grad(g[0, 0], z, allow_unused=True)
    except RuntimeError as err:
        if "twice" in str(err):
            return False
        raise
    finally:
        target.n_forward_evals = evals
    return True


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
    steps = step_schedule(step_size, noise.shape[0], step_decay)
    use_hessian = entropy in ("linearized", "path")
    eye = torch.eye(k, dtype=torch.float64)
    mean0, cov0, log_q0 = _start_law(z0, init_is_prior)
    cov, dev = cov0.expand(N, k, k).clone(), mean0 - z0.double()  # linearised law: covariance, mean - chain
    path_logdet = torch.zeros(N, dtype=torch.float64)
    alive, z, prev = torch.ones(N, dtype=torch.bool), z0.clone(), None
    for t in range(len(steps) + 1):
        lp, g, hess, ok = _value_grad_hessian(target, z, use_hessian and t < len(steps))
        if prev is not None:  # was the step into z divergent?
            ok &= torch.nan_to_num(mh_log_ratio(*prev[:2], lp, g, prev[2], z, noise[t - 1], steps[t - 1]),
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


MAX_BACKOFF_FRACTION = 0.05


# the step-size search tolerates half that (an estimate over the surviving chains), so that the final run,
# with more chains, rarely crosses the limit
SEARCH_MAX_LOST = 0.5 * MAX_BACKOFF_FRACTION


def search_step_size(target: WhitenedTarget, settings: LangevinSettings, entropy: str,
                      init: InitSampler | None, generator: torch.Generator, dtype,
                      warn_low: bool = True) -> tuple[float, dict]:
    """Minimise the KL estimate over ``log s`` with common random numbers; returns ``s`` and the curve.
    ``warn_low``: warn when the minimum is at ``search_min`` (not for a start that is already the chain's best
    approximation, e.g. the Laplace start on a Gaussian posterior)."""
    k, K, N = target.latent_dim, settings.n_steps, settings.search_chains
    z0 = draw_start(N, target, init, generator, dtype)
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
        "psis_khat": psis_khat(curve[chosen]["log_w"]),
    }
    return chosen, info


# HMC's acceptance rate at its optimal step is 0.651 on product targets as k -> inf (Beskos et al., Bernoulli 2013);
# rough targets want more (Stan's NUTS adapts to 0.8). Measured on phase retrieval (L = 16): 0.70 at s = 0.12 in
# the flow's moment frame, 0.61 at s = 0.15.
HMC_TARGET_ACCEPT = 0.7


# the bisection stops when its bracket is this narrow (relative): ~8 trajectories per chain from [1e-3, 2]
ACCEPT_SEARCH_TOL = 0.05


def acceptance_step_size(target: WhitenedTarget, settings: LangevinSettings, init: InitSampler | None,
                          generator: torch.Generator, dtype) -> tuple[float, dict]:
    """The HMC step size whose mean Metropolis acceptance probability over one trajectory from
    ``search_chains`` start points is `HMC_TARGET_ACCEPT`: bisection in ``log s`` over ``[search_min,
    search_max]`` with common random numbers (the same starts and momenta for every ``s``, so the acceptance is
    a smooth and, up to its Monte-Carlo noise, decreasing function of ``s``); returns the lower end of the final
    bracket and the curve."""
    z0 = draw_start(settings.search_chains, target, init, generator, dtype)
    p0 = torch.randn(z0.shape, generator=generator, dtype=dtype)
    lp0, g0 = target.log_joint_and_grad(z0)
    curve: dict[float, float] = {}

    def acceptance(s: float) -> float:
        _, lq, _, p = leapfrog(target, z0, g0, p0, s, settings.leapfrog)
        log_alpha = torch.nan_to_num(hmc_log_ratio(lp0, p0, lq, p), nan=-math.inf)
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
