"""The amortised posterior's network: a conditional normalizing flow ``q_phi(z | y)`` (normflows' layers), and
the flow it becomes for one observation (`ConditionedFlow`, what ``--refine`` fine-tunes).

In the sampling direction,

    eps ~ N(0, I_k) -> [rational-quadratic spline coupling, conditioner sees c] x n_layers
                    -> z = loc(c) + L(c) u  (L lower triangular),        c = embed(y)

where ``embed`` standardises the flattened observation (moments of a simulated pilot set) and maps it through
an MLP plus a linear skip, so that a posterior mean linear in ``y`` (a linear-Gaussian problem) is easy. Trained
by `ganflow.posterior.amortized_training`; used through `ganflow.posterior.amortized.AmortizedPosterior`.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import normflows as nf
import torch
from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling
from normflows.nets.resnet import ResidualNet
from normflows.utils.splines import DEFAULT_MIN_DERIVATIVE
from torch import Tensor, nn

from .flows import masks

__all__ = ["ConditionalLatentFlow", "ConditionedFlow", "base_log_prob"]

if TYPE_CHECKING:
    from .amortized_training import AmortizedSettings


class _ObsEmbedding(nn.Module):
    """``y [B, *obs_shape] -> c [B, embed_dim]``: standardised, then an MLP plus a linear skip."""

    def __init__(self, y_loc: Tensor, y_scale: Tensor, s: AmortizedSettings):
        super().__init__()
        m = y_loc.numel()
        self.register_buffer("y_loc", y_loc.detach().float().reshape(-1).clone())
        self.register_buffer("y_scale", y_scale.detach().float().reshape(-1).clone())
        self.mlp = nn.Sequential(nn.Linear(m, s.embed_hidden), nn.SiLU(), nn.Linear(s.embed_hidden, s.embed_hidden),
                                 nn.SiLU(), nn.Linear(s.embed_hidden, s.embed_dim))
        self.skip = nn.Linear(m, s.embed_dim)

    def forward(self, y: Tensor) -> Tensor:
        u = (y.reshape(y.shape[0], -1) - self.y_loc) / self.y_scale
        return self.mlp(u) + self.skip(u)


class _ConditionalGaussian(nf.flows.Flow):
    """``z = loc(c) + L(c) u`` with ``L`` lower triangular, ``diag L = exp(s)`` (``s`` soft-clamped to
    ``(-8, 8)``): a conditional Gaussian, exact for a linear-Gaussian problem; identity at start."""

    def __init__(self, latent_dim: int, context_dim: int):
        super().__init__()
        k = latent_dim
        self.register_buffer("rows", torch.tril_indices(k, k, -1)[0], persistent=False)
        self.register_buffer("cols", torch.tril_indices(k, k, -1)[1], persistent=False)
        self.head = nn.Linear(context_dim, 2 * k + k * (k - 1) // 2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.k = k

    @torch.no_grad()
    def start_at(self, loc: Tensor, L: Tensor) -> None:
        """Start (any context) at ``N(loc, L L^T)``: the head's bias, its weight left at zero."""
        k = self.k
        log_diag = torch.log(torch.diagonal(L)).clamp(-7.5, 7.5)
        self.head.bias[:k] = loc
        self.head.bias[k:2 * k] = 8.0 * torch.atanh(log_diag / 8.0)
        self.head.bias[2 * k:] = L[self.rows, self.cols]

    def _params(self, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.head(context)
        k = self.k
        loc, s = out[:, :k], 8.0 * torch.tanh(out[:, k:2 * k] / 8.0)
        L = torch.diag_embed(torch.exp(s))
        L = L.index_put((torch.arange(len(out), device=out.device)[:, None], self.rows, self.cols), out[:, 2 * k:])
        return loc, s, L

    def forward(self, u, context=None):
        loc, s, L = self._params(context)
        return loc + (L @ u.unsqueeze(-1)).squeeze(-1), s.sum(1)

    def inverse(self, z, context=None):
        loc, s, L = self._params(context)
        u = torch.linalg.solve_triangular(L, (z - loc).unsqueeze(-1), upper=False).squeeze(-1)
        return u, -s.sum(1)


class _SplineCoupling(nf.flows.Flow):
    """A rational-quadratic spline coupling whose conditioner also sees the context; identity at start."""

    def __init__(self, mask: Tensor, s: "AmortizedSettings"):
        super().__init__()

        def make_net(in_features, out_features):
            net = ResidualNet(in_features, out_features, hidden_features=s.hidden, context_features=s.embed_dim,
                              num_blocks=s.n_blocks)
            # Uniform bins and unit derivatives: the spline is the identity (normflows' own recipe).
            nn.init.zeros_(net.final_layer.weight)
            nn.init.constant_(net.final_layer.bias, math.log(math.exp(1 - DEFAULT_MIN_DERIVATIVE) - 1))
            return net

        self.coupling = PiecewiseRationalQuadraticCoupling(
            mask=mask, transform_net_create_fn=make_net, num_bins=s.spline_bins, tails="linear",
            tail_bound=s.tail_bound)

    def forward(self, z, context=None):
        z, log_det = self.coupling.inverse(z, context)
        return z, log_det.reshape(-1)

    def inverse(self, z, context=None):
        z, log_det = self.coupling(z, context)
        return z, log_det.reshape(-1)


def base_log_prob(eps: Tensor) -> Tensor:
    return -0.5 * (eps * eps).sum(1) - 0.5 * eps.shape[1] * math.log(2 * math.pi)


class ConditionalLatentFlow(nn.Module):
    """``q_phi(z | y)``: conditional spline couplings (normflows/nflows), then a conditional Gaussian map.

    ``context(y)`` ``[B, *obs_shape] -> [B, embed_dim]``; ``transform(eps, c)`` -> ``(z, log_q)``;
    ``log_prob(z, c)`` -> ``[B]``; ``forward(z, y)`` = ``log_prob(z, context(y))``.
    """

    def __init__(self, latent_dim: int, obs_shape: tuple[int, ...], settings: AmortizedSettings,
                 y_loc: Tensor, y_scale: Tensor):
        super().__init__()
        k, s = int(latent_dim), settings
        self.latent_dim, self.obs_shape, self.settings = k, tuple(obs_shape), s
        self.embed = _ObsEmbedding(y_loc, y_scale, s)
        layers: list[nf.flows.Flow] = []
        if k >= 2:  # k == 1 has nothing to couple: the conditional affine layer carries the fit
            for mask in masks(k, s.n_layers):
                layers.append(_SplineCoupling(mask, s))
        layers.append(_ConditionalGaussian(k, s.embed_dim))
        self.flow = nf.ConditionalNormalizingFlow(q0=nf.distributions.DiagGaussian(k, trainable=False), flows=layers)

    @torch.no_grad()
    def start_at(self, intercept: Tensor, coef: Tensor, L: Tensor) -> None:
        """Start at the Gaussian ``N(intercept + coef u, L L^T)`` (``u`` the standardised ``y``, ``coef``
        ``[k, m]``): the embedding's first ``k`` outputs carry ``coef u`` (its skip; the MLP's part zeroed) and
        the Gaussian layer adds them to its location. With ``k > embed_dim`` only the covariance is set."""
        k = self.latent_dim
        gauss = self.flow.flows[-1]
        if k <= self.settings.embed_dim:
            self.embed.skip.weight[:k] = coef
            self.embed.skip.bias[:k] = 0.0
            self.embed.mlp[-1].weight[:k] = 0.0
            self.embed.mlp[-1].bias[:k] = 0.0
            gauss.head.weight[:k, :k] = torch.eye(k)
        gauss.start_at(intercept, L)

    def context(self, y: Tensor) -> Tensor:
        return self.embed(y)

    def transform(self, eps: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``eps [B, k] -> (z, log q(z | y))`` (layers applied here: normflows accumulates in float32)."""
        u, log_det = eps, torch.zeros(eps.shape[0], dtype=eps.dtype, device=eps.device)
        for layer in self.flow.flows:
            u, ld = layer(u, context=context)
            log_det = log_det + ld
        return u, base_log_prob(eps) - log_det

    def log_prob(self, z: Tensor, context: Tensor) -> Tensor:
        eps, log_det = z, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for layer in reversed(self.flow.flows):
            eps, ld = layer.inverse(eps, context=context)
            log_det = log_det + ld
        return base_log_prob(eps) + log_det

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.log_prob(z, self.context(y))


class ConditionedFlow(nn.Module):
    """``q_phi(. | y)`` for one fixed ``y`` with the `LatentFlow` interface (``transform(eps)``, ``log_prob(z)``,
    ``sample(n, generator)``): what `fit_flow` fine-tunes for ``--refine`` (the context is a fixed buffer, the
    coupling and Gaussian layers are trained)."""

    def __init__(self, model: ConditionalLatentFlow, y: Tensor, share: bool = False):
        super().__init__()
        self.latent_dim = model.latent_dim
        # share=True: a view for sampling (no copy); False: an own copy to fine-tune
        self.layers = model.flow.flows if share else copy.deepcopy(model.flow.flows)
        with torch.no_grad():
            self.register_buffer("ctx", model.context(y.reshape(1, *model.obs_shape).float()).detach().clone())
        self.register_buffer("loc", torch.zeros(self.latent_dim))  # where LatentFlow keeps its device

    def transform(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        c = self.ctx.expand(eps.shape[0], -1)
        u, log_det = eps, torch.zeros(eps.shape[0], dtype=eps.dtype, device=eps.device)
        for layer in self.layers:
            u, ld = layer(u, context=c)
            log_det = log_det + ld
        return u, base_log_prob(eps) - log_det

    def log_prob(self, z: Tensor) -> Tensor:
        c = self.ctx.expand(z.shape[0], -1)
        eps, log_det = z, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for layer in reversed(self.layers):
            eps, ld = layer.inverse(eps, context=c)
            log_det = log_det + ld
        return base_log_prob(eps) + log_det

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(torch.randn(n, self.latent_dim, generator=generator, device=self.loc.device))

    forward = log_prob
