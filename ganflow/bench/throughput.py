"""Operator throughput: the built-in operators' batched forward + VJP against plain numpy / scipy
implementations of the same computation (checked equal before they are timed)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from .metrics import _best_time
from .plan import BenchPlan

__all__ = ["numpy_phase_vjp", "scipy_elliptic_vjp"]


def numpy_phase_vjp(
    x: np.ndarray, size: int, mask: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy phase retrieval: ``y = |fft2(pad(x))|[mask]`` (orthonormal) and its VJP
    ``Re(ifft2(w_full * F / |F|))[:n, :n]`` (from scripts/bench_phase_retrieval.py)."""
    n = x.shape[-1]
    padded = np.zeros(x.shape[:-2] + (size, size), dtype=x.dtype)
    padded[..., :n, :n] = x
    spec = np.fft.fft2(padded, norm="ortho")
    mag = np.abs(spec)
    y = mag[..., mask]
    w_full = np.zeros(spec.shape, dtype=spec.dtype)
    w_full[..., mask] = w * np.divide(
        spec[..., mask], mag[..., mask], out=np.zeros_like(w, dtype=spec.dtype), where=mag[..., mask] > 0
    )
    grad = np.fft.ifft2(w_full, norm="ortho").real[..., :n, :n]
    return y, grad


def scipy_elliptic_vjp(op, m: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain scipy elliptic forward + adjoint, one sample at a time: assemble ``K(m)`` from COO triplets,
    ``splu`` with scipy's default ordering, forward solve, sensor interpolation, adjoint solve, the
    adjoint-state gradient. The same discretisation as ``ganflow.problems.elliptic`` (its mesh arrays are reused)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    s = op.solver
    N = s.n * s.n
    p, q, d = s.face_p, s.face_q, s.dir_cell
    idx = op.interp_index.numpy()
    wt = op.interp_weight.numpy()
    P = sp.csr_matrix(
        (wt.ravel(), (np.repeat(np.arange(len(idx)), idx.shape[1]), idx.ravel())), shape=(len(idx), N)
    )
    off = op.interp_offset.numpy()
    ys, grads = [], []
    for mb, wb in zip(m.reshape(len(m), -1), w, strict=True):
        kappa = np.exp(mb)
        kp, kq = kappa[p], kappa[q]
        tf, td = 2 * kp * kq / (kp + kq), 2 * kappa[d]
        K = sp.coo_matrix(
            (
                np.concatenate([tf, tf, -tf, -tf, td]),
                (np.concatenate([p, q, p, q, d]), np.concatenate([p, q, q, p, d])),
            ),
            shape=(N, N),
        ).tocsc()
        rhs = s.rhs_source.copy()
        np.add.at(rhs, d, td * s.dir_value)
        lu = spla.splu(K)
        u = lu.solve(rhs)
        ys.append(P @ u + off)
        lam = lu.solve(P.T @ wb, trans="T")
        jump = (u[p] - u[q]) * (lam[p] - lam[q])
        s2 = (kp + kq) ** 2
        g = -np.bincount(p, 2 * kp * kq**2 / s2 * jump, N) - np.bincount(q, 2 * kq * kp**2 / s2 * jump, N)
        g -= np.bincount(d, 2 * kappa[d] * lam[d] * (u[d] - s.dir_value), N)
        grads.append(g)
    return np.stack(ys), np.stack(grads).reshape(m.shape)


def _throughput(plan: BenchPlan, seed: int, echo) -> list[dict]:
    """One record per operator size of the plan: elliptic, then phase retrieval."""
    records = []
    for n in plan.elliptic_sizes:
        echo(f"[throughput] elliptic n={n}")
        records.append(_elliptic_throughput(n, plan, seed))
    for n, B in plan.phase_sizes:
        echo(f"[throughput] phase_retrieval n={n}")
        records.append(_phase_throughput(n, B, plan, seed))
    return records


def _elliptic_throughput(n: int, plan: BenchPlan, seed: int) -> dict:
    from ..plugins import load_problem

    prob = load_problem("elliptic", n=n, prior="channels")
    op = prob.make_operator(sensors="grid:8")
    B = plan.elliptic_batch
    m = prob.sample_fields(B, torch.Generator().manual_seed(seed)).double()
    w = torch.randn(B, *op.obs_shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    torch_step = functools.partial(_torch_vjp, op, m, w)
    y_t, g_t = torch_step()
    y_n, g_n = scipy_elliptic_vjp(op, m.numpy(), w.numpy())
    np.testing.assert_allclose(y_t.detach().numpy(), y_n, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(g_t.numpy(), g_n, rtol=1e-6, atol=1e-8 * np.abs(g_n).max())
    tw, tc = _best_time(torch_step, plan.repeats)
    nw, nc = _best_time(functools.partial(scipy_elliptic_vjp, op, m.numpy(), w.numpy()), plan.repeats)
    return {
        "problem": "elliptic",
        "method": "operator_throughput",
        "n": n,
        "batch": B,
        "ganflow_solves_per_s": B / tw,
        "scipy_solves_per_s": B / nw,
        "speedup": nw / tw,
        "ganflow_solves_per_cpu_s": B / tc,
        "scipy_solves_per_cpu_s": B / nc,
        "unit": "forward + adjoint solves",
    }


def _phase_throughput(n: int, B: int, plan: BenchPlan, seed: int) -> dict:
    from ..plugins import load_problem

    prob = load_problem("phase_retrieval", n=n)
    op = prob.make_operator(oversampling=2, mask_fraction=0.5, mask_seed=0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, n, generator=gen)
    w = torch.randn(B, *op.obs_shape, generator=gen)
    torch_step = functools.partial(_torch_vjp, op, x, w)
    mask = op.mask.numpy()
    xn, wn = x.numpy(), w.numpy()
    y_t, g_t = torch_step()
    y_n, g_n = numpy_phase_vjp(xn, op.size, mask, wn)
    np.testing.assert_allclose(y_t.detach().numpy(), y_n, rtol=1e-4, atol=1e-4 * np.abs(y_n).max())
    np.testing.assert_allclose(g_t.numpy(), g_n, rtol=1e-3, atol=1e-3 * np.abs(g_n).max())
    tw, tc = _best_time(torch_step, plan.repeats)
    nw, nc = _best_time(functools.partial(numpy_phase_vjp, xn, op.size, mask, wn), plan.repeats)
    return {
        "problem": "phase_retrieval",
        "method": "operator_throughput",
        "n": n,
        "batch": B,
        "ganflow_solves_per_s": B / tw,
        "numpy_solves_per_s": B / nw,
        "speedup": nw / tw,
        "ganflow_solves_per_cpu_s": B / tc,
        "numpy_solves_per_cpu_s": B / nc,
        "unit": "forward + VJP evaluations",
    }


def _torch_vjp(op, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(op(x), w^T dop/dx)`` by autograd: the ganflow side of the comparison."""
    xx = x.clone().requires_grad_(True)
    y = op(xx)
    (g,) = torch.autograd.grad(y, xx, w)
    return y, g
