"""Simulation-based calibration on linear_gaussian: nominal coverage with the flow, and detection of a
deliberately overconfident posterior (--shrink)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy.stats import norm

from ganflow.calibrate import CalibrateSettings, calibrate, rank_uniformity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIOR = os.path.join(ROOT, "problems", "linear_gaussian.py") + ":generator"
# A cheap flow per truth: the Laplace start is exact on this problem, a short fit keeps it a flow.
CHEAP = {
    "flow": {
        "max_iter": 60,
        "min_iter": 20,
        "warmup": 20,
        "n_layers": 2,
        "hidden": 16,
        "map_starts": 2,
        "map_iter": 150,
    },
    "solve": {"n_samples": 1000, "n_quantile": 1000},
}


def _reference_rank_test(ranks: np.ndarray, n_draws: int, n_bins: int):
    """Equal-width bins over the L + 1 rank values by integer arithmetic (bin of r: floor(r n_bins / (L + 1))),
    expected counts from how many rank values each bin holds, and scipy's chi-square test."""
    from scipy.stats import chisquare

    counts = np.bincount(ranks * n_bins // (n_draws + 1), minlength=n_bins)
    per_bin = np.bincount(np.arange(n_draws + 1) * n_bins // (n_draws + 1), minlength=n_bins)
    expected = ranks.size * per_bin / (n_draws + 1)
    return counts, expected, chisquare(counts, expected)


# (L, n_bins): bin counts that divide L + 1 (100/10, 21/3) and that do not (100/7, 100/3, 21/6, 10/4)
RANK_CASES = [(99, 10), (20, 3), (99, 7), (99, 3), (20, 6), (9, 4)]


@pytest.mark.parametrize("n_draws, n_bins", RANK_CASES)
def test_rank_uniformity_test_against_scipy(n_draws, n_bins):
    # Perfectly uniform ranks (every value of 0..L equally often) are a perfect fit whatever the binning.
    exact = rank_uniformity(np.repeat(np.arange(n_draws + 1), 1000), n_draws, n_bins)
    assert exact["chi2"] == pytest.approx(0.0, abs=1e-9) and exact["p_value"] == pytest.approx(1.0), exact
    rng = np.random.default_rng(n_draws * 100 + n_bins)
    uniform = rng.integers(0, n_draws + 1, size=5000)
    peaked = np.clip(rng.normal(n_draws / 2, n_draws / 10, size=5000).round(), 0, n_draws).astype(int)
    for ranks in (uniform, peaked):
        got = rank_uniformity(ranks, n_draws, n_bins)
        counts, expected, ref = _reference_rank_test(ranks, n_draws, n_bins)
        np.testing.assert_array_equal(got["counts"], counts)
        np.testing.assert_allclose(got["expected"], expected, rtol=1e-12)
        assert got["chi2"] == pytest.approx(ref.statistic, rel=1e-10)
        assert got["p_value"] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)
    assert rank_uniformity(peaked, n_draws, n_bins)["p_value"] < 1e-10


def test_flow_posterior_is_calibrated():
    out = calibrate("linear_gaussian", PRIOR, CalibrateSettings(n_truths=20), CHEAP, seed=0)
    assert out["n_indicators"] == {"latent": 20 * 16, "field": 20 * 256}
    for kind in ("latent", "field"):
        cov = out["coverage"][kind]
        assert abs(cov["95"] - 0.95) < 0.03, (kind, cov)
        assert abs(cov["90"] - 0.90) < 0.03, (kind, cov)
        assert abs(cov["50"] - 0.50) < 0.05, (kind, cov)
    assert out["warning"] is None
    # latent coordinates are nearly independent across truths: their pooled ranks pass the uniformity test
    assert out["rank_test"]["latent"]["p_value"] > 0.01


def test_cli_detects_overconfident_posterior(tmp_path):
    from click.testing import CliRunner

    from ganflow.cli import cli as group

    cfg = tmp_path / "cal.toml"
    cfg.write_text(
        "\n".join(f"[{t}]\n" + "\n".join(f"{k} = {v!r}" for k, v in tab.items()) for t, tab in CHEAP.items())
    )
    outdir = tmp_path / "cal"
    r = CliRunner().invoke(
        group,
        [
            "calibrate",
            "--problem",
            "linear_gaussian",
            "--prior",
            PRIOR,
            "--n-truths",
            "8",
            "--shrink",
            "0.5",
            "--config",
            str(cfg),
            "--quiet",
            "-o",
            str(outdir),
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads((outdir / "calibration.json").read_text())
    assert (outdir / "calibration.png").stat().st_size > 0
    # shrinking by 0.5 turns the 95 % interval into a +-0.98 sd one: coverage ~ 2 Phi(0.98) - 1 = 0.67
    expected = 2 * norm.cdf(0.5 * norm.ppf(0.975)) - 1
    for kind in ("latent", "field"):
        assert out["coverage"][kind]["95"] < 0.85, out["coverage"]
        assert abs(out["coverage"][kind]["95"] - expected) < 0.1
        assert out["rank_test"][kind]["p_value"] < 1e-3  # U-shaped ranks
    assert "under-coverage" in out["warning"] and "under-coverage" in r.output
    assert out["settings"]["shrink"] == 0.5


@pytest.mark.parametrize("args,msg", [(["--shrink", "0"], "shrink"), (["--n-truths", "1"], "n_truths")])
def test_bad_settings(tmp_path, args, msg, cli):
    r = cli("calibrate", "--problem", "linear_gaussian", "--prior", PRIOR, "-o", str(tmp_path / "c"), *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
