"""The flow family of the latent posterior (normflows): affine (Glow-style, one conditioner for scale and shift),
RealNVP (two conditioners) and rational-quadratic spline couplings between alternating masks, on top of an affine
base map ``z = loc + L u`` (`LatentFlow`). Fitted by `ganflow.posterior.flow.fit_flow`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import normflows as nf
import torch
from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling
from normflows.nets.resnet import ResidualNet
from normflows.utils.splines import DEFAULT_MIN_DERIVATIVE
from torch import Tensor, nn

__all__ = ["LatentFlow", "masks"]

if TYPE_CHECKING:
    from .flow import FlowSettings


def masks(k: int, n_layers: int) -> list[Tensor]:
    """Alternating binary masks: even/odd entries, then first/second half, so every pair of coordinates
    is coupled within a few layers (k >= 2)."""
    idx = torch.arange(k)
    patterns = [(idx % 2 == 0), (idx % 2 == 1), (idx < k // 2), (idx >= k // 2)]
    return [patterns[i % 4].float() for i in range(n_layers)]


class _AffineCoupling(nf.flows.Flow):
    """A masked affine coupling (RealNVP) whose log-scale ``s`` and shift ``t`` come from one conditioner MLP
    (normflows' ``MLP``, last layer zero-initialised: the identity at the start) on the masked input:
    ``z' = b z + (1 - b) (z exp(s) + t)`` with ``s = c tanh(.)`` soft-clamped to ``(-c, c)``.

    normflows' ``MaskedAffineFlow`` is the same transform with two conditioner nets (twice the matrix products
    per layer, ~1.9x the cost of a fit step's flow part at batch 16) and its ``AffineCoupling`` has no bound on
    the log-scale; hence this small layer."""

    def __init__(self, mask: Tensor, s: FlowSettings):
        super().__init__()
        k = mask.numel()
        self.register_buffer("b", mask)
        self.register_buffer("free", 1 - mask)
        self.net = nf.nets.MLP([k] + [s.hidden] * s.n_hidden_layers + [2 * k], init_zeros=True)
        self.clamp = float(s.scale_clamp)

    def _scale_shift(self, z_masked: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.net(z_masked).chunk(2, dim=1)
        return self.free * (self.clamp * torch.tanh(raw)), self.free * shift

    def forward(self, z):
        z_masked = self.b * z
        scale, shift = self._scale_shift(z_masked)
        return z_masked + self.free * z * torch.exp(scale) + shift, scale.sum(1)

    def inverse(self, z):
        z_masked = self.b * z
        scale, shift = self._scale_shift(z_masked)
        return z_masked + self.free * (z - shift) * torch.exp(-scale), -scale.sum(1)


class _SplineCoupling(nf.flows.Flow):
    """A rational-quadratic spline coupling layer (normflows/nflows), identity at initialisation."""

    def __init__(self, mask: Tensor, s: FlowSettings):
        super().__init__()

        def make_net(in_features, out_features):
            net = ResidualNet(in_features, out_features, hidden_features=s.hidden, num_blocks=s.n_hidden_layers)
            # Uniform bins and unit derivatives: the spline is the identity (normflows' own recipe).
            nn.init.zeros_(net.final_layer.weight)
            nn.init.constant_(net.final_layer.bias, math.log(math.exp(1 - DEFAULT_MIN_DERIVATIVE) - 1))
            return net

        self.coupling = PiecewiseRationalQuadraticCoupling(
            mask=mask, transform_net_create_fn=make_net, num_bins=s.spline_bins, tails="linear",
            tail_bound=s.spline_tail_bound,
        )

    def forward(self, z):
        z, log_det = self.coupling(z)
        return z, log_det.reshape(-1)

    def inverse(self, z):
        z, log_det = self.coupling.inverse(z)
        return z, log_det.reshape(-1)


class LatentFlow(nn.Module):
    """``q_phi(z)``: coupling layers on a fixed ``N(0, I_k)`` base, then a fixed affine map ``mu + L u``.

    ``sample(n, generator)`` -> ``(z [n, k], log_q [n])``; ``log_prob(z)`` -> ``[n]`` (also ``forward``).
    """

    def __init__(self, latent_dim: int, settings: FlowSettings, loc: Tensor | None = None,
                 scale_tril: Tensor | None = None):
        super().__init__()
        k = int(latent_dim)
        self.latent_dim = k
        self.settings = settings
        layers: list[nf.flows.Flow] = []
        if k >= 2:
            for mask in masks(k, settings.n_layers):
                if settings.kind == "affine":
                    layers.append(_AffineCoupling(mask, settings))
                elif settings.kind == "realnvp":
                    h = [k] + [settings.hidden] * settings.n_hidden_layers + [k]
                    s_net = nf.nets.MLP(h, init_zeros=True, output_fn="tanh", output_scale=settings.scale_clamp)
                    t_net = nf.nets.MLP(h, init_zeros=True)
                    layers.append(nf.flows.MaskedAffineFlow(mask, t_net, s_net))
                else:
                    layers.append(_SplineCoupling(mask, settings))
        # k == 1 has nothing to couple: an elementwise affine layer (identity at start) carries the fit.
        layers.append(nf.flows.AffineConstFlow((k,)))
        base = nf.distributions.DiagGaussian(k, trainable=False)
        self.flow = nf.NormalizingFlow(q0=base, flows=layers)
        self.register_buffer("loc", torch.zeros(k) if loc is None else loc.detach().float().clone())
        self.register_buffer("scale_tril", torch.eye(k) if scale_tril is None else scale_tril.detach().float().clone())

    def _log_det_affine(self) -> Tensor:
        return torch.log(torch.diagonal(self.scale_tril).abs()).sum()

    def _base_log_prob(self, eps: Tensor) -> Tensor:
        return -0.5 * (eps * eps).sum(1) - 0.5 * self.latent_dim * math.log(2 * math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        eps = torch.randn(n, self.latent_dim, generator=generator, device=self.loc.device)
        return self.transform(eps)

    def transform(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """``eps [n, k] -> (z, log_q(z))``."""
        # Layers are applied here rather than by NormalizingFlow.forward_and_log_det, which accumulates
        # log-determinants in a float32 buffer whatever the input dtype.
        u, log_det = eps, torch.zeros(eps.shape[0], dtype=eps.dtype, device=eps.device)
        for layer in self.flow.flows:
            u, ld = layer(u)
            log_det = log_det + ld
        z = self.loc + u @ self.scale_tril.T
        return z, self._base_log_prob(eps) - log_det - self._log_det_affine()

    def log_prob(self, z: Tensor) -> Tensor:
        u = torch.linalg.solve_triangular(self.scale_tril, (z - self.loc).T, upper=False).T
        eps, log_det_inv = u, torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        for layer in reversed(self.flow.flows):
            eps, ld = layer.inverse(eps)
            log_det_inv = log_det_inv + ld
        return self._base_log_prob(eps) + log_det_inv - self._log_det_affine()

    forward = log_prob
