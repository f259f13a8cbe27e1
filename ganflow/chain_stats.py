"""Convergence of MCMC chains: rank-normalised split R-hat and bulk effective sample size.

The estimators of Vehtari, Gelman, Simpson, Carpenter & Bürkner, "Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC", Bayesian Analysis 16 (2021), as ArviZ
computes them by default (``arviz.rhat``, ``arviz.ess``; tests/test_arviz.py checks the two agree to 1e-6):

- split every chain in halves (2C chains of S // 2 draws; the middle draw of an odd S is dropped);
- rank-normalise: ``z = Phi^-1((r - 3/8) / (n + 1/4))`` with ``r`` the average ranks of all ``n`` draws;
- R-hat ``= sqrt(((S'-1)/S' W + B/S') / W)`` (W: mean within-chain variance, B/S': variance of the chain
  means), the larger of the bulk (z of the draws) and the tail (z of their distance from the median);
- bulk ESS ``= C' S' / tau`` on the z of the split chains, ``tau = -1 + 2 sum_t rho_t`` with Geyer's initial
  positive and monotone sequences on the autocorrelations ``rho_t = 1 - (W - mean_c acov_c(t)) / var+``
  (autocovariances by FFT, divided by S').

These replace pyro's ``split_gelman_rubin`` (plain split R-hat: ArviZ's ``method="split"``) and
``effective_sample_size`` (ArviZ's ``method="identity"`` up to the autocovariance's normalisation: chains neither
split nor rank-normalised, so a slow drift within a chain goes unseen; on 4 AR(1) chains of 200 draws with
``phi = 0.9``, exact ESS 42, it reads 50 where the bulk ESS reads 23 to 29). The rank normalisation and the folded
(tail) R-hat see chains that differ in scale or in heavy tails, which the plain split R-hat misses.

Example:
    >>> import numpy as np
    >>> draws = np.random.default_rng(0).normal(size=(4, 500, 2))  # [chains, draws, coordinates]
    >>> bool(np.all(rhat_rank(draws) < 1.01)), bool(np.all(ess_bulk(draws) > 1000))
    (True, True)
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

__all__ = ["rhat_rank", "ess_bulk", "split_chains"]


def split_chains(draws: np.ndarray) -> np.ndarray:
    """``[C, S] -> [2C, S // 2]``: the first and the last half of every chain."""
    half = draws.shape[1] // 2
    return np.concatenate([draws[:, :half], draws[:, draws.shape[1] - half:]], axis=0)


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Rank-normalised values (average ranks of all entries, Blom's offsets)."""
    r = rankdata(x, method="average", axis=None).reshape(x.shape)
    return ndtri((r - 0.375) / (x.size + 0.25))


def _rhat(x: np.ndarray) -> float:
    """The potential scale reduction of chains ``x`` ``[C, S]``."""
    s = x.shape[1]
    between = s * np.var(x.mean(axis=1), ddof=1)
    within = np.mean(np.var(x, axis=1, ddof=1))
    return float(np.sqrt((between / within + s - 1) / s))


def _autocov(x: np.ndarray) -> np.ndarray:
    """Autocovariances ``[C, S]`` of every chain at every lag, by FFT, each divided by ``S``."""
    s = x.shape[1]
    f = np.fft.rfft(x - x.mean(axis=1, keepdims=True), n=2 * s, axis=1)
    return np.fft.irfft(f * np.conjugate(f), n=2 * s, axis=1)[:, :s] / s


def _ess(x: np.ndarray) -> float:
    """Effective sample size of chains ``x`` ``[C, S]`` (Geyer's initial monotone sequence)."""
    c, s = x.shape
    if np.ptp(x) < np.finfo(float).resolution:
        return float(x.size)
    acov = _autocov(x)
    mean_var = np.mean(acov[:, 0]) * s / (s - 1.0)
    var_plus = mean_var * (s - 1.0) / s + (np.var(x.mean(axis=1), ddof=1) if c > 1 else 0.0)
    rho = np.zeros(s)
    rho[0] = even = 1.0
    rho[1] = odd = 1.0 - (mean_var - np.mean(acov[:, 1])) / var_plus
    t = 1
    while t < s - 3 and even + odd > 0.0:  # initial positive sequence
        even = 1.0 - (mean_var - np.mean(acov[:, t + 1])) / var_plus
        odd = 1.0 - (mean_var - np.mean(acov[:, t + 2])) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    t = 1
    while t <= max_t - 2:  # initial monotone sequence
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    tau = -1.0 + 2.0 * np.sum(rho[: max_t + 1]) + np.sum(rho[max_t + 1: max_t + 2])
    return float(x.size / max(tau, 1.0 / np.log10(x.size)))


def _per_coordinate(fn, draws: np.ndarray) -> np.ndarray:
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim == 2:
        draws = draws[..., None]
    if draws.ndim != 3 or draws.shape[1] < 4:
        raise ValueError(f"draws must be [chains, draws >= 4, coordinates], got {draws.shape}")
    return np.array([fn(draws[:, :, j]) for j in range(draws.shape[2])])


def rhat_rank(draws: np.ndarray) -> np.ndarray:
    """Rank-normalised split R-hat ``[k]`` of ``draws`` ``[C, S, k]`` (or ``[C, S]``): max of bulk and tail."""

    def one(x: np.ndarray) -> float:
        split = split_chains(x)
        return max(_rhat(_z_scale(split)), _rhat(_z_scale(np.abs(split - np.median(split)))))

    return _per_coordinate(one, draws)


def ess_bulk(draws: np.ndarray) -> np.ndarray:
    """Bulk effective sample size ``[k]`` of ``draws`` ``[C, S, k]`` (or ``[C, S]``)."""
    return _per_coordinate(lambda x: _ess(_z_scale(split_chains(x))), draws)
