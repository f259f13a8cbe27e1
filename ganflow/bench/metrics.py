"""What is measured of a method's draws against the reference: errors, distance, cost, and the clocks."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from .plan import BenchPlan
    from .references import _Reference

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_projections: int, seed: int) -> float:
    """Sliced 2-Wasserstein distance between two equal-weight point clouds ``[n, k]``, ``[m, k]``.

    Random unit directions (seeded); the larger cloud is subsampled (seeded) to the smaller's size so that
    each 1-D distance is the distance between sorted projections.
    """
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    a = a[rng.permutation(len(a))[:n]] if len(a) > n else a
    b = b[rng.permutation(len(b))[:n]] if len(b) > n else b
    dirs = rng.standard_normal((a.shape[1], n_projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def _field_moments(G, z: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    xs = []
    with torch.no_grad():
        for i in range(0, len(z), batch):
            xs.append(G(torch.as_tensor(z[i : i + batch], dtype=torch.float32)).double().numpy())
    x = np.concatenate(xs)
    return x.mean(0), x.std(0, ddof=1)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _metrics(z: np.ndarray, ref: _Reference, G, plan: BenchPlan, seed: int) -> dict:
    z = np.asarray(z, np.float64)
    m, s = z.mean(0), z.std(0, ddof=1)
    sd_rel = np.abs(s / ref.sd - 1)
    fm, fs = _field_moments(G, z)
    whiten = lambda v: (v - ref.mean) / ref.sd  # noqa: E731 - distances in reference-sd units
    return {
        "latent_mean_err_sd": float(np.max(np.abs(m - ref.mean) / ref.sd)),
        "latent_sd_rel_err_median": float(np.median(sd_rel)),
        "latent_sd_rel_err_max": float(np.max(sd_rel)),
        "field_mean_rel_err": _rel(fm, ref.field_mean),
        "field_std_rel_err": _rel(fs, ref.field_std),
        "distance": sliced_wasserstein(whiten(z), whiten(ref.half_a), plan.n_projections, seed),
        "distance_ref_baseline": sliced_wasserstein(
            whiten(ref.half_b), whiten(ref.half_a), plan.n_projections, seed
        ),
        "n_draws": int(len(z)),
    }


def _samples_per_s(fit, G, n: int, seed: int, batch: int = 1000) -> float:
    """Posterior field samples per second after the fit: a latent draw and ``G`` (no operator)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fit.draw(min(batch, n), gen)  # warm-up (allocator, first-call costs)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            b = min(batch, n - done)
            G(fit.draw(b, gen))
            done += b
    return n / (time.perf_counter() - t0)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(fn(), wall seconds, CPU seconds of this process)``."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def _best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(best wall, best CPU) seconds over ``repeats`` calls, after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        _, w, c = _timed(fn)
        walls.append(w)
        cpus.append(c)
    return min(walls), min(cpus)
