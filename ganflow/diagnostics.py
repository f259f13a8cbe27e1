""" "Is my posterior good?": importance-sampling and posterior-predictive diagnostics.

**Importance weights of a variational posterior.** For draws ``z_i ~ q`` (the flow),

    log w_i = log p(y, z_i) - log q(z_i),

and ``w`` estimates ``p(z|y) / q(z)`` up to the constant ``p(y)``. Two summaries:

- ``ESS/N = (sum w)^2 / (N sum w^2)`` (Kish), in (0, 1]; 1 means ``q`` equals the posterior.
- the Pareto-smoothed importance sampling (PSIS) shape ``k_hat`` (Vehtari, Simpson, Gelman, Yao & Gabry,
  "Pareto smoothed importance sampling", JMLR 25, 2024): a generalized Pareto distribution (GPD) is fitted to
  the ``M = ceil(min(N/5, 3 sqrt(N)))`` largest weights with the Zhang & Stephens (2009) empirical-Bayes
  estimator and a weakly informative prior that pulls ``k`` towards 0.5 (``(M k + 10 * 0.5) / (M + 10)``).
  ``k_hat < 0.5``: reliable; ``0.5 <= k_hat <= 0.7``: usable, slower convergence; ``k_hat > 0.7``: the weights
  have (nearly) infinite variance, the flow misses posterior mass and its statistics are unreliable.
  The smoothed weights (the tail replaced by GPD quantiles) give PSIS-reweighted statistics.

**Posterior-predictive check of the data** (Gelman, Meng & Stern 1996). For posterior draws ``z_i``,
with ``m`` observed values,

    D_obs,i = ||y - A(G(z_i))||^2 / sigma^2,      y_rep,i = A(G(z_i)) + sigma eps_i,
    D_rep,i = ||y_rep,i - A(G(z_i))||^2 / sigma^2  (~ chi^2_m),
    p = P(D_rep >= D_obs)  (estimated by the fraction of draws).

``chi2_per_dof = mean(D_obs) / m`` should be near 1 (much larger: the prior or the operator cannot explain the
data; much smaller: over-fitting / sigma too large); ``p`` near 0 flags misfit, near 1 an over-estimated
noise.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(4000, 3))
    >>> log_w = -0.5 * (x**2).sum(1) + 0.5 * (x**2).sum(1)  # proposal == target: constant weights
    >>> psis(log_w).khat < 0.5
    True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .errors import GanflowError

__all__ = [
    "DiagnosticSettings",
    "PsisResult",
    "psis",
    "gpd_fit",
    "gpd_quantile",
    "ess_ratio",
    "discrepancies",
    "posterior_predictive_check",
    "diagnose_draws",
    "draw_flow",
    "khat_warning",
    "DiagnosticsResult",
    "posterior_diagnostics",
    "KHAT_BAD",
    "KHAT_GOOD",
]

KHAT_GOOD = 0.5
KHAT_BAD = 0.7


@dataclass(frozen=True)
class DiagnosticSettings:
    """How many fresh draws the end-of-solve diagnostics use (cheap: 2,000 forward evaluations)."""

    n_draws: int = 2_000
    batch_size: int = 500
    enabled: bool = True

    def validate(self) -> None:
        if self.n_draws < 10 or self.batch_size < 1:
            raise GanflowError("diagnostics: n_draws must be >= 10 and batch_size >= 1")


# --- generalized Pareto fit and PSIS ------------------------------------------------------------------------
def gpd_fit(x: np.ndarray, prior_k: float = 10.0) -> tuple[float, float]:
    """Fit a GPD ``(k, sigma)`` with location 0 to exceedances ``x > 0`` (Zhang & Stephens 2009).

    The profile-likelihood posterior over ``theta = -k / sigma`` is evaluated on ``m = 30 + floor(sqrt(n))``
    quadrature points ``theta_j = 1/x_(n) + (1 - sqrt(m / (j - 1/2))) / (3 x_(n/4))``; the estimate is the
    posterior mean of ``theta``, ``k = mean(log(1 - theta x))``, ``sigma = -k / theta``. With ``prior_k > 0``
    the
    weakly informative prior of Vehtari et al. (2024) shrinks ``k`` towards 0.5: ``(n k + prior_k/2)/(n +
    prior_k)``.

    Args:
        x: ``[n]`` exceedances (> 0), any order.
    Returns:
        ``(k, sigma)``; the shape ``k`` is the usual one (``k > 0``: heavy tail, ``1/k`` finite moments).
    """
    x = np.sort(np.asarray(x, np.float64))
    n = x.size
    if n < 5:
        raise GanflowError(f"GPD fit needs at least 5 exceedances, got {n}")
    m = 30 + int(math.sqrt(n))
    j = np.arange(1, m + 1)
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (j - 0.5))) / (3.0 * x[int(n / 4 + 0.5) - 1])
    k_j = np.log1p(-theta[:, None] * x[None, :]).mean(1)  # profile MLE of k given theta (usual sign)
    log_lik = n * (np.log(-theta / k_j) - k_j - 1.0)
    # normalised posterior weights of the quadrature points (uniform prior on theta), computed stably
    w = np.exp(log_lik - np.logaddexp.reduce(log_lik))
    keep = w >= 10 * np.finfo(float).eps  # drop negligible points, as the reference implementations do
    w, theta = w[keep] / w[keep].sum(), theta[keep]
    theta_hat = float((theta * w).sum())
    k = float(np.log1p(-theta_hat * x).mean())
    sigma = -k / theta_hat
    if prior_k > 0:
        k = (n * k + prior_k * 0.5) / (n + prior_k)
    return k, sigma


def gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """Quantile function of GPD(k, sigma), location 0: ``sigma ((1 - p)^(-k) - 1) / k``."""
    p = np.asarray(p, np.float64)
    if abs(k) < 1e-12:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


@dataclass
class PsisResult:
    """Output of `psis`: ``khat``; ``log_weights`` ``[N]`` (smoothed, normalised: logsumexp = 0);
    ``ess_ratio``
    (Kish ESS / N of the smoothed weights) and ``ess_ratio_raw`` (of the raw weights); ``tail_len`` ``M``."""

    khat: float
    log_weights: np.ndarray
    ess_ratio: float
    ess_ratio_raw: float
    tail_len: int

    @property
    def weights(self) -> np.ndarray:
        return np.exp(self.log_weights)


def ess_ratio(log_w: np.ndarray) -> float:
    """Kish effective sample size over N: ``(sum w)^2 / (N sum w^2)``, from log weights ``[N]``."""
    lw = np.asarray(log_w, np.float64)
    lw = lw - lw.max()
    w = np.exp(lw)
    return float(w.sum() ** 2 / (lw.size * (w * w).sum()))


def psis(log_w: np.ndarray) -> PsisResult:
    """Pareto-smoothed importance sampling of raw log weights ``[N]`` (Vehtari et al. 2024, Algorithm 1).

    The ``M = ceil(min(N/5, 3 sqrt(N)))`` largest weights are replaced by the expected order statistics of the
    GPD fitted to their exceedances over the ``(M+1)``-th largest, ``u + F^{-1}((i - 1/2)/M)``, truncated at
    the largest raw weight. Non-finite log weights (``-inf``: zero weight) are allowed; ``nan`` is an error.
    Constant weights (proposal == target) give ``khat = -inf``.
    """
    lw = np.asarray(log_w, np.float64).ravel()
    n = lw.size
    if n < 10:
        raise GanflowError(f"PSIS needs at least 10 weights, got {n}")
    if np.isnan(lw).any() or np.isposinf(lw).any():
        raise GanflowError("PSIS: log weights contain NaN or +inf")
    raw_ess = ess_ratio(lw)
    lw = lw - lw.max()
    M = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))
    order = np.argsort(lw, kind="stable")
    tail = order[-M:]
    cutoff = lw[order[-M - 1]]
    khat = -math.inf
    smoothed = lw.copy()
    if np.isfinite(cutoff):
        # exceedances in the weight scale (largest weight = 1 after the shift)
        exceed = np.exp(lw[tail]) - math.exp(cutoff)
        if np.sort(exceed)[int(M / 4 + 0.5) - 1] <= 0 < exceed[-1]:
            # a quarter of the tail underflows beside the largest weights (a proposal that misses the target
            # by hundreds of nats): no GPD fit, and the verdict is the worst one
            khat = math.inf
        elif exceed[-1] > 0 and np.ptp(exceed) > 1e-12 * exceed[-1]:
            khat, sigma = gpd_fit(exceed)
            if math.isfinite(khat):
                p = (np.arange(1, M + 1) - 0.5) / M
                new = np.log(gpd_quantile(p, khat, sigma) + math.exp(cutoff))
                smoothed[tail] = np.minimum(new, 0.0)  # never above the largest raw weight
    smoothed = smoothed - np.logaddexp.reduce(smoothed)
    return PsisResult(
        khat=float(khat),
        log_weights=smoothed,
        ess_ratio=ess_ratio(smoothed),
        ess_ratio_raw=raw_ess,
        tail_len=M,
    )


# --- torch side: weights and predictive checks of a fitted posterior ----------------------------------------
def discrepancies(
    predict: Callable[[Tensor], Tensor],
    y: Tensor,
    noise_sigma: float,
    z: Tensor,
    generator: torch.Generator,
    batch_size: int = 500,
    on_pred: Callable[[Tensor, Tensor, slice], None] | None = None,
    sq_dist: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``D_obs`` and ``D_rep`` ``[N]`` (module docstring) for latent draws ``z`` ``[N, k]``.

    Args:
        predict: ``z -> A(G(z))`` ``[B, *obs_shape]`` (one forward evaluation per draw).
        on_pred: called as ``on_pred(z_batch, pred_batch, rows)`` so that a caller can reuse ``A(G(z))``
            (the importance weights need it too) without a second forward evaluation.
        sq_dist: ``(pred, y) -> [B]`` squared distance in the noise model's whitened units (default
            ``||y - pred||^2 / sigma^2``); with the representation error, ``rho^T Sigma^-1 rho``.
    """
    d_obs, d_rep = [], []
    yv = y.reshape(-1).double()
    with torch.no_grad():
        for s in range(0, z.shape[0], batch_size):
            zb = z[s : s + batch_size]
            pred = predict(zb)
            if on_pred is not None:
                on_pred(zb, pred, slice(s, s + zb.shape[0]))
            if sq_dist is not None:
                d_obs.append(sq_dist(pred, y).double())
            pred = pred.reshape(-1, yv.numel()).double()
            eps = torch.randn(pred.shape, generator=generator, dtype=torch.float64)
            if sq_dist is None:
                d_obs.append(((yv - pred) ** 2).sum(1) / noise_sigma**2)
            d_rep.append(
                (eps * eps).sum(1)
            )  # ||y_rep - A(G(z))||^2 / sigma^2 with y_rep = A(G(z)) + sigma eps
    return torch.cat(d_obs).numpy(), torch.cat(d_rep).numpy()


