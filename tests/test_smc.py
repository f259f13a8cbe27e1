"""Tempered SMC (`ganflow.posterior.smc`) against exact posteriors and evidences, and broken variants that fail.

References that do not come from the code under test: the curved and two-mode problems by quadrature
(tests/exact_problems.py; ``log p(y)`` is the grid sum of ``p(y | z) p(z)`` times the cell area) and the
linear-Gaussian problem in closed form (posterior from `exact_posterior`, evidence ``y ~ N(A b, H H^T + sigma^2
I)`` by scipy).

The checks, on ``N`` final particles: each whitened statistic (curved, twin: as tests/test_exact_posteriors.py;
linear-Gaussian: every coordinate's mean and variance) within 4 standard errors, the error computed for
``N * EFFICIENCY`` independent draws. The particles are not independent (resampling duplicates them and the moves
decorrelate them only down to ``max_correlation``); the efficiencies are measured: over 20 seeds (N = 1,000) the
spread of the particle means was up to 1.3 times the independent-draw error on curved, 1.7 on the twin's ``z_1``
(which mode a particle sits in is settled in the early stages). ``log p(y)`` within 4 of its own ``log_evidence_se``
(measured: spread over seeds / mean error estimate 1.02 curved, 0.74 twin, 1.02 linear-Gaussian).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from exact_problems import curved_problem, log_posterior_grid, quadrature_moments, twin_problem
from scipy.stats import multivariate_normal

from ganflow.errors import GanflowError
from ganflow.posterior import LatentTarget
from ganflow.posterior import smc as smc_mod
from ganflow.posterior.smc import SmcSettings, run_smc
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior

N = 1000
EFFICIENCY = {"curved": 0.5, "twin": 0.25, "linear_gaussian": 0.5}


def _grid_log_evidence(p) -> float:
    """``log p(y) = log sum_grid p(y | z) p(z) dA`` with the constants `LatentTarget` includes (m = k = 2)."""
    z1, _, lp = log_posterior_grid(p)
    cell = (z1[1, 0] - z1[0, 0]) ** 2
    top = lp.max()
    return float(top + np.log(np.exp(lp - top).sum() * cell) - np.log(2 * np.pi * p.noise_sigma**2) - np.log(2 * np.pi))


@pytest.fixture(scope="module")
def exact2d():
    out = {}
    for p in (curved_problem(), twin_problem()):
        out[p.name] = (p, quadrature_moments(p), _grid_log_evidence(p))
    return out


@pytest.fixture(scope="module")
def linear():
    """k = 16, sigma = 0.05: posterior sds 0.006-0.065 (a 15-150x contraction of the prior), ~36 stages."""
    p = LinearGaussianProblem(latent_dim=16)
    G, A = p.generator(), p.make_operator()
    g = torch.Generator().manual_seed(0)
    sigma = 0.05
    with torch.no_grad():
        y = A(G(torch.randn(1, 16, generator=g)))[0] + sigma * torch.randn(A.obs_shape, generator=g)
    ex = exact_posterior(G, A, y, sigma)
    M, W, b = A.M.double().numpy(), G.W.double().numpy(), G.b.double().numpy()
    log_z = multivariate_normal(M @ b, M @ W @ W.T @ M.T + sigma**2 * np.eye(len(y))).logpdf(y.double().numpy())
    return G, A, y, sigma, ex, float(log_z)


def _run(target, seed: int = 0, **kw):
    return run_smc(target, SmcSettings(**{"n_particles": N, "progress": False, **kw}),
                   torch.Generator().manual_seed(seed))


def _failures_2d(fit, ref: dict, log_z: float, efficiency: float) -> list[str]:
    """The checks that fail on a 2-D exact problem: whitened moments and the evidence (module docstring)."""
    lam, V = np.linalg.eigh(ref["cov"])
    u = (fit.samples.double().numpy() - ref["mean"]) @ V / np.sqrt(lam)
    series = np.stack([u[:, 0], u[:, 1], u[:, 0] ** 2 - 1, u[:, 1] ** 2 - 1, u[:, 0] * u[:, 1]], 1)
    se = series.std(0) / math.sqrt(len(u) * efficiency)
    bad = [f"moment {i}: {m:.3f} vs se {e:.3f}" for i, (m, e) in enumerate(zip(series.mean(0), se, strict=True))
           if not abs(m) < 4 * e]
    return bad + _evidence_failure(fit, log_z)


def _evidence_failure(fit, log_z: float) -> list[str]:
    est, se = fit.attrs["log_evidence"], fit.attrs["log_evidence_se"]
    return [] if abs(est - log_z) < 4 * se else [f"log evidence {est:.3f} vs exact {log_z:.3f}, se {se:.3f}"]


def _failures_linear(fit, ex, log_z: float) -> list[str]:
    """Every coordinate's mean and variance within 4 se of the closed form, and the evidence."""
    z = fit.samples.double().numpy()
    n = len(z) * EFFICIENCY["linear_gaussian"]
    sd = ex.latent_std
    mean_err = np.abs(z.mean(0) - ex.latent_mean) / (sd / math.sqrt(n))
    var_err = np.abs(z.var(0) / sd**2 - 1) / math.sqrt(2 / n)
    bad = [f"mean {i}: {e:.1f} se" for i, e in enumerate(mean_err) if not e < 4]
    bad += [f"variance {i}: {e:.1f} se" for i, e in enumerate(var_err) if not e < 4]
    return bad + _evidence_failure(fit, log_z)


