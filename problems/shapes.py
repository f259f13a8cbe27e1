"""Textured shapes: a second family of example objects, unlike the phantoms and the channels.

The built-in problems' defaults (flow settings, MAP search, representation error) were tuned on Shepp-Logan-like
phantoms and on channelized media. A user's own fields are neither; to check that the defaults stay honest on
data they were never tuned on (issue 34), `PhaseRetrievalProblem(objects="shapes")` draws its example fields
from `sample_shapes` instead: a few flat-cornered shapes (rotated rectangles, triangles, rings) with striped
textures on a zero background, no enclosing outline, sharp corners and holes where the phantoms are smooth and
nested.

    ganflow data --problem phase_retrieval --kw objects=shapes --n 20000 --seed 0 -o shapes.h5

Example:
    >>> import torch
    >>> x = sample_shapes(4, 32, torch.Generator().manual_seed(0))
    >>> tuple(x.shape), bool((x >= 0).all()), bool((x[:, :4] == 0).all())
    ((4, 32, 32), True, True)
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import Tensor

from ganflow import GanflowError

__all__ = ["sample_shapes", "SHAPE_KINDS"]

SHAPE_KINDS = ("rectangle", "triangle", "ring")
MAX_SHAPES = 3
CENTRE = 0.15  # centres uniform in [-CENTRE, CENTRE]^2; with the sizes below every shape keeps |u|, |v| < 0.5
HALF_SIDES = (0.1, 0.25)  # a rectangle's (half-diagonal <= 0.354)
RADII = (0.15, 0.35)  # a triangle's vertex radii, a ring's outer radius


def sample_shapes(n_samples: int, n: int, generator: torch.Generator) -> Tensor:
    """``[n_samples, n, n]`` float32 textured shapes, nonnegative, zero outside the central half ``|u|, |v| < 0.5``.

    On pixel-centre coordinates ``u, v`` in ``(-1, 1)`` each field is

        x = max_i  v_i * 1[S_i] * (1 + t_i sin(w_i . (r - c_i) + phi_i))

    over 1 to 3 shapes ``S_i`` (the count uniform), each a rotated rectangle, a triangle or a ring (kind uniform):
    centre ``c_i`` uniform in ``[-0.15, 0.15]^2``; a rectangle's half-sides uniform in ``[0.1, 0.25]``, a
    triangle's vertex radii and a ring's outer radius in ``[0.15, 0.35]`` (its inner radius 0.3-0.7 of that);
    any angle; level ``v_i`` uniform in ``[0.3, 1]``; stripes of amplitude ``t_i`` uniform in ``[0, 0.5]``,
    wavenumber ``|w_i|`` uniform in ``[10, 25]`` (periods of 4-10 pixels on 32x32), any direction and phase.
    Every law is symmetric under ``r -> -r``, so the family is invariant under phase retrieval's twin. All
    randomness comes from ``generator``.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 0:
        raise GanflowError(f"shapes: n_samples must be an integer >= 0, got {n_samples!r}")
    if not isinstance(generator, torch.Generator):
        raise GanflowError("shapes: sample_fields needs a torch.Generator")
    B, K = int(n_samples), MAX_SHAPES

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    # Every parameter is drawn up front in a fixed order: the fields do not depend on the chunking below.
    count = torch.randint(1, K + 1, (B, 1), generator=generator)
    kind = torch.randint(0, len(SHAPE_KINDS), (B, K), generator=generator)
    centre = uniform(-CENTRE, CENTRE, B, K, 2)
    half = uniform(*HALF_SIDES, B, K, 2)
    angle = uniform(0, 2 * math.pi, B, K)
    radii = uniform(*RADII, B, K, 3)  # triangle vertices at angles angle + (2 pi j + jitter) / 3; [..., 0] ring
    jitter = uniform(-0.5, 0.5, B, K, 3)
    inner = uniform(0.3, 0.7, B, K)
    level = uniform(0.3, 1.0, B, K)
    stripes = [uniform(0, 0.5, B, K), uniform(10, 25, B, K), uniform(0, 2 * math.pi, B, K),
               uniform(0, 2 * math.pi, B, K)]
    present = torch.arange(K) < count  # [B, K]

    u = (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1
    vv, uu = torch.meshgrid(u, u, indexing="ij")
    out = torch.empty(B, n, n, dtype=torch.float32)
    chunk = max(1, 2**21 // (K * n * n))
    for lo in range(0, B, chunk):
        sl = slice(lo, lo + chunk)
        du, dv = uu - centre[sl, :, 0, None, None], vv - centre[sl, :, 1, None, None]  # [b, K, n, n]
        inside = torch.stack([
            _rectangle(du, dv, half[sl], angle[sl]),
            _triangle(du, dv, radii[sl], angle[sl], jitter[sl]),
            _ring(du, dv, radii[sl, :, 0], inner[sl]),
        ])  # [kinds, b, K, n, n]
        shape = inside.gather(0, kind[sl][None, :, :, None, None].expand(1, -1, -1, n, n))[0]
        amp, wave, direction, phase = (p[sl, :, None, None] for p in stripes)
        texture = 1 + amp * torch.sin(wave * (torch.cos(direction) * du + torch.sin(direction) * dv) + phase)
        value = level[sl, :, None, None] * shape * texture * present[sl, :, None, None]
        out[sl] = value.amax(1).float()
    return out


def _rectangle(du: Tensor, dv: Tensor, half: Tensor, angle: Tensor) -> Tensor:
    """1 inside the rectangle of half-sides ``half [b, K, 2]`` rotated by ``angle [b, K]`` about the centre."""
    c, s = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    p, q = c * du + s * dv, -s * du + c * dv
    return ((p.abs() < half[..., 0, None, None]) & (q.abs() < half[..., 1, None, None])).double()


def _triangle(du: Tensor, dv: Tensor, radii: Tensor, angle: Tensor, jitter: Tensor) -> Tensor:
    """1 inside the triangle with vertices at ``radii[j]`` from the centre, angles ``angle + (2 pi j + jitter) / 3``.

    The vertices go round counter-clockwise (consecutive angles differ by 2 pi/3 +- 1/3 < pi), so a point is
    inside when it lies left of all three edges."""
    theta = angle[..., None] + (2 * math.pi * torch.arange(3) + jitter) / 3  # [b, K, 3]
    pu, pv = radii * torch.cos(theta), radii * torch.sin(theta)
    inside = torch.ones_like(du, dtype=torch.bool)
    for j in range(3):
        k = (j + 1) % 3
        eu, ev = (pu[..., k] - pu[..., j])[..., None, None], (pv[..., k] - pv[..., j])[..., None, None]
        cross = eu * (dv - pv[..., j, None, None]) - ev * (du - pu[..., j, None, None])
        inside &= cross > 0
    return inside.double()


def _ring(du: Tensor, dv: Tensor, outer: Tensor, inner_fraction: Tensor) -> Tensor:
    """1 between the radii ``inner_fraction * outer`` and ``outer`` (``[b, K]``)."""
    r = torch.hypot(du, dv)
    outer = outer[..., None, None]
    return ((r < outer) & (r > inner_fraction[..., None, None] * outer)).double()
