"""Split-conformal recalibration of the field's credible intervals, learned on held-out truths.

The representation error (`ganflow.posterior.representation`) makes the error bars honest to first order;
where the coverage on held-out truths is still below nominal (a nonlinear operator, residual statistics
estimated from a few hundred fields), the remaining gap is closed by one scale factor ``c`` applied to every
field draw about the posterior mean,

    x  ->  m + c (x - m),          so that      q_alpha  ->  m + c (q_alpha - m),    sd -> c sd,

learned by split conformal prediction (Vovk, Gammerman & Shafer 2005; Angelopoulos & Bates 2021,
arXiv 2107.07511): for each calibration truth ``x*`` and entry ``i``, the score is the smallest ``c`` whose
scaled central ``level`` interval holds ``x*_i``,

    s_i = (m_i - x*_i) / (m_i - lo_i)   if x*_i < m_i,      (x*_i - m_i) / (hi_i - m_i)   otherwise,

and ``c`` is the ``ceil((n + 1) level) / n`` empirical quantile of the ``n`` pooled scores. Truths are
exchangeable, entries of one truth are not, so the guarantee is for the pooled coverage in expectation over
truths; `ganflow calibrate --recalibrate` therefore learns ``c`` on one half of the held-out truths and reports
the coverage of the other half before and after. The scale is stored in the prior checkpoint (key
``recalibration``, plain numbers and strings: weights-only loadable) with the problem, operator settings and
noise it was learned for; `ganflow solve` applies it when they match (``[solve] recalibrate = "auto"``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from .errors import GanflowError

__all__ = ["central_interval", "interval_scores", "conformal_scale", "scaled_coverage", "recalibrate_summary",
           "scaled_field_fn", "recalibration_applies", "check_recalibration"]


def central_interval(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and central ``level`` interval ``(m, lo, hi)`` of ``draws`` ``[N, d]`` (each ``[d]``)."""
    draws = np.asarray(draws, np.float64)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return draws.mean(0), lo, hi


def interval_scores(interval: tuple, truth: np.ndarray) -> np.ndarray:
    """Per entry, the smallest scale ``c`` for which ``m + c ([lo, hi] - m)`` holds ``truth`` ``[d]``.

    ``interval = (m, lo, hi)`` (`central_interval`). A zero-width side gives ``inf`` unless the truth sits on
    the mean (then 0)."""
    m, lo, hi = interval
    t = np.asarray(truth, np.float64).reshape(m.shape)
    gap = np.where(t < m, m - t, t - m)
    width = np.where(t < m, m - lo, hi - m)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(gap <= 0, 0.0, gap / width)
    return np.where(np.isnan(s), np.inf, s)


def conformal_scale(scores: np.ndarray, level: float = 0.95) -> float:
    """The split-conformal quantile: the ``ceil((n + 1) level)``-th smallest of the ``n`` scores."""
    s = np.sort(np.asarray(scores, np.float64).reshape(-1))
    k = math.ceil((s.size + 1) * level)
    if s.size == 0 or k > s.size:
        raise GanflowError(f"conformal recalibration at level {level} needs at least {math.ceil(level / (1 - level))} "
                           f"scores, got {s.size}")
    c = float(s[k - 1])
    if not math.isfinite(c):
        raise GanflowError("conformal recalibration: the intervals have zero width where the truths are not")
    return c


def scaled_coverage(interval: tuple, truth: np.ndarray, scale: float) -> np.ndarray:
    """Indicators ``[d]``: is each entry of ``truth`` inside ``m + scale ([lo, hi] - m)``."""
    m, lo, hi = interval
    t = np.asarray(truth, np.float64).reshape(m.shape)
    return (t >= m + scale * (lo - m)) & (t <= m + scale * (hi - m))


def recalibrate_summary(summary, scale: float):
    """A `FieldSummary` with every field draw scaled about the mean by ``scale`` (quantiles, sd, samples)."""
    m = summary.mean
    return replace(
        summary,
        std=summary.std * scale,
        quantiles={q: (m + scale * (v - m)).astype(v.dtype) for q, v in summary.quantiles.items()},
        samples=(m + scale * (summary.samples - m)).astype(summary.samples.dtype),
    )


def scaled_field_fn(field_fn: Callable, mean: np.ndarray, scale: float) -> Callable:
    """``z -> m + scale (field_fn(z) - m)``."""
    m = torch.as_tensor(np.asarray(mean), dtype=torch.float32)

    def fields(z: torch.Tensor) -> torch.Tensor:
        x = field_fn(z)
        return (m.to(x.dtype) + scale * (x - m.to(x.dtype))).to(x.dtype)

    return fields


def check_recalibration(rec: Any) -> dict:
    """A checkpoint's ``recalibration`` entry, checked (a one-line error when it is malformed)."""
    keys = ("scale", "level", "problem", "operator_kwargs", "representation_error")
    if not isinstance(rec, dict) or any(k not in rec for k in keys):
        raise GanflowError(f"prior checkpoint: 'recalibration' must be a dict with {', '.join(keys)}")
    scale = rec["scale"]
    if not isinstance(scale, float) or not (0 < scale < math.inf):
        raise GanflowError(f"prior checkpoint: recalibration scale must be a positive number, got {scale!r}")
    return rec


def recalibration_applies(rec: dict, op_info: dict, representation_error: str) -> str | None:
    """None when ``rec`` was learned for this problem, operator settings and representation-error setting;
    else the reason it does not apply."""
    problem = str(op_info.get("problem", op_info.get("operator", "")))
    if problem != rec["problem"]:
        return f"learned for problem {rec['problem']}, not {problem}"
    # A record with every setting (defaults filled, `ganflow.plugins.operator_settings`) matches options that
    # leave some to their defaults; an older record without them matches the options exactly as written.
    key = "operator_settings" if "operator_settings" in rec and "operator_settings" in op_info else "operator_kwargs"
    theirs, mine = dict(rec[key] or {}), dict(op_info.get(key) or {})
    if mine != theirs:
        return f"learned for operator settings {theirs}, not {mine}"
    if representation_error != rec["representation_error"]:
        return f"learned with the representation error {rec['representation_error']}"
    return None