@pytest.mark.parametrize("name", ["curved", "twin"])
def test_smc_matches_quadrature_moments_and_evidence(exact2d, name):
    p, ref, log_z = exact2d[name]
    fit = _run(LatentTarget(p.generator, p.operator, p.y, p.noise_sigma))
    assert fit.attrs["n_stages"] >= 2 and fit.trace["beta"][-1] == 1.0
    assert _failures_2d(fit, ref, log_z, EFFICIENCY[name]) == []


def test_smc_matches_linear_gaussian_closed_form(linear):
    G, A, y, sigma, ex, log_z = linear
    fit = _run(LatentTarget(G, A, y, sigma))
    assert np.all(np.diff(fit.trace["beta"]) > 0) and fit.attrs["n_stages"] > 10
    assert 0.3 < fit.attrs["acceptance_rate"] < 0.9
    assert _failures_linear(fit, ex, log_z) == []


def _no_reweighting(monkeypatch):
    monkeypatch.setattr(smc_mod, "_incremental_log_weights", lambda ll, b, b_new: torch.zeros_like(ll))


def _jump_to_one(monkeypatch):
    monkeypatch.setattr(smc_mod, "_next_beta", lambda ll, b, ess: 1.0)


def _no_moves(monkeypatch):
    monkeypatch.setattr(smc_mod, "_move", lambda target, z, frame, beta, step, s, g, *a: (
        z, step, {"moves": 0, "acceptance": math.nan, "correlation": 1.0}))


@pytest.mark.parametrize("breakage, fails", [(_no_reweighting, "log evidence"), (_jump_to_one, "log evidence"),
                                             (_no_moves, "variance")])
def test_broken_smc_fails_the_same_checks(linear, monkeypatch, breakage, fails):
    """No reweighting (the evidence sums nothing), a schedule that jumps to b = 1 (importance sampling from the
    prior: ESS ~ 1, then moves from a handful of points) and no moves (the particles collapse onto a few prior
    draws) each fail the linear-Gaussian checks that the intact sampler passes."""
    G, A, y, sigma, ex, log_z = linear
    breakage(monkeypatch)
    failures = _failures_linear(_run(LatentTarget(G, A, y, sigma), max_moves=20), ex, log_z)
    assert any(f.startswith(fails) for f in failures), failures


def _narrow_start(ex, scale: float = 0.5, shift: float = 0.5):
    """A start law like a reverse-KL flow's: independent normals with ``scale`` times the posterior sds, centred
    ``shift`` sds off; its sampler and ``log q``."""
    mean = torch.as_tensor(ex.latent_mean, dtype=torch.float64) + shift * torch.as_tensor(ex.latent_std)
    q = torch.distributions.Normal(mean, scale * torch.as_tensor(ex.latent_std, dtype=torch.float64))
    return (lambda n, g: q.mean + q.stddev * torch.randn(n, len(mean), generator=g, dtype=torch.float64),
            lambda z: q.log_prob(z.double()).sum(1))


