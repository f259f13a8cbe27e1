"""Affine frames for latent chains: the posterior of ``u`` with ``z = loc + L u`` (`WhitenedTarget`), and the
frames ganflow uses: the identity (the seed's unpreconditioned chains), the Laplace frame (MAP and Hessian) and the
frame of a fitted flow's own draw moments (the refiner); and the chains' starting points in a frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ..errors import GanflowError
from .target import LatentTarget

__all__ = ["InitSampler", "WhitenedTarget", "identity_frame", "laplace_frame", "moment_frame", "draw_start", "finite"]

if TYPE_CHECKING:
    from .langevin import LangevinSettings


InitSampler = Callable[[int, torch.Generator], Tensor]


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
        if not (finite(self.loc, self.scale_tril) and bool((diag > 0).all())):
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
    (`ganflow.posterior.modes.laplace_approximation`), ``L L^T = (-Hessian)^-1`` at the most massive mode."""
    from .flow import FlowSettings
    from .modes import laplace_approximation

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
    if z.ndim != 2 or z.shape[0] <= z.shape[1] or not finite(z):
        raise GanflowError(f"langevin moment frame: need finite [n, k] draws with n > k, got {tuple(z.shape)}")
    k = z.shape[1]
    cov = torch.cov(z.T).reshape(k, k)
    # relative jitter: a (nearly) degenerate sampler still gives a usable factor
    cov = cov + 1e-10 * float(torch.diagonal(cov).mean()) * torch.eye(k, dtype=cov.dtype)
    return z.mean(0), torch.linalg.cholesky(cov)


def finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def draw_start(n: int, frame: WhitenedTarget, init: InitSampler | None, generator: torch.Generator,
                dtype) -> Tensor:
    """Start points in the chain's frame: ``N(0, I)`` there, or ``init``'s draws mapped into it."""
    k = frame.latent_dim
    if init is None:
        return torch.randn(n, k, generator=generator, dtype=dtype)
    z0 = torch.as_tensor(init(n, generator)).detach().to(dtype)
    if z0.shape != (n, k):
        raise GanflowError(f"langevin init sampler returned shape {tuple(z0.shape)}, expected ({n}, {k})")
    if not finite(z0):
        raise GanflowError("langevin init sampler returned non-finite latent vectors")
    return frame.to_frame(z0)
