"""The latent posterior target shared by every method (flow, Langevin, NUTS).

    log p(z | y) = log p(y | z) + log p(z) - log p(y)
    log p(y | z) = -||y - A(G(z))||^2 / (2 sigma^2) - (m/2) log(2 pi sigma^2)
    log p(z)     = -||z||^2 / 2 - (k/2) log(2 pi)

``LatentTarget.log_joint(z)`` returns ``log p(y, z)`` (normalising constants included, so that the ELBO is a
lower bound on ``log p(y)``). Every evaluation of ``A(G(z))`` for one ``z`` adds one to ``n_forward_evals``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import GanflowError
from ..operators import GaussianNoise, check_compatible

__all__ = ["LatentTarget"]


class LatentTarget(nn.Module):
    """``log p(y, z)`` for a batch of latent vectors.

    Args:
        generator: ``[B, k] -> [B, *field_shape]``.
        operator: ``[B, *field_shape] -> [B, *obs_shape]``.
        y: the observation, ``[*obs_shape]``.
        noise_sigma: absolute noise standard deviation.
        check: run the shape / finiteness checks of `check_compatible` first.
        noise: the noise model (``log_likelihood(pred, y)``, ``sigma``); default white `GaussianNoise`
            (``noise_sigma``); `ganflow.posterior.representation.RepresentationNoise` adds the prior's
            representation error.

    Example:
        >>> from ganflow.problems.linear_gaussian import LinearGaussianProblem
        >>> p = LinearGaussianProblem()
        >>> t = LatentTarget(p.generator(), p.make_operator(), torch.zeros(p.obs_shape), 0.1)
        >>> t.log_joint(torch.zeros(3, t.latent_dim)).shape
        torch.Size([3])
    """

    def __init__(self, generator: nn.Module, operator: nn.Module, y: Tensor, noise_sigma: float, check: bool = True,
                 noise: nn.Module | None = None):
        super().__init__()
        if check:
            check_compatible(generator, operator, y)
        self.generator = generator
        self.operator = operator
        self.noise = noise if noise is not None else GaussianNoise(noise_sigma)
        self.register_buffer("y", y.detach().clone())
        self.latent_dim = int(generator.latent_dim)
        self.field_shape = tuple(generator.field_shape)
        self.obs_shape = tuple(operator.obs_shape)
        self.n_forward_evals = 0
        for p in list(generator.parameters()) + list(operator.parameters()):
            p.requires_grad_(False)

    @property
    def noise_sigma(self) -> float:
        return self.noise.sigma

    def predict(self, z: Tensor) -> Tensor:
        """``A(G(z))`` ``[B, *obs_shape]``; counts ``B`` forward evaluations."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise GanflowError(f"latent batch must be [B, {self.latent_dim}], got {tuple(z.shape)}")
        self.n_forward_evals += int(z.shape[0])
        return self.operator(self.generator(z))

    def log_prior(self, z: Tensor) -> Tensor:
        return -0.5 * (z * z).sum(1) - 0.5 * self.latent_dim * math.log(2 * math.pi)

    def log_likelihood(self, z: Tensor) -> Tensor:
        return self.noise.log_likelihood(self.predict(z), self.y)

    def log_joint(self, z: Tensor) -> Tensor:
        """``log p(y | z) + log p(z)`` ``[B]``."""
        return self.log_likelihood(z) + self.log_prior(z)

    forward = log_joint

    def log_joint_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``log p(y, z)`` ``[B]`` and its gradient ``[B, k]`` (rows are independent)."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            lp = self.log_joint(z)
            (g,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), g
