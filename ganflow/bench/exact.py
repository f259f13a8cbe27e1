"""Exact non-Gaussian test problems (the tests, and ``ganflow bench``'s ``curved`` case): a 2-D latent, a
nonlinear generator, posterior moments by quadrature.

The field is 16 pixels on a circle, ``t_j = j / 16``, built from two orthonormal modes (mean-square 1, mutually
orthogonal over the pixels)

    phi_1(t) = sqrt(2) sin(4 pi t),   phi_2(t) = sqrt(2) cos(2 pi t),

by the nonlinear generator ``x = G(z) = z_1 phi_1 + (z_2 + b z_1^2) phi_2``, ``z ~ N(0, I_2)``. The operator
reads the two mode coefficients ``c_i = mean_j x_j phi_i(t_j)`` (so ``c_1 = z_1``, ``c_2 = z_2 + b z_1^2``) and
returns

- ``curved`` (one mode): ``y = (w c_1, c_2)``: ``c_2`` is measured well and ``c_1`` weakly, so the posterior
  is a banana bent along the parabola ``z_2 = y_2 - b z_1^2``;
- ``twin`` (two symmetric modes): ``y = (c_1^2, c_2)``, even in ``z_1``: the sign of the ``phi_1`` component is
  lost, as phase retrieval loses the twin image, and the posterior has mirror modes at ``+-z_1``;
- ``asymmetric twin``: ``y = (c_1^2 + a c_1, c_2)``, two modes of unequal mass (0.71 and 0.29 for a = 0.7).

Both are observed with Gaussian noise ``sigma``; ``y`` is ``A(G(z_true))`` plus a fixed seeded noise draw. The
posterior density ``p(z | y) ~ exp(-||y - A(G(z))||^2 / (2 sigma^2) - |z|^2 / 2)`` is evaluated on a fine grid
(numpy/torch, float64) and its moments are sums over the grid: the reference against which ganflow's flow,
NUTS and Langevin are tested. The grid step (12 / 1200 = 0.01) is 1/25 of the narrowest posterior scale here
(a twin mode's sd 0.25): halving it changes no moment by more than 1e-9, far below any sampler's error.

Example:
    >>> p = curved_problem()
    >>> m = quadrature_moments(p)
    >>> m["mean"].shape, m["sd"].shape
    ((2,), (2,))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

N_PIX = 16


def _modes() -> Tensor:
    t = torch.arange(N_PIX, dtype=torch.float64) / N_PIX
    return torch.stack([math.sqrt(2) * torch.sin(4 * math.pi * t), math.sqrt(2) * torch.cos(2 * math.pi * t)])


class CurvedGenerator(nn.Module):
    """``x = z_1 phi_1 + (z_2 + b z_1^2) phi_2``: ``[B, 2] -> [B, 16]`` (the DESIGN generator contract)."""

    def __init__(self, bend: float):
        super().__init__()
        self.register_buffer("modes", _modes().float())
        self.bend = float(bend)
        self.latent_dim = 2
        self.field_shape = (N_PIX,)

    def forward(self, z: Tensor) -> Tensor:
        c1, c2 = z[:, :1], z[:, 1:2] + self.bend * z[:, :1] ** 2
        m = self.modes.to(z.dtype)
        return c1 * m[0] + c2 * m[1]


class CoefficientOperator(nn.Module):
    """The two mode coefficients ``c_i = mean_j x_j phi_i(t_j)``, returned as ``(w c_1, c_2)`` (linear) or
    ``(c_1^2 + shift c_1, c_2)`` (``twin``: even in ``c_1`` when ``shift = 0``): ``[B, 16] -> [B, 2]``."""

    def __init__(self, weight: float = 1.0, twin: bool = False, shift: float = 0.0):
        super().__init__()
        self.register_buffer("modes", _modes().float())
        self.weight, self.twin, self.shift = float(weight), bool(twin), float(shift)
        self.field_shape, self.obs_shape = (N_PIX,), (2,)

    def forward(self, x: Tensor) -> Tensor:
        c = x @ self.modes.to(x.dtype).T / N_PIX
        first = c[:, :1] ** 2 + self.shift * c[:, :1] if self.twin else self.weight * c[:, :1]
        return torch.cat([first, c[:, 1:]], 1)


@dataclass
class ExactProblem:
    """A test problem: generator, operator, observation, noise level and the latent truth."""

    name: str
    generator: CurvedGenerator
    operator: CoefficientOperator
    y: Tensor  # [2], float32
    noise_sigma: float
    z_true: np.ndarray


def _observe(name: str, G: CurvedGenerator, A: CoefficientOperator, z_true, sigma: float, seed: int) -> ExactProblem:
    z = torch.tensor([z_true], dtype=torch.float32)
    noise = sigma * torch.randn(2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = A(G(z))[0] + noise
    return ExactProblem(name, G, A, y, sigma, np.asarray(z_true, np.float64))


def curved_problem() -> ExactProblem:
    """One curved mode (b = 1, w = 0.5, sigma = 0.3): posterior sds 0.40 and 0.56, correlation -0.78, skewness
    -0.38 and -0.71; its Laplace approximation is off by 0.22 sd in the mean of z_1."""
    return _observe("curved", CurvedGenerator(1.0), CoefficientOperator(weight=0.5), (0.8, -0.5), 0.3, seed=1)


def twin_problem(noise_sigma: float = 0.5) -> ExactProblem:
    """Two mirror modes at z_1 ~ +-1.2 with equal mass (b = 0.5, sigma = 0.5): the posterior mean of z_1 is 0
    and its sd 1.19, while within a mode z_1 has sd ~0.25. The valley between them is ~2.5 nats deep; with
    ``noise_sigma = 0.1`` it is ~100 nats, which no sampler's chain crosses."""
    return _observe("twin", CurvedGenerator(0.5), CoefficientOperator(twin=True), (1.2, 0.3), noise_sigma, seed=2)