def _from_start(target, init, log_q, **kw):
    s = SmcSettings(**{"n_particles": N, "progress": False, "start": "flow", **kw})
    return run_smc(target, s, torch.Generator().manual_seed(0), init=init, init_log_prob=log_q)


def test_smc_from_a_too_narrow_start_recovers_the_closed_form(linear, monkeypatch):
    """Tempering from a start law half as wide as the posterior and half an sd off (what a reverse-KL flow
    gives) through ``q^(1 - b) p(y, z)^b``: the closed-form moments and evidence, in fewer stages than from the
    prior. Weights that forget ``p(z) / q(z)`` (tempering as if ``q`` were the prior) fail."""
    G, A, y, sigma, ex, log_z = linear
    target = LatentTarget(G, A, y, sigma)
    fit = _from_start(target, *_narrow_start(ex))
    assert _failures_linear(fit, ex, log_z) == []
    assert 2 <= fit.attrs["n_stages"] < 18  # from the prior: 36 (measured 9 from this start)
    real = smc_mod._log_likelihood
    monkeypatch.setattr(smc_mod, "_log_likelihood", lambda target, z, log_q=None: real(target, z))
    failures = _failures_linear(_from_start(target, *_narrow_start(ex)), ex, log_z)
    assert any(f.startswith("log evidence") for f in failures), failures


def test_smc_start_needs_its_flow_and_resumes_only_from_it(linear, tmp_path):
    G, A, y, sigma, ex, _ = linear
    target = LatentTarget(G, A, y, sigma)
    with pytest.raises(GanflowError, match="needs the flow"):
        run_smc(target, SmcSettings(n_particles=50, progress=False, start="flow"))
    with pytest.raises(GanflowError, match="takes neither"):
        run_smc(target, SmcSettings(n_particles=50, progress=False), init=_narrow_start(ex)[0],
                init_log_prob=_narrow_start(ex)[1])
    ckpt = str(tmp_path / "smc.ckpt")
    s = SmcSettings(n_particles=100, progress=False, start="flow", max_stages=1)
    with pytest.raises(GanflowError, match="max_stages"):
        run_smc(target, s, checkpoint_path=ckpt, init=_narrow_start(ex)[0], init_log_prob=_narrow_start(ex)[1])
    with pytest.raises(GanflowError, match="another flow"):
        run_smc(target, dataclasses.replace(s, max_stages=50), checkpoint_path=ckpt, resume=True,
                init=_narrow_start(ex, shift=0.6)[0], init_log_prob=_narrow_start(ex, shift=0.6)[1])
    fit = run_smc(target, dataclasses.replace(s, max_stages=50), checkpoint_path=ckpt, resume=True,
                  init=_narrow_start(ex)[0], init_log_prob=_narrow_start(ex)[1])
    assert fit.trace["beta"][-1] == 1.0


def _interrupted_run(monkeypatch, step: str, after: int, target, s, seed: int, ckpt: str) -> None:
    """A checkpointed run killed (KeyboardInterrupt) when ``smc.<step>`` is called for the ``after + 1``-th time,
    i.e. after ``after`` completed calls and their checkpoints; the real function is restored after."""
    real, calls = getattr(smc_mod, step), []

    def dying(*a):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(smc_mod, step, dying)
    with pytest.raises(KeyboardInterrupt):
        run_smc(target, s, torch.Generator().manual_seed(seed), checkpoint_path=ckpt)
    monkeypatch.setattr(smc_mod, step, real)


