"""Stage two with the prior's representation error: ``x = G(z) + r``, ``y = A(x) + eta``.

The residual ``r ~ N(r_mean, B B^T)`` (field space, `ganflow.prior.residuals`) is pushed through the operator
once per solve, at a reference field ``x_ref = G(z_ref)`` (the MAP of the plain target), by secants over the
residual's own scale:

    e_mean = A(x_ref + r_mean) - A(x_ref),     w_j = A(x_ref + r_mean + b_j) - A(x_ref + r_mean),

so that ``A(G(z) + r) ~ A(G(z)) + e_mean + W xi`` with ``xi ~ N(0, I_q)``; exact for a linear operator, a
linearisation at the relevant field for a nonlinear one. The likelihood of ``z`` integrates ``xi`` out:

    y | z ~ N(A(G(z)) + e_mean, sigma^2 I + W W^T),

evaluated with the Woodbury identity (``M = I + W^T W / sigma^2``, ``L L^T = M``):
``rho^T Sigma^-1 rho = ||rho||^2 / sigma^2 - ||L^-1 W^T rho||^2 / sigma^4``, ``rho = y - A(G(z)) - e_mean``.
Given ``z`` the residual's posterior is Gaussian, ``xi | z, y ~ N(M^-1 W^T rho / sigma^2, M^-1)``, so field
draws are ``x = G(z) + r_mean + B xi`` with ``xi`` from that conditional: the off-range part is added, and the
data inform it as far as they see it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import GanflowError
from ..operators import GaussianNoise

__all__ = ["RepresentationNoise", "representation_noise", "field_columns"]


class RepresentationNoise(GaussianNoise):
    """White noise plus the pushed-forward representation error: covariance ``sigma^2 I + W W^T``.

    Args:
        sigma: the measurement noise sd.
        obs_shift: ``e_mean`` ``[*obs_shape]``.
        obs_basis: ``W^T`` ``[q, *obs_shape]``.
        field_mean: ``r_mean`` ``[*field_shape]``.
        field_basis: ``B^T`` ``[q, *field_shape]`` (row ``j`` maps to ``obs_basis[j]``).
    """

    def __init__(self, sigma: float, obs_shift: Tensor, obs_basis: Tensor, field_mean: Tensor, field_basis: Tensor):
        super().__init__(sigma)
        q = obs_basis.shape[0]
        self.register_buffer("obs_shift", obs_shift.detach().float().reshape(-1))
        self.register_buffer("obs_basis", obs_basis.detach().float().reshape(q, -1))
        self.register_buffer("field_mean", field_mean.detach().float())
        self.register_buffer("field_basis", field_basis.detach().float().reshape(q, -1))
        W = self.obs_basis.double()
        M = torch.eye(q, dtype=torch.float64) + W @ W.T / self.sigma**2
        self.register_buffer("chol", torch.linalg.cholesky(M))
        self.logdet = float(2 * torch.log(torch.diagonal(self.chol)).sum())

    @property
    def rank(self) -> int:
        return int(self.obs_basis.shape[0])

    def state(self) -> dict[str, Tensor]:
        """The tensors that rebuild this noise model (`from_state`; posterior.h5 ``/representation``)."""
        return {"sigma": torch.tensor(float(self.sigma), dtype=torch.float64), "obs_shift": self.obs_shift,
                "obs_basis": self.obs_basis, "field_mean": self.field_mean, "field_basis": self.field_basis}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], obs_shape, field_shape) -> "RepresentationNoise":
        """Rebuild from `state` (shapes checked: a one-line error when they do not fit)."""
        try:
            q = state["obs_basis"].shape[0]
            noise = cls(float(state["sigma"]), state["obs_shift"].reshape(obs_shape),
                        state["obs_basis"].reshape(q, *obs_shape), state["field_mean"].reshape(field_shape),
                        state["field_basis"].reshape(q, *field_shape))
        except (KeyError, RuntimeError, ValueError, AttributeError) as e:
            raise GanflowError(f"the stored representation error does not fit the posterior ({e})") from None
        return noise

    def _rho(self, pred: Tensor, y: Tensor) -> Tensor:
        return (y.reshape(1, -1) - pred.reshape(pred.shape[0], -1) - self.obs_shift).double()

    def _solve_l(self, rho: Tensor) -> Tensor:
        """``L^-1 W^T rho`` ``[B, q]``."""
        a = rho @ self.obs_basis.double().T
        return torch.linalg.solve_triangular(self.chol, a.T, upper=False).T

    def sq_mahalanobis(self, pred: Tensor, y: Tensor) -> Tensor:
        """``rho^T Sigma^-1 rho`` ``[B]``."""
        rho = self._rho(pred, y)
        return (rho.pow(2).sum(1) / self.sigma**2 - self._solve_l(rho).pow(2).sum(1) / self.sigma**4)

    def log_likelihood(self, pred: Tensor, y: Tensor) -> Tensor:
        m = self.obs_shift.numel()
        quad = self.sq_mahalanobis(pred, y)
        return (-0.5 * (quad + self.logdet + m * math.log(2 * math.pi * self.sigma**2))).to(pred.dtype)

    def sample(self, pred: Tensor, generator: torch.Generator | None = None) -> Tensor:
        xi = torch.randn(pred.shape[0], self.rank, generator=generator, dtype=pred.dtype)
        e = (self.obs_shift + xi @ self.obs_basis).reshape(pred.shape)
        return super().sample(pred + e, generator)

    def residual_draws(self, pred: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draws of ``r | z, y`` ``[B, *field_shape]`` for ``pred = A(G(z))`` ``[B, *obs_shape]``."""
        u = self._solve_l(self._rho(pred, y)) / self.sigma**2  # L^-1 W^T rho / sigma^2
        eps = torch.randn(u.shape, generator=generator, dtype=torch.float64)
        # xi = M^-1 W^T rho / sigma^2 + L^-T eps = L^-T (u + eps)
        xi = torch.linalg.solve_triangular(self.chol.T, (u + eps).T, upper=True).T
        r = self.field_mean.reshape(1, -1) + (xi.float() @ self.field_basis)
        return r.reshape(pred.shape[0], *self.field_mean.shape)


