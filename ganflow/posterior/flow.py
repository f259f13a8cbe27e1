"""Stage two: a normalizing-flow variational posterior in the latent space, fitted by reverse KL.

The flow is ``z = T_phi(eps)``, ``eps ~ N(0, I_k)`` (a fixed, non-trainable base), with

    T_phi = (affine a) o (coupling layers, normflows)

where the optional fixed affine map ``a(u) = mu + L u`` comes from a Laplace approximation (MAP and the
latent Hessian; ``init="laplace"``) or is the identity (``init="identity"``), and the coupling layers start at
the identity. It is fitted by minimising

    KL(q_phi || p(z|y)) = E_eps[ log q_phi(T_phi(eps)) - log p(y, T_phi(eps)) ] + log p(y),

i.e. maximising the ELBO ``E_q[log p(y, z) - log q(z)] <= log p(y)``, with a batch of draws per step
(Dasgupta et al., CMAME 2024). The default gradient estimator is "sticking the landing" (Roeder, Wu &
Duvenaud, NeurIPS 2017): ``log q`` is evaluated with the flow's parameters held fixed, which drops a
zero-mean score term and makes the gradient variance vanish as ``q`` approaches the posterior.

Coupling layers:

- ``kind="affine"`` (default): masked affine couplings (Dinh et al. 2017) with one conditioner MLP (normflows)
  giving both the log-scale and the shift, its last layer zero-initialised (identity start); log-scales are
  soft-clamped, ``c * tanh(s / c)``, so that one step can never blow a scale up.
- ``kind="realnvp"``: the same couplings as normflows' ``MaskedAffineFlow``, with two conditioner MLPs (one for
  the log-scale, one for the shift): twice the small matrix products per layer, which at the small batches of a
  fit is most of the flow's own cost (the earlier default, kept so that posterior files written with it load).
- ``kind="spline"``: rational-quadratic spline couplings (Durkan et al. 2019), identity-initialised.

Both are as fast in the sampling direction as in the density direction.

Multimodal posteriors: `laplace_modes` finds the distinct modes of the MAP search (hill-valley test, Laplace
masses); with more than one, `fit_flow` fits one flow per mode and returns their `MixtureFlow`, weighted by
importance sampling (`ganflow.posterior.mixture`). With one mode it is the single flow, draw for draw.

Example:
    >>> import torch
    >>> flow = LatentFlow(4, FlowSettings(n_layers=2, hidden=8))
    >>> z, log_q = flow.sample(3, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(flow.log_prob(z), log_q, atol=1e-5))
    True
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import normflows as nf
import numpy as np
import torch
from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling
from normflows.nets.resnet import ResidualNet
from normflows.utils.splines import DEFAULT_MIN_DERIVATIVE
from torch import Tensor, nn

from ..errors import GanflowError
from ..progress import Progress
from .base import LatentFit
from .mixture import MixtureFlow, fit_mixture_weights
from .target import LatentTarget

__all__ = ["FlowSettings", "LatentFlow", "LaplaceMode", "fit_flow", "laplace_approximation", "laplace_modes",
           "flow_from_state", "load_flow_checkpoint"]


@dataclass(frozen=True)
class FlowSettings:
    """Settings of the flow posterior (TOML table ``[flow]``)."""

    kind: Literal["affine", "realnvp", "spline"] = "affine"
    n_layers: int = 8  # coupling layers
    hidden: int = 64  # hidden units of each conditioner
    n_hidden_layers: int = 2
    scale_clamp: float = 2.0  # soft bound on each layer's log-scale (affine, realnvp)
    spline_bins: int = 8
    spline_tail_bound: float = 4.0
    # "laplace": start from the Laplace approximation (MAP + latent Hessian), so training only has to learn
    # the non-Gaussian part; converges ~10x faster than "identity" on near-Gaussian posteriors.
    init: Literal["identity", "laplace"] = "laplace"
    # random starts of the MAP search (init="laplace"); from 8 on, the best quarter is kept after a third of
    # map_iter. Multimodal posteriors (phase retrieval: 64) need many.
    map_starts: int = 8
    map_iter: int = 300
    # Warm restarts of the search's survivors (the cosine schedule run again from the top, at most map_restarts
    # times; stopped once a cycle raises the best log p(y, z) by less than MAP_RESTART_TOL nats). On a rugged
    # posterior one cycle stops in a shallow local optimum, and the restart's large steps leave it: on the
    # benchmark's phase-retrieval observation the best of 64 starts rose from log p 2321.7, 5.4 posterior sd
    # from the NUTS mean, to 2340.2, 1.1 sd from it, in 5 cycles (+15 s); the flow fitted from the first one
    # stayed 0.36 sd off. 0 keeps the single cycle.
    map_restarts: int = 0
    # Multimodal posteriors (init="laplace"): the distinct modes of the MAP search (a valley deeper than
    # mode_barrier nats on the segment between two optima; starts the screen dropped are checked too) each get a
    # flow, at most max_modes of them (the most massive by Laplace mass), and modes with less than
    # mode_min_mass of the total Laplace mass are dropped. One mode left: the single flow, exactly as before.
    # The mixture weights come from weight_draws importance draws of each component (see posterior/mixture.py).
    max_modes: int = 4
    mode_min_mass: float = 1e-3
    mode_barrier: float = 1.0
    weight_draws: int = 1024
    batch_size: int = 64  # draws per step
    max_iter: int = 2000
    min_iter: int = 100
    lr: float = 3e-3
    lr_final: float = 1e-5  # cosine decay from lr to lr_final over max_iter
    warmup: int = 100  # linear warm-up steps
    grad_clip: float = 10.0  # max global gradient norm
    estimator: Literal["stl", "standard", "dreg"] = "stl"
    # estimator "dreg": the importance-weighted bound over groups of iw_group draws (batch_size a multiple)
    iw_group: int = 8
    # estimator "dreg": the Renyi (VR) bound of order iw_alpha over each group, 1/(1-a) log mean w^(1-a):
    # 0 is the importance-weighted bound, towards 1 the ELBO (milder weights, lower gradient variance)
    iw_alpha: float = 0.0
    # Tempering: over the first temper_fraction of max_iter the fit's target is p(z) p(y|z)^beta, beta rising
    # geometrically from temper_beta0 to 1, so the flow spreads before it sharpens; 0 is off. A mixture's
    # components are not tempered (each must stay in its mode).
    temper_fraction: float = 0.0
    temper_beta0: float = 0.1
    patience: int = 100  # stop when the smoothed ELBO has not improved by `tol` for this many steps
    tol: float = 0.01  # nats
    smoothing: float = 0.99  # EMA factor of the smoothed ELBO
    max_failures: int = 20  # non-finite steps tolerated (each undone, lr halved)
    checkpoint_every_s: float = 60.0  # resumable fit checkpoints (when a checkpoint path is given)
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.n_layers >= 1, "flow.n_layers must be >= 1"),
            (self.hidden >= 1, "flow.hidden must be >= 1"),
            (self.n_hidden_layers >= 1, "flow.n_hidden_layers must be >= 1"),
            (self.scale_clamp > 0, "flow.scale_clamp must be > 0"),
            (self.spline_bins >= 2, "flow.spline_bins must be >= 2"),
            (self.spline_tail_bound > 0, "flow.spline_tail_bound must be > 0"),
            (self.batch_size >= 2, "flow.batch_size must be >= 2"),
            (self.max_iter >= 0, "flow.max_iter must be >= 0"),
            (0 <= self.min_iter, "flow.min_iter must be >= 0"),
            (self.lr > 0 and self.lr_final > 0, "flow.lr and flow.lr_final must be > 0"),
            (self.warmup >= 0, "flow.warmup must be >= 0"),
            (self.grad_clip > 0, "flow.grad_clip must be > 0"),
            (self.patience >= 1, "flow.patience must be >= 1"),
            (0 <= self.smoothing < 1, "flow.smoothing must be in [0, 1)"),
            (self.max_failures >= 0, "flow.max_failures must be >= 0"),
            (self.checkpoint_every_s >= 0, "flow.checkpoint_every_s must be >= 0"),
            (self.map_starts >= 1 and self.map_iter >= 1, "flow.map_starts and flow.map_iter must be >= 1"),
            (self.map_restarts >= 0, "flow.map_restarts must be >= 0"),
            (self.max_modes >= 1, "flow.max_modes must be >= 1"),
            (0 <= self.mode_min_mass < 1, "flow.mode_min_mass must be in [0, 1)"),
            (self.mode_barrier > 0, "flow.mode_barrier must be > 0"),
            (self.weight_draws >= 10, "flow.weight_draws must be >= 10"),
            (self.iw_group >= 1 and self.batch_size % self.iw_group == 0,
             "flow.iw_group must be >= 1 and divide flow.batch_size"),
            (0 <= self.iw_alpha < 1, "flow.iw_alpha must be in [0, 1)"),
            (0 <= self.temper_fraction <= 1, "flow.temper_fraction must be in [0, 1]"),
            (0 < self.temper_beta0 <= 1, "flow.temper_beta0 must be in (0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GanflowError(msg)


def _masks(k: int, n_layers: int) -> list[Tensor]:
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
            for mask in _masks(k, settings.n_layers):
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


def _latent_hessian_eig(target: LatentTarget, z: Tensor, fd_step: float, chunk: int) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of ``-Hessian`` of ``log p(y, z)`` at ``z`` by central differences of the gradient
    (``2k`` points, in chunks: in one batch they were the memory peak of a 256x256 solve); eigenvalues floored
    at 1, the prior's precision, which a Gauss-Newton Hessian never falls below."""
    k = z.shape[0]
    eye = torch.eye(k)
    pts = torch.cat([z + fd_step * eye, z - fd_step * eye])
    g = torch.cat([target.log_joint_and_grad(c)[1] for c in pts.split(chunk)])
    H = (g[:k] - g[k:]).double() / (2 * fd_step)
    evals, evecs = torch.linalg.eigh(-0.5 * (H + H.T))
    if not torch.isfinite(evals).all():
        raise GanflowError("Laplace approximation: the latent Hessian is not finite")
    return evals.clamp(min=1.0), evecs