def posterior_predictive_check(
    d_obs: np.ndarray, d_rep: np.ndarray, n_obs: int, log_weights: np.ndarray | None = None
) -> dict:
    """``ppc_p_value = P(D_rep >= D_obs)``, ``ppc_chi2_per_dof = E[D_obs] / m``, ``ppc_chi2_rep_per_dof``,
    ``ppc_n_draws``; expectations under the normalised ``log_weights`` ``[N]`` when given (PSIS), else
    uniform."""
    d_obs, d_rep = np.asarray(d_obs, np.float64), np.asarray(d_rep, np.float64)
    w = np.full(d_obs.size, 1.0 / d_obs.size) if log_weights is None else np.exp(log_weights)
    return {
        "ppc_p_value": float((w * (d_rep >= d_obs)).sum()),
        "ppc_chi2_per_dof": float((w * d_obs).sum() / n_obs),
        "ppc_chi2_rep_per_dof": float((w * d_rep).sum() / n_obs),
        "ppc_n_draws": int(d_obs.size),
    }


@dataclass
class DiagnosticsResult:
    """Scalar ``attrs`` for posterior.h5, ``arrays`` for ``/diagnostics`` (``log_weights``, ``ppc_d_obs``,
    ``ppc_d_rep``), the `PsisResult` when the posterior has a density, and the latent draws used ``z``."""

    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    psis: PsisResult | None = None
    z: Tensor | None = None

    @property
    def warning(self) -> str | None:
        return khat_warning(self.attrs.get("psis_khat"))


