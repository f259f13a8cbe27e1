"""Split-conformal recalibration (`ganflow.recalibration`) and the representation error carried into
posterior.h5 for `ganflow predict`.

References independent of the code under test: order statistics written out by hand, numpy quantiles of
explicitly scaled draws, a Gaussian miscalibration of known size (truths twice as spread as the draws need a
scale of exactly 2), and the solve's own field statistics for predict's re-drawn fields.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ganflow.calibrate import CalibrateSettings, _store_recalibration, calibrate
from ganflow.errors import GanflowError
from ganflow.field_stats import FieldSummary
from ganflow.io import Observation
from ganflow.prior.checkpoint import generator_from_checkpoint, load_checkpoint
from ganflow.prior.residuals import estimate_representation_error
from ganflow.problems.linear_gaussian import BlurSubsample, LinearGenerator, _cosine_basis
from ganflow.qoi import predict
from ganflow.recalibration import (
    central_interval,
    conformal_scale,
    interval_scores,
    recalibrate_summary,
    recalibration_applies,
    scaled_coverage,
)
from ganflow.solve import resolve_operator, solve

N, K_FULL, K, SIGMA = 16, 16, 10, 0.05
# The latent posterior of a linear generator is Gaussian, so the flow's Laplace start is exact: no flow steps.
FAST_FLOW = {"max_iter": 0, "min_iter": 0, "map_starts": 2}


def test_conformal_scale_is_the_finite_sample_order_statistic():
    rng = np.random.default_rng(0)
    # n = 19: ceil(20 * 0.95) = 19 -> the largest; n = 39: ceil(40 * 0.95) = 38 -> the second largest
    assert conformal_scale(rng.permutation(np.arange(1.0, 20.0)), 0.95) == 19.0
    assert conformal_scale(rng.permutation(np.arange(1.0, 40.0)), 0.95) == 38.0
    assert conformal_scale(np.arange(1.0, 11.0), 0.9) == 10.0  # ceil(11 * 0.9) = 10
    with pytest.raises(GanflowError, match="needs at least"):
        conformal_scale(np.arange(1.0, 11.0), 0.95)  # ceil(11 * 0.95) = 11 > 10


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.7])
def test_scores_and_scaled_coverage_agree_with_scaled_draws(scale):
    """The score is the smallest scale holding the truth, and the scaled interval is the interval of the
    scaled draws: both checked against numpy quantiles of ``m + c (x - m)`` computed directly."""
    rng = np.random.default_rng(1)
    draws = rng.gamma(2.0, 1.0, size=(801, 300))  # skewed, so the two sides differ
    truth = rng.gamma(2.0, 1.3, size=300)
    scaled = draws.mean(0) + scale * (draws - draws.mean(0))
    lo, hi = np.quantile(scaled, [0.025, 0.975], axis=0)
    inside = (truth >= lo) & (truth <= hi)
    iv = central_interval(draws, 0.95)
    ind = scaled_coverage(iv, truth, scale)
    near = np.isclose(truth, lo) | np.isclose(truth, hi)
    assert np.array_equal(ind[~near], inside[~near])
    assert np.array_equal((interval_scores(iv, truth) <= scale)[~near], inside[~near])
    assert 0 < inside.sum() < inside.size  # the check is not vacuous: both outcomes occur


def test_learns_a_known_miscalibration():
    """Draws ``N(0, 1)`` per entry, truths ``N(0, 2^2)``: the 95 % intervals cover ``P(|N| < 0.98) = 0.67``
    and the scale that restores 95 % is exactly 2. With 2,000 scores the conformal quantile's sd is ~0.08
    (sqrt(p (1 - p) / n) / density of |t| at 3.92 = 0.0049 / 0.058), so 0.3 is ~3.5 sd; the checked coverage
    over 4,000 fresh entries has sd 0.004 (0.02 is 5 sd)."""
    rng = np.random.default_rng(2)

    def batch(n):
        return [(central_interval(rng.standard_normal((1000, 50)), 0.95), 2.0 * rng.standard_normal(50))
                for _ in range(n)]

    learn, check = batch(40), batch(80)
    c = conformal_scale(np.concatenate([interval_scores(iv, t) for iv, t in learn]), 0.95)
    assert abs(c - 2.0) < 0.3
    before = np.mean([scaled_coverage(iv, t, 1.0).mean() for iv, t in check])
    after = np.mean([scaled_coverage(iv, t, c).mean() for iv, t in check])
    assert abs(before - (2 * norm.cdf(norm.ppf(0.975) / 2) - 1)) < 0.02
    assert abs(after - 0.95) < 0.02


def test_recalibrated_summary_is_the_summary_of_scaled_draws():
    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, 1.0, size=(4000, 6, 5)).astype(np.float32)
    qs = (0.025, 0.5, 0.975)

    def summary(d):
        return FieldSummary(n=d.shape[0], mean=d.mean(0), std=d.std(0), quantiles={q: np.quantile(d, q, 0) for q in qs},
                            samples=d[:8], latent_samples=np.zeros((1, 1)), obs_pred_mean=np.zeros(1), n_quantile=4000)

    c = 1.6
    got = recalibrate_summary(summary(x), c)
    want = summary(x.mean(0) + c * (x - x.mean(0)))
    for q in qs:
        np.testing.assert_allclose(got.quantiles[q], want.quantiles[q], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.std, want.std, rtol=1e-4)
    np.testing.assert_allclose(got.samples, want.samples, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-5)


@pytest.fixture(scope="module")
def truncated():
    """The linear-Gaussian problem's full generator (16 modes) and a prior that keeps only 4 of them: truths
    from the problem's sampler lie off the prior's range."""
    W = torch.from_numpy(_cosine_basis(N, K_FULL)).float()
    full = LinearGenerator(W, torch.zeros(N * N), (N, N))
    trunc = LinearGenerator(W[:, :K], torch.zeros(N * N), (N, N))
    return full, trunc, BlurSubsample(N, stride=2, blur_sigma=1.0)


def test_calibrate_recalibrate_restores_coverage(truncated, tmp_path):
    """Without a representation-error model the truncated prior's intervals miss most held-out truths; the
    scale learned on 8 truths brings the other 8 to nominal. Measured: 95 % coverage 0.29 -> 0.96, scale
    ~4. The check half has 8 x 256 correlated entries: over seeds its coverage varies by a few points, hence
    0.06."""
    full, trunc, _ = truncated
    fields = full(torch.randn(16, K_FULL, generator=torch.Generator().manual_seed(321))).numpy()
    np.save(tmp_path / "truths.npy", fields)
    cfg = {"flow": FAST_FLOW, "solve": {"n_samples": 1000}, "diagnostics": {"n_draws": 200}}

    out = calibrate("linear_gaussian", trunc, CalibrateSettings(n_truths=16, noise_sigma=SIGMA), cfg, seed=0,
                    truths=tmp_path / "truths.npy", recalibrate=True)
    rec = out["recalibration"]
    print(rec)
    assert rec["n_learn"] == 8 and rec["n_check"] == 8
    assert rec["check_coverage_before"]["95"] < 0.6
    assert abs(rec["check_coverage_after"]["95"] - 0.95) < 0.06
    assert rec["scale"] > 1.5
    assert rec["problem"] == "linear_gaussian" and rec["representation_error"] == "none"
    assert rec["operator_settings"] == {"stride": 2, "blur_sigma": 1.0}  # BlurSubsample's defaults, filled in


def test_solve_applies_a_matching_recalibration_only(truncated):
    """Same seed, recalibration on vs off: every quantile moves to ``m + c (q - m)`` exactly; an operator with
    other settings leaves it off under "auto" and says why."""
    full, trunc, _ = truncated
    x = full(torch.randn(1, K_FULL, generator=torch.Generator().manual_seed(5)))[0]
    op = BlurSubsample(N, stride=2, blur_sigma=1.0)
    y = op(x[None])[0] + SIGMA * torch.randn(op.obs_shape, generator=torch.Generator().manual_seed(6))
    obs = Observation(y=y, noise_sigma=SIGMA, problem="linear_gaussian", x_true=x)
    cfg = {"flow": FAST_FLOW, "solve": {"n_samples": 1000, "n_quantile": 1000}, "diagnostics": {"n_draws": 200}}
    trunc.recalibration = {"scale": 2.5, "level": 0.95, "problem": "linear_gaussian", "operator_kwargs": {},
                           "representation_error": "none"}
    try:
        off = solve(obs, trunc, config={**cfg, "solve": {**cfg["solve"], "recalibrate": "off"}}, progress=False)
        on = solve(obs, trunc, config=cfg, progress=False)
        other = solve(obs, trunc, config={**cfg, "operator": {"blur_sigma": 2.0}}, progress=False)
    finally:
        del trunc.recalibration
    assert on.attrs["recalibration"] == "on" and on.attrs["recalibration_scale"] == 2.5
    m = off.summary.mean
    for q in (0.025, 0.975):
        np.testing.assert_allclose(on.summary.quantiles[q], m + 2.5 * (off.summary.quantiles[q] - m), atol=1e-5)
    np.testing.assert_allclose(on.summary.std, 2.5 * off.summary.std, rtol=1e-5)
    assert on.attrs["coverage_95"] > off.attrs["coverage_95"]
    assert other.attrs["recalibration"].startswith("not applied: learned for operator settings")


@pytest.mark.parametrize("problem,learnt,same,other", [
    ("linear_gaussian", {}, {"blur_sigma": 1.0}, {"blur_sigma": 2.0}),
    # the bundled elliptic record's options against the demo's
    ("elliptic", {"sensors": "grid:8", "sensor_seed": 0}, {"sensors": "grid:8"}, {"sensors": "grid:6"}),
])
def test_a_recalibration_matches_options_left_to_their_defaults(problem, learnt, same, other):
    """A record with every operator setting applies to options that differ only in what they leave to a default,
    and not to other settings; an older record (options as written, no settings) matches only the same text."""
    info = {name: resolve_operator(None, problem=problem, operator_kwargs=kw)[1]
            for name, kw in (("learnt", learnt), ("same", same), ("other", other))}
    rec = {"scale": 1.3, "level": 0.95, "problem": problem, "operator_kwargs": learnt,
           "operator_settings": info["learnt"]["operator_settings"], "representation_error": "none"}
    assert recalibration_applies(rec, info["same"], "none") is None
    assert recalibration_applies(rec, info["other"], "none").startswith("learned for operator settings")
    old = {k: v for k, v in rec.items() if k != "operator_settings"}
    assert recalibration_applies(old, info["learnt"], "none") is None
    assert recalibration_applies(old, info["same"], "none") is not None


def test_recalibration_is_stored_in_the_checkpoint(tmp_path):
    from ganflow.problems.elliptic import EllipticProblem

    src = EllipticProblem(n=32).bundled_prior()
    path = tmp_path / "prior.pt"
    path.write_bytes(open(src, "rb").read())
    rec = {"scale": 1.3, "level": 0.95, "problem": "elliptic", "operator_kwargs": {"sensors": "grid:8"},
           "representation_error": "on", "check_coverage_after": {"95": 0.95}}
    _store_recalibration(str(path), rec)
    G = generator_from_checkpoint(load_checkpoint(path))  # weights-only
    assert G.recalibration == rec
    assert G.representation_error is not None  # everything else kept


@pytest.mark.parametrize("args,msg", [([], "give --truths"), (["--truths", "T"], "is not a file")])
def test_cli_recalibrate_needs_truths_and_a_checkpoint(tmp_path, cli, args, msg):
    np.save(tmp_path / "T.npy", np.zeros((4, 16, 16), np.float32))
    args = [a.replace("T", str(tmp_path / "T.npy")) if a == "T" else a for a in args]
    r = cli("calibrate", "--problem", "linear_gaussian", "--prior", "ganflow.problems.linear_gaussian:generator",
            "--recalibrate", "-o", str(tmp_path / "cal"), *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cal").exists()


def test_predict_redraws_the_representation_error(truncated, tmp_path):
    """predict from posterior.h5 alone: its field draws carry ``r | z, y`` again, so the identity QoI's sd
    matches the solve's field sd (Monte-Carlo error of an sd from 4,000 and 10,000 draws: ~1.2 %; the median
    over entries of the ratio within 4 %). Without the residual it would be far smaller (the off-range modes
    carry a quarter of the spread here: ratio 0.75)."""
    full, trunc, op = truncated
    held = full(torch.randn(300, K_FULL, generator=torch.Generator().manual_seed(11)))
    trunc.representation_error = estimate_representation_error(trunc, held, seed=0, n_iter=300)
    try:
        x = full(torch.randn(1, K_FULL, generator=torch.Generator().manual_seed(5)))[0]
        y = op(x[None])[0] + SIGMA * torch.randn(op.obs_shape, generator=torch.Generator().manual_seed(6))
        obs = Observation(y=y, noise_sigma=SIGMA, problem="linear_gaussian")
        res = solve(obs, trunc, config={"flow": FAST_FLOW, "solve": {"n_samples": 10000}}, progress=False)
        path = res.save(tmp_path / "posterior.h5")
        qoi = tmp_path / "q.py"
        qoi.write_text("def field(x):\n    return x.reshape(x.shape[0], -1)\n")
        rep = predict(path, [f"field={qoi}:field"], n=4000, prior=trunc, write=False)
        ratio = rep.qois["field"].std.reshape(N, N) / res.summary.std
        assert abs(np.median(ratio) - 1) < 0.04
        plain = trunc(torch.as_tensor(res.summary.latent_samples[:4000])).std(0).numpy()
        assert np.median(plain / res.summary.std) < 0.85  # measured 0.75
    finally:
        del trunc.representation_error
