"""The elliptic problem: convergence to manufactured solutions, exact 1-D solutions, a series solution,
adjoint gradients against finite differences, interpolation, bad input and the check-operator command."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ganflow
from ganflow import GanflowError
from ganflow.cli import cli
from ganflow.problems.elliptic import (
    BOUNDARY_CONDITIONS,
    EllipticOperator,
    EllipticProblem,
    FiniteVolumeSolver,
    bilinear_interpolation,
)

PI = np.pi


def _centres(n: int):
    t = (np.arange(n) + 0.5) / n
    y, x = np.meshgrid(t, t, indexing="ij")  # [i, j] -> (x_j, y_i): row 0 at the bottom
    return x, y


# Smooth conductivity for the manufactured solutions: m and its gradient.
def _m(x, y):
    return 0.6 * np.sin(2 * PI * x + 0.3) * np.cos(1.5 * PI * y)


def _grad_m(x, y):
    return (
        1.2 * PI * np.cos(2 * PI * x + 0.3) * np.cos(1.5 * PI * y),
        -0.9 * PI * np.sin(2 * PI * x + 0.3) * np.sin(1.5 * PI * y),
    )


def _u_hippylib(x, y):
    """u = y + 0.3 sin(pi y) cos(pi x): u = 0 at y = 0, u = 1 at y = 1, du/dx = 0 at x = 0, 1."""
    a = 0.3
    u = y + a * np.sin(PI * y) * np.cos(PI * x)
    ux = -a * PI * np.sin(PI * y) * np.sin(PI * x)
    uy = 1 + a * PI * np.cos(PI * y) * np.cos(PI * x)
    lap = -2 * a * PI**2 * np.sin(PI * y) * np.cos(PI * x)
    return u, ux, uy, lap


def _u_darcy(x, y):
    """u = sin(pi x) sin(2 pi y): zero on the whole boundary."""
    u = np.sin(PI * x) * np.sin(2 * PI * y)
    return (
        u,
        PI * np.cos(PI * x) * np.sin(2 * PI * y),
        2 * PI * np.sin(PI * x) * np.cos(2 * PI * y),
        -5 * PI**2 * u,
    )


@pytest.mark.parametrize("bc,exact", [("hippylib", _u_hippylib), ("darcy", _u_darcy)])
def test_manufactured_solution_second_order(bc, exact):
    dirichlet, _ = BOUNDARY_CONDITIONS[bc]
    errors = []
    for n in (16, 32, 64, 128):
        x, y = _centres(n)
        u, ux, uy, lap = exact(x, y)
        m = _m(x, y)
        mx, my = _grad_m(x, y)
        f = -np.exp(m) * (lap + mx * ux + my * uy)  # -div(e^m grad u) = -e^m (lap u + grad m . grad u)
        uh, _ = FiniteVolumeSolver(n, dirichlet, f).solve(m[None])
        errors.append(np.sqrt(np.mean((uh[0] - u) ** 2)))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 1.8) & (orders < 2.2)), (errors, orders)


@pytest.mark.parametrize("bc", ["hippylib", "darcy"])
@pytest.mark.parametrize("sensors", ["grid:4", "random:7"])
def test_gradient_matches_finite_differences(bc, sensors):
    n = 10
    gen = torch.Generator().manual_seed(3)
    op = EllipticProblem(n=n, prior="grf", std=0.7, corr_length=0.3).make_operator(bc=bc, sensors=sensors)
    m = EllipticProblem(n=n, prior="grf", std=0.7, corr_length=0.3).sample_fields(2, gen).double()
    w = torch.randn(2, *op.obs_shape, generator=gen, dtype=torch.float64)

    def loss(field):
        return (w * op(field)).sum() + 0.5 * (op(field) ** 2).sum()

    mg = m.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(mg), mg)
    with torch.no_grad():
        delta = torch.randn(m.shape, generator=gen, dtype=torch.float64)
        eps = 1e-5
        fd = (loss(m + eps * delta) - loss(m - eps * delta)) / (2 * eps)
        assert abs(float((grad * delta).sum() - fd)) < 1e-4 * abs(float(fd))
        # and entry by entry at a few cells, including a corner and a Dirichlet-face cell
        for i, j in [(0, 0), (n - 1, 3), (4, 5), (7, n - 1)]:
            e = torch.zeros_like(m)
            e[1, i, j] = 1.0
            fd_ij = (loss(m + eps * e) - loss(m - eps * e)) / (2 * eps)
            assert abs(float(grad[1, i, j] - fd_ij)) < 1e-4 * max(abs(float(fd_ij)), 1e-8)


@pytest.mark.parametrize("bc", ["hippylib", "darcy"])
def test_torch_gradcheck_full_jacobian(bc):
    op = EllipticOperator(n=5, bc=bc, sensors="full")
    m = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_(
        True
    )
    assert torch.autograd.gradcheck(op, (m,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_constant_conductivity_gives_linear_pressure():
    # hippylib BCs with any constant conductivity: u = y exactly, at the cell centres and at any sensor.
    n = 12
    op = EllipticOperator(n=n, bc="hippylib", sensors="random:40", sensor_seed=5)
    m = torch.full((2, n, n), 0.7, dtype=torch.float64)
    m[1] = -1.3
    _, y = _centres(n)
    assert np.allclose(op.solve(m).numpy(), y[None], atol=1e-12)
    assert np.allclose(op(m).numpy(), op.sensor_xy[:, 1].numpy()[None], atol=1e-12)
    # flux through the top = effective conductivity = the constant
    assert np.allclose(op.flux_top(m).numpy(), np.exp([0.7, -1.3]), rtol=1e-12)


def test_layered_media_effective_conductivity():
    # Layers across the flow (m depends on y): series, harmonic mean; along the flow (m(x)): arithmetic mean.
    n = 16
    rng = np.random.default_rng(0)
    layers = rng.uniform(np.log(0.5), np.log(20.0), n)
    kappa = np.exp(layers)
    op = EllipticOperator(n=n, bc="hippylib", sensors="full")
    m = torch.from_numpy(np.stack([np.repeat(layers[:, None], n, 1), np.repeat(layers[None, :], n, 0)]))
    flux = op.flux_top(m).numpy()
    assert flux[0] == pytest.approx(1.0 / np.mean(1.0 / kappa), rel=1e-12)
    assert flux[1] == pytest.approx(np.mean(kappa), rel=1e-12)
    # the float32 path of the QoI agrees
    qoi = EllipticProblem(n=n).qois()["flux_top"](m.float())
    assert qoi.dtype == torch.float32 and np.allclose(qoi.numpy(), flux, rtol=1e-5)


def test_darcy_unit_square_matches_series_solution():
    # -lap u = 1, u = 0 on the boundary: u(x, y) = sum_{j,k odd} 16 sin(j pi x) sin(k pi y) / (pi^4 j k (j^2 +
    # k^2)).
    pts = np.array([[0.5, 0.5], [0.3, 0.8], [0.1, 0.15]])
    jj, kk = np.meshgrid(np.arange(1, 400, 2), np.arange(1, 400, 2), indexing="ij")
    coef = 16.0 / (PI**4 * jj * kk * (jj**2 + kk**2))
    exact = np.array([(coef * np.sin(jj * PI * px) * np.sin(kk * PI * py)).sum() for px, py in pts])
    errors = []
    for n in (32, 64):
        op = EllipticOperator(n=n, bc="darcy", sensors=pts.tolist())
        errors.append(np.abs(op(torch.zeros(1, n, n, dtype=torch.float64))[0].numpy() - exact).max())
    assert errors[1] < 2e-4 * exact.max()
    assert errors[0] / errors[1] > 3.0  # O(h^2) (interpolation and solution)


def test_bilinear_interpolation_exact_on_linear_functions():
    n = 9
    x, y = _centres(n)
    u = 0.3 - 1.7 * x + 2.4 * y
    rng = np.random.default_rng(1)
    inside = rng.uniform(0.5 / n, 1 - 0.5 / n, (50, 2))  # the hull of the cell centres
    P, c = bilinear_interpolation(n, inside, {})
    assert np.allclose(P @ u.ravel() + c, 0.3 - 1.7 * inside[:, 0] + 2.4 * inside[:, 1], atol=1e-13)
    # Near the walls: Dirichlet data top/bottom consistent with v = 0.3 + 2.4 y, no-flux sides; any point.
    anywhere = np.vstack([rng.uniform(0, 1, (50, 2)), [[0, 0], [1, 1], [0, 0.5], [0.02, 0.99]]])
    P, c = bilinear_interpolation(n, anywhere, {"bottom": 0.3, "top": 2.7})
    assert np.allclose(P @ (0.3 + 2.4 * y).ravel() + c, 0.3 + 2.4 * anywhere[:, 1], atol=1e-13)
    # the operator's ELL buffers hold the same interpolation
    op = EllipticOperator(n=n, sensors=anywhere.tolist())
    got = op.observe(torch.from_numpy(y)[None])  # hippylib walls: u = 0 bottom, 1 top, consistent with u = y
    assert np.allclose(got[0].numpy(), anywhere[:, 1], atol=1e-13)


def test_sensor_layouts_and_dtypes():
    p = EllipticProblem(n=8)
    assert p.make_operator(sensors="grid:3").obs_shape == (9,)
    assert np.allclose(
        p.make_operator(sensors="grid:3").sensor_xy[:4].numpy(),
        [[0.25, 0.25], [0.5, 0.25], [0.75, 0.25], [0.25, 0.5]],
    )
    hip = p.make_operator(sensors="hippylib", sensor_seed=2).sensor_xy.numpy()
    assert (
        hip.shape == (50, 2) and hip[:, 0].min() >= 0.1 and hip[:, 0].max() <= 0.9 and hip[:, 1].max() <= 0.5
    )
    a = p.make_operator(sensors="random:5", sensor_seed=1).sensor_xy
    assert torch.equal(a, p.make_operator(sensors="random:5", sensor_seed=1).sensor_xy)
    assert not torch.equal(a, p.make_operator(sensors="random:5", sensor_seed=2).sensor_xy)
    full = ganflow.load_problem("elliptic", n=8).make_operator(sensors="full")
    m = p.sample_fields(3, torch.Generator().manual_seed(0))
    assert m.dtype == torch.float32 and m.shape == (3, 8, 8)
    assert set(np.unique(m.numpy()).round(5)) == set(np.log([3.0, 12.0]).astype(np.float32).round(5))
    out32, out64 = full(m), full(m.double())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64 and out32.shape == (3, 8, 8)
    assert torch.allclose(out32.double(), out64, atol=1e-6)
    assert torch.equal(m, p.sample_fields(3, torch.Generator().manual_seed(0)))
    grf = EllipticProblem(n=32, prior="grf", mean=1.0, std=0.5).sample_fields(
        200, torch.Generator().manual_seed(0)
    )
    assert abs(float(grf.mean()) - 1.0) < 0.1 and abs(float(grf.std()) - 0.5) < 0.1


@pytest.mark.parametrize(
    "make",
    [
        lambda: EllipticOperator(n=8)(torch.zeros(2, 8, 9)),
        lambda: EllipticOperator(n=8)(torch.zeros(8, 8)),
        lambda: EllipticOperator(n=8, bc="neumann"),
        lambda: EllipticOperator(n=8, sensors="ring:5"),
        lambda: EllipticOperator(n=8, sensors="grid:0"),
        lambda: EllipticOperator(n=8, sensors="random:x"),
        lambda: EllipticOperator(n=8, sensors=[[0.5, 0.5], [1.2, 0.5]]),
        lambda: EllipticOperator(n=8, sensors=[[0.5, -0.01]]),
        lambda: EllipticOperator(n=1),
        lambda: EllipticProblem(prior="gaussian"),
        lambda: EllipticProblem(prior="channels", std=2.0),
        lambda: EllipticProblem(corr_length=-0.1),
        lambda: ganflow.load_problem("elliptic", resolution=32),
        lambda: ganflow.load_operator(problem="elliptic", sensor="grid:4"),
    ],
)
def test_bad_input_raises_ganflow_error(make):
    with pytest.raises(GanflowError) as info:
        make()
    assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 400.0])
def test_out_of_range_sample_gives_nan_row_not_a_failed_batch(bad):
    """A sample the solver cannot take (non-finite, or exp(m) overflowing) gives a NaN row and no gradient;
    the other rows are exactly what they are when solved alone."""
    op = EllipticOperator(n=8, sensors="grid:3")
    m = EllipticProblem(n=8, prior="grf").sample_fields(3, torch.Generator().manual_seed(0)).float()
    m[1, 2, 3] = bad
    m.requires_grad_(True)
    y = op(m)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    (g,) = torch.autograd.grad(torch.nan_to_num(y, nan=0.0).sum(), m)
    assert torch.equal(g[1], torch.zeros_like(g[1]))
    good = m.detach()[[0, 2]].clone().requires_grad_(True)
    y_alone = op(good)
    (g_alone,) = torch.autograd.grad(y_alone.sum(), good)
    assert torch.allclose(y[[0, 2]], y_alone) and torch.allclose(g[[0, 2]], g_alone)


@pytest.mark.parametrize("bc", ["hippylib", "darcy"])
def test_torch_backend_matches_superlu(bc):
    """The batched block-Cholesky solver (the GPU path) against SuperLU: the same pressures and adjoint gradients
    to round-off, on rough fields with a conductivity contrast of e^6, a NaN row kept apart as on SuperLU."""
    kwargs = dict(n=12, bc=bc, sensors="random:20", sensor_seed=3)
    ref, fast = EllipticOperator(**kwargs, backend="scipy"), EllipticOperator(**kwargs, backend="torch")
    m = 1.5 * torch.randn(4, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m[2, 5, 5] = float("nan")
    weights = torch.randn(4, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = {}
    for name, op in (("scipy", ref), ("torch", fast)):
        field = m.clone().requires_grad_(True)
        y = op(field)
        (g,) = torch.autograd.grad(torch.nan_to_num(y * weights, nan=0.0).sum(), field)
        out[name] = (y, g, op.solve(m))
    (y0, g0, u0), (y1, g1, u1) = out["scipy"], out["torch"]
    assert torch.equal(torch.isnan(y0), torch.isnan(y1)) and torch.isnan(y1[2]).all()
    ok = [0, 1, 3]
    assert torch.allclose(u1[ok], u0[ok], rtol=0, atol=1e-11)
    assert torch.allclose(y1[ok], y0[ok], rtol=0, atol=1e-11)
    assert torch.allclose(g1, g0, rtol=0, atol=1e-10 * float(g0.abs().max()))
    with pytest.raises(GanflowError, match="backend"):
        EllipticOperator(n=8, backend="cuda")


def test_nonfinite_truth_is_refused_by_simulate():
    with pytest.raises(GanflowError, match="non-finite"):
        ganflow.simulate("elliptic", truth=torch.full((8, 8), float("inf")), problem_kwargs={"n": 8},
                         noise_sigma=0.01)


def test_check_operator_cli_on_elliptic():
    result = CliRunner().invoke(
        cli, ["check-operator", "elliptic", "--kw", "n=12", "--kw", "bc=darcy", "--batch", "2", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "obs_shape (64,)" in result.output and "PASSED" in result.output
    rows = re.findall(r"^\s+(\d\.\de-0\d)\s+\S+\s+(\S+)\s+(\S+)$", result.output, flags=re.M)
    rel = [float(r[2]) for r in rows]
    assert len(rel) == 6
    assert rel[1] < rel[0] / 50 and rel[2] < rel[1] / 50 and min(rel) < 1e-7  # central difference: O(eps^2)
    bad = CliRunner().invoke(cli, ["check-operator", "no_such_problem"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_banded_cholesky_matches_superlu_and_falls_back_to_it(monkeypatch):
    """The CPU solver's banded Cholesky (LAPACK dpbtrf) gives SuperLU's pressures and adjoint gradients (an
    independent sparse LU of the same assembled K) to round-off; a sample whose banded pivot fails is solved by
    SuperLU instead, with the same result."""
    import scipy.sparse.linalg as spla

    from ganflow.problems import elliptic as el

    op = EllipticOperator(n=12, sensors="grid:4")
    m = EllipticProblem(n=12).sample_fields(3, torch.Generator().manual_seed(1)).double().numpy()
    fv = op.solver
    u, factors = fv.solve(m)
    mats, rhs = fv.assemble(m)
    u_lu = np.stack([spla.splu(K).solve(b) for K, b in zip(mats, rhs, strict=True)]).reshape(m.shape)
    np.testing.assert_allclose(u, u_lu, rtol=0, atol=1e-12)
    g = np.random.default_rng(0).standard_normal(m.shape)
    lam_lu = np.stack([spla.splu(K).solve(gb) for K, gb in zip(mats, g.reshape(3, -1), strict=True)])
    lam = np.stack([f.solve(gb, trans="T") for f, gb in zip(factors, g.reshape(3, -1), strict=True)])
    np.testing.assert_allclose(lam, lam_lu, rtol=0, atol=1e-10 * np.abs(lam_lu).max())
    real = el.lapack.dpbtrf
    calls = []

    def failing_second(band, lower=0):
        calls.append(1)
        chol, info = real(band, lower=lower)
        return chol, (1 if len(calls) == 2 else info)

    monkeypatch.setattr(el.lapack, "dpbtrf", failing_second)
    u2, factors2 = fv.solve(m)
    assert isinstance(factors2[1], type(spla.splu(mats[0]))) and not isinstance(factors2[0], type(factors2[1]))
    np.testing.assert_allclose(u2, u, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fv.gradient(m, u2, factors2, g), fv.gradient(m, u, factors, g), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_a_second_derivative_through_the_solver_is_refused_not_wrong(backend):
    """The adjoint gradient is not itself differentiated, so a Hessian through the solver would silently lack its
    terms (measured on the elliptic benchmark case: wrong by factors against finite differences). A backward that
    builds a graph for one (``create_graph=True``) raises instead; first derivatives are unaffected."""
    op = EllipticOperator(n=5, bc="hippylib", sensors="grid:2", backend=backend)
    m = torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_(True)
    (g,) = torch.autograd.grad((op(m) ** 2).sum(), m)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(RuntimeError, match="twice"):
        torch.autograd.grad((op(m) ** 2).sum(), m, create_graph=True)