def khat_warning(khat: float | None) -> str | None:
    """The warning line for ``khat > 0.7`` (else None)."""
    if khat is not None and math.isfinite(khat) and khat > KHAT_BAD:
        return (
            f"PSIS k-hat = {khat:.2f} > {KHAT_BAD}: the flow posterior is unreliable (it misses posterior "
            "mass); fit longer or larger, compare with --method nuts, or use `ganflow predict --reweight`"
        )
    return None


def draw_flow(flow, n: int, generator: torch.Generator, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """``n`` draws ``z`` ``[n, k]`` and their ``log q`` ``[n]`` from a flow (``sample(b, generator)``)."""
    zs, lqs = [], []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            z, lq = flow.sample(min(batch_size, n - start), generator)
            zs.append(z)
            lqs.append(lq)
    return torch.cat(zs), torch.cat(lqs)


def diagnose_draws(
    target, z: Tensor, log_q: Tensor | None, generator: torch.Generator, batch_size: int = 500
) -> DiagnosticsResult:
    """Diagnostics of latent draws ``z`` ``[N, k]`` on ``target`` (a `LatentTarget`), one forward evaluation
    per draw. With ``log_q`` ``[N]`` (draws from a density ``q``, i.e. the flow) also the importance weights:
    ``psis_khat``, ``is_ess_ratio`` (smoothed weights), ``is_ess_ratio_raw``, ``is_n_draws``, and the
    predictive check under the PSIS weights (``ppc_p_value_psis``, ``ppc_chi2_per_dof_psis``)."""
    t0 = time.perf_counter()
    evals0 = target.n_forward_evals
    out = DiagnosticsResult(z=z)
    n = z.shape[0]
    log_joint = np.empty(n)

    def keep_log_joint(zb: Tensor, pred: Tensor, rows: slice) -> None:
        log_joint[rows] = (
            (target.noise.log_likelihood(pred, target.y) + target.log_prior(zb)).double().cpu().numpy()
        )

    d_obs, d_rep = discrepancies(
        target.predict,
        target.y,
        target.noise_sigma,
        z,
        generator,
        batch_size,
        keep_log_joint if log_q is not None else None,
        getattr(target.noise, "sq_mahalanobis", None),
    )
    m = target.y.numel()
    out.arrays["ppc_d_obs"], out.arrays["ppc_d_rep"] = d_obs, d_rep
    out.attrs.update(posterior_predictive_check(d_obs, d_rep, m))
    if log_q is not None:
        log_w = log_joint - log_q.double().cpu().numpy()
        log_w = np.where(np.isnan(log_w), -np.inf, log_w)  # a draw where the target is undefined: zero weight
        res = psis(log_w)
        out.psis = res
        out.arrays["log_weights"] = log_w
        out.attrs.update(
            {
                "psis_khat": res.khat,
                "is_ess_ratio": res.ess_ratio,
                "is_ess_ratio_raw": res.ess_ratio_raw,
                "is_n_draws": int(n),
            }
        )
        from .tails import tail_attrs  # issue 38: raw draws against their weighted statistics

        out.attrs.update(tail_attrs(z, res))
        ppc_w = posterior_predictive_check(d_obs, d_rep, m, res.log_weights)
        out.attrs["ppc_p_value_psis"] = ppc_w["ppc_p_value"]
        out.attrs["ppc_chi2_per_dof_psis"] = ppc_w["ppc_chi2_per_dof"]
    out.attrs["diag_forward_evals"] = int(target.n_forward_evals - evals0)
    out.attrs["diag_wall_time_s"] = float(time.perf_counter() - t0)
    return out


def posterior_diagnostics(
    target,
    *,
    flow=None,
    samples: Tensor | None = None,
    settings: DiagnosticSettings | None = None,
    generator: torch.Generator | None = None,
) -> DiagnosticsResult:
    """End-of-solve diagnostics: ``n_draws`` fresh draws of a ``flow`` (``sample(n, generator) -> (z,
    log_q)``)
    with importance weights, or up to ``n_draws`` of the stored ``samples`` ``[N, k]`` (Langevin, NUTS) with
    the
    predictive check only. See `diagnose_draws`."""
    s = settings or DiagnosticSettings()
    s.validate()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if flow is not None:
        z, log_q = draw_flow(flow, s.n_draws, g, s.batch_size)
    elif samples is not None:
        idx = torch.randperm(samples.shape[0], generator=g)[: s.n_draws]
        z, log_q = samples[idx].float(), None
    else:
        raise GanflowError("posterior_diagnostics needs a flow or stored samples")
    return diagnose_draws(target, z, log_q, g, s.batch_size)


def solve_diagnostics(target, fit, table: dict | None, seed: int) -> dict:
    """The end-of-solve call: diagnostics of a `LatentFit` as scalar attrs for posterior.h5.

    ``table`` is the config table ``[diagnostics]`` (`DiagnosticSettings`; ``enabled = false`` skips them).
    The draws come from their own generator (seeded from ``seed``), so adding diagnostics leaves every other
    output of the solve unchanged. A flow with ``k_hat > 0.7`` or a failed tail check (`ganflow.tails`) raises a
    ``RuntimeWarning``.
    """
    import warnings

    from .config import parse_settings

    s = parse_settings(DiagnosticSettings, table, "diagnostics")
    if not s.enabled:
        return {}
    g = torch.Generator().manual_seed(int(seed) + 0x5EED_D1A6)
    flow = fit.model if fit.method in ("flow", "amortized") and hasattr(fit.model, "sample") else None
    samples = None
    if flow is None:
        samples = fit.samples if fit.samples is not None else fit.draw(s.n_draws, g)
    res = posterior_diagnostics(target, flow=flow, samples=samples, settings=s, generator=g)
    from .tails import tail_warning

    for message in (res.warning, tail_warning(res.attrs)):
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    return res.attrs
