"""ganflow.gradcheck: the VJP check passes correct operators, fails a wrong VJP, reports shapes and dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ganflow import GanflowError
from ganflow.gradcheck import check_operator, format_report, operator_from_spec
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
    report = check_operator(BlurSubsample(), torch.Generator().manual_seed(1), batch=2)
    assert report["passed"] and report["batch_consistency"] < 1e-5
    text = format_report(report, "linear_gaussian")
    assert "field_shape (16, 16)" in text and "obs_shape (64,)" in text and text.count("e-0") >= 6


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
