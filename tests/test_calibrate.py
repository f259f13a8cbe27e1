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


def test_rank_uniformity_test_against_scipy():
    rng = np.random.default_rng(0)
    uniform = rank_uniformity(rng.integers(0, 100, size=5000), 99, 10)
    assert uniform["p_value"] > 0.01 and sum(uniform["counts"]) == 5000
    peaked = rank_uniformity(np.clip(rng.normal(50, 10, size=5000).round(), 0, 99), 99, 10)
    assert peaked["p_value"] < 1e-10


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
