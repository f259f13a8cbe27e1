"""ganflow.gradcheck: the VJP check passes correct operators, fails a wrong VJP, reports shapes and dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ganflow import GanflowError
from ganflow.gradcheck import DEFAULT_EPS, check_operator, format_report, operator_from_spec
from ganflow.problems.linear_gaussian import BlurSubsample


class _Cube(torch.autograd.Function):
    """y = x^3 with a VJP scaled by ``factor`` (1 is correct)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(x)
        ctx.factor = factor
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.factor * 3 * x**2 * g, None


class CubeOperator(nn.Module):
    def __init__(self, factor: float = 1.0, float32_only: bool = False):
        super().__init__()
        self.factor, self.float32_only = factor, float32_only
        self.field_shape, self.obs_shape = (3, 2), (6,)

    def forward(self, x):
        if self.float32_only and x.dtype != torch.float32:
            raise TypeError("float32 only")
        return _Cube.apply(x, self.factor).reshape(x.shape[0], -1)


def test_correct_vjp_passes_with_second_order_convergence():
    report = check_operator(CubeOperator(), torch.Generator().manual_seed(0), batch=3)
    assert report["dtype"] == "float64" and report["passed"] and report["decreasing"]
    rel = [r["rel_err"] for r in report["rows"]]
    assert rel[1] / rel[2] == pytest.approx(100.0, rel=0.05)  # central difference error ~ eps^2
    assert report["field_shape"] == (3, 2) and report["obs_shape"] == (6,)


def test_wrong_vjp_fails():
    report = check_operator(CubeOperator(factor=1.01), torch.Generator().manual_seed(0))
    assert not report["passed"]
    assert report["min_rel_err"] == pytest.approx(0.01, rel=0.01)
    assert "FAILED" in format_report(report)


def test_float32_only_operator_is_checked_in_float32():
    report = check_operator(
        CubeOperator(float32_only=True), torch.Generator().manual_seed(0), eps_list=(1e-1, 1e-2)
    )
    assert report["dtype"] == "float32" and report["passed"]


def test_linear_operator_exact_at_every_step():
    """For a linear A the central difference has no truncation error: every row equals <w, M delta> up to
    round-off, with M the operator's matrix and (delta, w) redrawn here in the documented order of
    `check_operator` (x, then delta, then w from the one generator), the reference computed in numpy."""
    op = BlurSubsample()
    report = check_operator(op, torch.Generator().manual_seed(1), batch=2)
    assert report["passed"] and report["batch_consistency"] < 1e-5 and report["dtype"] == "float64"
    gen = torch.Generator().manual_seed(1)
    torch.randn(2, 16, 16, generator=gen)  # x
    delta = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64).numpy().reshape(2, -1)
    w = torch.randn(2, 64, generator=gen, dtype=torch.float64).numpy()
    exact = float(np.sum(w * (delta @ op.M.double().numpy().T)))
    assert report["directional_derivative"] == pytest.approx(exact, rel=1e-12)
    assert [r["eps"] for r in report["rows"]] == list(DEFAULT_EPS)
    for r in report["rows"]:
        # round-off only: l(x +- eps delta) carry ~1e-16 |l| each (|l| <~ 100 |exact| here), divided by 2 eps
        # (measured: 2e-15 at eps 0.1 up to 8e-10 at 1e-6); a truncation or scaling error is >~ eps^2 or O(1)
        assert abs(r["fd"] - exact) / abs(exact) < 1e-14 / r["eps"], r
        assert r["rel_err"] == pytest.approx(abs(r["fd"] - exact) / abs(exact), rel=1e-3, abs=1e-15)
    # the text shows the same table: one line per step with its eps, finite difference and relative error
    text = format_report(report, "linear_gaussian")
    assert "field_shape (16, 16)" in text and "obs_shape (64,)" in text and "PASSED" in text
    table = [line.split() for line in text.splitlines() if line.strip().startswith(tuple("0123456789"))]
    assert len(table) == len(DEFAULT_EPS)
    for cols, r in zip(table, report["rows"], strict=True):
        assert float(cols[0]) == pytest.approx(r["eps"]) and float(cols[1]) == pytest.approx(exact, rel=1e-9)
        assert float(cols[3]) == pytest.approx(r["rel_err"], rel=1e-2, abs=1e-300)


def test_wrong_output_shape_is_an_error():
    op = CubeOperator()
    op.obs_shape = (5,)
    with pytest.raises(GanflowError, match="declared obs_shape"):
        check_operator(op)


def test_problem_spec_gives_default_operator_and_prior_fields():
    op, x = operator_from_spec("linear_gaussian", {"stride": 4}, torch.Generator().manual_seed(0), batch=2)
    assert op.obs_shape == (16,) and x.shape == (2, 16, 16)
    op, x = operator_from_spec("ganflow.problems.linear_gaussian:operator", {})
    assert op.obs_shape == (64,) and x is None
    with pytest.raises(GanflowError):
        operator_from_spec("linear_gaussian", {"strid": 4})
