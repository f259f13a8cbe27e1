"""A linear-Gaussian problem with a known answer: the engine's test bed and a first example.

Generator (the prior):   x = G(z) = W z + b,   z ~ N(0, I_k),   x a 16x16 field by default.
    The columns of W are smooth 2-D cosine modes with amplitudes decaying with frequency; b is a smooth bump.
Operator:                A(x) = S B x: a separable Gaussian blur B followed by subsampling S (every
    ``stride``-th pixel in each direction), so 16x16 -> 8x8 = 64 observations by default.
Noise:                   y = A(x) + eta, eta ~ N(0, sigma^2 I).

Because everything is linear and Gaussian, the posterior is Gaussian in closed form
(`exact_posterior`):  with H = A W,  Sigma_z = (I + H^T H / sigma^2)^{-1},
mu_z = Sigma_z H^T (y - A b) / sigma^2,  and the field posterior is N(W mu_z + b, W Sigma_z W^T).

Example:
    >>> import torch
    >>> p = LinearGaussianProblem()
    >>> G, A = p.generator(), p.make_operator()
    >>> A(G(torch.zeros(2, G.latent_dim))).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ganflow import GanflowError

__all__ = ["LinearGaussianProblem", "LinearGenerator", "BlurSubsample", "GaussianPosterior", "exact_posterior",
           "generator", "operator"]


def _cosine_basis(n: int, k: int) -> np.ndarray:
    """``[n*n, k]``: the k lowest-frequency 2-D cosine modes, amplitude 1/(1 + a + b)."""
    side = int(np.ceil(np.sqrt(k)))
    t = (np.arange(n) + 0.5) / n
    cols = []
    pairs = sorted(((a, b) for a in range(side) for b in range(side)), key=lambda ab: (ab[0] + ab[1], ab))
    for a, b in pairs[:k]:
        mode = np.outer(np.cos(np.pi * a * t), np.cos(np.pi * b * t))
        mode /= np.sqrt((mode**2).mean())
        cols.append(mode.ravel() / (1.0 + a + b))
    return np.stack(cols, 1)


class LinearGenerator(nn.Module):
    """``G(z) = W z + b`` reshaped to ``[B, n, n]``; ``W`` ``[n*n, k]`` and ``b`` ``[n*n]`` are buffers."""

    def __init__(self, W: Tensor, b: Tensor, field_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("W", W.float())
        self.register_buffer("b", b.float())
        self.latent_dim = int(W.shape[1])
        self.field_shape = tuple(field_shape)

    def forward(self, z: Tensor) -> Tensor:
        return (z @ self.W.T + self.b).reshape(z.shape[0], *self.field_shape)


def _blur_matrix_1d(n: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian blur on n points (truncated at 3 sigma, renormalised at the edges)."""
    i = np.arange(n)
    B = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2) if sigma > 0 else np.eye(n)
    B[np.abs(i[:, None] - i[None, :]) > 3 * sigma + 1e-9] = 0.0
    return B / B.sum(1, keepdims=True)


class BlurSubsample(nn.Module):
    """``A(x) = S B x``: separable Gaussian blur then subsampling every ``stride``-th pixel.

    ``[B, n, n] -> [B, (n // stride)**2]``. The whole map is one dense matrix buffer ``M``.
    """

    def __init__(self, n: int = 16, stride: int = 2, blur_sigma: float = 1.0):
        super().__init__()
        if n <= 0 or stride <= 0 or n % stride:
            raise GanflowError(f"linear_gaussian operator: stride {stride} must divide n = {n}")
        if not blur_sigma >= 0:
            raise GanflowError(f"linear_gaussian operator: blur_sigma must be >= 0, got {blur_sigma}")
        B1 = _blur_matrix_1d(n, blur_sigma)
        rows = np.arange(stride // 2, n, stride)
        S1B1 = B1[rows]
        M = np.kron(S1B1, S1B1)  # row-major 2-D index (i, j) -> i * n + j
        self.register_buffer("M", torch.from_numpy(M).float())
        self.field_shape = (n, n)
        self.obs_shape = (len(rows) ** 2,)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ self.M.T


@dataclass
class GaussianPosterior:
    """Exact Gaussian posterior of the latent and the field (float64 numpy)."""

    latent_mean: np.ndarray  # [k]
    latent_cov: np.ndarray  # [k, k]
    field_mean: np.ndarray  # [*field_shape]
    field_cov: np.ndarray  # [n_field, n_field]

    @property
    def latent_std(self) -> np.ndarray:
        return np.sqrt(np.diag(self.latent_cov))

    @property
    def field_std(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.field_cov), 0, None)).reshape(self.field_mean.shape)




def exact_posterior(generator: LinearGenerator, operator: BlurSubsample, y: Tensor, noise_sigma: float
                    ) -> GaussianPosterior:
    """The closed-form posterior for a linear generator and a linear operator."""
    W = generator.W.double().numpy()
    b = generator.b.double().numpy()
    M = operator.M.double().numpy()
    H = M @ W
    yv = y.double().numpy().reshape(-1)
    prec = np.eye(W.shape[1]) + H.T @ H / noise_sigma**2
    cov = np.linalg.inv(prec)
    cov = 0.5 * (cov + cov.T)
    mean = cov @ H.T @ (yv - M @ b) / noise_sigma**2
    return GaussianPosterior(mean, cov, (W @ mean + b).reshape(generator.field_shape), W @ cov @ W.T)


class LinearGaussianProblem:
    """The linear-Gaussian problem (registered as ``linear_gaussian``).

    Args:
        n: field side (the field is ``[n, n]``).
        latent_dim: number of cosine modes ``k``.
    """

    name = "linear_gaussian"

    def __init__(self, n: int = 16, latent_dim: int = 16):
        if n < 2 or latent_dim < 1 or latent_dim > n * n:
            raise GanflowError(f"linear_gaussian: need n >= 2 and 1 <= latent_dim <= n*n, got {n}, {latent_dim}")
        self.n = int(n)
        self.latent_dim = int(latent_dim)
        self.field_shape = (self.n, self.n)
        W = _cosine_basis(self.n, self.latent_dim)
        t = (np.arange(self.n) + 0.5) / self.n
        b = 0.5 * np.exp(-((t[:, None] - 0.5) ** 2 + (t[None, :] - 0.5) ** 2) / 0.1).ravel()
        self._W = torch.from_numpy(W).float()
        self._b = torch.from_numpy(b).float()

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self.make_operator().obs_shape

    def generator(self) -> LinearGenerator:
        """The exact linear generator ``G(z) = W z + b`` (a valid ``--prior``)."""
        return LinearGenerator(self._W.clone(), self._b.clone(), self.field_shape)

    def make_operator(self, stride: int = 2, blur_sigma: float = 1.0) -> BlurSubsample:
        return BlurSubsample(self.n, stride, blur_sigma)

    def sample_fields(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator)
        with torch.no_grad():
            return self.generator()(z)

    def qois(self) -> dict:
        return {"total": lambda x: x.reshape(x.shape[0], -1).sum(1), "center": lambda x: x[:, self.n // 2, self.n // 2]}


# Zero-argument factories for spec strings: ganflow.problems.linear_gaussian:generator / :operator
def generator() -> LinearGenerator:
    return LinearGaussianProblem().generator()


def operator() -> BlurSubsample:
    return LinearGaussianProblem().make_operator()
