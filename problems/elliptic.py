"""The elliptic inverse problem: infer the log-conductivity ``m`` from sparse noisy pressure.

PDE on the unit square Omega = (0, 1)^2:

    -div(exp(m) grad u) = f.

Boundary conditions (``bc``):

- ``"hippylib"`` (default, as in hIPPYlib's Poisson tutorial): ``f = 0``, ``u = 0`` on the bottom edge
  ``y = 0``, ``u = 1`` on the top edge ``y = 1``, no flux ``exp(m) du/dx = 0`` through the sides ``x = 0``
  and ``x = 1``;
- ``"darcy"``: ``f = 1``, ``u = 0`` on the whole boundary.

Grid convention: a field is ``[n, n]``; entry ``[i, j]`` is the cell of side ``h = 1/n`` whose centre is
``x = (j + 1/2) h``, ``y = (i + 1/2) h``; row 0 touches the bottom edge ``y = 0``.

Discretisation (second-order cell-centred finite volumes): with ``kappa = exp(m)`` per cell, the flux through
the face between neighbouring cells P and Q (face length h, centre distance h) is ``T_PQ (u_P - u_Q)`` with
the transmissibility ``T_PQ = 2 kappa_P kappa_Q / (kappa_P + kappa_Q)`` (harmonic mean); through a Dirichlet
face (half-cell distance h/2 to the boundary value g) it is ``2 kappa_P (u_P - g)``; no-flux faces contribute
nothing. Balancing the fluxes out of each cell against ``f_P h^2`` gives ``K(m) u = b(m)`` with K symmetric
positive definite. ``K`` is assembled with scipy.sparse into LAPACK band storage (half-bandwidth n) and
factorised per sample by banded Cholesky (`scipy.linalg.lapack.dpbtrf`; SuperLU for a sample whose pivot
fails); the backward pass solves the adjoint system ``K^T lam = dl/du`` with the same
factors and returns ``dl/dm = -lam^T (dK/dm u - db/dm)``, with
``dT_PQ/dm_P = 2 kappa_P kappa_Q^2 / (kappa_P + kappa_Q)^2``.

Observations (``sensors``): bilinear interpolation of the cell-centre solution, extended to the boundary
(Dirichlet sides take the boundary value; no-flux sides take the adjacent cell value, i.e. zero normal
derivative), so every point of the closed unit square can be observed:

- ``"grid:K"`` (default ``"grid:8"``): the K x K points ``((b + 1)/(K + 1), (a + 1)/(K + 1))``, with ``a``
  (row, y) slow;
- ``"random:N"``: N points uniform on the unit square, drawn with ``sensor_seed``;
- ``"hippylib"``: 50 points uniform on [0.1, 0.9] x [0.1, 0.5] (hIPPYlib's Poisson example), drawn with
  ``sensor_seed``;
- ``"full"``: u at every cell centre, ``obs_shape = (n, n)``;
- a list of ``[x, y]`` pairs inside the closed unit square.

Example fields (the prior's training data): FFT spectral synthesis of a Gaussian random field with a
squared-exponential covariance ``exp(-(dx/lx)^2/2 - (dy/ly)^2/2)`` on a periodic ``2n x 2n`` grid, cropped
to ``n x n``. ``prior="channels"`` thresholds it at 0 into a binary medium of conductivity 12 or 3
(``m = log 12`` or ``log 3``), channels running along y (``corr_length = (0.06, 0.3)``); ``prior="grf"`` is
``m = mean + std * g`` with ``corr_length = 0.2``.

Quantities of interest: ``"pressure"`` (u, ``[B, n, n]``) and ``"flux_top"``: ``int_{y=1} exp(m) du/dy dx``,
the total flux through the top edge; with the hippylib BCs it is the effective conductivity of the square (for
layers ``m(y)`` the harmonic mean, for layers ``m(x)`` the arithmetic mean).

Example:
    >>> import torch
    >>> p = EllipticProblem(n=16)
    >>> A = p.make_operator(sensors="grid:4")
    >>> m = p.sample_fields(2, torch.Generator().manual_seed(0))
    >>> A(m).shape, A(torch.zeros(1, 16, 16))[0, ::4]  # constant conductivity: u = y
    (torch.Size([2, 16]), tensor([0.2000, 0.4000, 0.6000, 0.8000]))
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from scipy.linalg import lapack
from torch import Tensor, nn

from ganflow import GanflowError

__all__ = [
    "EllipticProblem",
    "EllipticOperator",
    "FiniteVolumeSolver",
    "BlockTridiagonalSolver",
    "bilinear_interpolation",
    "sensor_points",
    "BOUNDARY_CONDITIONS",
]

SIDES = ("bottom", "top", "left", "right")

# bc name -> (Dirichlet values per side; sides not listed have no flux, constant source f)
BOUNDARY_CONDITIONS = {
    "hippylib": ({"bottom": 0.0, "top": 1.0}, 0.0),
    "darcy": ({"bottom": 0.0, "top": 0.0, "left": 0.0, "right": 0.0}, 1.0),
}


class FiniteVolumeSolver:
    """Cell-centred finite volumes for ``-div(exp(m) grad u) = f`` on the unit square, batched over ``m``.

    Args:
        n: cells per side; fields are ``[n, n]`` (see the module docstring for the grid convention).
        dirichlet: side name (``bottom``, ``top``, ``left``, ``right``) -> boundary value, a number or an
            array ``[n]`` of values at the face midpoints (along x for bottom/top, along y for left/right).
            Sides not listed have no flux.
        source: f, a number or an array ``[n, n]`` of cell-centre values (midpoint rule).

    ``solve(m)`` takes ``m`` ``[B, n, n]`` (float64 numpy) and returns ``u`` ``[B, n, n]`` and the list of
    factors (banded Cholesky); ``gradient(m, u, factors, grad_u)`` returns ``dl/dm`` for ``grad_u = dl/du`` (one adjoint
    solve each).
    """

    def __init__(self, n: int, dirichlet: dict, source: float | np.ndarray = 0.0):
        n = int(n)
        if n < 2:
            raise GanflowError(f"elliptic: need n >= 2 cells per side, got {n}")
        unknown = sorted(set(dirichlet) - set(SIDES))
        if unknown:
            raise GanflowError(
                f"elliptic: unknown boundary side(s) {', '.join(unknown)} (known: {', '.join(SIDES)})"
            )
        self.n, self.h, N = n, 1.0 / n, n * n
        idx = np.arange(N).reshape(n, n)
        # Interior faces: x-neighbours then y-neighbours; P is the left/lower cell, Q the right/upper one.
        self.face_p = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
        self.face_q = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
        side_cells = {"bottom": idx[0, :], "top": idx[-1, :], "left": idx[:, 0], "right": idx[:, -1]}
        self.dirichlet = {}
        cells, values = [], []
        for side in SIDES:
            if side not in dirichlet:
                continue
            g = np.broadcast_to(np.asarray(dirichlet[side], dtype=np.float64), (n,)).copy()
            if not np.isfinite(g).all():
                raise GanflowError(f"elliptic: Dirichlet values on the {side} side must be finite")
            self.dirichlet[side] = g
            cells.append(side_cells[side])
            values.append(g)
        self.dir_cell = np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64)
        self.dir_value = np.concatenate(values) if values else np.zeros(0)
        f = np.broadcast_to(np.asarray(source, dtype=np.float64), (n, n))
        self.rhs_source = (f * self.h**2).ravel().copy()

        # COO pattern of K: per interior face (P,P), (Q,Q), (P,Q), (Q,P); per Dirichlet face (P,P).
        p, q, d = self.face_p, self.face_q, self.dir_cell
        rows = np.concatenate([p, q, p, q, d])
        cols = np.concatenate([p, q, q, p, d])
        # CSC structure once; per sample only the values change: data = scatter @ coo_values.
        key, inverse = np.unique(cols * N + rows, return_inverse=True)
        self.indices = (key % N).astype(np.int32)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(key // N, minlength=N))]).astype(np.int32)
        n_coo = rows.size
        self._scatter = sp.csr_matrix((np.ones(n_coo), (inverse, np.arange(n_coo))), shape=(key.size, n_coo))
        upper = rows <= cols  # the band storage keeps the upper triangle: ab[n + i - j, j] = K[i, j]
        band_at = (n + rows - cols) * N + cols
        self._band_scatter = sp.csr_matrix((np.ones(int(upper.sum())), (band_at[upper], np.arange(n_coo)[upper])),
                                           shape=((n + 1) * N, n_coo))
        n_face, n_dir = p.size, d.size
        self._face_to_p = sp.csr_matrix((np.ones(n_face), (p, np.arange(n_face))), shape=(N, n_face))
        self._face_to_q = sp.csr_matrix((np.ones(n_face), (q, np.arange(n_face))), shape=(N, n_face))
        self._dir_to_cell = sp.csr_matrix((np.ones(n_dir), (d, np.arange(n_dir))), shape=(N, n_dir))

    def _transmissibilities(self, kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kp, kq = kappa[:, self.face_p], kappa[:, self.face_q]
        return 2.0 * kp * kq / (kp + kq), 2.0 * kappa[:, self.dir_cell]

    def _values(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``m`` ``[B, n, n]`` -> the COO values of ``K(m_b)`` ``[B, n_coo]`` and the right-hand sides ``[B, n*n]``."""
        kappa = np.exp(m.reshape(m.shape[0], -1))
        t_face, t_dir = self._transmissibilities(kappa)
        coo = np.concatenate([t_face, t_face, -t_face, -t_face, t_dir], axis=1)
        rhs = self.rhs_source[None, :] + (self._dir_to_cell @ (t_dir * self.dir_value).T).T
        return coo, rhs

    def assemble(self, m: np.ndarray) -> tuple[list[sp.csc_matrix], np.ndarray]:
        """``m`` ``[B, n, n]`` -> the matrices ``K(m_b)`` (CSC) and right-hand sides ``b(m)`` ``[B, n*n]``."""
        coo, rhs = self._values(m)
        data = np.ascontiguousarray((self._scatter @ coo.T).T)
        N = self.n * self.n
        return [sp.csc_matrix((row, self.indices, self.indptr), shape=(N, N)) for row in data], rhs

    def bands(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``K(m_b)`` in LAPACK's upper band storage ``[B, n + 1, n*n]`` (``ab[n + i - j, j] = K[i, j]``; cells
        numbered row by row, so the half-bandwidth is ``n``) and the right-hand sides ``[B, n*n]``."""
        coo, rhs = self._values(m)
        N = self.n * self.n
        return np.ascontiguousarray((self._band_scatter @ coo.T).T).reshape(-1, self.n + 1, N), rhs

    def solve(self, m: np.ndarray) -> tuple[np.ndarray, list]:
        """``m`` ``[B, n, n]`` float64 -> ``u`` ``[B, n, n]`` and each sample's factors (for `gradient`)."""
        ab, rhs = self.bands(m)
        # K is SPD with half-bandwidth n: a banded Cholesky (LAPACK dpbtrf) is half the time of SuperLU with a
        # fill-reducing ordering at n = 32 (1.1 against 2.1 ms a sample; the ordering and symbolic analysis cannot
        # be reused in scipy). Should a pivot fail (K SPD to rounding only), that sample takes SuperLU. One sample
        # after another: SuperLU objects made in worker threads leak (scipy gh-15921).
        factors = []
        with _one_blas_thread():
            for b, band in enumerate(ab):
                chol, info = lapack.dpbtrf(band, lower=0)
                if info == 0:
                    factors.append(_BandCholesky(chol))
                else:
                    K = self.assemble(m[b : b + 1])[0][0]
                    factors.append(spla.splu(K, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                             options={"SymmetricMode": True}))
            u = np.stack([f.solve(r) for f, r in zip(factors, rhs, strict=True)]).reshape(m.shape)
        return u, factors

    def gradient(self, m: np.ndarray, u: np.ndarray, factors: list, grad_u: np.ndarray) -> np.ndarray:
        """``dl/dm`` ``[B, n, n]`` from ``dl/du`` ``[B, n, n]`` via one adjoint solve per sample."""
        B = m.shape[0]
        g = grad_u.reshape(B, -1)
        # adjoint: K^T lam = dl/du, with the forward factors (K = K^T)
        with _one_blas_thread():
            lam = np.stack([lu.solve(gb, trans="T") for lu, gb in zip(factors, g, strict=True)])
        kappa = np.exp(m.reshape(B, -1))
        uf = u.reshape(B, -1)
        p, q, d = self.face_p, self.face_q, self.dir_cell
        kp, kq = kappa[:, p], kappa[:, q]
        wp, wq = kp / (kp + kq), kq / (kp + kq)  # in [0, 1]: no overflow of kappa^3 for large |m|
        jump = (uf[:, p] - uf[:, q]) * (lam[:, p] - lam[:, q])
        # dT/dm_P = kappa_P dT/dkappa_P = 2 kappa_P kappa_Q^2 / (kappa_P + kappa_Q)^2; symmetrically for Q.
        grad = -(self._face_to_p @ (2.0 * kp * wq**2 * jump).T).T
        grad -= (self._face_to_q @ (2.0 * kq * wp**2 * jump).T).T
        # Dirichlet face: residual 2 kappa_P (u_P - g), derivative in m_P is the residual itself.
        grad -= (self._dir_to_cell @ (2.0 * kappa[:, d] * lam[:, d] * (uf[:, d] - self.dir_value)).T).T
        return grad.reshape(m.shape)