def _log_joints(target: LatentTarget, z: Tensor) -> Tensor:
    """``log p(y, z)`` ``[n]`` without gradients, NaN read as ``-inf`` (a point to rank last, not to crash on)."""
    with torch.no_grad():
        return torch.nan_to_num(target.log_joint(z), nan=-math.inf)


def most_massive_mode(target: LatentTarget, z: Tensor, fd_step: float = 1e-2, chunk: int = 32,
                      n_candidates: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of the ``n_candidates`` points of ``z`` ``[n, k]`` with the highest ``log p(y, z)``, the one with the most
    Laplace mass, ``log p(y, z*) + 1/2 log det Sigma``: a narrow spike can have the highest density and little
    mass (on the elliptic posterior the highest-density mode gave coverage 0.44, the most massive 0.62).
    Returns ``(z*, eigenvalues, eigenvectors of -Hessian at z*, log p(y, z*))``.
    """
    lp = _log_joints(target, z)
    best_mass, chosen, error = -math.inf, None, None
    for i in torch.argsort(lp, descending=True)[:n_candidates].tolist():
        if not math.isfinite(float(lp[i])):
            continue
        try:
            evals, evecs = _latent_hessian_eig(target, z[i], fd_step, chunk)
        except GanflowError as e:
            error = e
            continue
        mass = float(lp[i]) - 0.5 * float(torch.log(evals).sum())
        if mass > best_mass:
            best_mass, chosen = mass, (z[i].clone(), evals, evecs, lp[i].detach())
    if chosen is None:
        raise error or GanflowError("Laplace approximation: log p(y, z) is not finite at any MAP start")
    return chosen


def _map_lr(it: int, s: FlowSettings) -> float:
    """The MAP search's cosine learning-rate schedule, 0.05 down to 1e-3 over ``map_iter``."""
    return 1e-3 + 0.5 * (0.05 - 1e-3) * (1 + math.cos(math.pi * it / s.map_iter))


def _map_stage(target: LatentTarget, z: Tensor, it: int, stage_end: int, s: FlowSettings,
               generator: torch.Generator | None) -> Tensor:
    """Adam uphill on ``log p(y, z)`` from iteration ``it`` to ``stage_end``; a start that diverges restarts from
    a prior draw of ``generator`` (or, without one, from the prior mean: the extra starts draw nothing)."""
    k = z.shape[1]
    z = z.detach().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=_map_lr(it, s))
    while it < stage_end:
        for group in opt.param_groups:
            group["lr"] = _map_lr(it, s)
        opt.zero_grad()
        lp = target.log_joint(z)
        it += 1
        if not torch.isfinite(lp).all():
            bad = ~torch.isfinite(lp)
            with torch.no_grad():  # restart diverged starts
                z[bad] = (torch.randn(int(bad.sum()), k, generator=generator) if generator is not None
                          else torch.zeros(int(bad.sum()), k, dtype=z.dtype, device=z.device))
            continue
        (-lp.sum()).backward()
        opt.step()
    return z.detach()


