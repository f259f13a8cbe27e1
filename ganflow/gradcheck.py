"""Verify a forward operator before any solve: shapes, batch consistency, VJP vs finite differences, speed.

The VJP check follows hIPPYlib's ``modelVerify``: with a random field ``x``, a random direction ``delta`` and
a random cotangent ``w``, the scalar ``l(x) = <w, A(x)>`` has the autograd directional derivative
``<grad l(x), delta>`` (one vector-Jacobian product), compared with the central difference

    fd(eps) = (l(x + eps delta) - l(x - eps delta)) / (2 eps)

at shrinking ``eps``. A correct VJP shows an error falling like ``eps^2`` until round-off takes over; a wrong
one levels off at the size of the mistake. The check runs in float64 when the operator accepts it (a float64
copy of the operator is made; the caller's operator is not changed).

Example:
    >>> from ganflow.problems.linear_gaussian import BlurSubsample
    >>> report = check_operator(BlurSubsample(), torch.Generator().manual_seed(0), eps_list=(1e-2, 1e-4))
    >>> report["dtype"], report["passed"]
    ('float64', True)
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from typing import Sequence

import torch
from torch import Tensor

from .errors import GanflowError
from .operators import call_plugin
from .operators import check_operator as check_operator_contract
from .plugins import load_operator, load_problem, resolve_spec

__all__ = ["check_operator", "format_report", "operator_from_spec", "DEFAULT_EPS"]

DEFAULT_EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# Pass if the best relative error is below this (the central difference reaches ~sqrt(machine eps)^(4/3)).
_TOL = {torch.float64: 1e-6, torch.float32: 1e-2}


def _is_problem(obj) -> bool:
    return all(hasattr(obj, a) for a in ("make_operator", "sample_fields"))


def operator_from_spec(
    spec: str, kwargs: dict | None = None, generator: torch.Generator | None = None, batch: int = 4
):
    """``(operator, x)`` from a spec: a problem spec gives ``problem.make_operator(**kwargs)`` and ``x`` drawn
    from ``problem.sample_fields`` (None when its shape does not fit); an operator spec gives ``x = None``."""
    obj = resolve_spec(spec)
    kwargs = dict(kwargs or {})
    if not _is_problem(obj):
        return load_operator(spec, **kwargs), None
    problem = load_problem(spec) if inspect.isclass(obj) or not hasattr(obj, "field_shape") else obj
    op = load_operator(problem=problem, **kwargs)
    x = None
    if generator is not None:
        fields = problem.sample_fields(batch, generator)
        if isinstance(fields, Tensor) and tuple(fields.shape) == (batch, *tuple(op.field_shape)):
            x = fields
    return op, x


def _float64_copy(op, x: Tensor):
    """A float64 copy of ``op`` if it maps float64 to float64, else None."""
    try:
        op64 = copy.deepcopy(op).to(torch.float64)
        with torch.no_grad():
            out = op64(x.detach().to(torch.float64))
        return op64 if isinstance(out, Tensor) and out.dtype == torch.float64 else None
    except Exception:  # any failure means "no float64 support": the check falls back to float32
        return None


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def check_operator(
    op,
    generator: torch.Generator | None = None,
    batch: int = 4,
    eps_list: Sequence[float] = DEFAULT_EPS,
    x: Tensor | None = None,
    repeats: int = 3,
) -> dict:
    """Check a forward operator; returns a report dict (see `format_report`).

    Args:
        op: a forward operator ``[B, *field_shape] -> [B, *obs_shape]``.
        generator: draws ``x`` (unless given), the direction ``delta`` and the cotangent ``w``
            (seeded 0 if None).
        batch: ``B``.
        eps_list: finite-difference steps, largest first.
        x: the field to check at, ``[B, *field_shape]`` (default: standard normal).
        repeats: timing repeats (the median is reported).

    Report keys: ``field_shape``, ``obs_shape``, ``batch``, ``dtype``;
    ``batch_consistency`` (``max |A(x)[:1] - A(x[:1])|``); ``directional_derivative`` (``<grad l, delta>``);
    ``rows`` (``eps``, ``fd``, ``abs_err``, ``rel_err``); ``min_rel_err``, ``tol``; ``decreasing`` (the best
    error is below the error at the largest step, or within ``tol`` from the start); ``passed``
    (``min_rel_err < tol``); ``forward_s`` and ``forward_vjp_s`` (median seconds per batch, own dtype).
    """
    check_operator_contract(op)
    if batch < 1:
        raise GanflowError(f"batch must be >= 1, got {batch}")
    eps_list = [float(e) for e in eps_list]
    if not eps_list or any(not (math.isfinite(e) and e > 0) for e in eps_list):
        raise GanflowError(f"eps_list must be positive numbers, got {eps_list}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    field_shape, obs_shape = tuple(op.field_shape), tuple(op.obs_shape)
    if x is None:
        x = torch.randn(batch, *field_shape, generator=gen)
    if tuple(x.shape) != (batch, *field_shape):
        raise GanflowError(f"check field has shape {tuple(x.shape)}, expected {(batch, *field_shape)}")
    x = x.detach()

    batch_consistency = _check_forward(op, x, obs_shape)
    vjp, w = _check_vjp(op, x, obs_shape, gen, eps_list)
    return {
        "field_shape": field_shape,
        "obs_shape": obs_shape,
        "batch": batch,
        "dtype": vjp["dtype"],
        "batch_consistency": batch_consistency,
        "directional_derivative": vjp["directional_derivative"],
        "rows": vjp["rows"],
        "min_rel_err": vjp["min_rel_err"],
        "tol": vjp["tol"],
        "decreasing": vjp["decreasing"],
        "passed": vjp["passed"],
        **_time_forward(op, x, w, repeats),
    }


def _check_forward(op, x: Tensor, obs_shape: tuple) -> float:
    """Check the output at ``x`` (declared shape, finite); return the batch consistency
    ``max |A(x)[:1] - A(x[:1])|``."""
    batch = x.shape[0]
    with torch.no_grad():
        out = call_plugin(op, x, "operator (at the check field)")
    if not isinstance(out, Tensor) or tuple(out.shape) != (batch, *obs_shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise GanflowError(f"operator returned {got} for a batch of {batch}, declared obs_shape {obs_shape}")
    if not torch.isfinite(out).all():
        raise GanflowError("operator returned non-finite values at the check field")
    with torch.no_grad():
        one = op(x[:1])
    return float((out[:1] - one).abs().max())


def _check_vjp(op, x: Tensor, obs_shape: tuple, gen: torch.Generator, eps_list: list[float]) -> tuple[dict, Tensor]:
    """The VJP check (float64 when the operator allows): the autograd directional derivative of
    ``l(x) = <w, A(x)>`` against central differences at each step of ``eps_list``. Returns the report's VJP
    entries and the cotangent ``w`` (in the check's dtype)."""
    op64 = _float64_copy(op, x)
    dtype = torch.float64 if op64 is not None else x.dtype
    opc = op64 if op64 is not None else op
    xc = x.to(dtype)
    delta = torch.randn(xc.shape, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(x.shape[0], *obs_shape, generator=gen, dtype=torch.float64).to(dtype)

    def loss(field: Tensor) -> Tensor:
        return (w * opc(field)).sum()

    xg = xc.clone().requires_grad_(True)
    value = loss(xg)
    if not value.requires_grad:
        raise GanflowError("operator output does not depend differentiably on the field (no autograd graph)")
    (grad,) = torch.autograd.grad(value, xg)
    ad = float((grad * delta).sum())
    rows = []
    with torch.no_grad():
        for eps in eps_list:
            fd = float((loss(xc + eps * delta) - loss(xc - eps * delta)) / (2 * eps))
            abs_err = abs(fd - ad)
            rows.append({"eps": eps, "fd": fd, "abs_err": abs_err, "rel_err": abs_err / max(abs(ad), 1e-300)})
    rel = [r["rel_err"] for r in rows]
    best = min(range(len(rel)), key=rel.__getitem__)
    tol = _TOL.get(dtype, 1e-2)
    # A linear operator's central difference is exact at every step: already within tol counts as converged.
    decreasing = rel[best] < rel[0] or rel[0] < tol
    report = {
        "dtype": str(dtype).replace("torch.", ""),
        "directional_derivative": ad,
        "rows": rows,
        "min_rel_err": rel[best],
        "tol": tol,
        "decreasing": decreasing,
        "passed": bool(rel[best] < tol),
    }
    return report, w


def _time_forward(op, x: Tensor, w: Tensor, repeats: int) -> dict:
    """Median seconds per batch of the forward map and of forward + VJP, in the operator's own dtype."""

    def forward():
        with torch.no_grad():
            op(x)

    def forward_vjp():
        xv = x.clone().requires_grad_(True)
        torch.autograd.grad((op(xv) * w.to(x.dtype)).sum(), xv)

    return {"forward_s": _timed(forward, repeats), "forward_vjp_s": _timed(forward_vjp, repeats)}


def format_report(report: dict, title: str = "operator") -> str:
    """The report as text: shapes, the convergence table, the verdict and the timings."""
    lines = [
        f"check-operator {title}",
        f"  field_shape {report['field_shape']}  obs_shape {report['obs_shape']}  batch {report['batch']}"
        f"  dtype {report['dtype']}",
        f"  batch consistency max|A(x)[:1] - A(x[:1])| = {report['batch_consistency']:.3e}",
        f"  VJP check: l(x) = <w, A(x)>, autograd <grad l, delta> = {report['directional_derivative']:.10e}",
        f"  {'eps':>9s}  {'finite difference':>20s}  {'abs error':>10s}  {'rel error':>10s}",
    ]
    for r in report["rows"]:
        lines.append(f"  {r['eps']:9.1e}  {r['fd']:20.12e}  {r['abs_err']:10.3e}  {r['rel_err']:10.3e}")
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append(
        f"  {verdict}: min rel error {report['min_rel_err']:.2e} (tol {report['tol']:.0e}), "
        f"{'decreasing' if report['decreasing'] else 'not decreasing'} with eps"
    )
    lines.append(
        f"  time per batch of {report['batch']}: forward {report['forward_s'] * 1e3:.2f} ms, "
        f"forward + VJP {report['forward_vjp_s'] * 1e3:.2f} ms"
    )
    return "\n".join(lines)
