"""Streamed field statistics of the posterior: mean, std and quantiles of ``G(z)`` and ``A(G(z))`` over batches
of posterior draws (`StreamingMoments`, `summarize_fields`).

For ``N`` latent draws ``z_i`` (fresh from a flow, or stored MCMC draws) the fields ``x_i = G(z_i)`` are pushed
through in batches; mean and standard deviation (``N - 1`` in the variance) are accumulated exactly (Chan et
al.'s parallel update of the Welford sums, in float64), so ``[N, *field_shape]`` never sits in memory. Quantiles
come from the first ``n_quantile`` draws (at least 2,000 by default), which are kept. `WeightedMoments` and
`weighted_quantiles` are the same under importance weights (``ganflow predict --reweight``).

Example:
    >>> import torch
    >>> s = StreamingMoments((2,))
    >>> for b in torch.arange(10.).reshape(5, 2, 1).expand(5, 2, 2): s.update(b)
    >>> s.mean.tolist(), round(float(s.std[0]), 4)
    ([4.5, 4.5], 3.0277)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .errors import GanflowError

__all__ = ["StreamingMoments", "WeightedMoments", "weighted_quantiles", "FieldSummary", "summarize_fields", "QUANTILES"]

QUANTILES = (0.025, 0.25, 0.5, 0.75, 0.975)


class StreamingMoments:
    """Exact running mean and variance of batches ``[B, *shape]`` (float64, parallel Welford update)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.n = 0
        self._mean = np.zeros(self.shape)
        self._m2 = np.zeros(self.shape)

    def update(self, batch: Tensor | np.ndarray) -> None:
        b = batch.detach().cpu().double().numpy() if isinstance(batch, Tensor) else np.asarray(batch, np.float64)
        if b.shape[1:] != self.shape:
            raise GanflowError(f"batch shape {b.shape[1:]} does not match {self.shape}")
        nb = b.shape[0]
        if nb == 0:
            return
        mb = b.mean(0)
        m2b = ((b - mb) ** 2).sum(0)
        n = self.n + nb
        delta = mb - self._mean
        self._mean = self._mean + delta * nb / n
        self._m2 = self._m2 + m2b + delta**2 * self.n * nb / n
        self.n = n

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def var(self) -> np.ndarray:
        return self._m2 / max(self.n - 1, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


class WeightedMoments:
    """Exact running weighted mean and variance of batches ``[B, *shape]`` with weights ``[B]`` (West 1979).

    ``var = M2 / (W - sum w^2 / W)`` (the unbiased estimator for reliability weights), which equals the sample
    variance of `StreamingMoments` when all weights are equal.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.w_sum = 0.0
        self.w2_sum = 0.0
        self._mean = np.zeros(self.shape)
        self._m2 = np.zeros(self.shape)

    def update(self, batch: np.ndarray, weights: np.ndarray) -> None:
        b = np.asarray(batch, np.float64)
        w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * len(self.shape))
        wb = float(w.sum())
        if wb <= 0:
            return
        mb = (w * b).sum(0) / wb
        m2b = (w * (b - mb) ** 2).sum(0)
        W = self.w_sum + wb
        delta = mb - self._mean
        self._mean = self._mean + delta * wb / W
        self._m2 = self._m2 + m2b + delta**2 * self.w_sum * wb / W
        self.w_sum = W
        self.w2_sum += float((w * w).sum())

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def std(self) -> np.ndarray:
        denom = self.w_sum - self.w2_sum / self.w_sum if self.w_sum > 0 else 0.0
        return np.sqrt(self._m2 / denom) if denom > 0 else np.zeros(self.shape)


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs=QUANTILES) -> dict[float, np.ndarray]:
    """Quantiles of weighted draws ``values`` ``[N, *shape]``, ``weights`` ``[N]`` (>= 0): the weighted
    empirical CDF through the midpoints ``(cumsum(w) - w/2) / sum(w)``, linearly interpolated, per element."""
    v = np.asarray(values, np.float64)
    flat = v.reshape(v.shape[0], -1)
    w = np.asarray(weights, np.float64)
    out = {q: np.empty(flat.shape[1]) for q in qs}
    for j in range(flat.shape[1]):
        order = np.argsort(flat[:, j], kind="stable")
        ws = w[order]
        cdf = (np.cumsum(ws) - 0.5 * ws) / ws.sum()
        for q in qs:
            out[q][j] = np.interp(q, cdf, flat[order, j])
    return {q: a.reshape(v.shape[1:]) for q, a in out.items()}


@dataclass
class FieldSummary:
    """Statistics of the posterior-predictive field and of ``A(G(z))``."""

    n: int
    mean: np.ndarray
    std: np.ndarray
    quantiles: dict[float, np.ndarray]
    samples: np.ndarray  # [M, *field_shape] kept draws
    latent_samples: np.ndarray  # [N_keep_latent, k]
    obs_pred_mean: np.ndarray
    n_quantile: int


def summarize_fields(
    draw: Callable[[int], Tensor],
    generator_fn: Callable[[Tensor], Tensor],
    forward_fn: Callable[[Tensor], Tensor] | None,
    n_samples: int = 10_000,
    batch_size: int = 500,
    n_quantile: int = 2_000,
    n_keep: int = 64,
    n_keep_latent: int | None = None,
    n_pred: int | None = None,
) -> FieldSummary:
    """Stream field statistics over ``n_samples`` latent draws.

    Args:
        draw: ``draw(b) -> [b, k]`` latent draws (called repeatedly).
        generator_fn: ``z -> x`` ``[b, *field_shape]``.
        forward_fn: ``x -> A(x)``, used for ``obs_pred_mean`` over the first ``n_pred`` draws (default:
            ``n_quantile``), since the operator may be far costlier than the generator.
        n_keep: field samples kept for ``/field/samples``.
        n_keep_latent: latent draws kept (default all ``n_samples``, which is ``[N, k]``, small).
    """
    if n_samples < 1 or batch_size < 1:
        raise GanflowError("n_samples and batch_size must be >= 1")
    n_quantile = min(n_quantile, n_samples)
    n_pred = n_quantile if n_pred is None else min(n_pred, n_samples)
    n_keep_latent = n_samples if n_keep_latent is None else n_keep_latent
    moments = None
    pred_moments = None
    q_store: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    latents: list[np.ndarray] = []
    done = 0
    with torch.no_grad():
        while done < n_samples:
            b = min(batch_size, n_samples - done)
            z = draw(b)
            x = generator_fn(z)
            if not torch.isfinite(x).all():
                raise GanflowError("the generator produced non-finite fields for some posterior draws")
            if moments is None:
                moments = StreamingMoments(tuple(x.shape[1:]))
            moments.update(x)
            xn = x.detach().cpu().float().numpy()
            if done < n_quantile:
                q_store.append(xn[: n_quantile - done])
            if done < n_keep:
                kept.append(xn[: n_keep - done])
            if done < n_keep_latent:
                latents.append(z.detach().cpu().float().numpy()[: n_keep_latent - done])
            if forward_fn is not None and done < n_pred:
                pred = forward_fn(x[: n_pred - done])
                if not torch.isfinite(pred).all():
                    raise GanflowError("the operator produced non-finite predictions for some posterior draws")
                if pred_moments is None:
                    pred_moments = StreamingMoments(tuple(pred.shape[1:]))
                pred_moments.update(pred)
            done += b
    qs = np.concatenate(q_store, 0)
    quantiles = {q: np.quantile(qs, q, axis=0).astype(np.float32) for q in QUANTILES}
    return FieldSummary(
        n=done,
        mean=moments.mean.astype(np.float32),
        std=moments.std.astype(np.float32),
        quantiles=quantiles,
        samples=np.concatenate(kept, 0),
        latent_samples=np.concatenate(latents, 0),
        obs_pred_mean=pred_moments.mean.astype(np.float32) if pred_moments is not None else None,
        n_quantile=qs.shape[0],
    )