def _map_search(target: LatentTarget, s: FlowSettings, generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """The screened multi-start MAP search: ``(survivors [m, k] after map_iter and the warm restarts, the starts
    the screen dropped [n, k] as they were at the screen, the screen's iteration)``."""
    z = torch.randn(s.map_starts, target.latent_dim, generator=generator)
    # Screening: every start runs the first third of the iterations, then only the best quarter goes on. On a
    # multimodal posterior (phase retrieval) many starts find the good basin far more often than few, and
    # the screen makes 4x the starts cost about 2x the evaluations.
    screen = s.map_starts >= 8 and s.map_iter >= 3
    if not screen:
        z = _map_stage(target, z, 0, s.map_iter, s, generator)
        return _map_restart(target, z, s, generator), z[:0], s.map_iter
    it_screen = s.map_iter // 3
    z = _map_stage(target, z, 0, it_screen, s, generator)
    lp = _log_joints(target, z)
    order = torch.argsort(lp, descending=True)
    keep = max(1, s.map_starts // 4)
    survivors = _map_stage(target, z[order[:keep]], it_screen, s.map_iter, s, generator)
    return _map_restart(target, survivors, s, generator), z[order[keep:]], it_screen


MAP_RESTART_TOL = 0.5  # nats: a warm restart that raises the best log p(y, z) by less ends the restarts


def _map_restart(target: LatentTarget, z: Tensor, s: FlowSettings, generator: torch.Generator | None) -> Tensor:
    """Up to ``map_restarts`` more cycles of the search's schedule from ``z`` (warm restarts), while each raises
    the best ``log p(y, z)`` by at least `MAP_RESTART_TOL`. Each start keeps the better of its old and new
    point, so no start ends lower than it began."""
    if s.map_restarts == 0:
        return z
    lp = _log_joints(target, z)
    for _ in range(s.map_restarts):
        z_new = _map_stage(target, z.clone(), 0, s.map_iter, s, generator)  # it updates its input in place
        lp_new = _log_joints(target, z_new)
        gain = float(lp_new.max() - lp.max())
        better = lp_new > lp
        z, lp = torch.where(better[:, None], z_new, z), torch.where(better, lp_new, lp)
        if not gain >= MAP_RESTART_TOL:
            break
    return z


def _scale_tril(evals: Tensor, evecs: Tensor) -> Tensor:
    """``L`` with ``L L^T = V diag(1 / evals) V^T``, the Laplace covariance."""
    cov = (evecs * (1.0 / evals)) @ evecs.T
    return torch.linalg.cholesky(0.5 * (cov + cov.T)).float()


def laplace_approximation(target: LatentTarget, settings: FlowSettings, generator: torch.Generator,
                          fd_step: float = 1e-2) -> tuple[Tensor, Tensor, Tensor]:
    """MAP of ``log p(z|y)`` from several prior starts, and ``L`` with ``L L^T = (-Hessian)^-1`` at the MAP.

    The Hessian is taken by central finite differences of the gradient (``2k`` points, in batches),
    which works for any operator, including ones whose backward is not itself differentiable; its
    eigenvalues are floored at 1 (the prior's precision, which a Gauss-Newton Hessian never falls below).
    Returns ``(map [k], scale_tril [k, k], log_joint_at_map)``.
    """
    survivors, _, _ = _map_search(target, settings, generator)
    z_map, evals, evecs, lp_map = most_massive_mode(target, survivors, fd_step, max(settings.batch_size, 32))
    return z_map, _scale_tril(evals, evecs), lp_map


@dataclass(frozen=True)
class LaplaceMode:
    """A local mode of ``p(z|y)``: the MAP ``loc`` ``[k]``, ``scale_tril`` ``[k, k]`` (``L L^T`` the Laplace
    covariance), ``log_joint`` ``log p(y, z*)`` and ``log_mass`` ``log p(y, z*) + 1/2 log det Sigma`` (the Laplace
    evidence, up to the constant ``k/2 log 2 pi`` common to all modes)."""

    loc: Tensor
    scale_tril: Tensor
    log_joint: float
    log_mass: float


def _mode(z: Tensor, evals: Tensor, evecs: Tensor, lp) -> LaplaceMode:
    return LaplaceMode(z.detach().clone(), _scale_tril(evals, evecs), float(lp),
                       float(lp) - 0.5 * float(torch.log(evals).sum()))


def _valleys(target: LatentTarget, z: Tensor, lp: float, anchors: Tensor, lp_anchors: Tensor, barrier: float,
             n_points: int = 5) -> Tensor:
    """``[m]``: whether the segment from ``z`` to each anchor dips more than ``barrier`` nats below its lower end
    (the hill-valley test, Ursem 1999): the two lie on different hills of ``log p(y, z)``."""
    t = torch.linspace(0, 1, n_points + 2, dtype=z.dtype, device=z.device)[1:-1]
    pts = z + t[None, :, None] * (anchors[:, None, :] - z)
    lp_path = _log_joints(target, pts.reshape(-1, z.shape[0]))
    return lp_path.reshape(anchors.shape[0], n_points).amin(1) < torch.clamp(lp_anchors, max=lp) - barrier


def _distinct(target: LatentTarget, z: Tensor, s: FlowSettings, max_new: int,
              anchors: Tensor | None = None) -> Tensor:
    """The points of ``z`` ``[n, k]`` (best ``log p`` first) on hills that no anchor and no better point holds:
    at most ``max_new`` of them."""
    lp = _log_joints(target, z)
    with torch.no_grad():
        lp_anchors = None if anchors is None else target.log_joint(anchors)
    kept: list[int] = []
    for i in torch.argsort(lp, descending=True).tolist():
        if len(kept) >= max_new or not math.isfinite(float(lp[i])):
            break
        pool = [anchors] if anchors is not None else []
        pool_lp = [lp_anchors] if anchors is not None else []
        pool, pool_lp = torch.cat(pool + [z[kept]]), torch.cat(pool_lp + [lp[kept]])
        if pool.shape[0] == 0 or bool(_valleys(target, z[i], float(lp[i]), pool, pool_lp, s.mode_barrier).all()):
            kept.append(i)
    return z[kept]


def laplace_modes(target: LatentTarget, settings: FlowSettings, generator: torch.Generator,
                  fd_step: float = 1e-2) -> list[LaplaceMode]:
    """The distinct modes of ``p(z|y)`` with their Laplace approximations, most massive first.

    The first is `laplace_approximation`'s (same draws from ``generator``, same numbers). Then every other
    optimum of the search, and every start the screen dropped, that lies on a hill of its own (a valley deeper
    than ``mode_barrier`` on the segment to each mode found) is a candidate: dropped starts are first polished
    to ``map_iter`` like the survivors (drawing nothing from ``generator``). The costs are capped for the many
    minor hills of a rugged posterior (phase retrieval: 8 of 16 survivors, all with < 1e-3 of the mass): at most
    ``max_modes`` dropped starts are polished and ``max_modes`` Hessians taken, the highest first. The
    ``max_modes`` most massive modes are kept, less any with under ``mode_min_mass`` of their total Laplace mass.
    """
    s = settings
    survivors, dropped, it_screen = _map_search(target, s, generator)
    chunk = max(s.batch_size, 32)
    modes = [_mode(*most_massive_mode(target, survivors, fd_step, chunk))]
    if s.max_modes == 1:
        return modes
    reps = _distinct(target, survivors, s, 2 * s.max_modes)
    new = _distinct(target, dropped, s, s.max_modes, reps) if dropped.shape[0] else dropped
    if new.shape[0]:
        new = _map_stage(target, new, it_screen, s.map_iter, s, None)
    for z in _distinct(target, torch.cat([reps, new]), s, s.max_modes, modes[0].loc[None]):
        try:
            with torch.no_grad():
                lp = target.log_joint(z[None])[0]
            modes.append(_mode(z, *_latent_hessian_eig(target, z, fd_step, chunk), lp))
        except GanflowError:
            continue  # a non-finite Hessian: not a mode to fit
    modes = sorted(modes, key=lambda m: -m.log_mass)[: s.max_modes]
    total = torch.logsumexp(torch.tensor([m.log_mass for m in modes]), 0)
    return [m for m in modes if m.log_mass - float(total) >= math.log(max(s.mode_min_mass, 1e-300))]


def _lr_factor(step: int, s: FlowSettings) -> float:
    if step < s.warmup:
        return (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, s.max_iter - s.warmup))
    ratio = s.lr_final / s.lr
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * t))