def field_columns(stats: dict, n_diag: int, generator: torch.Generator) -> Tensor:
    """``B^T`` ``[q + n_diag, *field_shape]``: the stored low-rank basis and ``n_diag`` random columns
    ``sqrt(diag) eps / sqrt(n_diag)`` that carry the per-pixel remainder (their outer products average to it)."""
    basis, diag = stats["basis"].float(), stats["diag"].float()
    if n_diag < 1 or float(diag.sum()) <= 0:
        return basis
    eps = torch.randn(n_diag, *diag.shape, generator=generator)
    return torch.cat([basis, diag.sqrt() * eps / math.sqrt(n_diag)])


@torch.no_grad()
def _push(operator: nn.Module, x: Tensor, batch: int = 64) -> Tensor:
    return torch.cat([operator(part) for part in x.split(batch)])


@torch.no_grad()
def representation_noise(stats: dict, operator: nn.Module, x_ref: Tensor, sigma: float,
                         generator: torch.Generator, n_diag: int = 64) -> RepresentationNoise:
    """The `RepresentationNoise` of residual statistics ``stats`` pushed through ``operator`` at ``x_ref``."""
    cols = field_columns(stats, n_diag, generator)
    x0 = (x_ref.float() + stats["mean"].float())[None]
    a_ref, a0 = _push(operator, x_ref.float()[None]), _push(operator, x0)
    t = 1.0
    for _ in range(4):  # a column that leaves the operator's domain is taken as a shorter secant
        obs_cols = (_push(operator, x0 + t * cols) - a0) / t
        if torch.isfinite(obs_cols).all() and torch.isfinite(a0).all():
            break
        t *= 0.1
    else:
        raise GanflowError("representation error: the operator is not finite around the reference field; "
                           "solve with --representation-error off")
    return RepresentationNoise(sigma, (a0 - a_ref)[0], obs_cols, stats["mean"].float(), cols)