def test_resume_after_an_interrupted_stage_is_bit_identical(tmp_path, monkeypatch):
    """A run killed after its third stage boundary (the checkpoint is renamed into place before the next stage
    starts) and resumed ends exactly as the uninterrupted run; other settings or data are refused."""
    p = curved_problem()
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    s = SmcSettings(n_particles=300, target_ess=0.9, progress=False)
    whole = run_smc(target, s, torch.Generator().manual_seed(5))
    ckpt = str(tmp_path / "smc.ckpt")
    _interrupted_run(monkeypatch, "_stage", 3, target, s, 5, ckpt)
    resumed = run_smc(target, s, torch.Generator().manual_seed(123), checkpoint_path=ckpt, resume=True)
    assert torch.equal(whole.samples, resumed.samples)
    assert whole.attrs["log_evidence"] == resumed.attrs["log_evidence"]
    assert np.array_equal(whole.trace["beta"], resumed.trace["beta"])
    with pytest.raises(GanflowError, match="target_ess"):
        run_smc(target, SmcSettings(n_particles=300, progress=False), checkpoint_path=ckpt, resume=True)
    other = LatentTarget(p.generator, p.operator, p.y + 1, p.noise_sigma)
    with pytest.raises(GanflowError, match="other data"):
        run_smc(other, s, checkpoint_path=ckpt, resume=True)


@pytest.mark.parametrize("table, message", [({"n_particles": 1}, "n_particles"), ({"target_ess": 1.0}, "target_ess"),
                                            ({"min_moves": 5, "max_moves": 2}, "min_moves"),
                                            ({"frame": "flow"}, "frame")])
def test_bad_smc_settings_are_one_line_errors(table, message):
    from ganflow.config import parse_settings

    with pytest.raises(GanflowError, match=message):
        parse_settings(SmcSettings, table, "smc")


def test_cli_solve_smc_writes_the_evidence(tmp_path, cli):
    """``ganflow solve --method smc`` writes posterior.h5 with ``log_evidence`` and its error; an unknown [smc]
    key is one line on stderr and exit 2."""
    import h5py

    prior = "ganflow.problems.linear_gaussian:generator"
    obs, out = tmp_path / "obs.h5", tmp_path / "post.h5"
    assert cli("simulate", "--problem", "linear_gaussian", "--prior", prior, "-o", obs, "--seed", "1",
               "--noise-relative", "0.05").returncode == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text("[smc]\nn_particles = 200\n[solve]\nn_samples = 500\nn_quantile = 200\n")
    r = cli("solve", "--obs", obs, "--prior", prior, "--method", "smc", "-o", out, "--config", cfg, "--quiet")
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "smc" and f["latent/samples"].shape[0] > 0
        assert np.isfinite(f.attrs["log_evidence"]) and f.attrs["log_evidence_se"] > 0 and f.attrs["n_stages"] >= 1
        assert f["trace/beta"][-1] == 1.0
    cfg.write_text("[smc]\nn_particle = 200\n")
    r = cli("solve", "--obs", obs, "--prior", prior, "--method", "smc", "-o", tmp_path / "b.h5", "--config", cfg)
    assert r.returncode == 2 and "smc.n_particle" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_solve_smc_from_the_flow(tmp_path, cli):
    """``[smc] start = "flow"``: solve fits the flow first, tempers from it, and counts its evaluations."""
    import h5py

    prior = "ganflow.problems.linear_gaussian:generator"
    obs, out = tmp_path / "obs.h5", tmp_path / "post.h5"
    assert cli("simulate", "--problem", "linear_gaussian", "--prior", prior, "-o", obs, "--seed", "1",
               "--noise-relative", "0.05").returncode == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text('[smc]\nn_particles = 200\nstart = "flow"\n[flow]\nmax_iter = 300\n'
                   "[solve]\nn_samples = 500\nn_quantile = 200\n")
    r = cli("solve", "--obs", obs, "--prior", prior, "--method", "smc", "-o", out, "--config", cfg, "--quiet")
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "smc" and np.isfinite(f.attrs["init_flow_elbo"])
        assert f.attrs["n_forward_evals"] > 200 * int(f["trace/moves"][()].sum()) and f["trace/beta"][-1] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "obs.h5", "post.h5"]  # no .ckpt, no .ckpt.flow


