"""Fourier phase retrieval: operator vs NumPy, VJP vs finite differences, ambiguities, mask, phantoms."""

from __future__ import annotations

import pathlib
import time
import tomllib

import numpy as np
import pytest
import torch

from ganflow import GanflowError, load_operator, load_problem
from ganflow.problems.phase_retrieval import (
    PhaseRetrievalOperator,
    PhaseRetrievalProblem,
    central_region,
    error_modulo_twin,
    sample_phantoms,
    symmetric_pair_mask,
    twin,
)


def numpy_reference(x: np.ndarray, size: int, mask: np.ndarray, intensity: bool) -> np.ndarray:
    """``|fft2(pad(x))|[mask]`` in float64 NumPy, the object in the top-left corner."""
    n = x.shape[-1]
    padded = np.zeros(x.shape[:-2] + (size, size))
    padded[..., :n, :n] = x
    mag = np.abs(np.fft.fft2(padded, norm="ortho"))
    out = mag**2 if intensity else mag
    return out[..., mask]


@pytest.mark.parametrize(
    "n, s, mask_fraction, intensity",
    [(8, 2, 1.0, False), (16, 2, 0.3, False), (12, 3, 0.7, True), (10, 1.5, 1.0, True), (32, 1, 0.5, False)],
)
def test_operator_matches_numpy(n, s, mask_fraction, intensity):
    op = PhaseRetrievalOperator(n, oversampling=s, mask_fraction=mask_fraction, mask_seed=3,
                                intensity=intensity)
    x = torch.rand(4, n, n, generator=torch.Generator().manual_seed(n))
    y = op(x)
    assert y.dtype == torch.float32 and tuple(y.shape) == (4, *op.obs_shape)
    size = round(s * n)
    ref = numpy_reference(x.double().numpy(), size, op.mask.numpy(), intensity)
    assert op.obs_shape == (int(op.mask.sum()),)
    np.testing.assert_allclose(y.numpy(), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_operator_matches_numpy_with_explicit_mask():
    n, size = 8, 16
    mask = np.random.default_rng(0).random((size, size)) < 0.4  # arbitrary, may hold both members of a pair
    op = PhaseRetrievalOperator(n, oversampling=2, mask=mask.tolist())
    x = torch.rand(2, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    np.testing.assert_allclose(op(x).numpy(), numpy_reference(x.numpy(), size, mask, False), rtol=1e-12)


@pytest.mark.parametrize("intensity", [False, True])
def test_vjp_matches_finite_differences(intensity):
    n = 6
    op = PhaseRetrievalOperator(n, oversampling=2, mask_fraction=0.6, intensity=intensity)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(1, n, n, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, *op.obs_shape, generator=gen, dtype=torch.float64)
    d = torch.randn(1, n, n, generator=gen, dtype=torch.float64)
    y = op(x)
    assert y.dtype == torch.float64
    (vjp,) = torch.autograd.grad((w * y).sum(), x)
    h = 1e-6
    with torch.no_grad():
        fd = ((w * op(x + h * d)).sum() - (w * op(x - h * d)).sum()) / (2 * h)
    assert float((vjp * d).sum()) == pytest.approx(float(fd), rel=1e-7, abs=1e-9)
    # and the full Jacobian by torch's own central-difference checker
    assert torch.autograd.gradcheck(op, (x.detach().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_gradient_finite_at_spectral_zeros():
    op = PhaseRetrievalOperator(8, oversampling=2)
    for x0 in (torch.zeros(2, 8, 8), torch.ones(2, 8, 8)):  # x = 1 has F(k) = 0 for every k != 0 on the grid
        x = x0.clone().requires_grad_(True)
        op(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    x = torch.zeros(1, 8, 8, requires_grad=True)
    op(x).sum().backward()
    assert float(x.grad.abs().max()) == 0.0  # the minimum-norm subgradient at F = 0


def test_twin_gives_identical_magnitudes():
    problem = PhaseRetrievalProblem(n=16)
    x = problem.sample_fields(6, torch.Generator().manual_seed(0))
    x = x + 0.1 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))  # not point-symmetric
    ops = (problem.make_operator(), problem.make_operator(oversampling=3, mask_fraction=0.4, intensity=True))
    for op in ops:
        y, y_twin = op(x.double()), op(twin(x).double())
        np.testing.assert_allclose(y_twin.numpy(), y.numpy(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(twin(x), x)
    assert torch.equal(error_modulo_twin(twin(x), x), torch.zeros(6))
    assert float(error_modulo_twin(x, x).max()) == 0.0
    # the plain relative error of the twin is large, so the min really picks the twin
    plain = ((twin(x) - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1))
    assert float(plain.min()) > 0.1


def test_error_modulo_translations():
    x = sample_phantoms(3, 16, torch.Generator().manual_seed(4))
    shifted = torch.roll(twin(x), shifts=(2, -3), dims=(-2, -1))  # support stays inside: no wrap-around
    assert float(error_modulo_twin(shifted, x).min()) > 0.1
    assert float(error_modulo_twin(shifted, x, translations=True).max()) < 1e-6
    noisy = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expect = (noisy - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    torch.testing.assert_close(error_modulo_twin(noisy, x, translations=True), expect, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", [16, 24, 15])
def test_symmetric_pair_mask_has_no_redundant_pair(size):
    mask = symmetric_pair_mask(size, mask_fraction=0.5, mask_seed=1).numpy()
    n_self = 4 if size % 2 == 0 else 1
    n_pairs = (size * size + n_self) // 2
    assert mask.sum() == round(0.5 * n_pairs)
    for r, c in zip(*np.nonzero(mask), strict=True):
        pr, pc = (-r) % size, (-c) % size
        assert (pr, pc) == (r, c) or not mask[pr, pc], f"both {(r, c)} and {(pr, pc)} kept"
    assert not np.array_equal(mask, symmetric_pair_mask(size, 0.5, mask_seed=2).numpy())
    assert np.array_equal(mask, symmetric_pair_mask(size, 0.5, mask_seed=1).numpy())
    assert symmetric_pair_mask(size, 1.0).all()  # 1.0 means the full (redundant) grid


def test_phantoms_are_nonnegative_central_and_seeded():
    n = 24
    x = sample_phantoms(50, n, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and tuple(x.shape) == (50, n, n)
    assert float(x.min()) >= 0.0
    assert bool((x.flatten(1).amax(1) > 0).all())
    assert float(x[:, ~central_region(n)].abs().max()) == 0.0
    assert torch.equal(central_region(16)[4:12, 4:12], torch.ones(8, 8, dtype=torch.bool))
    assert int(central_region(16).sum()) == 64
    assert torch.equal(x, sample_phantoms(50, n, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, sample_phantoms(50, n, torch.Generator().manual_seed(1)))
    # same law under the point reflection: the mean phantom is nearly point-symmetric
    big = sample_phantoms(600, n, torch.Generator().manual_seed(2)).mean(0)
    assert float((big - twin(big)).abs().max()) < 0.15 * float(big.max())
    # chunking does not change the draws: n = 256 uses chunks of a few samples
    y = sample_phantoms(3, 256, torch.Generator().manual_seed(3))
    assert float(y[:, ~central_region(256)].abs().max()) == 0.0 and float(y.min()) >= 0


def test_problem_contract_and_qois():
    problem = load_problem("phase_retrieval", n=16)
    assert problem.name == "phase_retrieval" and problem.field_shape == (16, 16)
    op = load_operator(problem=problem, mask_fraction=0.5)
    assert op.field_shape == (16, 16) and op.obs_shape == (257,)
    x = torch.zeros(2, 16, 16)
    x[0, 4:8, 4:8] = 1.0
    q = problem.qois()
    torch.testing.assert_close(q["total_mass"](x), torch.tensor([16.0, 0.0]))
    torch.testing.assert_close(q["support_area"](x), torch.tensor([16 / 256, 0.0]))
    # buffers move with the module, and the mask is saved in state_dict
    assert "mask" in op.state_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_fraction=0.0), "mask_fraction"),
        (dict(mask_fraction=1.5), "mask_fraction"),
        (dict(oversampling=0.5), "oversampling"),
        (dict(oversampling=1.3), "whole number"),
        (dict(mask=np.ones((8, 8), bool)), "shape"),
        (dict(mask=np.zeros((32, 32), bool)), "no frequency"),
        (dict(mask=np.full((32, 32), 2)), "boolean"),
        (dict(mask=np.ones((32, 32), bool), mask_fraction=0.5), "not both"),
        (dict(intensity="yes"), "intensity"),
    ],
)
def test_bad_operator_options_raise(kwargs, match):
    with pytest.raises(GanflowError, match=match):
        PhaseRetrievalProblem(n=16).make_operator(**kwargs)


def test_bad_sizes_and_fields_raise():
    for n in (0, 7, -4, 2):
        with pytest.raises(GanflowError, match="even"):
            PhaseRetrievalProblem(n=n)
        with pytest.raises(GanflowError, match="even"):
            PhaseRetrievalOperator(n)
    op = PhaseRetrievalOperator(8)
    with pytest.raises(GanflowError, match=r"\[\.\.\., 8, 8\]"):
        op(torch.zeros(2, 8, 9))
    with pytest.raises(GanflowError):
        error_modulo_twin(torch.zeros(8, 8), torch.zeros(6, 6))
    with pytest.raises(GanflowError, match="mask_fractoin"):
        load_operator(problem=PhaseRetrievalProblem(n=8), mask_fractoin=0.5)


def test_smoke_256():
    op = PhaseRetrievalProblem(n=256).make_operator(mask_fraction=0.5)
    x = sample_phantoms(2, 256, torch.Generator().manual_seed(0)).requires_grad_(True)
    t0 = time.perf_counter()
    y = op(x)
    y.square().sum().backward()
    elapsed = time.perf_counter() - t0
    assert tuple(y.shape) == (2, op.obs_shape[0]) and op.obs_shape[0] == round(0.5 * (512 * 512 + 4) / 2)
    assert x.grad.shape == (2, 256, 256) and torch.isfinite(x.grad).all()
    print(f"n=256 batch 2 forward+backward: {elapsed:.3f} s")


@pytest.mark.parametrize("name", ["phase_retrieval_demo.toml", "phase_retrieval_256.toml"])
def test_configs_build_problem_and_operator(name):
    cfg = tomllib.loads((pathlib.Path(__file__).parents[1] / "configs" / name).read_text())
    problem = load_problem("phase_retrieval", **cfg["problem"])
    op = load_operator(problem=problem, **cfg["operator"])
    assert op.field_shape == problem.field_shape
    trainer = pytest.importorskip("ganflow.prior.trainer")
    from ganflow.config import parse_settings

    settings = parse_settings(trainer.TrainSettings, cfg["train"], "train")
    assert 16 <= settings.latent_dim <= 128
