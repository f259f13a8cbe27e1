"""Simulation-based calibration on linear_gaussian: nominal coverage with the flow, and detection of a
deliberately overconfident posterior (--shrink)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ganflow.calibrate import CalibrateSettings, calibrate, rank_uniformity
from ganflow.simulate import simulate

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


# The flow under test starts from the identity, not from the Laplace approximation (exact on this problem, so
# a Laplace-started flow would pass whatever its training did): 100 steps of a 4-layer flow reach about 0.06 sd
# and 5 % in sd per truth (measured against the exact posterior).
FITTED = {
    "flow": {"init": "identity", "max_iter": 100, "min_iter": 100, "warmup": 10, "lr": 1e-2, "n_layers": 4,
             "hidden": 32},
    "solve": {"n_samples": 1000, "n_quantile": 1000},
}
NOISE_SIGMA = 0.3  # absolute (about 0.1 max |A(x)| for prior truths), so every truth has the same posterior covariance


def _exact_posterior_zero_obs():
    """The exact posterior for y = 0 (its covariance is that of every observation: linear-Gaussian)."""
    from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior

    p = LinearGaussianProblem()
    G, A = p.generator(), p.make_operator()
    return G, exact_posterior(G, A, torch.zeros(A.obs_shape), NOISE_SIGMA)


def _sbc_coverage_se(n_truths: int, n_sim: int = 20_000) -> dict:
    """Standard errors of the pooled coverages of an exact posterior, by simulation (numpy).

    On linear_gaussian the posterior covariance Sigma does not depend on y, and with z* ~ prior, y ~ p(y|z*),
    z* - E[z|y] ~ N(0, Sigma). So each truth's indicators 1{|u_j| <= z_(level)} over the latent coordinates
    (u = (z* - mu) / sd) and over the field entries (x = W z + b) are correlated draws whose pooled mean has a
    variance we simulate; over T truths it shrinks by T."""
    G, ex = _exact_posterior_zero_obs()
    W = G.W.double().numpy()
    rng = np.random.default_rng(0)
    u = rng.standard_normal((n_sim, ex.latent_cov.shape[0])) @ np.linalg.cholesky(ex.latent_cov).T
    scaled = {"latent": np.abs(u) / ex.latent_std, "field": np.abs(u @ W.T) / np.sqrt(np.diag(ex.field_cov))}
    return {
        kind: {str(int(100 * lvl)): float((a <= norm.ppf(0.5 + lvl / 2)).mean(1).std() / np.sqrt(n_truths))
               for lvl in (0.5, 0.9, 0.95)}
        for kind, a in scaled.items()
    }


def test_flow_posterior_is_calibrated():
    """SBC of a flow fitted from the identity: each pooled coverage within 4 standard errors of nominal (both
    directions: over- and under-coverage), the standard errors those of an exact posterior's SBC.

    Coverage alone cannot tell the posterior from the prior (the prior is calibrated too), so the flow's
    posterior-mean fields must also be as close to the truths as the exact posterior's: under it the error
    x* - E[x|y] ~ N(0, Sigma_x), so the mean over T truths of ||mean - x*||^2 is tr(Sigma_x) (1 + 1/N for the
    mean of N draws) with se (2 tr(Sigma_x^2) / T)^(1/2); within 4 se, both directions."""
    T = 16
    settings = CalibrateSettings(n_truths=T, noise_sigma=NOISE_SIGMA)
    out = calibrate("linear_gaussian", PRIOR, settings, FITTED, seed=0)
    assert out["n_indicators"] == {"latent": T * 16, "field": T * 256}
    assert out["solve_config"]["flow"]["init"] == "identity"
    se = _sbc_coverage_se(T)
    for kind in ("latent", "field"):
        for lvl in ("50", "90", "95"):
            got, nominal = out["coverage"][kind][lvl], int(lvl) / 100
            assert abs(got - nominal) < 4 * se[kind][lvl], (kind, lvl, got, se[kind][lvl])
    G, ex = _exact_posterior_zero_obs()
    sq_err = []
    for t, row in enumerate(out["per_truth"]):  # truth t was simulated with seed 100_003 seed + t (here t)
        x_true = simulate("linear_gaussian", prior=G, noise_sigma=NOISE_SIGMA, seed=t).x_true.double().numpy()
        sq_err.append((row["rel_l2_error"] * np.linalg.norm(x_true)) ** 2)
    cov_x = ex.field_cov
    expected = np.trace(cov_x) * (1 + 1 / FITTED["solve"]["n_samples"])
    se_sq = np.sqrt(2 * np.sum(cov_x * cov_x) / T)
    assert abs(np.mean(sq_err) - expected) < 4 * se_sq, (np.mean(sq_err), expected, se_sq)
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


def test_smc_from_flow_is_calibrated():
    """SBC with ``method = "smc"`` tempering from the flow (the correction of issue 34): the FITTED flow cut to
    20 steps is too narrow on its own; the SMC moves restore nominal latent coverage, within 4 exact-SBC
    standard errors both ways (measured 0.97 at 95 %). The 20-step flow alone covers 0.71 at 95 %: what the test
    would see if calibrate ignored the method."""
    T = 8
    cfg = {**FITTED, "flow": {**FITTED["flow"], "max_iter": 20, "min_iter": 20},
           "smc": {"start": "flow", "n_particles": 500, "progress": False}}
    out = calibrate("linear_gaussian", PRIOR, CalibrateSettings(n_truths=T, noise_sigma=NOISE_SIGMA, method="smc"),
                    cfg, seed=1)
    assert out["method"] == "smc" and out["solve_config"]["smc"]["start"] == "flow"
    se = _sbc_coverage_se(T)
    for lvl in ("90", "95"):
        got, nominal = out["coverage"]["latent"][lvl], int(lvl) / 100
        assert abs(got - nominal) < 4 * se["latent"][lvl], (lvl, got, se["latent"][lvl])


class _Stop(Exception):
    pass


def _stop_after(n: int):
    calls = []

    def progress(line: str) -> None:
        calls.append(line)
        if len(calls) == n:
            raise _Stop(line)

    return progress


@pytest.mark.parametrize("held_out", [False, True], ids=["prior-truths", "held-out-recalibrate"])
def test_calibration_resumes_where_it_stopped(tmp_path, held_out):
    """A calibration stopped after 2 of 4 truths and resumed from its checkpoint gives what the uninterrupted
    run gives (same machine: every truth's seeds depend on its index only), with the recalibration learnt from
    all 4 truths' intervals; a leftover checkpoint is never silently restarted or continued with other settings."""
    from ganflow.errors import GanflowError

    T, ckpt = 4, tmp_path / "c" / "calibration.ckpt"
    extra = {}
    if held_out:
        G, _ = _exact_posterior_zero_obs()
        np.save(tmp_path / "truths.npy", G(torch.randn(T, 16, generator=torch.Generator().manual_seed(5))).numpy())
        extra = {"truths": tmp_path / "truths.npy", "recalibrate": True}
    settings = CalibrateSettings(n_truths=T, noise_sigma=NOISE_SIGMA)
    whole = calibrate("linear_gaussian", PRIOR, settings, CHEAP, seed=3, **extra)
    with pytest.raises(_Stop):
        calibrate("linear_gaussian", PRIOR, settings, CHEAP, seed=3, progress=_stop_after(2), checkpoint=ckpt,
                  **extra)
    with pytest.raises(GanflowError, match=r"interrupted calibration \(2 truths done\).*--resume"):
        calibrate("linear_gaussian", PRIOR, settings, CHEAP, seed=3, checkpoint=ckpt, **extra)
    with pytest.raises(GanflowError, match="made by another calibration"):
        calibrate("linear_gaussian", PRIOR, settings, CHEAP, seed=4, checkpoint=ckpt, resume=True, **extra)
    lines = []
    resumed = calibrate("linear_gaussian", PRIOR, settings, CHEAP, seed=3, progress=lines.append, checkpoint=ckpt,
                        resume=True, **extra)
    assert [ln.split(":")[0] for ln in lines] == ["truth 3/4", "truth 4/4"]  # only the truths left were solved
    assert not ckpt.exists()
    assert [r["truth"] for r in resumed["per_truth"]] == list(range(T))
    for a, b in zip(resumed["per_truth"], whole["per_truth"], strict=True):
        np.testing.assert_allclose([a[k] for k in a if k != "wall_time_s"], [b[k] for k in b if k != "wall_time_s"],
                                   rtol=1e-9)
    for kind, cov in whole["coverage"].items():
        assert resumed["coverage"][kind] == pytest.approx(cov, abs=1e-12)
    for kind in resumed["_ranks"]:
        np.testing.assert_array_equal(resumed["_ranks"][kind], whole["_ranks"][kind])
    if held_out:
        assert resumed["recalibration"]["n_learn"] == 2 and resumed["recalibration"]["n_check"] == 2
        assert resumed["recalibration"]["scale"] == pytest.approx(whole["recalibration"]["scale"], rel=1e-9)
        assert resumed["recalibration"]["problem"] == "linear_gaussian"


def test_cli_calibrate_resume_without_a_checkpoint_is_one_line(tmp_path, cli):
    r = cli("calibrate", "--problem", "linear_gaussian", "--prior", PRIOR, "--resume", "-o", str(tmp_path / "c"))
    assert r.returncode == 2 and "no checkpoint of an interrupted calibration" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