def test_stacked_smc_solve_resumes_by_observation(tmp_path, cli):
    """A stacked obs.h5 is solved by SMC observation by observation (issue 10's stack), each part with its own
    evidence; ``--max-obs`` then ``--resume`` finishes the rest."""
    import h5py

    prior = "ganflow.problems.linear_gaussian:generator"
    obs, out = tmp_path / "obs.h5", tmp_path / "post.h5"
    assert cli("simulate", "--problem", "linear_gaussian", "--prior", prior, "-o", obs, "--seed", "2", "--n-obs", "2",
               "--noise-relative", "0.05").returncode == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text("[smc]\nn_particles = 200\n[solve]\nn_samples = 300\nn_quantile = 100\n")
    common = ("solve", "--obs", obs, "--prior", prior, "--method", "smc", "-o", out, "--config", cfg, "--quiet")
    assert cli(*common, "--max-obs", "1").returncode == 0 and not out.exists()
    r = cli(*common, "--resume")
    assert r.returncode == 0 and "skipped 1 finished" in r.stdout, r.stdout + r.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "smc"
        assert all(np.isfinite(f[g].attrs["log_evidence"]) for g in ("obs_0000", "obs_0001"))


def _sweep_failures(fit, ref: dict) -> list[str]:
    """The curved problem's whitened moments within 4 se, the se from the chains' smallest bulk ESS."""
    lam, V = np.linalg.eigh(ref["cov"])
    u = (fit.samples.double().numpy() - ref["mean"]) @ V / np.sqrt(lam)
    series = np.stack([u[:, 0], u[:, 1], u[:, 0] ** 2 - 1, u[:, 1] ** 2 - 1, u[:, 0] * u[:, 1]], 1)
    se = series.std(0) / math.sqrt(fit.attrs["ess_min"])
    return [f"moment {i}: {m:.3f} vs se {e:.3f}" for i, (m, e) in enumerate(zip(series.mean(0), se, strict=True))
            if not abs(m) < 4 * e]


def test_final_sweeps_are_posterior_chains(exact2d, monkeypatch):
    """After b = 1, ``final_sweeps`` of frozen-step MCMC give ``N`` chains of ``S`` draws whose moments match
    quadrature within the error their own ESS implies (an ESS well above ``N``: the sweeps add draws); sweeps
    at the wrong temperature (b = 0.3, a wider law) fail the same check."""
    p, ref, _ = exact2d["curved"]
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    fit = _run(target, n_particles=400, final_sweeps=16, sweep_moves=3)
    assert fit.samples.shape == (400 * 16, 2) and fit.attrs["n_chains"] == 400 and fit.attrs["final_sweeps"] == 16
    assert fit.attrs["ess_min"] > 1.5 * 400 and 0.3 < fit.attrs["sweep_acceptance_rate"] < 0.95
    assert _sweep_failures(fit, ref) == []
    chains = fit.samples.double().numpy().reshape(400, 16, 2)
    first_last = max(np.corrcoef(chains[:, 0, j], chains[:, -1, j])[0, 1] for j in range(2))
    assert fit.attrs["sweep_correlation"] == pytest.approx(first_last, abs=1e-6)
    monkeypatch.setattr(smc_mod, "SWEEP_BETA", 0.3)
    assert _sweep_failures(_run(target, n_particles=400, final_sweeps=16, sweep_moves=3), ref) != []


def test_chains_that_do_not_move_report_a_sweep_correlation_of_one(monkeypatch):
    """``sweep_correlation`` is what says the ESS over the sweeps is too short-sighted: chains that never move
    read 1."""
    p = curved_problem()
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    monkeypatch.setattr(smc_mod, "_transition", lambda wt, u, lp, g, *a: (u, lp, g, torch.zeros(len(u), dtype=bool)))
    fit = _run(target, n_particles=100, final_sweeps=4, sweep_moves=1)
    assert fit.attrs["sweep_correlation"] == pytest.approx(1.0, abs=1e-9)


def test_a_checkpoint_from_before_a_new_setting_resumes_as_its_default(tmp_path):
    """A run checkpointed before ``start`` existed ran from the prior: it resumes with ``start = "prior"``."""
    from ganflow.checkpoint import save_checkpoint

    p = curved_problem()
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    s = SmcSettings(n_particles=100, progress=False, final_sweeps=2)
    ckpt = str(tmp_path / "smc.ckpt")
    run_smc(target, s, torch.Generator().manual_seed(0), checkpoint_path=ckpt)
    old = torch.load(ckpt, weights_only=True)
    del old["settings"]["start"]
    save_checkpoint(ckpt, old)
    fit = run_smc(target, dataclasses.replace(s, final_sweeps=3), checkpoint_path=ckpt, resume=True)
    assert fit.samples.shape == (300, 2)
    with pytest.raises(GanflowError, match="start"):
        run_smc(target, dataclasses.replace(s, final_sweeps=4, start="flow"), checkpoint_path=ckpt, resume=True,
                init=lambda n, g: torch.randn(n, 2, generator=g), init_log_prob=lambda z: -0.5 * (z * z).sum(1))


