"""``ganflow bench --quick``: runs, writes the documented records; its linear-Gaussian flow is accurate."""

from __future__ import annotations

import json

import numpy as np

from ganflow.bench import sliced_wasserstein

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


def test_sliced_wasserstein_separates_shifted_clouds():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2000, 5)), rng.standard_normal((1500, 5))
    same = sliced_wasserstein(a, b, 64, seed=1)
    shifted = sliced_wasserstein(a, b + 1.0, 64, seed=1)
    assert same < 0.15
    # a unit shift in every coordinate projects to |<1, u>| ~ 1 on average over unit directions u
    assert shifted > 5 * same
    assert sliced_wasserstein(a, b, 64, seed=1) == same  # seeded


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
    flow = methods["flow"]
    # Against the exact posterior, 1,000 flow draws: Monte-Carlo error alone is ~0.03 sd per coordinate.
    assert flow["latent_mean_err_sd"] < 0.2
    assert flow["latent_sd_rel_err_max"] < 0.2
    assert flow["field_mean_rel_err"] < 0.05
    assert flow["distance"] < 2 * flow["distance_ref_baseline"] + 0.05
    assert flow["n_forward_evals"] > 0 and flow["fit_wall_s"] > 0 and flow["samples_per_s"] > 0
    overhead = methods["flow_overhead"]
    assert overhead["overhead_ratio"] > 0 and overhead["bare_value_and_grad_s"] > 0
    throughput = [r for r in records if r["method"] == "operator_throughput"]
    assert {r["problem"] for r in throughput} == {"elliptic", "phase_retrieval"}
    assert all(r["speedup"] > 0 for r in throughput)
    targets = [r for r in records if r["method"] == "target"]
    assert any("mean error" in t["target"] for t in targets)
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