FLOW_CHECKPOINT_KIND = "ganflow.flow_fit"
FLOW_CHECKPOINT_VERSION = 1
# Settings that may differ on resume: they change neither the computation nor the result.
_RESUME_FREE = {"progress", "max_iter", "patience", "min_iter", "max_failures", "checkpoint_every_s"}


def _target_fingerprint(target: LatentTarget) -> str:
    """What a checkpoint must have been fitted against: the data, sigma and the latent dimension."""
    h = hashlib.sha1(target.y.detach().cpu().float().numpy().tobytes())
    h.update(f"{target.noise_sigma!r}|{target.latent_dim}|{tuple(target.obs_shape)}".encode())
    return h.hexdigest()


def load_flow_checkpoint(path: str | os.PathLike) -> dict:
    """Load a flow-fit checkpoint with ``weights_only=True`` (a pickle payload is refused, never run)."""
    from ..checkpoint import load_of_kind

    return load_of_kind(path, "flow checkpoint", "ganflow flow-fit checkpoint", FLOW_CHECKPOINT_KIND,
                        FLOW_CHECKPOINT_VERSION)


@dataclass
class _FlowFit:
    """One flow fit: what it was set up with, and the state each step changes and a checkpoint stores."""

    target: LatentTarget
    settings: FlowSettings
    generator: torch.Generator
    t0: float  # perf_counter when this process started the fit
    evals0: int  # the target's forward evaluations before this process started the fit
    flow: LatentFlow
    opt: torch.optim.Optimizer
    params: list[Tensor]
    loc: Tensor | None  # the fixed affine start (Laplace), or None for the identity
    scale_tril: Tensor | None
    attrs: dict
    good: tuple[dict, dict]  # the last good (flow, optimiser) snapshot a non-finite step rolls back to
    lr_scale: float = 1.0
    losses: list = field(default_factory=list)
    elbo_smooth: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    smooth: float | None = None
    best_smooth: float = -math.inf
    best_step: int = 0
    failures: int = 0
    step: int = 0
    evals_before: int = 0  # forward evaluations of the interrupted run(s)
    # a component of a mixture over modes: it must stay in its mode, so estimator "dreg" (mass-covering) falls
    # back to "stl" there (measured: on the twin problem DReG components spread over both modes and diverged)
    component: bool = False
    wall_before: float = 0.0

    def n_forward_evals(self) -> int:
        return self.evals_before + self.target.n_forward_evals - self.evals0

    def wall_time_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0


