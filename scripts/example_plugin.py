"""A complete user plug-in: your own forward operator, generator and problem, used through spec strings.

    ganflow simulate --problem scripts/example_plugin.py:problem --prior scripts/example_plugin.py:generator \
                     --noise-sigma 0.05 -o obs.h5
    ganflow solve --obs obs.h5 --prior scripts/example_plugin.py:generator -o posterior.h5
    ganflow check-operator scripts/example_plugin.py:SmoothedSensors

Contracts (docs/problems.md): an operator is an nn.Module with `field_shape`, `obs_shape` and a differentiable,
noise-free forward `[B, *field_shape] -> [B, *obs_shape]`; a generator has `latent_dim` and `field_shape` and
maps `[B, latent_dim] -> [B, *field_shape]`. Masks and matrices are buffers so `.to(device)` works.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SmoothedSensors(nn.Module):
    """A nonlinear toy measurement: ``y_j = tanh(sum_i w_ji x_i)`` at ``n_sensors`` Gaussian-weighted spots."""

    def __init__(self, n: int = 16, n_sensors: int = 12, width: float = 0.15, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        centers = torch.rand(n_sensors, 2, generator=g) * 0.8 + 0.1
        t = (torch.arange(n) + 0.5) / n
        yy, xx = torch.meshgrid(t, t, indexing="ij")
        d2 = (xx[None] - centers[:, 0, None, None]) ** 2 + (yy[None] - centers[:, 1, None, None]) ** 2
        w = torch.exp(-0.5 * d2 / width**2)
        self.register_buffer("weights", (w / w.sum((1, 2), keepdim=True)).reshape(n_sensors, -1))
        self.field_shape = (n, n)
        self.obs_shape = (n_sensors,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.reshape(x.shape[0], -1) @ self.weights.T)


class FourierGenerator(nn.Module):
    """``G(z)``: a field made of ``latent_dim`` smooth Fourier modes with decaying amplitudes."""

    def __init__(self, n: int = 16, latent_dim: int = 8):
        super().__init__()
        t = (torch.arange(n) + 0.5) / n
        modes = []
        for a in range(1, 4):
            for b in range(1, 4):
                modes.append(torch.outer(torch.sin(math.pi * a * t), torch.sin(math.pi * b * t)) / (a + b))
        self.register_buffer("basis", torch.stack(modes[:latent_dim]).reshape(latent_dim, -1))
        self.latent_dim = latent_dim
        self.field_shape = (n, n)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.basis).reshape(z.shape[0], *self.field_shape)


class ToyProblem:
    """A problem bundles the operator factory and an example-field sampler (for `ganflow data`)."""

    name = "toy"
    field_shape = (16, 16)

    def make_operator(self, n_sensors: int = 12, seed: int = 0) -> SmoothedSensors:
        return SmoothedSensors(16, n_sensors, seed=seed)

    def sample_fields(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return FourierGenerator()(torch.randn(n, 8, generator=generator))

    def qois(self):
        return {"mean_value": lambda x: x.mean((1, 2))}


problem = ToyProblem()


def generator() -> FourierGenerator:
    return FourierGenerator()
