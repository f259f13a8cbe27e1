"""The textured-shapes family (`ganflow.problems.shapes`), checked against matplotlib's point-in-polygon test
and against its own stated laws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.path import Path

from ganflow import GanflowError, load_problem
from ganflow.problems.phase_retrieval import central_region, twin
from ganflow.problems.shapes import _rectangle, _ring, _triangle, sample_shapes


def _grid(n=64):
    u = (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1
    vv, uu = torch.meshgrid(u, u, indexing="ij")
    return uu, vv


def _contains(vertices, uu, vv):
    return Path(vertices).contains_points(np.stack([uu.ravel(), vv.ravel()], 1)).reshape(uu.shape)


def test_rectangle_and_triangle_match_a_point_in_polygon_test():
    """Random rotated rectangles and jittered triangles: the indicators equal matplotlib's `contains_points` on
    a 64x64 grid, except on pixel centres within 1e-9 of an edge (none expected for random parameters)."""
    g = torch.Generator().manual_seed(0)
    uu, vv = _grid()
    for _ in range(20):
        c = (torch.rand(2, generator=g, dtype=torch.float64) - 0.5) * 0.6
        du, dv = uu - c[0], vv - c[1]
        half = 0.1 + 0.3 * torch.rand(2, generator=g, dtype=torch.float64)
        angle = 2 * math.pi * torch.rand((), generator=g, dtype=torch.float64)
        got = _rectangle(du[None, None], dv[None, None], half[None, None], angle[None, None])[0, 0].numpy()
        cs, sn = math.cos(angle), math.sin(angle)
        corners = [(float(c[0] + cs * a - sn * b), float(c[1] + sn * a + cs * b))
                   for a, b in ((-half[0], -half[1]), (half[0], -half[1]), (half[0], half[1]), (-half[0], half[1]))]
        np.testing.assert_array_equal(got, _contains(corners, uu.numpy(), vv.numpy()))

        radii = 0.15 + 0.3 * torch.rand(3, generator=g, dtype=torch.float64)
        jitter = torch.rand(3, generator=g, dtype=torch.float64) - 0.5
        got = _triangle(du[None, None], dv[None, None], radii[None, None], angle[None, None],
                        jitter[None, None])[0, 0].numpy()
        theta = angle + (2 * math.pi * torch.arange(3) + jitter) / 3
        verts = [(float(c[0] + r * math.cos(t)), float(c[1] + r * math.sin(t)))
                 for r, t in zip(radii, theta, strict=True)]
        np.testing.assert_array_equal(got, _contains(verts, uu.numpy(), vv.numpy()))
        assert got.sum() > 0


def test_ring_is_the_annulus():
    uu, vv = _grid()
    got = _ring(uu[None, None] - 0.1, vv[None, None], torch.tensor([[0.4]], dtype=torch.float64),
                torch.tensor([[0.5]], dtype=torch.float64))[0, 0].numpy()
    r = np.hypot(uu.numpy() - 0.1, vv.numpy())
    np.testing.assert_array_equal(got, (r < 0.4) & (r > 0.2))


def test_shapes_are_nonnegative_central_seeded_and_twin_invariant_in_law():
    n = 32
    x = sample_shapes(2000, n, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and tuple(x.shape) == (2000, n, n)
    assert float(x.min()) >= 0.0 and bool((x.flatten(1).amax(1) > 0).all())
    assert float(x[:, ~central_region(n)].abs().max()) == 0.0  # support inside |u|, |v| < 0.5
    assert float(x.max()) <= 1.5  # level <= 1, texture <= 1 + 0.5
    assert torch.equal(x[:5], sample_shapes(2000, n, torch.Generator().manual_seed(0))[:5])
    assert not torch.equal(x[:5], sample_shapes(5, n, torch.Generator().manual_seed(1)))
    # Every law is symmetric under r -> -r: the mean field is point-symmetric up to its Monte-Carlo error
    # (per-pixel sd of x ~0.2 at most, so the mean's ~0.005 and a difference's ~0.007; 6 sd over 256 pixels).
    mean = x.mean(0)
    assert float((mean - twin(mean)).abs().max()) < 0.045
    # textured: within a shape the level varies (a flat shape would have one value), and corners are sharp:
    # many fields are not the phantoms' nested ellipses, whose values are few and constant on regions
    distinct = [len(torch.unique(f[f > 0])) for f in x[:50]]
    assert np.median(distinct) > 10


def test_problem_draws_shapes_and_has_no_bundled_prior():
    p = load_problem("phase_retrieval", n=16, objects="shapes")
    assert p.bundled_prior() is None
    g = torch.Generator().manual_seed(3)
    assert torch.equal(p.sample_fields(4, g), sample_shapes(4, 16, torch.Generator().manual_seed(3)))
    assert load_problem("phase_retrieval", n=32).bundled_prior() is not None
    with pytest.raises(GanflowError, match="objects must be one of phantoms, shapes"):
        load_problem("phase_retrieval", objects="circles")