def _snapshot(flow: LatentFlow, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the flow's and the optimiser's state to roll back to."""
    # Plain tensor clones (cheaper than deepcopy of the whole dicts).
    model = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    opt_state = opt.state_dict()
    opt_copy = {
        "state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                  for i, st in opt_state["state"].items()},
        "param_groups": copy.deepcopy(opt_state["param_groups"]),
    }
    return model, opt_copy


def _load_resume_checkpoint(target: LatentTarget, s: FlowSettings, checkpoint_path) -> dict:
    """The checkpoint to resume from, refused unless it was fitted with these settings to this target."""
    if checkpoint_path is None:
        raise GanflowError("resume needs a checkpoint path")
    if not os.path.exists(checkpoint_path):
        raise GanflowError(f"--resume: no flow checkpoint at {checkpoint_path}")
    ckpt = load_flow_checkpoint(checkpoint_path)
    try:
        saved = dict(ckpt["settings"])
        fingerprint = ckpt["target"]
    except (KeyError, TypeError, ValueError):
        raise GanflowError(f"flow checkpoint {checkpoint_path} lacks its settings or target") from None
    bad = sorted(key for key in set(saved) | set(asdict(s))
                 if key not in _RESUME_FREE and saved.get(key) != asdict(s).get(key))
    if bad:
        raise GanflowError(f"--resume: flow settings differ from the checkpoint's: {', '.join(bad)}")
    if fingerprint != _target_fingerprint(target):
        raise GanflowError(f"--resume: {checkpoint_path} was fitted to other data, noise or prior")
    return ckpt


def _start_fit(target: LatentTarget, s: FlowSettings, g: torch.Generator, ckpt: dict | None,
               t0: float, evals0: int, mode: LaplaceMode | None = None, attrs: dict | None = None,
               start: nn.Module | None = None) -> _FlowFit:
    """Set-up: the affine start (the Laplace ``mode``, or the checkpoint's), the flow, its optimiser and the
    first snapshot. ``start``: a flow to begin from instead (a copy is trained; `ganflow.posterior.amortized`
    refinement)."""
    attrs = dict(attrs or {})
    loc = scale_tril = None
    if ckpt is not None:
        if ckpt.get("init_loc") is not None:
            loc, scale_tril = ckpt["init_loc"], ckpt["init_scale_tril"]
        attrs.update(ckpt.get("attrs", {}))
    elif start is not None:
        attrs["init"] = "given"
    elif mode is not None:
        loc, scale_tril = mode.loc, mode.scale_tril
    # Layer initialisation draws from torch's global RNG: seed it from `g` (and restore it) so the fit
    # depends only on the generator passed in. (On resume the draw is repeated but overwritten below.)
    init_seed = int(torch.randint(0, 2**62, (1,), generator=g)) if ckpt is None else 0
    if start is not None:
        flow = copy.deepcopy(start).train().requires_grad_(True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            flow = LatentFlow(target.latent_dim, s, loc, scale_tril)
    params = [p for p in flow.parameters() if p.requires_grad]
    # fused: one kernel for all parameters (at batch 16 the per-tensor loop cost 2.3 ms a step, fused 0.7 ms)
    opt = torch.optim.Adam(params, lr=s.lr, fused=True)
    return _FlowFit(target=target, settings=s, generator=g, t0=t0, evals0=evals0, flow=flow, opt=opt,
                    params=params, loc=loc, scale_tril=scale_tril, attrs=attrs, good=_snapshot(flow, opt))


def _restore_fit(fit: _FlowFit, ckpt: dict, checkpoint_path) -> None:
    """Resume: put the interrupted fit's flow, optimiser, snapshot, RNG state, step and traces back."""
    try:
        fit.flow.load_state_dict(ckpt["flow"])
        fit.opt.load_state_dict(ckpt["opt"])
        fit.good = (ckpt["good_flow"], ckpt["good_opt"])
        fit.generator.set_state(ckpt["rng"])
        fit.step, fit.failures, fit.lr_scale = int(ckpt["step"]), int(ckpt["failures"]), float(ckpt["lr_scale"])
        fit.smooth = None if ckpt["smooth"] is None else float(ckpt["smooth"])
        fit.best_smooth, fit.best_step = float(ckpt["best_smooth"]), int(ckpt["best_step"])
        fit.losses = ckpt["losses"].tolist()
        fit.elbo_smooth = ckpt["elbo_smooth"].tolist()
        fit.lrs = ckpt["lrs"].tolist()
        fit.evals_before, fit.wall_before = int(ckpt["n_forward_evals"]), float(ckpt["wall_time_s"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GanflowError(f"flow checkpoint {checkpoint_path} does not fit this flow ({first[:160]})") from None


def _save_fit_checkpoint(fit: _FlowFit, checkpoint_path, mixture: dict | None = None) -> None:
    """Write the whole fit state atomically (tensors and plain types: ``weights_only``-loadable); for a
    mixture, ``mixture`` holds its modes and finished components and ``fit`` is the component in progress."""
    from ..checkpoint import save_checkpoint

    cpu = lambda sd: copy.deepcopy({k_: v for k_, v in sd.items()})  # noqa: E731
    save_checkpoint(checkpoint_path, {
        "kind": FLOW_CHECKPOINT_KIND,
        "format_version": FLOW_CHECKPOINT_VERSION,
        "settings": asdict(fit.settings),
        "target": _target_fingerprint(fit.target),
        "latent_dim": fit.target.latent_dim,
        "init_loc": None if fit.loc is None else fit.loc.detach().cpu().clone(),
        "init_scale_tril": None if fit.scale_tril is None else fit.scale_tril.detach().cpu().clone(),
        "attrs": {k_: v for k_, v in fit.attrs.items() if isinstance(v, (int, float, str, bool))
                  or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))},
        "flow": cpu(fit.flow.state_dict()),
        "opt": cpu(fit.opt.state_dict()),
        "good_flow": fit.good[0],
        "good_opt": fit.good[1],
        "rng": fit.generator.get_state(),
        "step": fit.step,
        "failures": fit.failures,
        "lr_scale": fit.lr_scale,
        "smooth": fit.smooth,
        "best_smooth": fit.best_smooth,
        "best_step": fit.best_step,
        "losses": torch.tensor(fit.losses, dtype=torch.float64),
        "elbo_smooth": torch.tensor(fit.elbo_smooth, dtype=torch.float64),
        "lrs": torch.tensor(fit.lrs, dtype=torch.float64),
        "n_forward_evals": fit.n_forward_evals(),
        "wall_time_s": fit.wall_time_s(),
        **({"mixture": mixture} if mixture is not None else {}),
    })


class _StopGradientTwin:
    """``log q`` with the flow's parameters held fixed (the STL estimator): a frozen copy synced in place."""

    def __init__(self, flow: LatentFlow):
        # A plain parameter copy each step; torch.func.functional_call's per-call re-parametrisation cost ~1/3
        # of a step.
        self.frozen = copy.deepcopy(flow).requires_grad_(False)
        self.frozen_tensors = list(self.frozen.parameters()) + list(self.frozen.buffers())
        self.live_tensors = list(flow.parameters()) + list(flow.buffers())

    def __call__(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            torch._foreach_copy_(self.frozen_tensors, self.live_tensors)  # one call, not one per tensor
        return self.frozen(z)


def _dreg_surrogate(log_w: Tensor, group: int, alpha: float = 0.0) -> Tensor:
    """The doubly reparameterised surrogate of the importance-weighted bound (Tucker et al., ICLR 2019): over
    groups of ``group`` draws, ``-sum_k stop(w~_k^2) log w_k`` with ``w~`` the normalised weights and ``log q``
    taken with the parameters held fixed. Its gradient is that of the IW bound, which covers the posterior's mass
    better than the ELBO (the reverse-KL fit is too narrow); its value is not the bound, so the recorded loss
    is the plain negative ELBO.

    With ``alpha`` in (0, 1) the bound is Renyi's (Li & Turner 2016), ``1/(1-a) log mean_k w_k^(1-a)``; with
    ``w~`` now normalised ``w^(1-a)``, moving the score term onto the path (as DReG does) gives the coefficient
    ``a w~_k + (1-a) w~_k^2`` in place of ``w~_k^2``: ``alpha = 0`` is the IW bound above, ``alpha -> 1`` the
    sticking-the-landing ELBO gradient (``1/K`` each)."""
    lw = log_w.reshape(-1, group)
    w = torch.softmax((1 - alpha) * lw.detach(), dim=1)
    surrogate = -((alpha * w + (1 - alpha) * w * w) * lw).sum(1).mean()
    elbo = log_w.mean()
    return surrogate - surrogate.detach() - elbo.detach()


def _step(fit: _FlowFit, twin: _StopGradientTwin, lr: float) -> Tensor | None:
    """One optimisation step on a fresh batch; the loss, or None when the loss or a gradient is not finite."""
    s = fit.settings
    for group in fit.opt.param_groups:
        group["lr"] = lr
    eps = torch.randn(s.batch_size, fit.target.latent_dim, generator=fit.generator)
    z, log_q = fit.flow.transform(eps)
    if s.estimator in ("stl", "dreg"):
        log_q = twin(z)
    beta = _temper_beta(fit)
    if beta < 1:  # the tempered target; the recorded loss stays the untempered negative ELBO
        log_lik, log_prior = fit.target.log_likelihood(z), fit.target.log_prior(z)
        log_p, log_p_fit = log_lik + log_prior, beta * log_lik + log_prior
    else:
        log_p = log_p_fit = fit.target.log_joint(z)
    if s.estimator == "dreg" and not fit.component:
        loss = _dreg_surrogate(log_p_fit - log_q, s.iw_group, s.iw_alpha)
    else:
        loss = (log_q - log_p_fit).mean()
    if beta < 1:
        loss = loss - loss.detach() + (log_q - log_p).mean().detach()
    fit.opt.zero_grad(set_to_none=True)
    ok = bool(torch.isfinite(loss))
    if ok:
        loss.backward()
        # One reduction instead of a check per tensor: the total norm is finite iff every gradient is.
        grad_norm = torch.nn.utils.clip_grad_norm_(fit.params, s.grad_clip, foreach=True)
        ok = bool(torch.isfinite(grad_norm))
    if ok:  # finite gradients clipped to grad_clip: Adam's step is finite too (no check of the parameters)
        fit.opt.step()
    return loss.detach() if ok else None


def _temper_end(fit: _FlowFit) -> int:
    """The step from which the fit's target is the posterior itself (0 without tempering, or for a component)."""
    return 0 if fit.component else int(round(fit.settings.temper_fraction * fit.settings.max_iter))


def _temper_beta(fit: _FlowFit) -> float:
    """The likelihood's power at this step: ``beta0^(1 - step / end)`` before the tempering's end, then 1."""
    end = _temper_end(fit)
    return 1.0 if fit.step >= end else fit.settings.temper_beta0 ** (1 - fit.step / end)


def _roll_back(fit: _FlowFit) -> None:
    """Undo a non-finite step: model and optimiser back to the last good snapshot, learning rate halved."""
    fit.failures += 1
    fit.flow.load_state_dict(fit.good[0])
    # A copy: the optimiser adopts the given tensors and updates them in place, which would corrupt the
    # snapshot for a second rollback.
    fit.opt.load_state_dict(copy.deepcopy(fit.good[1]))
    fit.lr_scale *= 0.5


def _record(fit: _FlowFit, elbo: float, lr: float) -> None:
    """Book a good step: snapshot every 50 steps, the smoothed ELBO, the traces and the best so far."""
    s = fit.settings
    if fit.step % 50 == 0:
        fit.good = _snapshot(fit.flow, fit.opt)
    fit.smooth = elbo if fit.smooth is None else s.smoothing * fit.smooth + (1 - s.smoothing) * elbo
    fit.losses.append(-elbo)
    fit.elbo_smooth.append(fit.smooth)
    fit.lrs.append(lr)
    if fit.smooth > fit.best_smooth + s.tol or fit.step < _temper_end(fit):  # patience counts from the posterior
        fit.best_smooth, fit.best_step = fit.smooth, fit.step
    fit.step += 1


def _converged(fit: _FlowFit) -> bool:
    """The stopping rule: past min_iter and warm-up, no gain of ``tol`` in the smoothed ELBO for ``patience``."""
    s = fit.settings
    return fit.step >= max(s.min_iter, s.warmup, _temper_end(fit)) and fit.step - fit.best_step > s.patience


def _optimise(fit: _FlowFit, checkpoint_path, monitor, monitor_every: int, mixture: dict | None = None,
              desc: str = "flow") -> str:
    """The loop: step until ``max_iter`` or the stopping rule, checkpointing on the clock (with ``mixture``, the
    mixture fit's own state); why it stopped."""
    s = fit.settings
    twin = _StopGradientTwin(fit.flow)

    def observe() -> None:
        if monitor is not None:
            with torch.no_grad():
                monitor(fit.step, fit.flow)

    observe()
    t_last_save = time.perf_counter()
    bar = Progress(s.max_iter, desc, enabled=s.progress, initial=fit.step)
    stopped = "max_iter"
    while fit.step < s.max_iter:
        lr = s.lr * _lr_factor(fit.step, s) * fit.lr_scale
        loss = _step(fit, twin, lr)
        if loss is None:
            _roll_back(fit)
            if fit.failures > s.max_failures:
                bar.close()
                raise GanflowError(
                    f"flow fit: {fit.failures} non-finite steps (loss or gradient); the target or operator "
                    "returns NaN/Inf; check the operator with `ganflow check-operator`"
                )
            continue
        _record(fit, -float(loss), lr)
        bar.update(1)
        if fit.step % 10 == 0:
            bar.set_postfix(elbo=f"{fit.smooth:.3f}")
        if fit.step % monitor_every == 0:
            observe()
        if _converged(fit):
            stopped = "converged"
            break
        if checkpoint_path is not None and time.perf_counter() - t_last_save >= s.checkpoint_every_s:
            _save_fit_checkpoint(fit, checkpoint_path, mixture)
            t_last_save = time.perf_counter()
    bar.close()
    if fit.step % monitor_every != 0:
        observe()
    return stopped


def _freeze(flow: nn.Module) -> nn.Module:
    flow.eval()
    for p in flow.parameters():
        p.requires_grad_(False)
    return flow


def _fit_result(fit: _FlowFit, stopped: str) -> LatentFit:
    """Write-out: freeze the flow and hand back its sampler, traces, attributes and state."""
    flow = _freeze(fit.flow)

    def sampler(n: int, gen: torch.Generator) -> Tensor:
        with torch.no_grad():
            return flow.sample(n, gen)[0]

    fit.attrs.update({
        "iterations": fit.step,
        "stopped": stopped,
        "elbo": float(fit.elbo_smooth[-1]) if fit.elbo_smooth else float("nan"),
        "nonfinite_steps": fit.failures,
        "flow_kind": fit.settings.kind,
        "n_modes": 1,
    })
    return LatentFit(
        method="flow",
        sampler=sampler,
        trace={"loss": np.asarray(fit.losses), "elbo_smooth": np.asarray(fit.elbo_smooth),
               "lr": np.asarray(fit.lrs)},
        attrs=fit.attrs,
        state={k_: v.detach().cpu().clone() for k_, v in flow.state_dict().items()},
        settings=asdict(fit.settings),
        n_forward_evals=fit.n_forward_evals(),
        wall_time_s=fit.wall_time_s(),
        model=flow,
    )


def _find_modes(target: LatentTarget, s: FlowSettings, g: torch.Generator, evals0: int) -> tuple[list, dict]:
    """The Laplace modes to start from (``[None]`` for ``init="identity"``) and their attributes."""
    if s.init != "laplace":
        return [None], {}
    modes = laplace_modes(target, s, g)
    attrs = {"laplace_log_joint_map": modes[0].log_joint,
             "laplace_forward_evals": target.n_forward_evals - evals0}
    if len(modes) > 1:
        modes, attrs["mode_screen_weights"] = _screen_modes(target, s, g, modes)
    return modes, attrs


def _screen_modes(target: LatentTarget, s: FlowSettings, g: torch.Generator,
                  modes: list[LaplaceMode]) -> tuple[list[LaplaceMode], list[float]]:
    """Before a flow is fitted per mode: each mode's share of the mass by importance sampling from the Laplace
    approximations (`fit_mixture_weights`, ``weight_draws`` draws each), and the modes under ``mode_min_mass``
    dropped (the first, the MAP's, always stays). The Laplace mass trusts a quadratic fit at a hill's top; on a
    rugged posterior it is far too large for minor hills (phase retrieval: 2 % each by Laplace, 1e-6 by
    importance sampling), and each kept mode costs a whole flow fit."""
    flows = [_laplace_flow(target.latent_dim, s, m) for m in modes]
    log_w, _ = fit_mixture_weights(target, flows, g, s.weight_draws, batch=max(s.batch_size, 32))
    w = [float(v) for v in log_w.exp()]
    keep = [m for j, m in enumerate(modes) if j == 0 or w[j] >= s.mode_min_mass]
    return keep, [round(v, 6) for v in w]


def _mixture_payload(modes: list[LaplaceMode], done: list[dict]) -> dict:
    """What a mixture fit's checkpoint adds: the modes and the finished components."""
    return {"locs": torch.stack([m.loc for m in modes]), "scale_trils": torch.stack([m.scale_tril for m in modes]),
            "log_joints": [m.log_joint for m in modes], "log_masses": [m.log_mass for m in modes], "done": done}


def _modes_from_checkpoint(mixture: dict) -> list[LaplaceMode]:
    return [LaplaceMode(loc, tril, float(lj), float(lm)) for loc, tril, lj, lm in
            zip(mixture["locs"], mixture["scale_trils"], mixture["log_joints"], mixture["log_masses"], strict=True)]


def _component_record(fit: _FlowFit, stopped: str) -> dict:
    """A finished component: its weights, traces and how it stopped (plain types, for the checkpoint)."""
    return {"state": {k_: v.detach().cpu().clone() for k_, v in fit.flow.state_dict().items()},
            "losses": torch.tensor(fit.losses, dtype=torch.float64),
            "elbo_smooth": torch.tensor(fit.elbo_smooth, dtype=torch.float64),
            "lrs": torch.tensor(fit.lrs, dtype=torch.float64), "stopped": stopped, "failures": fit.failures}


def _laplace_flow(latent_dim: int, s: FlowSettings, mode: LaplaceMode) -> LatentFlow:
    """A flow at its Laplace start, built without touching the caller's global RNG (its state is loaded or it
    stays the identity on top of the Laplace map)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LatentFlow(latent_dim, s, mode.loc, mode.scale_tril)


def _mixture_view(target: LatentTarget, s: FlowSettings, modes: list[LaplaceMode], flows: list) -> MixtureFlow:
    """For the monitor: the fitted components so far, the one in training, and the rest at their Laplace start,
    weighted by Laplace mass (the fitted weights come at the end)."""
    pending = [_laplace_flow(target.latent_dim, s, m) for m in modes[len(flows):]]
    return MixtureFlow(flows + pending, torch.tensor([m.log_mass for m in modes]))


def _fit_components(target: LatentTarget, s: FlowSettings, g: torch.Generator, modes: list[LaplaceMode],
                    attrs: dict, ckpt: dict | None, clock: tuple[float, int], checkpoint_path, monitor,
                    monitor_every: int) -> tuple[list, list[dict], _FlowFit]:
    """One flow per mode, one after the other from the same generator (a checkpoint resumes the one it was
    taken in). Returns the flows, their records and the last component's fit (for the totals)."""
    done = list(ckpt["mixture"]["done"]) if ckpt is not None else []
    flows = []
    for m, rec in zip(modes, done, strict=False):
        flow = _laplace_flow(target.latent_dim, s, m)
        flow.load_state_dict(rec["state"])
        flows.append(_freeze(flow))
    fit, first = None, len(done)
    for j in range(first, len(modes)):
        resume_here = ckpt if j == first else None  # only the component the checkpoint was taken in
        fit = _start_fit(target, s, g, resume_here, *clock, mode=modes[j], attrs=attrs)
        fit.component = True
        fit.evals_before = int(ckpt["n_forward_evals"]) if ckpt is not None else 0
        fit.wall_before = float(ckpt["wall_time_s"]) if ckpt is not None else 0.0
        if resume_here is not None:
            _restore_fit(fit, ckpt, checkpoint_path)
        view = None if monitor is None else _mixture_view(target, s, modes, flows + [fit.flow])
        offset = sum(len(r["losses"]) for r in done)
        watch = None if monitor is None else (lambda step, _flow, o=offset, v=view: monitor(o + step, v))
        stopped = _optimise(fit, checkpoint_path, watch, monitor_every, _mixture_payload(modes, done),
                            desc=f"flow {j + 1}/{len(modes)}")
        done.append(_component_record(fit, stopped))
        flows.append(_freeze(fit.flow))
    return flows, done, fit


def _fit_mixture(target: LatentTarget, s: FlowSettings, g: torch.Generator, modes: list[LaplaceMode], attrs: dict,
                 ckpt: dict | None, clock: tuple[float, int], checkpoint_path, monitor,
                 monitor_every: int) -> LatentFit:
    """Several modes: a flow per mode (`_fit_components`), then the mixture weights by importance sampling
    (`fit_mixture_weights`); a `LatentFit` of the mixture, whose ``log_prob`` is exact."""
    flows, done, fit = _fit_components(target, s, g, modes, attrs, ckpt, clock, checkpoint_path, monitor,
                                       monitor_every)
    log_w, w_attrs = fit_mixture_weights(target, flows, g, s.weight_draws, batch=max(s.batch_size, 32))
    mixture = _freeze(MixtureFlow(flows, log_w))
    laplace_w = torch.softmax(torch.tensor([m.log_mass for m in modes], dtype=torch.float64), 0)
    cat = lambda key: np.concatenate([np.asarray(r[key]) for r in done])  # noqa: E731
    stops = [r["stopped"] for r in done]
    fit.attrs.update({
        "iterations": int(sum(len(r["losses"]) for r in done)),
        "stopped": "converged" if all(x == "converged" for x in stops) else "max_iter",
        "nonfinite_steps": int(sum(int(r["failures"]) for r in done)),
        "flow_kind": s.kind,
        "n_modes": len(modes),
        "mode_weights": [float(v) for v in mixture.weights],
        "mode_laplace_weights": [float(v) for v in laplace_w],
        "mode_locs": [[round(float(v), 4) for v in m.loc] for m in modes],
        **w_attrs,
    })
    if monitor is not None:
        monitor(int(fit.attrs["iterations"]), mixture)

    def sampler(n: int, gen: torch.Generator) -> Tensor:
        with torch.no_grad():
            return mixture.sample(n, gen)[0]

    return LatentFit(
        method="flow", sampler=sampler,
        trace={"loss": cat("losses"), "elbo_smooth": cat("elbo_smooth"), "lr": cat("lrs"),
               "component": np.concatenate([np.full(len(r["losses"]), j) for j, r in enumerate(done)])},
        attrs=fit.attrs, state={k_: v.detach().cpu().clone() for k_, v in mixture.state_dict().items()},
        settings=asdict(s), n_forward_evals=fit.n_forward_evals(), wall_time_s=fit.wall_time_s(), model=mixture,
    )


def fit_flow(target: LatentTarget, settings: FlowSettings | None = None, generator: torch.Generator | None = None,
             *, checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
             monitor: Callable[[int, LatentFlow], None] | None = None, monitor_every: int = 25,
             start: nn.Module | None = None) -> LatentFit:
    """Fit ``q_phi`` to ``p(z|y)`` by reverse KL; return a `LatentFit` whose ``sampler`` draws from it.

    Each step draws ``batch_size`` base samples from ``generator``, so the same seed gives the same fit on CPU.
    A step whose loss or gradient is not finite is undone (model and optimiser go back to the last good
    snapshot) and the learning rate is halved; after ``max_failures`` such steps the fit stops with an error.

    Multimodal posteriors: when the MAP search finds several distinct modes (`laplace_modes`), one flow is
    fitted per mode and the result is their `MixtureFlow` (``model``; ``attrs``: ``n_modes``, ``mode_weights``,
    ``mode_weights_se``, ``mode_laplace_weights``, ``mode_locs``, ``log_evidence``; ``trace["component"]``). With
    one mode the fit is the single flow, draw for draw as before mode finding existed.

    With ``checkpoint_path`` the whole fit state (flow, optimiser, rollback snapshot, the generator's RNG state,
    step, traces, the Laplace start, a mixture's modes and finished components) is written there atomically
    every ``settings.checkpoint_every_s`` seconds (tensors and plain types: ``weights_only``-loadable).
    ``resume=True`` continues from that file instead of starting over; on CPU the result is bit-identical to an
    uninterrupted fit with the same generator seed, and ``generator`` is left in the same state. The caller
    deletes the file once the result is saved.

    ``monitor(step, flow)``, when given, is called with the current flow (for a mixture: all components, the
    unfitted ones at their Laplace start) before the first step (the Laplace start), every ``monitor_every``
    steps and after the last; it must not train the flow or draw from ``generator`` (``ganflow bench`` uses it
    to time the fit to a given accuracy).

    ``start``, when given, is the flow to begin from instead of the Laplace / identity start: a module with
    `LatentFlow`'s ``transform(eps)``, ``log_prob(z)`` and ``sample(n, generator)`` (a copy is trained; used by
    ``solve --amortized --refine``). A resumed fit must be given the same ``start`` (its weights are restored).
    """
    s = settings or FlowSettings()
    s.validate()
    if monitor_every < 1:
        raise GanflowError(f"monitor_every must be >= 1, got {monitor_every}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    clock = (time.perf_counter(), target.n_forward_evals)
    ckpt = _load_resume_checkpoint(target, s, checkpoint_path) if resume else None
    if ckpt is not None and "mixture" in ckpt:
        modes = _modes_from_checkpoint(ckpt["mixture"])
        return _fit_mixture(target, s, g, modes, dict(ckpt.get("attrs", {})), ckpt, clock, checkpoint_path, monitor,
                            monitor_every)
    modes, attrs = _find_modes(target, s, g, clock[1]) if ckpt is None and start is None else ([None], {})
    if len(modes) > 1:
        return _fit_mixture(target, s, g, modes, attrs, None, clock, checkpoint_path, monitor, monitor_every)
    fit = _start_fit(target, s, g, ckpt, *clock, mode=modes[0], attrs=attrs, start=start)
    if ckpt is not None:
        _restore_fit(fit, ckpt, checkpoint_path)
    stopped = _optimise(fit, checkpoint_path, monitor, monitor_every)
    return _fit_result(fit, stopped)


def flow_from_state(latent_dim: int, settings: dict, state: dict[str, Tensor]) -> nn.Module:
    """Rebuild a fitted `LatentFlow`, or `MixtureFlow` (its state holds ``log_weights``), from what
    ``posterior.h5`` stores (settings JSON and the state dict)."""
    known = {f for f in FlowSettings.__dataclass_fields__}
    s = FlowSettings(**{k: v for k, v in settings.items() if k in known})
    if "log_weights" in state:
        K = int(state["log_weights"].shape[0])
        flow = MixtureFlow([LatentFlow(latent_dim, s) for _ in range(K)], torch.zeros(K))
    else:
        flow = LatentFlow(latent_dim, s)
    flow.load_state_dict(state)
    flow.eval()
    return flow


def affine_frame(model: nn.Module) -> tuple[Tensor, Tensor]:
    """``(loc, scale_tril)`` of a fitted flow's affine (Laplace) frame, for chains preconditioned by it; for a
    mixture over modes, the heaviest mode's (the modes of one posterior are shaped alike)."""
    if hasattr(model, "components"):
        model = model.components[int(model.weights.argmax())]
    return model.loc, model.scale_tril