def test_sweeps_resume_and_extend(tmp_path, monkeypatch):
    """A run killed after its second final sweep resumes to the uninterrupted run's draws exactly; a finished
    tempering's checkpoint takes more sweeps on resume (``final_sweeps`` may change; ``target_ess`` may not)."""
    p = curved_problem()
    target = LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)
    s = SmcSettings(n_particles=200, target_ess=0.5, progress=False, final_sweeps=4, sweep_moves=2)
    whole = run_smc(target, s, torch.Generator().manual_seed(2))
    ckpt = str(tmp_path / "smc.ckpt")
    _interrupted_run(monkeypatch, "_sweep", 2, target, s, 2, ckpt)
    resumed = run_smc(target, s, torch.Generator().manual_seed(9), checkpoint_path=ckpt, resume=True)
    assert torch.equal(whole.samples, resumed.samples)
    longer = run_smc(target, SmcSettings(**{**s.__dict__, "final_sweeps": 6}), checkpoint_path=ckpt, resume=True)
    assert longer.samples.shape == (200 * 6, 2)
    assert torch.equal(longer.samples.reshape(200, 6, 2)[:, :4], whole.samples.reshape(200, 4, 2))


def test_resume_from_the_flow_reuses_the_saved_flow(tmp_path, monkeypatch):
    """``start = "flow"`` with a checkpoint keeps the fitted flow beside it (``<ckpt>.flow``); ``--resume`` loads
    it instead of fitting again (a refit costs the fit twice, and on another machine would be another flow) and
    still counts its evaluations; a flow file fitted to other data is refused."""
    import importlib

    from ganflow.simulate import simulate

    solve_mod = importlib.import_module("ganflow.solve")  # the module (the package exports its function `solve`)

    prior = "ganflow.problems.linear_gaussian:generator"
    obs = simulate("linear_gaussian", prior=solve_mod.load_prior(prior), noise_relative=0.05, seed=3)
    cfg = {"smc": {"n_particles": 200, "start": "flow", "max_stages": 1},
           "flow": {"init": "identity", "max_iter": 30, "min_iter": 30, "warmup": 10, "lr": 1e-2},
           "solve": {"n_samples": 300, "n_quantile": 100}}
    ckpt = str(tmp_path / "post.h5.ckpt")
    with pytest.raises(GanflowError, match="max_stages"):
        solve_mod.solve(obs, prior, method="smc", config=cfg, progress=False, checkpoint_path=ckpt)
    flow_file = solve_mod.start_flow_path(ckpt)
    saved = torch.load(flow_file, weights_only=True)
    assert saved["n_forward_evals"] > 0

    def no_refit(*a, **k):
        raise AssertionError("the flow was fitted again on resume")

    monkeypatch.setattr(solve_mod, "fit_flow", no_refit)
    cfg["smc"]["max_stages"] = 100
    result = solve_mod.solve(obs, prior, method="smc", config=cfg, progress=False, checkpoint_path=ckpt, resume=True)
    assert result.fit.trace["beta"][-1] == 1.0 and result.attrs["n_forward_evals"] > saved["n_forward_evals"]
    assert result.attrs["init_flow_elbo"] == saved["attrs"]["elbo"]  # the resumed run reports the saved flow
    other = simulate("linear_gaussian", prior=solve_mod.load_prior(prior), noise_relative=0.05, seed=4)
    # the flow file's own check (the SMC checkpoint would refuse other data too, with another message)
    with pytest.raises(GanflowError, match=r"ckpt\.flow was fitted to other data"):
        solve_mod.solve(other, prior, method="smc", config=cfg, progress=False, checkpoint_path=ckpt, resume=True)
