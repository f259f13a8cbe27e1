"""``ganflow bench --quick``: runs, writes the documented records; its linear-Gaussian flow is accurate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ganflow.bench import sliced_wasserstein
from ganflow.errors import GanflowError
from ganflow.prior.report import sliced_wasserstein as report_swd
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior

METHOD_KEYS = {
    "problem",
    "method",
    "latent_mean_err_sd",
    "latent_sd_rel_err_median",
    "latent_sd_rel_err_max",
    "field_mean_rel_err",
    "field_std_rel_err",
    "distance",
    "n_forward_evals",
    "fit_wall_s",
    "samples_per_s",
}
HEADER_KEYS = {"cpu_model", "cores", "torch_version", "torch_threads", "date", "load_average_start"}


def _swd_bench(a, b, n_proj, seed):
    return sliced_wasserstein(a, b, n_proj, seed=seed)


def _swd_report(a, b, n_proj, seed):
    return report_swd(torch.from_numpy(a), torch.from_numpy(b), n_proj, torch.Generator().manual_seed(seed))


# A shift d of a whole cloud shifts every 1-D projection by v.d, so each direction's squared W2 is (v.d)^2
# exactly and SWD^2 = mean over the P directions of (v.d)^2, whose expectation over unit v in D dimensions is
# |d|^2 / D. One direction's (v.d)^2 has sd sqrt(2 (D - 1) / (D + 2)) = 1.07 times its mean (D = 5), so SWD^2
# carries a relative Monte-Carlo error 1.07 / sqrt(P) and SWD half of it (0.84 % for P = 4096); 4 SE = 3.3 %.
# A W1 in place of W2 (E|v.d| = 0.84 sqrt(|d|^2 / D) for D = 5) or a missing square root (SWD^2 = 2.85 SWD
# here) is far outside.
SHIFT = np.array([2.0, -1.0, 0.5, 3.0, 0.0])
N_PROJ = 4096


@pytest.mark.parametrize("swd", [_swd_bench, _swd_report], ids=["bench", "prior_report"])
def test_sliced_wasserstein_of_a_shifted_cloud_is_analytic(swd):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1000, SHIFT.size)) * np.array([1.0, 2.0, 0.5, 1.0, 3.0])  # any cloud will do
    exact = np.sqrt(SHIFT @ SHIFT / SHIFT.size)
    se = 0.5 * np.sqrt(2 * (SHIFT.size - 1) / (SHIFT.size + 2)) / np.sqrt(N_PROJ) * exact
    got = swd(a, a + SHIFT, N_PROJ, 1)
    assert abs(got - exact) < 4 * se, (got, exact, se)
    assert swd(a, a, 64, 1) == 0.0 and swd(a, a + SHIFT, N_PROJ, 1) == got  # seeded


def test_sliced_wasserstein_separates_independent_shifted_clouds():
    """Independent Gaussian clouds of unequal sizes (the bench subsamples the larger): for sorted 1-D samples
    W2^2(p, q + c) = W2^2(p, q) + c^2 + 2 c (mean q - mean p), so SWD(a, b + d)^2 = SWD(a, b)^2 + |d|^2 / D up
    to the directions' Monte-Carlo error (2.4 % of |d|^2 / D for P = 2048) and the cross term with the
    clouds' mean difference (sd ~ 2 |d| sqrt(2 / 6000) / D ~ 1 % here)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8000, SHIFT.size)), rng.standard_normal((6000, SHIFT.size))
    same = sliced_wasserstein(a, b, 2048, seed=1)
    shifted = sliced_wasserstein(a, b + SHIFT, 2048, seed=1)
    assert same < 0.05  # the sampling floor: W2 between two empirical N(0, 1) samples of 6000
    excess, exact = shifted**2 - same**2, SHIFT @ SHIFT / SHIFT.size
    assert abs(excess - exact) < 0.1 * exact, (excess, exact)


