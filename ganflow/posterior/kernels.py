"""Transition kernels on a `WhitenedTarget`, batched over chains: unadjusted Langevin (`ula_step`), Metropolis-
adjusted Langevin (`mala_step`) and Hamiltonian Monte Carlo (`hmc_step`: a `leapfrog` trajectory and a Metropolis
test on the energy, `hmc_log_ratio`). One implementation serves short-run Langevin, the refiner of a flow and the
moves of tempered SMC. A step maps ``(z, log p, grad)`` to the next state and returns what it accepted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

__all__ = ["ula_step", "mala_step", "hmc_step", "leapfrog", "hmc_log_ratio", "mh_log_ratio", "DIVERGENCE_NATS",
           "HMC_STEP_JITTER"]

if TYPE_CHECKING:
    from .frames import WhitenedTarget


# An unadjusted step is *divergent* when its proposal is not finite or when its Metropolis log ratio (the
# MALA acceptance the step would get) is below -DIVERGENCE_NATS: the energy-error threshold of Stan's NUTS
# divergences. At a usable step size the ratio is O(1) in the bulk; prior-tail chains on a stiff, curved
# posterior overshoot by thousands of nats and then overflow. A divergent chain keeps its state and halves its
# own step; if more than MAX_BACKOFF_FRACTION of the chains needed that, the step size itself is wrong and the
# run stops with an error.
DIVERGENCE_NATS = 1000.0


# A fixed trajectory length turns a near-Gaussian direction by the same angle every transition and can come back
# where it started (measured: 8-d linear Gaussian, L = 8 at s = 3.0, still 0.29 sd off after 20 transitions
# where MALA was 0.05): each chain's step is drawn uniformly within +-HMC_STEP_JITTER of ``s`` (Neal 2011, 5.4.2.2).
HMC_STEP_JITTER = 0.2


def mh_log_ratio(lp, g, lp_new, g_new, z, proposal, eps, s: Tensor | float) -> Tensor:
    """``log alpha`` of the Langevin proposal ``z' = z + (s^2/2) g + s eps`` (``s`` a float or ``[N, 1]``)."""
    h = 0.5 * s * s
    fwd = (eps * eps).sum(1)  # |z' - z - h g|^2 / s^2
    back = ((z - proposal - h * g_new) ** 2 / (s * s)).sum(1)
    return lp_new - lp - 0.5 * back + 0.5 * fwd


def ula_step(target: WhitenedTarget, z: Tensor, lp: Tensor, g: Tensor, s: Tensor, generator: torch.Generator):
    """One unadjusted step with per-chain step sizes ``s`` ``[N]``; a divergent chain (see `DIVERGENCE_NATS`)
    keeps its state and halves its step. Returns ``(z, lp, g, s, divergent [N] bool)``."""
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    sc = s[:, None]
    proposal = z + 0.5 * sc * sc * g + sc * eps
    lp_new, g_new = target.log_joint_and_grad(proposal)
    log_alpha = mh_log_ratio(lp, g, lp_new, g_new, z, proposal, eps, sc)
    ok = torch.isfinite(g_new).all(1) & torch.isfinite(proposal).all(1) & (
        torch.nan_to_num(log_alpha, nan=-math.inf) > -DIVERGENCE_NATS)
    z = torch.where(ok[:, None], proposal, z)
    lp, g = torch.where(ok, lp_new, lp), torch.where(ok[:, None], g_new, g)
    return z, lp, g, torch.where(ok, s, 0.5 * s), ~ok


def mala_step(target: WhitenedTarget, z: Tensor, lp: Tensor, g: Tensor, s: float, generator: torch.Generator):
    """One Metropolis-adjusted step. Returns ``(z, lp, g, accepted [N] bool)``."""
    h = 0.5 * s * s
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    proposal = z + h * g + s * eps
    lp_new, g_new = target.log_joint_and_grad(proposal)
    u = torch.rand(z.shape[0], generator=generator, dtype=z.dtype)
    log_alpha = mh_log_ratio(lp, g, lp_new, g_new, z, proposal, eps, s)
    # a proposal with a non-finite density or gradient is rejected, as Metropolis-Hastings prescribes
    ok = torch.isfinite(lp_new) & torch.isfinite(g_new).all(1)
    accept = ok & (torch.log(u) < torch.nan_to_num(log_alpha, nan=-math.inf))
    z = torch.where(accept[:, None], proposal, z)
    return z, torch.where(accept, lp_new, lp), torch.where(accept[:, None], g_new, g), accept


def leapfrog(target: WhitenedTarget, z: Tensor, g: Tensor, p: Tensor, s: Tensor | float, n_leapfrog: int):
    """``n_leapfrog`` leapfrog steps of size ``s`` (a float or ``[N, 1]``) from ``(z, p)`` (``g`` the gradient at
    ``z``): the end point, its log density, gradient and momentum."""
    q, gq, lq = z, g, None
    for _ in range(n_leapfrog):
        p = p + 0.5 * s * gq
        q = q + s * p
        lq, gq = target.log_joint_and_grad(q)
        p = p + 0.5 * s * gq
    return q, lq, gq, p


def hmc_log_ratio(lp: Tensor, p: Tensor, lp_end: Tensor, p_end: Tensor) -> Tensor:
    """``log`` of the Metropolis ratio of a trajectory: minus the change of the energy ``-log p + |p|^2 / 2``."""
    return lp_end - lp - 0.5 * ((p_end * p_end).sum(1) - (p * p).sum(1))


def hmc_step(target: WhitenedTarget, z: Tensor, lp: Tensor, g: Tensor, s: float, n_leapfrog: int,
              generator: torch.Generator):
    """One Hamiltonian Monte Carlo transition (fresh momentum, ``n_leapfrog`` leapfrog steps of each chain's
    jittered step, see `HMC_STEP_JITTER`; Metropolis test on the energy). Returns ``(z, lp, g, accepted [N]
    bool)``."""
    p = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    u = torch.rand(z.shape[0], 1, generator=generator, dtype=z.dtype)
    q, lq, gq, p_end = leapfrog(target, z, g, p, s * (1 + HMC_STEP_JITTER * (2 * u - 1)), n_leapfrog)
    u = torch.rand(z.shape[0], generator=generator, dtype=z.dtype)
    log_alpha = hmc_log_ratio(lp, p, lq, p_end)
    ok = torch.isfinite(lq) & torch.isfinite(gq).all(1)
    accept = ok & (torch.log(u) < torch.nan_to_num(log_alpha, nan=-math.inf))
    z = torch.where(accept[:, None], q, z)
    return z, torch.where(accept, lq, lp), torch.where(accept[:, None], gq, g), accept
