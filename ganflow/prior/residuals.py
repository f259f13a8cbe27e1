"""Representation error of a prior: how far real fields lie from the range of ``G``.

A GAN prior puts all its mass on the range ``{G(z)}``; a real field ``x`` is never exactly in it. Following the
Bayesian approximation-error approach (Kaipio & Somersalo, "Statistical and computational inverse problems",
2005, sec. 7.4), the off-range part is modelled as an additive Gaussian error in field space,

    x = G(z) + r,    r ~ N(r_mean, B B^T),   B = [b_1 ... b_q]  (field-space columns),

whose statistics are estimated once, in stage one, from held-out fields the generator never trained on:

1. projection: ``z*(x) = argmin_z ||x - G(z)||^2`` per field (Adam from ``n_starts`` prior draws, the best
   start kept), ``r = x - G(z*)``;
2. ``r_mean`` is the mean residual and ``B`` the leading principal directions of the centred residuals, scaled
   by their standard deviations (``B B^T`` is the rank-``q`` truncation of their sample covariance), with
   ``q`` the smallest rank that explains ``var_fraction`` of the residual variance (at most ``max_rank``);
3. the variance the truncation leaves out is kept per pixel (``diag``); stage two represents it by
   ``n_diag`` random columns ``sqrt(diag) * eps / sqrt(n_diag)``, so one finite-rank Gaussian carries both.

Everything is stored as plain tensors under the checkpoint's ``representation_error`` key (loadable with
``weights_only=True``). Stage two (`ganflow.posterior.representation`) pushes ``r`` through the operator.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from ..errors import GanflowError

__all__ = ["project_to_range", "residual_statistics", "estimate_representation_error", "MIN_FIELDS"]

MIN_FIELDS = 8  # fewer held-out fields cannot estimate a covariance worth the name


def project_to_range(generator, fields: Tensor, *, n_starts: int = 2, n_iter: int = 200, lr: float = 0.05,
                     seed: int = 0, batch: int = 512, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Best-fit latents ``z*`` ``[N, k]`` and residuals ``r = x - G(z*)`` ``[N, *field_shape]`` of ``fields``.

    Least squares in field space, Adam from ``n_starts`` draws of ``N(0, I)`` per field (cosine-decayed step
    size); the start with the smallest residual is kept. The iterations run on ``device`` (a copy of the
    generator goes there; the starts are drawn on the CPU, so the seed gives the same starts anywhere); the
    results come back on the CPU.
    """
    device = torch.device(device)
    if device.type != "cpu":
        generator = copy.deepcopy(generator).to(device)
    g = torch.Generator().manual_seed(int(seed))
    zs, rs = [], []
    for part in fields.split(max(1, batch // n_starts)):
        z, r = _project_batch(generator, part.float().to(device), n_starts, n_iter, lr, g)
        zs.append(z.cpu())
        rs.append(r.cpu())
    return torch.cat(zs), torch.cat(rs)


def _project_batch(generator, x: Tensor, n_starts: int, n_iter: int, lr: float, g: torch.Generator):
    n, k = x.shape[0], int(generator.latent_dim)
    target = x.repeat_interleave(n_starts, 0)
    z = torch.randn(n * n_starts, k, generator=g).to(x.device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_iter, eta_min=lr * 0.02)
    for _ in range(n_iter):
        opt.zero_grad()
        loss = (generator(z) - target).flatten(1).pow(2).sum(1)
        loss.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        err = (generator(z) - target).flatten(1).pow(2).sum(1).view(n, n_starts)
        best = err.argmin(1) + n_starts * torch.arange(n, device=x.device)
        z_best = z.detach()[best]
        return z_best, x - generator(z_best)


def residual_statistics(resid: Tensor, *, max_rank: int = 32, var_fraction: float = 0.95) -> dict:
    """``mean`` ``[*field_shape]``, ``basis`` ``[q, *field_shape]`` (``B^T``) and ``diag`` (the variance left
    out) of residuals ``[N, *field_shape]``; also ``rank``, ``var_explained``, ``n_fields``."""
    n = resid.shape[0]
    if n < MIN_FIELDS:
        raise GanflowError(f"representation error: need at least {MIN_FIELDS} held-out fields, got {n}")
    shape = tuple(resid.shape[1:])
    r = resid.reshape(n, -1).double()
    mean = r.mean(0)
    rc = r - mean
    _, s, vt = torch.linalg.svd(rc, full_matrices=False)
    var = s**2 / (n - 1)
    total = float(var.sum())
    frac = torch.cumsum(var, 0) / max(total, 1e-300)
    q = int(min(max_rank, n - 1, int((frac < var_fraction).sum()) + 1))
    basis = vt[:q] * var[:q].sqrt()[:, None]
    diag = (rc.pow(2).sum(0) / (n - 1) - basis.pow(2).sum(0)).clamp_min(0)
    return {
        "mean": mean.float().reshape(shape),
        "basis": basis.float().reshape(q, *shape),
        "diag": diag.float().reshape(shape),
        "rank": q,
        "var_explained": float(frac[q - 1]) if total > 0 else 1.0,
        "n_fields": int(n),
    }


def estimate_representation_error(generator, fields: Tensor, *, seed: int = 0, n_starts: int = 2,
                                  n_iter: int = 200, max_rank: int = 32, var_fraction: float = 0.95,
                                  device: str | torch.device = "cpu") -> dict:
    """Project held-out ``fields`` onto the range of ``generator`` (on ``device``) and return their residual
    statistics, plus ``rel_err`` (the mean ``||r|| / ||x - mean field||``: how far off-range the fields are) and
    the settings."""
    fields = torch.as_tensor(fields).float()
    if tuple(fields.shape[1:]) != tuple(generator.field_shape):
        raise GanflowError(f"representation error: fields {tuple(fields.shape[1:])} do not match the prior's "
                           f"{tuple(generator.field_shape)}")
    with torch.enable_grad():
        _, resid = project_to_range(generator, fields, n_starts=n_starts, n_iter=n_iter, seed=seed, device=device)
    stats = residual_statistics(resid, max_rank=max_rank, var_fraction=var_fraction)
    spread = (fields - fields.mean(0)).flatten(1).norm(dim=1).clamp_min(1e-30)
    stats["rel_err"] = float((resid.flatten(1).norm(dim=1) / spread).mean())
    stats.update(seed=int(seed), n_starts=int(n_starts), n_iter=int(n_iter), var_fraction=float(var_fraction))
    if not all(math.isfinite(float(v.sum())) for v in (stats["mean"], stats["basis"], stats["diag"])):
        raise GanflowError("representation error: the residual statistics are not finite")
    return stats