def asymmetric_twin_problem() -> ExactProblem:
    """The twin problem with ``y_1 = c_1^2 + 0.7 c_1``: modes at z_1 ~ 0.9 and -1.6 holding 0.711 and 0.289 of
    the mass (split at the valley of the z_1 marginal, z_1 = -0.37)."""
    return _observe("asymmetric_twin", CurvedGenerator(0.5), CoefficientOperator(twin=True, shift=0.7), (0.8, 0.3),
                    0.5, seed=2)


def log_posterior_grid(problem: ExactProblem, half_width: float = 6.0, n: int = 1201):
    """``(z1, z2, log p)`` on an ``n x n`` grid over ``[-half_width, half_width]^2`` (float64, unnormalised)."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    axis = 0.5 * (axis - axis.flip(0))  # exactly antisymmetric: the middle point is 0, mirror points match
    z1, z2 = torch.meshgrid(axis, axis, indexing="ij")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], 1)
    with torch.no_grad():  # the modules compute in the input's dtype
        r = problem.operator(problem.generator(z)) - problem.y.double()
    logp = -0.5 * (r * r).sum(1) / problem.noise_sigma**2 - 0.5 * (z * z).sum(1)
    return z1.numpy(), z2.numpy(), logp.reshape(n, n).numpy()


def quadrature_moments(problem: ExactProblem, half_width: float = 6.0, n: int = 1201) -> dict:
    """Posterior ``mean`` ``[2]``, ``cov`` ``[2, 2]``, ``sd`` ``[2]``, ``corr``, ``skew`` ``[2]`` (third
    standardised moments), ``m4`` ``[2]`` (fourth central moments) and the mass with ``z_1 > 0`` (half the
    ``z_1 = 0`` column's), by summing
    the normalised density over the grid; ``edge_mass`` (the mass on the grid's border rows) checks that the
    grid holds the posterior. ``mode_split`` is the lowest point of the ``z_1`` marginal on ``(-1, 1)`` (the
    valley between two modes) and ``mass_above_split`` the mass with ``z_1`` above it. ``half_width`` and ``n``
    are `log_posterior_grid`'s (a coarser grid for many observations: check it against the default one)."""
    z1, z2, logp = log_posterior_grid(problem, half_width, n)
    w = np.exp(logp - logp.max())
    w /= w.sum()
    mean = np.array([(w * z1).sum(), (w * z2).sum()])
    d1, d2 = z1 - mean[0], z2 - mean[1]
    cov = np.array([[(w * d1 * d1).sum(), (w * d1 * d2).sum()], [(w * d1 * d2).sum(), (w * d2 * d2).sum()]])
    sd = np.sqrt(np.diag(cov))
    skew = np.array([(w * d1**3).sum() / sd[0] ** 3, (w * d2**3).sum() / sd[1] ** 3])
    m4 = np.array([(w * d1**4).sum(), (w * d2**4).sum()])
    edge = w[0].sum() + w[-1].sum() + w[:, 0].sum() + w[:, -1].sum()
    axis, marginal = z1[:, 0], w.sum(1)
    split = float(axis[np.argmin(np.where(np.abs(axis) < 1, marginal, np.inf))])
    return {"mean": mean, "cov": cov, "sd": sd, "corr": float(cov[0, 1] / (sd[0] * sd[1])), "skew": skew,
            "m4": m4, "mass_z1_positive": float(w[z1 > 0].sum() + 0.5 * w[z1 == 0].sum()), "edge_mass": float(edge),
            "mode_split": split, "mass_above_split": float(w[z1 > split].sum())}


def quadrature_draws(problem: ExactProblem, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` exact posterior draws ``[n, 2]``: grid cells drawn by their mass, uniform within the cell."""
    z1, z2, logp = log_posterior_grid(problem)
    w = np.exp(logp - logp.max()).reshape(-1)
    idx = rng.choice(w.size, size=n, p=w / w.sum())
    step = z1[1, 0] - z1[0, 0]
    centre = np.stack([z1.reshape(-1)[idx], z2.reshape(-1)[idx]], 1)
    return centre + step * (rng.random((n, 2)) - 0.5)