_BLAS_CONTROLLER = None


def _one_blas_thread():
    """A context in which BLAS runs on one thread: a band of 32 is far too small to split, and OpenBLAS's
    threads made the banded Cholesky 5-10x slower beside another busy process (measured: 11-32 against 1.1-1.8
    ms a sample). The controller is built once (0.07 ms a use after that, against 4 ms for a fresh one)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


class _BandCholesky:
    """``K = U^T U`` from LAPACK ``dpbtrf`` (upper band storage), with a SuperLU object's ``solve(b, trans)``: K
    is symmetric, so the transposed (adjoint) solve is the same solve."""

    __slots__ = ("chol",)

    def __init__(self, chol: np.ndarray):
        self.chol = chol

    def solve(self, b: np.ndarray, trans: str = "N") -> np.ndarray:
        x, info = lapack.dpbtrs(self.chol, b, lower=0)
        if info != 0:
            raise RuntimeError(f"dpbtrs failed (info {info})")
        return x


# The cells along each side of a batch of fields [B, n, n] (row 0 at the bottom): an index for reading or writing.
_SIDE_CELLS = {"bottom": (slice(None), 0), "top": (slice(None), -1),
               "left": (slice(None), slice(None), 0), "right": (slice(None), slice(None), -1)}


class BlockTridiagonalSolver:
    """The same system as `FiniteVolumeSolver`, in torch on any device, batched: ``K(m) u = b(m)`` factorised by
    block Cholesky over the rows of cells.

    Why: SuperLU runs on the CPU, one sample at a time (about 2 ms each at n = 32); a GPU run of thousands of
    chains (a reference posterior, `scripts/gpu_elliptic_reference.py`) needs every sample solved at once where
    the samples live. With cells numbered row by row, ``K`` is block tridiagonal: ``n`` diagonal blocks ``A_i``
    (row ``i``'s x-faces, tridiagonal) coupled by diagonal blocks ``C_i = -diag(T_y)`` to the next row, so
    ``K = L L^T`` with diagonal blocks ``L_i = chol(A_i - X_i^T X_i)`` and sub-diagonal blocks ``X_i^T``,
    ``X_i = L_{i-1}^{-1} C_{i-1}``: ``n`` batched ``n x n`` factorisations instead of one sparse one per sample.
    The gradient is the adjoint state, as in `FiniteVolumeSolver.gradient`: one more solve with the same
    factors, and the derivative of ``lam . r(m, u)`` in ``m`` at fixed ``u``, ``lam`` (autograd on the
    matrix-free residual `residual`). Float64 throughout.
    """

    def __init__(self, fv: FiniteVolumeSolver):
        self.n, self.h = fv.n, fv.h
        self.dirichlet = {side: torch.from_numpy(g.copy()) for side, g in fv.dirichlet.items()}
        self.rhs_source = torch.from_numpy(fv.rhs_source.reshape(fv.n, fv.n).copy())

    def _transmissibilities(self, m: Tensor) -> tuple[Tensor, Tensor, dict]:
        """``T_x`` ``[B, n, n-1]``, ``T_y`` ``[B, n-1, n]`` and, per Dirichlet side, ``(cells' kappa * 2, g)``."""
        k = torch.exp(m)
        tx = 2.0 * k[:, :, :-1] * k[:, :, 1:] / (k[:, :, :-1] + k[:, :, 1:])
        ty = 2.0 * k[:, :-1, :] * k[:, 1:, :] / (k[:, :-1, :] + k[:, 1:, :])
        faces = {side: (2.0 * k[_SIDE_CELLS[side]], g.to(m.device)) for side, g in self.dirichlet.items()}
        return tx, ty, faces

    @staticmethod
    def _on_side(side: str, values: Tensor, like: Tensor) -> Tensor:
        """``values`` ``[B, n]`` placed on the cells along ``side`` of a ``[B, n, n]`` zero field."""
        out = torch.zeros_like(like)
        out[_SIDE_CELLS[side]] = values
        return out

    def residual(self, m: Tensor, u: Tensor) -> Tensor:
        """``K(m) u - b(m)`` ``[B, n, n]``, matrix-free (differentiable in ``m``)."""
        tx, ty, faces = self._transmissibilities(m)
        fx = tx * (u[:, :, :-1] - u[:, :, 1:])  # flux from cell (i, j) to (i, j + 1)
        fy = ty * (u[:, :-1, :] - u[:, 1:, :])
        pad = torch.nn.functional.pad
        r = pad(fx, (0, 1)) - pad(fx, (1, 0)) + pad(fy, (0, 0, 0, 1)) - pad(fy, (0, 0, 1, 0))
        for side, (t, g) in faces.items():
            r = r + self._on_side(side, t * (u[_SIDE_CELLS[side]] - g), u)
        return r - self.rhs_source.to(u.device)

    def assemble(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The row blocks: ``A`` ``[B, n, n, n]`` (block ``i`` = row ``i``), the couplings ``c`` ``[B, n-1, n]``
        (``C_i = diag(c_i)``) and the right-hand side ``b`` ``[B, n, n]``."""
        tx, ty, faces = self._transmissibilities(m)
        pad = torch.nn.functional.pad
        diag = pad(tx, (0, 1)) + pad(tx, (1, 0)) + pad(ty, (0, 0, 0, 1)) + pad(ty, (0, 0, 1, 0))
        b = self.rhs_source.to(m.device).expand_as(m).clone()
        for side, (t, g) in faces.items():
            diag = diag + self._on_side(side, t, m)
            b = b + self._on_side(side, t * g, m)
        A = torch.diag_embed(diag) - torch.diag_embed(tx, 1) - torch.diag_embed(tx, -1)
        return A, -ty, b

    def factor(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """Block Cholesky factors: ``L`` ``[B, n, n, n]`` (lower) and ``X`` ``[B, n-1, n, n]``."""
        A, c, _ = self.assemble(m)
        Ls, Xs = [torch.linalg.cholesky_ex(A[:, 0])[0]], []
        for i in range(1, self.n):
            X = torch.linalg.solve_triangular(Ls[-1], torch.diag_embed(c[:, i - 1]), upper=False)
            Ls.append(torch.linalg.cholesky_ex(A[:, i] - X.mT @ X)[0])
            Xs.append(X)
        return torch.stack(Ls, 1), torch.stack(Xs, 1)

    def solve(self, L: Tensor, X: Tensor, r: Tensor) -> Tensor:
        """``K^{-1} r`` for ``r`` ``[B, n, n]`` with the factors of `factor` (forward, then back substitution)."""
        tri = torch.linalg.solve_triangular
        ys = [tri(L[:, 0], r[:, 0, :, None], upper=False)]
        for i in range(1, self.n):
            ys.append(tri(L[:, i], r[:, i, :, None] - X[:, i - 1].mT @ ys[-1], upper=False))
        us = [tri(L[:, -1].mT, ys[-1], upper=True)]
        for i in range(self.n - 2, -1, -1):
            us.append(tri(L[:, i].mT, ys[i] - X[:, i] @ us[-1], upper=True))
        return torch.stack(us[::-1], 1)[..., 0]


def _first_order_only(grad_u: Tensor) -> None:
    """Refuse a backward that builds a graph for a second derivative (``create_graph=True``): the adjoint below is
    not itself differentiated, so the Hessian would silently lack the solver's terms (measured: wrong by factors).
    torch's ``once_differentiable`` does not catch ``autograd.grad(g, z)``, which prunes its error node."""
    if torch.is_grad_enabled() and grad_u.requires_grad:
        raise RuntimeError("elliptic solver: its gradient cannot be differentiated twice (no second derivatives)")


class _TorchSolveFunction(torch.autograd.Function):
    """``u = K(m)^{-1} b(m)`` by `BlockTridiagonalSolver`, with the adjoint-state gradient."""

    @staticmethod
    def forward(ctx, m: Tensor, solver: BlockTridiagonalSolver) -> Tensor:
        md = m.detach().to(torch.float64)
        L, X = solver.factor(md)
        u = solver.solve(L, X, solver.assemble(md)[2])
        ctx.solver, ctx.factors = solver, (L, X)
        ctx.save_for_backward(md, u)
        return u

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        _first_order_only(grad_u)
        md, u = ctx.saved_tensors
        lam = ctx.solver.solve(*ctx.factors, grad_u.to(torch.float64))  # K is symmetric: K^T lam = dl/du
        with torch.enable_grad():
            m_var = md.detach().requires_grad_(True)
            (g,) = torch.autograd.grad((lam * ctx.solver.residual(m_var, u)).sum(), m_var)
        return -g, None


class _SolveFunction(torch.autograd.Function):
    """``u = K(m)^{-1} b(m)`` with the adjoint-state gradient; float64 numpy inside."""

    @staticmethod
    def forward(ctx, m: Tensor, solver: FiniteVolumeSolver) -> Tensor:
        m_np = m.detach().cpu().to(torch.float64).numpy()
        u, factors = solver.solve(m_np)
        ctx.solver, ctx.factors, ctx.m_np, ctx.u_np = solver, factors, m_np, u
        return torch.from_numpy(u).to(device=m.device)

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        _first_order_only(grad_u)
        g = grad_u.detach().cpu().to(torch.float64).numpy()
        grad_m = ctx.solver.gradient(ctx.m_np, ctx.u_np, ctx.factors, g)
        return torch.from_numpy(grad_m).to(device=grad_u.device), None


def sensor_points(sensors, sensor_seed: int = 0) -> np.ndarray | None:
    """The sensor layout as ``[n_obs, 2]`` (x, y) coordinates, or None for ``"full"``."""
    if isinstance(sensors, str):
        name, _, arg = sensors.strip().partition(":")
        if name == "full" and not arg:
            return None
        if name == "hippylib" and not arg:
            gen = torch.Generator().manual_seed(int(sensor_seed))
            pts = torch.rand(50, 2, generator=gen, dtype=torch.float64).numpy()
            return np.stack([0.1 + 0.8 * pts[:, 0], 0.1 + 0.4 * pts[:, 1]], 1)
        if name in ("grid", "random"):
            try:
                count = int(arg) if arg else (8 if name == "grid" else -1)
            except ValueError:
                count = -1
            if count < 1:
                raise GanflowError(
                    f"elliptic: sensors '{sensors}' needs a positive integer count, e.g. '{name}:8'"
                )
            if name == "grid":
                t = np.arange(1, count + 1) / (count + 1)
                yy, xx = np.meshgrid(t, t, indexing="ij")
                return np.stack([xx.ravel(), yy.ravel()], 1)
            gen = torch.Generator().manual_seed(int(sensor_seed))
            return torch.rand(count, 2, generator=gen, dtype=torch.float64).numpy()
        raise GanflowError(
            f"elliptic: unknown sensors '{sensors}' (use grid:K, random:N, hippylib, full or [[x, y], ...])"
        )
    try:
        pts = np.asarray(sensors, dtype=np.float64)
    except (TypeError, ValueError):
        raise GanflowError("elliptic: sensors must be a layout name or a list of [x, y] pairs") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise GanflowError(
            f"elliptic: sensor coordinates must be a non-empty [N, 2] list, got shape {pts.shape}"
        )
    if not np.isfinite(pts).all() or (pts < 0).any() or (pts > 1).any():
        bad = int((~np.isfinite(pts).all(1) | (pts < 0).any(1) | (pts > 1).any(1)).sum())
        raise GanflowError(f"elliptic: {bad} sensor(s) outside the unit square [0, 1]^2")
    return pts


def bilinear_interpolation(n: int, points: np.ndarray, dirichlet: dict) -> tuple[sp.csr_matrix, np.ndarray]:
    """Bilinear interpolation of a cell-centre field, extended to the boundary: ``u(points) = P u + c``.

    The cell-centre lattice is extended by nodes on the walls x, y in {0, 1}. A wall node takes the Dirichlet
    value of its side (the mean of both sides at a corner; the value at the nearest face midpoint), or, on a
    no-flux side, the value of the adjacent cell (zero normal derivative). Exact for fields that are linear in
    x and y inside the hull of the cell centres, and for boundary data consistent with them.

    Args:
        n: cells per side. points: ``[n_obs, 2]`` (x, y) in the closed unit square.
        dirichlet: side -> value (number or ``[n]`` array), as in `FiniteVolumeSolver`.

    Returns: ``P`` (scipy CSR ``[n_obs, n*n]``, 4 entries per row at most) and ``c`` ``[n_obs]``.
    """
    h = 1.0 / n
    nodes = np.concatenate([[0.0], (np.arange(n) + 0.5) * h, [1.0]])  # n + 2 extended node coordinates
    g = {s: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for s, v in dirichlet.items()}
    x, y = points[:, 0], points[:, 1]
    ax = np.clip(np.searchsorted(nodes, x, side="right") - 1, 0, n)
    ay = np.clip(np.searchsorted(nodes, y, side="right") - 1, 0, n)
    wx = (x - nodes[ax]) / (nodes[ax + 1] - nodes[ax])
    wy = (y - nodes[ay]) / (nodes[ay + 1] - nodes[ay])
    rows, cols, vals = [], [], []
    const = np.zeros(len(points))
    for dr, dc, w in (
        (0, 0, (1 - wy) * (1 - wx)),
        (0, 1, (1 - wy) * wx),
        (1, 0, wy * (1 - wx)),
        (1, 1, wy * wx),
    ):
        r, c = ay + dr, ax + dc  # extended indices, 0..n+1
        walls = [(r == 0, "bottom", c), (r == n + 1, "top", c), (c == 0, "left", r), (c == n + 1, "right", r)]
        total, count = np.zeros(len(points)), np.zeros(len(points))
        for on_wall, side, along in walls:
            if side in g:
                hit = on_wall
                total += np.where(hit, g[side][np.clip(along - 1, 0, n - 1)], 0.0)
                count += hit
        is_dir = count > 0
        const += np.where(is_dir, w * total / np.maximum(count, 1), 0.0)
        # Interior nodes and no-flux wall nodes read the nearest cell.
        cell = np.clip(r - 1, 0, n - 1) * n + np.clip(c - 1, 0, n - 1)
        keep = ~is_dir
        rows.append(np.nonzero(keep)[0])
        cols.append(cell[keep])
        vals.append(w[keep])
    P = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(points), n * n)
    )
    return P, const


class EllipticOperator(nn.Module):
    """The forward operator ``m [B, n, n] -> u(sensors) [B, *obs_shape]`` (see the module docstring).

    Args:
        n: cells per side; ``field_shape = (n, n)``.
        bc: ``"hippylib"`` (u = 0 bottom, u = 1 top, no-flux sides, f = 0) or ``"darcy"`` (u = 0, f = 1).
        sensors: ``"grid:K"``, ``"random:N"``, ``"hippylib"``, ``"full"`` or a list of ``[x, y]`` pairs.
        sensor_seed: seed of the random layouts (``random:N``, ``hippylib``).
        backend: ``"auto"`` (banded Cholesky on the CPU, `BlockTridiagonalSolver` for fields on a GPU), ``"scipy"``
            or ``"torch"``. Both solve the same system to round-off, so the backend is not part of the operator's
            settings (``extra_repr``, fingerprint): a reference made with one holds for the other.

    Buffers: ``sensor_xy`` ``[n_obs, 2]`` (empty for ``full``) and the interpolation matrix in ELL form,
    ``interp_index`` / ``interp_weight`` ``[n_obs, 4]`` and ``interp_offset`` ``[n_obs]``.
    Accepts float32 or float64 and returns the input dtype; solves in float64.

    Example:
        >>> A = EllipticOperator(n=8, sensors=[[0.5, 0.25]])
        >>> A(torch.zeros(1, 8, 8, dtype=torch.float64))
        tensor([[0.2500]], dtype=torch.float64)
    """

    def __init__(
        self, n: int = 32, bc: str = "hippylib", sensors: str | Sequence = "grid:8", sensor_seed: int = 0,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in ("auto", "scipy", "torch"):
            raise GanflowError(f"elliptic: unknown backend '{backend}' (use auto, scipy or torch)")
        self.backend = backend
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise GanflowError(f"elliptic: n must be an integer >= 2, got {n!r}")
        if bc not in BOUNDARY_CONDITIONS:
            raise GanflowError(f"elliptic: unknown bc '{bc}' (known: {', '.join(BOUNDARY_CONDITIONS)})")
        dirichlet, source = BOUNDARY_CONDITIONS[bc]
        self.n, self.bc = n, bc
        self.sensors = sensors if isinstance(sensors, str) else "points"
        self.field_shape = (n, n)
        self.solver = FiniteVolumeSolver(n, dirichlet, source)
        self.torch_solver = BlockTridiagonalSolver(self.solver)
        pts = sensor_points(sensors, sensor_seed)
        if pts is None:
            self.obs_shape = (n, n)
            self.register_buffer("sensor_xy", torch.zeros(0, 2, dtype=torch.float64))
            index, weight, offset = np.zeros((0, 4), np.int64), np.zeros((0, 4)), np.zeros(0)
        else:
            self.obs_shape = (len(pts),)
            self.register_buffer("sensor_xy", torch.from_numpy(pts.copy()))
            P, offset = bilinear_interpolation(n, pts, dirichlet)
            index, weight = np.zeros((len(pts), 4), np.int64), np.zeros((len(pts), 4))
            P = P.tocsr()
            P.sum_duplicates()
            for r in range(len(pts)):  # at most 4 entries per row; a few hundred rows at most
                lo, hi = P.indptr[r], P.indptr[r + 1]
                index[r, : hi - lo], weight[r, : hi - lo] = P.indices[lo:hi], P.data[lo:hi]
        self.register_buffer("interp_index", torch.from_numpy(index))
        self.register_buffer("interp_weight", torch.from_numpy(weight))
        self.register_buffer("interp_offset", torch.from_numpy(np.asarray(offset, dtype=np.float64)))

    def extra_repr(self) -> str:
        return f"n={self.n}, bc={self.bc!r}, sensors={self.sensors!r}, obs_shape={self.obs_shape}"

    def _check(self, m: Tensor) -> None:
        if not isinstance(m, Tensor) or m.ndim != 3 or tuple(m.shape[1:]) != self.field_shape:
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise GanflowError(f"elliptic: expected log-conductivity [B, {self.n}, {self.n}], got {shape}")
        if not m.is_floating_point():
            raise GanflowError(f"elliptic: log-conductivity must be a float tensor, got {m.dtype}")

    def solve(self, m: Tensor) -> Tensor:
        """The pressure ``u`` at the cell centres, ``[B, n, n]`` float64 (differentiable).

        A sample outside the solver's range (a non-finite value, or ``|m| > 300``, where ``exp(m)`` overflows
        the face means) gets a NaN row and a zero gradient; the other rows are solved as usual. A sampler's
        diverging chain or trial step size is thus rejected as non-finite (flow rollback, Langevin step-size
        search, NUTS divergence) instead of aborting the whole batch; a bad *truth* is refused by
        ``ganflow simulate``'s own finiteness check.
        """
        self._check(m)
        md = m.detach()
        ok = torch.isfinite(md).flatten(1).all(1) & (md.abs().flatten(1).amax(1) <= 300)
        use_torch = self.backend == "torch" or (self.backend == "auto" and m.device.type != "cpu")
        fn, solver = (_TorchSolveFunction, self.torch_solver) if use_torch else (_SolveFunction, self.solver)
        if bool(ok.all()):
            return fn.apply(m, solver)
        keep = ok[:, None, None]
        u = fn.apply(torch.where(keep, m, torch.zeros_like(m)), solver)
        return torch.where(keep, u, torch.full_like(u, math.nan))

    def observe(self, u: Tensor) -> Tensor:
        """``u`` ``[B, n, n]`` -> ``[B, *obs_shape]`` (bilinear interpolation at the sensors)."""
        if self.sensor_xy.shape[0] == 0:
            return u
        flat = u.reshape(u.shape[0], -1)
        return (flat[:, self.interp_index] * self.interp_weight.to(u.dtype)).sum(-1) + self.interp_offset.to(
            u.dtype
        )

    def forward(self, m: Tensor) -> Tensor:
        return self.observe(self.solve(m)).to(m.dtype)

    def flux_top(self, m: Tensor) -> Tensor:
        """``int_{y=1} exp(m) du/dy dx``, ``[B]``: the sum over top faces of ``2 kappa_P (g - u_P)``."""
        u = self.solve(m)
        kappa_top = torch.exp(m[:, -1, :].to(torch.float64))
        g_top = torch.as_tensor(self.solver.dirichlet["top"], device=u.device)
        return (2.0 * kappa_top * (g_top - u[:, -1, :])).sum(-1).to(m.dtype)


def _grf(n_samples: int, n: int, corr_length: tuple[float, float], generator: torch.Generator) -> Tensor:
    """``[N, n, n]`` unit-variance GRF, squared-exponential covariance, FFT synthesis on a 2n x 2n torus."""
    M = 2 * n  # padding keeps the periodic wrap-around far from the cropped square
    k = torch.fft.fftfreq(M, d=1.0 / n, dtype=torch.float64)  # cycles per unit length
    lx, ly = corr_length
    # Spectral density of exp(-r^2 / (2 l^2)) is proportional to exp(-2 pi^2 l^2 k^2), per axis.
    amp = torch.exp(-(math.pi**2) * ((ly * k[:, None]) ** 2 + (lx * k[None, :]) ** 2))
    amp = amp / torch.sqrt((amp**2).mean())  # unit marginal variance
    noise = torch.randn(n_samples, M, M, generator=generator, dtype=torch.float64)
    field = torch.fft.ifft2(torch.fft.fft2(noise) * amp).real
    return field[:, :n, :n]


class EllipticProblem:
    """The elliptic problem (registered as ``elliptic``): log-conductivity from pressure (module docstring).

    Args:
        n: cells per side; ``field_shape = (n, n)``.
        prior: ``"channels"`` (binary medium, conductivity 12 or 3) or ``"grf"`` (smooth Gaussian
        log-conductivity).
        bc: boundary conditions used by `make_operator` and the QoIs by default (``"hippylib"`` or
        ``"darcy"``).
        corr_length: GRF correlation length, a number or ``[lx, ly]``; default ``[0.06, 0.3]`` for channels
            (channels along y), ``0.2`` for grf.
        mean, std: of ``m`` for ``prior="grf"`` (default 0 and 1).
        conductivities: ``[high, low]`` for ``prior="channels"`` (default ``[12, 3]``).

    Example:
        >>> p = EllipticProblem(n=16, prior="grf", std=0.5)
        >>> p.sample_fields(3, torch.Generator().manual_seed(1)).shape
        torch.Size([3, 16, 16])
    """

    name = "elliptic"

    def __init__(
        self,
        n: int = 32,
        prior: str = "channels",
        bc: str = "hippylib",
        corr_length: float | Sequence[float] | None = None,
        mean: float | None = None,
        std: float | None = None,
        conductivities: Sequence[float] | None = None,
    ):
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise GanflowError(f"elliptic: n must be an integer >= 2, got {n!r}")
        if prior not in ("channels", "grf"):
            raise GanflowError(f"elliptic: unknown prior '{prior}' (known: channels, grf)")
        if bc not in BOUNDARY_CONDITIONS:
            raise GanflowError(f"elliptic: unknown bc '{bc}' (known: {', '.join(BOUNDARY_CONDITIONS)})")
        if prior == "channels" and (mean is not None or std is not None):
            raise GanflowError("elliptic: mean and std apply to prior='grf' only")
        if prior == "grf" and conductivities is not None:
            raise GanflowError("elliptic: conductivities apply to prior='channels' only")
        self.n, self.prior, self.bc = n, prior, bc
        self.field_shape = (n, n)
        if corr_length is None:
            corr_length = (0.06, 0.3) if prior == "channels" else 0.2
        lengths = (
            np.broadcast_to(np.asarray(corr_length, dtype=np.float64), (2,))
            if np.ndim(corr_length) < 2
            else None
        )
        if (
            lengths is None
            or np.size(corr_length) not in (1, 2)
            or not (np.isfinite(lengths) & (lengths > 0)).all()
        ):
            raise GanflowError(
                f"elliptic: corr_length must be a positive number or [lx, ly], got {corr_length!r}"
            )
        self.corr_length = (float(lengths[0]), float(lengths[1]))
        self.mean = 0.0 if mean is None else float(mean)
        self.std = 1.0 if std is None else float(std)
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std >= 0):
            raise GanflowError(f"elliptic: need a finite mean and std >= 0, got {self.mean}, {self.std}")
        cond = (12.0, 3.0) if conductivities is None else tuple(float(c) for c in conductivities)
        if len(cond) != 2 or not all(math.isfinite(c) and c > 0 for c in cond):
            raise GanflowError(
                f"elliptic: conductivities must be two positive numbers, got {conductivities!r}"
            )
        self.conductivities = cond
        self._qoi_operator = None

    def make_operator(
        self,
        n: int | None = None,
        bc: str | None = None,
        sensors: str | Sequence = "grid:8",
        sensor_seed: int = 0,
        backend: str = "auto",
    ) -> EllipticOperator:
        """An `EllipticOperator`; ``n`` and ``bc`` default to the problem's."""
        return EllipticOperator(
            self.n if n is None else n, self.bc if bc is None else bc, sensors, sensor_seed, backend
        )

    def sample_fields(self, n_samples: int, generator: torch.Generator) -> Tensor:
        """``[n_samples, n, n]`` float32 log-conductivity fields from the example prior."""
        g = _grf(int(n_samples), self.n, self.corr_length, generator)
        if self.prior == "channels":
            high, low = (math.log(c) for c in self.conductivities)
            m = torch.where(g > 0, torch.full_like(g, high), torch.full_like(g, low))
        else:
            m = self.mean + self.std * g
        return m.float()

    def qois(self) -> dict:
        """``pressure``: ``m [B, n, n] -> u [B, n, n]``; ``flux_top``: ``m [B, n, n] -> [B]``."""
        if self._qoi_operator is None:
            self._qoi_operator = EllipticOperator(self.n, self.bc, "full")
        op = self._qoi_operator
        return {"pressure": lambda m: op.solve(m).to(m.dtype), "flux_top": op.flux_top}

    # Optional hook used by `ganflow demo` and `ganflow bench` (ganflow itself knows no physics) ----------
    def bundled_prior(self) -> str | None:
        """The demo prior shipped with ganflow (``problems/data/elliptic_<n>.pt``): 32x32 channel media with the
        default conductivities and correlation lengths; None for other settings."""
        import os

        default_channels = (self.prior == "channels" and tuple(self.conductivities) == (12.0, 3.0)
                            and self.corr_length == (0.06, 0.3))
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"elliptic_{self.n}.pt")
        return path if default_channels and os.path.isfile(path) else None