def test_pixel_wasserstein1_matches_scipy():
    """`pixel_wasserstein1` (issue 20's headline figure) against scipy's 1-D W1 of the pooled pixel values, in
    units of the reference sample's sd, and against the analytic W1 = |mu| of N(0, 1) vs N(mu, 1)."""
    from scipy.stats import wasserstein_distance

    from ganflow.prior import report

    rng = np.random.default_rng(0)
    a, b = rng.gamma(2.0, size=(300, 4, 4)), 1.5 * rng.standard_normal((300, 4, 4)) + 0.3
    ref = wasserstein_distance(a.ravel(), b.ravel()) / b.std(ddof=1)
    assert report.pixel_wasserstein1(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-10)
    # N(0, 1) vs N(0.5, 1), 200,000 values each: W1 = 0.5; sorted-sample W1 error ~ 1 / sqrt(n) = 0.002
    x, y = rng.standard_normal(200_000), rng.standard_normal(200_000) + 0.5
    assert report.pixel_wasserstein1(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(GanflowError, match="equal sizes"):
        report.pixel_wasserstein1(torch.zeros(3), torch.zeros(4))


def _bench_observation_posterior():
    """The exact posterior of the bench's linear-Gaussian case, rebuilt as the bench documents it: a truth
    drawn from the prior with seed 0, observed at the demo's noise level."""
    from ganflow.demo import DEMOS
    from ganflow.simulate import simulate

    spec = DEMOS["linear_gaussian"]
    p = LinearGaussianProblem()
    G, A = p.generator(), p.make_operator(**spec.operator_kwargs)
    obs = simulate("linear_gaussian", prior=G, operator_kwargs=spec.operator_kwargs,
                   problem_kwargs=spec.problem_kwargs, noise_relative=spec.noise_relative, seed=0)
    return exact_posterior(G, A, obs.y, obs.noise_sigma), obs.z_true.double().numpy()


def _quadratic_form_bound(cov: np.ndarray) -> float:
    """Mean + 4 sd of ||e||^2 for e ~ N(0, cov): tr(cov) + 4 (2 tr(cov^2))^(1/2)."""
    return float(np.trace(cov) + 4 * np.sqrt(2 * np.sum(cov * cov)))


def _swd_null(ex, n: int, n_proj: int, reps: int = 40) -> tuple[float, float]:
    """Mean and sd of the bench's distance (SWD of sd-standardised clouds) between two independent n-draw
    samples of the exact posterior: numpy, own projections."""
    rng = np.random.default_rng(5)
    chol = np.linalg.cholesky(ex.latent_cov) / ex.latent_std[:, None]
    k = chol.shape[0]
    vals = []
    for _ in range(reps):
        a, b = (rng.standard_normal((n, k)) @ chol.T for _ in range(2))
        v = rng.standard_normal((k, n_proj))
        v /= np.linalg.norm(v, axis=0)
        vals.append(np.sqrt(np.mean((np.sort(a @ v, 0) - np.sort(b @ v, 0)) ** 2)))
    return float(np.mean(vals)), float(np.std(vals))


def test_bench_quick_linear_gaussian(cli, tmp_path):
    out = tmp_path / "bench"
    r = cli("bench", "--quick", "--problem", "linear_gaussian", "--seed", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    records = json.loads((out / "results.json").read_text())
    header = records[0]
    assert header["method"] == "header" and HEADER_KEYS <= set(header)
    methods = {r["method"]: r for r in records if r["problem"] == "linear_gaussian"}
    for m in ("nuts", "flow", "langevin", "flow+langevin"):
        assert METHOD_KEYS <= set(methods[m]), m
    flow, nuts = methods["flow"], methods["nuts"]
    ex, z_true = _bench_observation_posterior()
    # the same observation as the bench's: its reference's distance from the truth agrees
    assert nuts["reference"] == "exact"
    assert nuts["z_true_err_sd"] == pytest.approx(np.max(np.abs(ex.latent_mean - z_true) / ex.latent_std), rel=1e-4)
    # The flow against the exact posterior, tolerances from the Monte-Carlo error of n = 1,000 draws: a mean
    # is within 4 sd / sqrt(n) (0.126 sd), an sd within 4 / sqrt(2n) (8.9 %); the field mean and std maps'
    # squared errors within mean + 4 sd of their sampling distributions (covariance Sigma_x / n of the mean
    # map; of the std map, by the delta method, s_i s_j rho_ij^2 / (2n)).
    n = flow["n_draws"]
    assert flow["latent_mean_err_sd"] < 4 / np.sqrt(n), flow["latent_mean_err_sd"]
    assert flow["latent_sd_rel_err_max"] < 4 / np.sqrt(2 * n), flow["latent_sd_rel_err_max"]
    cov_x, m_x = ex.field_cov, ex.field_mean.ravel()
    s_x = np.sqrt(np.diag(cov_x))
    assert (flow["field_mean_rel_err"] * np.linalg.norm(m_x)) ** 2 < _quadratic_form_bound(cov_x / n)
    cov_s = cov_x**2 / (2 * n * np.outer(s_x, s_x))  # = s_i s_j rho_ij^2 / (2n)
    assert (flow["field_std_rel_err"] * np.linalg.norm(s_x)) ** 2 < _quadratic_form_bound(cov_s)
    # the distance and its baseline against the null distribution of the same statistic (exact vs exact)
    null_mean, null_sd = _swd_null(ex, n, 64)
    assert abs(flow["distance_ref_baseline"] - null_mean) < 4 * null_sd, (flow["distance_ref_baseline"], null_mean)
    assert flow["distance"] < null_mean + 4 * null_sd, (flow["distance"], null_mean, null_sd)
    # cost records: each step of the fit evaluates a batch; fit times fit inside the run; ratios are ratios
    assert flow["n_forward_evals"] >= flow["iterations"] * flow["settings"]["batch_size"]
    for m in ("nuts", "flow", "langevin"):
        assert 0 < methods[m]["fit_wall_s"] < header["total_wall_s"], m
    overhead = methods["flow_overhead"]
    assert overhead["overhead_ratio"] == pytest.approx(overhead["flow_step_s"] / overhead["bare_value_and_grad_s"])
    throughput = [r for r in records if r["method"] == "operator_throughput"]
    assert {r["problem"] for r in throughput} == {"elliptic", "phase_retrieval"}
    for t in throughput:
        other = t.get("scipy_solves_per_s", t.get("numpy_solves_per_s"))
        assert t["speedup"] == pytest.approx(t["ganflow_solves_per_s"] / other)
    # every target's verdict is its measured value against its goal
    targets = [r for r in records if r["method"] == "target"]
    assert any("mean error" in t["target"] for t in targets)
    for t in targets:
        op, goal = t["goal"].split()
        assert t["met"] == {"<=": t["measured"] <= float(goal), "<": t["measured"] < float(goal),
                            ">=": t["measured"] >= float(goal)}[op], t
    md = (out / "results.md").read_text()
    assert "| linear_gaussian | flow (" in md and "speed-up" in md
    # accuracy along the fit: the Laplace start (step 0) first, monotone clock, and the time to the targets
    # is the first checkpoint meeting both
    trace = flow["accuracy_trace"]
    assert trace[0]["step"] == 0 and [t["step"] for t in trace] == sorted(t["step"] for t in trace)
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(trace, trace[1:], strict=False))
    first = next((t for t in trace if t["latent_mean_err_sd"] <= 0.1 and t["latent_sd_rel_err_max"] <= 0.1), None)
    assert flow["time_to_target_s"] == (first["elapsed_s"] if first else None)
    # runs made separately (one problem per process) merge into one table, targets recomputed
    merged = tmp_path / "merged"
    r = cli("bench", "--merge", out, "-o", merged)
    assert r.returncode == 0, r.stderr
    again = json.loads((merged / "results.json").read_text())
    assert [x["method"] for x in again if x["method"] != "header"] == [x["method"] for x in records[1:]]


def test_bench_rejects_unknown_problem(cli, tmp_path):
    r = cli("bench", "--problem", "nope", "-o", tmp_path / "x")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1


def test_bench_jobs_runs_parts_in_processes_and_merges(cli, tmp_path):
    """--jobs: each problem in its own `ganflow bench` process, then one merged table; the merged flow record
    is the part's record unchanged."""
    out = tmp_path / "bench"
    r = cli("bench", "--quick", "--jobs", "2", "--no-throughput", "--problem", "linear_gaussian", "-o", out)
    assert r.returncode == 0, r.stderr
    part = json.loads((out / "parts" / "linear_gaussian" / "results.json").read_text())
    merged = json.loads((out / "results.json").read_text())
    flow = next(x for x in merged if x.get("method") == "flow")
    assert flow == next(x for x in part if x.get("method") == "flow")
    assert any(x.get("method") == "target" for x in merged)
    assert "| linear_gaussian | flow (" in (out / "results.md").read_text()
    bad = cli("bench", "--jobs", "0", "-o", tmp_path / "b2")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--jobs" in bad.stderr


def test_refiner_targets_compare_with_the_flow_judged_beyond_the_reference_error():
    from ganflow.bench.targets import _targets

    flow = {"problem": "phase_retrieval", "method": "flow", "latent_mean_err_sd": 0.11,
            "latent_sd_rel_err_max": 0.064}
    refined = {"problem": "phase_retrieval", "method": "flow+langevin", "latent_mean_err_sd": 0.10,
               "latent_sd_rel_err_max": 0.081}

    def refiner_rows(rhat, split=None):
        nuts = {"problem": "phase_retrieval", "method": "nuts", "rhat_max": rhat, "ess_min": 2000.0,
                "reference": "stored", **({"reference_self_split": split} if split else {})}
        rows = _targets([flow, refined, nuts])
        return [r for r in rows if r["target"].startswith("refiner")]

    rows = refiner_rows(1.004)
    assert [r["met"] for r in rows] == [True, False]  # mean 0.10 <= 0.11; sd 8.1 % > 6.4 %
    assert rows[1]["target"] == "refiner latent sd rel. error (max) vs the flow's" and rows[1]["goal"] == "<= 0.064"
    assert all(r["met"] is None for r in refiner_rows(1.2))  # the plan's short NUTS run: never judged
    # A long unconverged run whose own halves differ by d: a difference beyond 2 d is judged either way, within not.
    # mean: 0.10 vs 0.11 (margin 0.008): met; sd: 8.1 % vs 6.4 % (margin 0.006): missed
    assert [r["met"] for r in refiner_rows(1.2, {"mean_sd": 0.004, "sd_rel": 0.003})] == [True, False]
    assert [r["met"] for r in refiner_rows(1.2, {"mean_sd": 0.006, "sd_rel": 0.009})] == [None, None]
    assert "R-hat 1.20" in refiner_rows(1.2, {"mean_sd": 0.0, "sd_rel": 0.0})[0]["target"]


def test_smc_reference_is_judged_by_its_runs_agreement_not_r_hat():
    """A stored SMC reference (R-hat over short particle chains reads ~1.1 by construction) judges the flow when
    its independent runs agree, and judges nothing when they disagree; its own target is the runs' agreement."""
    from ganflow.bench.targets import _targets

    flow = {"problem": "elliptic", "method": "flow", "latent_mean_err_sd": 0.05, "latent_sd_rel_err_max": 0.5}

    def rows(agree: bool):
        nuts = {"problem": "elliptic", "method": "nuts", "rhat_max": 1.12, "ess_min": 3000.0, "reference": "stored",
                "reference_sampler": "smc", "reference_converged": agree,
                "run_agreement": {"0-1": {"mean_sd": 0.04 if agree else 0.3}}}
        return _targets([flow, nuts])

    ok = rows(True)
    flow_rows = [r for r in ok if r["target"].startswith("flow latent")]
    assert [r["met"] for r in flow_rows] == [True, False] and "not converged" not in flow_rows[0]["target"]
    assert not any("R-hat" in r["target"] for r in ok)
    ref_row = [r for r in ok if r["target"].startswith("SMC reference")]
    assert len(ref_row) == 1 and ref_row[0]["met"] is True and ref_row[0]["measured"] == 0.04
    bad = rows(False)
    assert all(r["met"] is None for r in bad if r["target"].startswith("flow latent"))
    assert all(r["target"].endswith("(SMC reference: its independent runs disagree)")
               for r in bad if r["target"].startswith("flow latent"))
    assert [r["met"] for r in bad if r["target"].startswith("SMC reference")] == [False]
