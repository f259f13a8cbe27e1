"""The tail check of a flow or amortised posterior (issue 38): do its raw draws agree with their importance-
weighted statistics?

A ``q`` fitted by the forward KL (the amortised posterior) is mass-covering: a small fraction of draws far out
where ``p(z | y)`` has no mass costs it almost nothing. Such draws carry (almost) no importance weight, so PSIS
``k_hat`` and the ESS look fine, yet they dominate the plain moments of the draws. For draws ``z_i ~ q``
``[N, k]`` with PSIS-smoothed normalised weights ``w_i`` (`ganflow.diagnostics.psis`) and ``ESS = 1 / sum w_i^2``:

    raw:       m_j  = mean_i z_ij,          s_j  = sd_i z_ij
    weighted:  m~_j = sum_i w_i z_ij,       s~_j = sqrt(sum_i w_i (z_ij - m~_j)^2)
    MC error:  se_m = s~_j sqrt(1/ESS + 1/N),    se_log_s = sqrt((kappa_j - 1) (1/ESS + 1/N)) / 2

with ``kappa_j`` the weighted kurtosis (the two estimates share their draws, so ``1/ESS + 1/N`` overstates the
error of their difference: the check errs towards "agree"). Written as attributes:

- ``tail_mean_z``, ``tail_sd_z``: the largest ``|m_j - m~_j| / se_m`` and ``|log s_j - log s~_j| / se_log_s``;
- ``tail_sd_ratio``: the largest ``s_j / s~_j`` (above 1: ``q`` is wider than ``p`` along ``z_j``);
- ``tail_far_fraction``: the fraction of draws more than `FAR_SD` weighted sds from the weighted mean in some
  coordinate (a Gaussian posterior puts ~1e-9 of its mass there per coordinate);
- ``tail_check``: ``agree`` (both z-scores at most `TAIL_Z`), ``resampled`` (they disagree and ``k_hat <
  0.7``: `ganflow.solve` reports importance-resampled statistics, `resampled_fit`) or ``disagree`` (``k_hat >=
  0.7``: the weights cannot be trusted either; the raw draws are reported).

Example:
    >>> import numpy as np
    >>> from ganflow.diagnostics import psis
    >>> z = np.random.default_rng(0).normal(size=(4000, 2))
    >>> tail_attrs(z, psis(np.zeros(4000)))["tail_check"]
    'agree'
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .diagnostics import KHAT_BAD, PsisResult, draw_flow, psis

__all__ = ["tail_attrs", "tail_warning", "resampled_fit", "needs_resampling", "TAIL_Z", "FAR_SD"]

TAIL_Z = 4.0  # Monte-Carlo errors: k coordinates, two statistics; a false alarm costs only a resampled summary
FAR_SD = 6.0


def _weighted_moments(z: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted mean, sd and kurtosis ``[k]`` of ``z`` ``[N, k]`` (``w`` normalised)."""
    mean = w @ z
    d = z - mean
    var = np.maximum(w @ d**2, 1e-300)
    return mean, np.sqrt(var), (w @ d**4) / var**2


def tail_attrs(z, res: PsisResult) -> dict:
    """The tail check's attributes (module docstring) of draws ``z`` ``[N, k]`` with their `psis` result."""
    z = np.asarray(z.cpu() if isinstance(z, torch.Tensor) else z, dtype=np.float64)
    ok = np.all(np.isfinite(z), axis=1)
    w = np.where(ok, res.weights, 0.0)
    if not np.isfinite(res.khat) and res.khat > 0 or w.sum() <= 0:
        return {"tail_check": "disagree", "tail_worst": "no finite importance weights"}
    w = w / w.sum()
    z, w = z[ok], w[ok]
    n, ess = len(z), 1.0 / float(np.sum(w**2))
    m, s = z.mean(0), z.std(0)
    mw, sw, kurt = _weighted_moments(z, w)
    inv = 1.0 / ess + 1.0 / n
    mean_z = np.abs(m - mw) / (sw * math.sqrt(inv))
    sd_z = np.abs(np.log(np.maximum(s, 1e-300) / sw)) / (0.5 * np.sqrt(np.maximum(kurt - 1, 1e-12) * inv))
    far = float(np.mean(np.any(np.abs(z - mw) > FAR_SD * sw, axis=1)))
    agree = max(mean_z.max(), sd_z.max()) <= TAIL_Z
    check = "agree" if agree else ("resampled" if res.khat < KHAT_BAD else "disagree")
    j = int(np.argmax(np.maximum(mean_z, sd_z)))
    worst = (f"z[{j}]: raw mean {m[j]:.4g} vs weighted {mw[j]:.4g} ({mean_z[j]:.1f} MC errors), raw sd "
             f"{s[j]:.4g} = {s[j] / sw[j]:.2f}x the weighted ({sd_z[j]:.1f} MC errors)")
    return {"tail_check": check, "tail_mean_z": float(mean_z.max()), "tail_sd_z": float(sd_z.max()),
            "tail_sd_ratio": float(np.max(s / sw)), "tail_far_fraction": far, "tail_worst": worst}


def tail_warning(attrs: dict) -> str | None:
    """The warning line for a failed tail check (else None)."""
    check = attrs.get("tail_check")
    if check not in ("resampled", "disagree"):
        return None
    far = attrs.get("tail_far_fraction")
    far_txt = f"; {100 * far:.2g} % of draws lie > {FAR_SD:g} sd out" if far is not None else ""
    then = ("the reported statistics are importance-resampled" if check == "resampled" else
            f"k-hat >= {KHAT_BAD}: the weights cannot repair it, the raw draws are reported")
    return (f"ganflow: tail check: the posterior's raw draws disagree with their importance-weighted statistics "
            f"({attrs.get('tail_worst')}{far_txt}); {then}")


def needs_resampling(attrs: dict) -> bool:
    return attrs.get("tail_check") == "resampled"


def resampled_fit(fit, target, n_pool: int, generator: torch.Generator, batch_size: int = 500):
    """``fit`` whose draws are importance-resampled (with replacement) from ``n_pool`` fresh draws of its flow
    (``fit.model.sample(n, generator) -> (z, log_q)``) under their PSIS weights against ``target``: ``n_pool``
    more forward evaluations. Attributes ``resampled_pool`` and ``resampled_ess`` say how many draws stand
    behind the statistics."""
    z, log_q = draw_flow(fit.model, n_pool, generator, batch_size)
    evals0 = target.n_forward_evals
    with torch.no_grad():
        log_p = torch.cat([target.log_joint(zb) for zb in z.split(batch_size)])
    log_w = (log_p.double() - log_q.double()).cpu().numpy()
    res = psis(np.where(np.isnan(log_w), -np.inf, log_w))
    w = torch.from_numpy(res.weights)

    def sampler(n: int, gen: torch.Generator) -> torch.Tensor:
        return z[torch.multinomial(w, n, replacement=True, generator=gen)]

    attrs = {**fit.attrs, "resampled_pool": int(n_pool), "resampled_ess": float(1.0 / np.sum(res.weights**2))}
    return dataclasses.replace(fit, sampler=sampler, samples=None, attrs=attrs,
                               n_forward_evals=fit.n_forward_evals + target.n_forward_evals - evals0)
