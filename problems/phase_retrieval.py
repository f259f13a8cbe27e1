"""Fourier phase retrieval with oversampling: recover a real n x n object from Fourier magnitudes.

Operator (`PhaseRetrievalOperator`, ``[B, n, n] -> [B, m]``)::

    y = A(x) = |F(P x)|[mask]          (or |F(P x)|^2[mask] with intensity=True)

- ``P`` zero-pads the object to ``N x N`` with ``N = s n`` (oversampling ``s``, default 2), the object in
  the **top-left corner**: ``(P x)[r] = x[r]`` for ``r in [0, n)^2``, 0 elsewhere. The corner is only a
  convention: magnitudes do not see translations, so any placement gives the same ``y``.
- ``F`` is the orthonormal 2-D DFT on the ``N x N`` grid (``torch.fft``, ``norm="ortho"``), so
  ``||F v|| = ||v||``.
- ``mask`` is a boolean ``[N, N]`` buffer; the observations are the masked magnitudes in row-major order, so
  ``obs_shape = (mask.sum(),)``.

Because ``x`` is real, ``F(k) = conj(F(-k mod N))``: magnitudes come in point-symmetric pairs
``{k, -k mod N}``, and only about half of them are independent. The **self-symmetric** frequencies
(``2k = 0 mod N``: the 4 points with each coordinate in ``{0, N/2}`` for even ``N``) form pairs of one.

Problem (`PhaseRetrievalProblem`, registered as ``phase_retrieval``): Shepp-Logan-like phantoms (random
ellipses) as example fields, the operator above, and the helpers for the two trivial ambiguities of the
problem, `twin` and `error_modulo_twin`.

Ambiguities. ``A`` cannot tell ``x`` from any cyclic translate of ``P x`` on the ``N x N`` grid, nor from its
*twin* ``x(-r)`` (conjugate reflection: ``F[x(-r)] = conj(F[x])``). On the ``n x n`` field the twin is exactly
``torch.flip(x, (-2, -1))``: ``P flip(x)`` is the reflection of ``P x`` cyclically shifted by ``n - 1``, so
``A(twin(x)) = A(x)`` for every ``x``, whatever its support. Translations that keep the support inside the
``n x n`` field are ambiguities too; the prior's phantoms are centred, which removes these in practice.

Example:
    >>> import torch
    >>> problem = PhaseRetrievalProblem(n=16)
    >>> A = problem.make_operator(oversampling=2, mask_fraction=0.5, mask_seed=0)
    >>> x = problem.sample_fields(3, torch.Generator().manual_seed(0))
    >>> A(x).shape
    torch.Size([3, 257])
    >>> bool(torch.allclose(A(twin(x)), A(x), atol=1e-5))
    True
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor, nn

from ganflow import GanflowError

__all__ = [
    "PhaseRetrievalProblem",
    "PhaseRetrievalOperator",
    "symmetric_pair_mask",
    "sample_phantoms",
    "central_region",
    "twin",
    "error_modulo_twin",
]


def _check_n(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 4 or n % 2:
        raise GanflowError(f"{what}: n must be an even integer >= 4, got {n!r}")
    return int(n)


def _padded_size(n: int, oversampling) -> int:
    """``N = s n``, which must be a whole number of pixels."""
    number = isinstance(oversampling, Real) and not isinstance(oversampling, bool)
    if not number or not math.isfinite(oversampling):
        raise GanflowError(f"phase_retrieval: oversampling must be a number >= 1, got {oversampling!r}")
    if oversampling < 1:
        raise GanflowError(f"phase_retrieval: oversampling must be >= 1, got {oversampling}")
    size = float(oversampling) * n
    if abs(size - round(size)) > 1e-9:
        raise GanflowError(f"phase_retrieval: oversampling * n = {oversampling} * {n} must be a whole number")
    return int(round(size))


def _pair_partner(size: int) -> Tensor:
    """``[N*N]`` long: the row-major index of ``-k mod N`` for every frequency ``k`` of the ``N x N`` grid."""
    k = torch.arange(size)
    neg = (-k) % size
    return (neg[:, None] * size + neg[None, :]).reshape(-1)


def symmetric_pair_mask(size: int, mask_fraction: float = 1.0, mask_seed: int = 0) -> Tensor:
    """The default frequency mask, ``[N, N]`` bool (``N = size``).

    - ``mask_fraction == 1.0``: **every** frequency of the full ``N x N`` grid (``m = N^2``). Each independent
      magnitude of a non-self-symmetric pair is then measured twice (with independent noise), as a detector
      that records the whole diffraction pattern does.
    - ``0 < mask_fraction < 1``: one representative per point-symmetric pair ``{k, -k mod N}`` (the member
      with the smaller row-major index; a self-symmetric frequency is its own representative), and of the
      ``R = (N^2 + n_self) / 2`` representatives (``n_self`` = 4 for even ``N``, 1 for odd) a uniformly
      random subset of ``max(1, round(mask_fraction * R))`` is kept, drawn with ``torch.Generator`` seeded
      by ``mask_seed``. The mask never holds both members of a pair, so no measurement is redundant.

    So ``mask_fraction`` is the fraction of non-redundant frequencies kept; ``1.0`` is the special case of the
    full (redundant) pattern, which holds all ``R`` independent magnitudes.
    """
    if isinstance(mask_fraction, bool) or not isinstance(mask_fraction, Real) or not (0 < mask_fraction <= 1):
        raise GanflowError(f"phase_retrieval: mask_fraction must be in (0, 1], got {mask_fraction!r}")
    if isinstance(mask_seed, bool) or not isinstance(mask_seed, Integral):
        raise GanflowError(f"phase_retrieval: mask_seed must be an integer, got {mask_seed!r}")
    if mask_fraction == 1:
        return torch.ones(size, size, dtype=torch.bool)
    flat = torch.arange(size * size)
    representatives = flat[flat <= _pair_partner(size)]
    n_keep = max(1, round(float(mask_fraction) * representatives.numel()))
    gen = torch.Generator().manual_seed(int(mask_seed))
    keep = representatives[torch.randperm(representatives.numel(), generator=gen)[:n_keep]]
    mask = torch.zeros(size * size, dtype=torch.bool)
    mask[keep] = True
    return mask.reshape(size, size)


class PhaseRetrievalOperator(nn.Module):
    """Oversampled Fourier magnitudes of a real ``n x n`` field: ``[..., n, n] -> [..., m]``.

    ``y = |F(P x)|[mask]``, or ``|F(P x)|^2[mask]`` with ``intensity=True``; ``P`` zero-pads to ``N x N``
    (``N = oversampling * n``) with the object in the top-left corner, ``F`` is the orthonormal 2-D DFT, and
    ``y`` lists the frequencies where ``mask`` is true in row-major order (see the module docstring and
    `symmetric_pair_mask` for the default mask).

    Implementation: one real-to-complex FFT ``rfft2(x, s=(N, N))`` (zero padding and half the spectrum),
    then a gather; a frequency in the dropped half is read from its partner ``-k mod N``, whose magnitude is
    the same. Works on any device and keeps the input's float dtype (float32 by default, float64 for
    gradient checks); other dtypes are cast to float32.

    Gradient at zeros. ``|F|`` is not differentiable where ``F(k) = 0`` (e.g. at ``x = 0``). The forward is
    the exact magnitude (no smoothing, so no bias), and the VJP uses ``d|F|/dF = F / |F|`` where ``F != 0``
    and the minimum-norm subgradient ``0`` where ``F = 0`` (PyTorch's complex ``abs`` backward,
    ``sgn(0) = 0``; checked by the tests). Only a measure-zero set of fields is affected, and the gradient
    is finite everywhere.
    ``intensity=True`` is smooth and needs no such choice.

    Args:
        n: field side, an even integer >= 4 (``field_shape = (n, n)``).
        oversampling: ``s >= 1``; ``s * n`` must be a whole number. ``s >= 2`` makes the autocorrelation
            fully sampled (the usual condition for uniqueness up to the trivial ambiguities).
        mask_fraction: in ``(0, 1]``; see `symmetric_pair_mask`. Must stay 1.0 when ``mask`` is given.
        mask_seed: seed of the random mask.
        intensity: measure squared magnitudes ``|F|^2`` instead of ``|F|``.
        mask: an explicit ``[N, N]`` boolean mask (a tensor, array or nested lists of 0/1), used as given.

    Example:
        >>> A = PhaseRetrievalOperator(8, oversampling=2)
        >>> A.field_shape, A.obs_shape
        ((8, 8), (256,))
        >>> float(A(torch.ones(1, 8, 8)).max())  # |F(0)| = sum(x) / N
        4.0
    """

    def __init__(
        self,
        n: int,
        oversampling: float = 2,
        mask_fraction: float = 1.0,
        mask_seed: int = 0,
        intensity: bool = False,
        mask=None,
    ):
        super().__init__()
        n = _check_n(n, "phase_retrieval operator")
        size = _padded_size(n, oversampling)
        if not isinstance(intensity, bool):
            raise GanflowError(f"phase_retrieval: intensity must be true or false, got {intensity!r}")
        if mask is None:
            mask_t = symmetric_pair_mask(size, mask_fraction, mask_seed)
        else:
            if mask_fraction != 1.0:
                raise GanflowError("phase_retrieval: give either mask or mask_fraction < 1, not both")
            mask_t = _as_mask(mask, size)
        self.n, self.size, self.intensity = n, size, intensity
        self.oversampling = float(oversampling)
        self.register_buffer("mask", mask_t)
        # Row-major flat index into the half spectrum rfft2 returns ([N, N//2 + 1]); columns beyond it are
        # read from the partner -k mod N, which has the same magnitude because x is real.
        rows, cols = mask_t.nonzero(as_tuple=True)
        width = size // 2 + 1
        mirrored = cols >= width
        rows = torch.where(mirrored, (-rows) % size, rows)
        cols = torch.where(mirrored, (-cols) % size, cols)
        self.register_buffer("gather_index", rows * width + cols, persistent=False)
        self.field_shape = (n, n)
        self.obs_shape = (int(mask_t.sum()),)

    def extra_repr(self) -> str:
        return f"n={self.n}, size={self.size}, m={self.obs_shape[0]}, intensity={self.intensity}"

    def spectrum(self, x: Tensor) -> Tensor:
        """The half spectrum ``rfft2(P x)``, orthonormal scaling: ``[..., n, n] -> [..., N, N//2 + 1]``."""
        if x.ndim < 2 or tuple(x.shape[-2:]) != self.field_shape:
            raise GanflowError(
                f"phase_retrieval operator: field must be [..., {self.n}, {self.n}], got {list(x.shape)}"
            )
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        return torch.fft.rfft2(x, s=(self.size, self.size), norm="ortho")

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spectrum(x)
        half = spec.flatten(-2).index_select(-1, self.gather_index)
        if self.intensity:
            return half.real.square() + half.imag.square()
        return half.abs()


def _as_mask(mask, size: int) -> Tensor:
    try:
        m = torch.as_tensor(mask).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise GanflowError(f"phase_retrieval: mask is not an array: {e}") from None
    if tuple(m.shape) != (size, size):
        raise GanflowError(
            f"phase_retrieval: mask must have shape [{size}, {size}] (N = s*n), got {list(m.shape)}"
        )
    if m.dtype != torch.bool:
        if m.is_complex() or not ((m == 0) | (m == 1)).all():
            raise GanflowError("phase_retrieval: mask must be boolean (or 0/1)")
        m = m != 0
    if not m.any():
        raise GanflowError("phase_retrieval: mask selects no frequency")
    return m.clone()


def central_region(n: int) -> Tensor:
    """``[n, n]`` bool: the pixels whose centres ``u = (2i + 1)/n - 1`` satisfy ``|u| < 1/2`` on both axes.

    For ``n`` divisible by 4 this is the central half ``[n/4, 3n/4)^2``. Phantoms live inside it.
    """
    u = (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1
    inside = u.abs() < 0.5
    return inside[:, None] & inside[None, :]


def _ellipse_indicator(uu: Tensor, vv: Tensor, cx: Tensor, cy: Tensor, a: Tensor, b: Tensor, th: Tensor
                       ) -> Tensor:
    """``[B, K, n, n]``: 1 strictly inside each ellipse; parameters ``[B, K]``, ``uu, vv`` ``[n, n]``."""
    cx, cy, a, b, th = (t[..., None, None] for t in (cx, cy, a, b, th))
    du, dv = uu - cx, vv - cy
    c, s = torch.cos(th), torch.sin(th)
    p, q = (c * du + s * dv) / a, (-s * du + c * dv) / b
    return (p * p + q * q < 1).to(torch.float32)


def sample_phantoms(n_samples: int, n: int, generator: torch.Generator, n_inner: int = 4) -> Tensor:
    """Shepp-Logan-like phantoms, ``[n_samples, n, n]`` float32, nonnegative, support in `central_region`.

    On pixel-centre coordinates ``u, v`` in ``(-1, 1)`` (``u = (2j + 1)/n - 1`` along columns, ``v`` along
    rows), each phantom is

        x = v0 * 1[E0] * clamp(1 + sum_i a_i c_i 1[E_i], min=0)

    - ``E0``: an outer ellipse, centre uniform in ``[-0.05, 0.05]^2``, semi-axes uniform in ``[0.25, 0.45]``,
      angle uniform in ``[0, pi)``: its points have ``|u|, |v| <= 0.5``, so the support is central.
    - ``v0`` uniform in ``[0.5, 1]``: the outer intensity.
    - ``E_i``, ``i < n_inner``: inner ellipses, each present (``a_i = 1``) with probability 3/4, centre
      uniform in ``[-0.3, 0.3]^2``, semi-axes uniform in ``[0.04, 0.2]``, any angle; relative contrast ``c_i``
      uniform in ``[-1, 0.8]`` (negative: subtractive, possibly down to 0 after the clamp).

    The multiplication by ``1[E0]`` keeps every inner ellipse inside the outer one. The distribution is
    invariant under the point reflection ``x -> flip(x)`` (every parameter's law is symmetric), so a prior
    learnt from it cannot break the twin ambiguity. Vectorised over samples and ellipses (chunked to bound
    memory); all randomness is drawn from ``generator`` (a CPU generator).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 0:
        raise GanflowError(f"phase_retrieval: n_samples must be an integer >= 0, got {n_samples!r}")
    n = _check_n(n, "phase_retrieval phantoms")
    if not isinstance(generator, torch.Generator):
        raise GanflowError("phase_retrieval: sample_fields needs a torch.Generator")
    B, K = int(n_samples), int(n_inner)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    # Draw every parameter up front, in a fixed order, so the result does not depend on the chunk size.
    outer = [uniform(-0.05, 0.05, B, 1), uniform(-0.05, 0.05, B, 1), uniform(0.25, 0.45, B, 1),
             uniform(0.25, 0.45, B, 1), uniform(0, math.pi, B, 1)]
    v0 = uniform(0.5, 1.0, B)
    inner = [uniform(-0.3, 0.3, B, K), uniform(-0.3, 0.3, B, K), uniform(0.04, 0.2, B, K),
             uniform(0.04, 0.2, B, K), uniform(0, math.pi, B, K)]
    present = torch.rand(B, K, generator=generator) < 0.75
    contrast = uniform(-1.0, 0.8, B, K) * present

    u = (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1
    vv, uu = torch.meshgrid(u, u, indexing="ij")
    out = torch.empty(B, n, n, dtype=torch.float32)
    chunk = max(1, 2**22 // ((K + 1) * n * n))  # about 16 MiB of indicator values at a time
    for lo in range(0, B, chunk):
        sl = slice(lo, lo + chunk)
        e0 = _ellipse_indicator(uu, vv, *(p[sl] for p in outer))[:, 0]
        ei = _ellipse_indicator(uu, vv, *(p[sl] for p in inner))
        body = (1 + (contrast[sl, :, None, None].float() * ei).sum(1)).clamp_min(0)
        out[sl] = v0[sl, None, None].float() * e0 * body
    return out


def twin(x: Tensor) -> Tensor:
    """The conjugate-reflected twin of ``x`` ``[..., n, n]``: ``flip(x)`` along the last two axes.

    ``A(twin(x)) = A(x)`` exactly for every field (see the module docstring): on the padded grid the
    reflection ``x(-r)`` shifted by ``n - 1`` pixels is the flip, and shifts do not change magnitudes.
    """
    return torch.flip(x, (-2, -1))


def _relative_error(diff_sq: Tensor, ref_sq: Tensor) -> Tensor:
    return (diff_sq.clamp_min(0) / ref_sq.clamp_min(torch.finfo(ref_sq.dtype).tiny)).sqrt()


def error_modulo_twin(x_est: Tensor, x_true: Tensor, translations: bool = False) -> Tensor:
    """Relative L2 error modulo the trivial ambiguities, ``[..., n, n] x [..., n, n] -> [...]``.

    ``min over t in T of ||x_est - t(x_true)|| / ||x_true||`` with ``T = {identity, twin}``; with
    ``translations=True`` also every integer translation of each (zero-filled, by ``-n < d < n`` on both
    axes), the magnitude ambiguities of a field inside the ``n x n`` window. That minimum is computed for
    all shifts at once from the FFT cross-correlation on a ``2n x 2n`` grid (no wrap-around), in float64.
    """
    if x_est.shape[-2:] != x_true.shape[-2:] or x_est.ndim < 2:
        raise GanflowError(
            f"error_modulo_twin: fields must have the same [..., n, n] shape, got {list(x_est.shape)} "
            f"and {list(x_true.shape)}"
        )
    x_est, x_true = torch.broadcast_tensors(x_est.double(), x_true.double())
    ref_sq = x_true.square().sum((-2, -1))
    if not translations:
        errs = [(x_est - t).square().sum((-2, -1)) for t in (x_true, twin(x_true))]
        return _relative_error(torch.minimum(*errs), ref_sq).to(torch.float32)
    n0, n1 = x_true.shape[-2:]
    s = (2 * n0, 2 * n1)
    f_est = torch.fft.rfft2(x_est, s=s)
    best = None
    for t in (x_true, twin(x_true)):
        corr = torch.fft.irfft2(f_est * torch.fft.rfft2(t, s=s).conj(), s=s)  # <x_est, shift_d t> for all d
        err = x_est.square().sum((-2, -1)) + ref_sq - 2 * corr.amax((-2, -1))
        best = err if best is None else torch.minimum(best, err)
    return _relative_error(best, ref_sq).to(torch.float32)


OBJECTS = ("phantoms", "shapes")


class PhaseRetrievalProblem:
    """Fourier phase retrieval of Shepp-Logan-like phantoms (registered as ``phase_retrieval``).

    Args:
        n: field side, an even integer >= 4 (``field_shape = (n, n)``); the paper scale is 256.
        n_inner: number of candidate inner ellipses per phantom (see `sample_phantoms`).
        support_threshold: the level above which a pixel counts towards the ``support_area`` QoI.
        objects: the example fields: ``"phantoms"`` (`sample_phantoms`, the default and the bundled prior's) or
            ``"shapes"`` (`ganflow.problems.shapes.sample_shapes`: textured rectangles, triangles and rings, a
            family the defaults were not tuned on; no bundled prior).

    Example:
        >>> p = PhaseRetrievalProblem(n=8)
        >>> p.make_operator(mask_fraction=0.5).obs_shape
        (65,)
    """

    name = "phase_retrieval"

    def __init__(self, n: int = 32, n_inner: int = 4, support_threshold: float = 0.05, objects: str = "phantoms"):
        self.n = _check_n(n, "phase_retrieval")
        if objects not in OBJECTS:
            raise GanflowError(f"phase_retrieval: objects must be one of {', '.join(OBJECTS)}, got {objects!r}")
        self.objects = objects
        if isinstance(n_inner, bool) or not isinstance(n_inner, Integral) or n_inner < 0:
            raise GanflowError(f"phase_retrieval: n_inner must be an integer >= 0, got {n_inner!r}")
        if isinstance(support_threshold, bool) or not isinstance(support_threshold, Real):
            raise GanflowError(
                f"phase_retrieval: support_threshold must be a number, got {support_threshold!r}"
            )
        self.n_inner = int(n_inner)
        self.support_threshold = float(support_threshold)
        self.field_shape = (self.n, self.n)

    def make_operator(
        self,
        oversampling: float = 2,
        mask_fraction: float = 1.0,
        mask_seed: int = 0,
        intensity: bool = False,
        mask=None,
    ) -> PhaseRetrievalOperator:
        """`PhaseRetrievalOperator` for this problem's ``n``; see it for the arguments."""
        return PhaseRetrievalOperator(self.n, oversampling, mask_fraction, mask_seed, intensity, mask)

    def sample_fields(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` example fields ``[n, self.n, self.n]`` float32: `sample_phantoms` or, with ``objects="shapes"``,
        `ganflow.problems.shapes.sample_shapes`."""
        if self.objects == "shapes":
            from .shapes import sample_shapes

            return sample_shapes(n, self.n, generator)
        return sample_phantoms(n, self.n, generator, self.n_inner)

    def qois(self) -> dict:
        """``total_mass``: sum of ``x``; ``support_area``: fraction of pixels with ``x > support_threshold``.

        Both map ``[B, n, n] -> [B]``. Both are invariant under the twin and under translations.
        """
        level = self.support_threshold
        return {
            "total_mass": lambda x: x.flatten(-2).sum(-1),
            "support_area": lambda x: (x.flatten(-2) > level).float().mean(-1),
        }

    # Optional hooks used by `ganflow demo` (ganflow itself knows no physics) ---------------------------
    def bundled_prior(self) -> str | None:
        """The demo prior shipped with ganflow for this ``n`` (``problems/data/phase_retrieval_<n>.pt``, learnt
        from phantoms); None for the shapes."""
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"phase_retrieval_{self.n}.pt")
        return path if self.objects == "phantoms" and os.path.isfile(path) else None

    def metrics(self, x_est: Tensor, x_true: Tensor) -> dict:
        """Errors that respect the ambiguities: relative L2 error modulo the twin image (and translations)."""
        x_est, x_true = torch.as_tensor(x_est).float(), torch.as_tensor(x_true).float()
        return {
            "rel_l2_error_mod_twin": float(error_modulo_twin(x_est, x_true)),
            "rel_l2_error_mod_twin_shift": float(error_modulo_twin(x_est, x_true, translations=True)),
        }

    def figures(self, result, operator, outdir: str) -> dict:
        """``{"measurements.png": figure}``: log-magnitudes of the truth's spectrum, the mask, and the data
        (`ganflow demo` writes it into ``outdir``)."""
        from matplotlib.figure import Figure

        mask = operator.mask.cpu().numpy()
        panels = []
        if result.x_true is not None:
            with torch.no_grad():
                full = PhaseRetrievalOperator(self.n, operator.oversampling, 1.0)(
                    torch.as_tensor(result.x_true)[None].float())[0]
            size = mask.shape[0]
            panels.append(("log10 |F(truth)|", np.log10(full.reshape(size, size).numpy() + 1e-6)))
        panels.append(("mask (measured frequencies)", mask.astype(float)))
        data = np.full(mask.shape, np.nan)
        data[mask] = np.asarray(result.y).ravel()
        panels.append(("log10 data y (masked)", np.log10(np.abs(data) + 1e-6)))
        fig = Figure(figsize=(3.4 * len(panels), 3.2))  # no pyplot: nothing global to select or close
        for ax, (title, img) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
            im = ax.imshow(np.fft.fftshift(img), cmap="magma")
            ax.set_title(title + " (fftshifted)", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        return {"measurements.png": fig}
