"""ArviZ interop (issue 35): chain statistics and PSIS against ArviZ's reference implementations, the export's
round trip (R-hat / ESS of exported NUTS chains, PSIS-LOO of an exported flow) and the missing-extra error."""

from __future__ import annotations

import builtins
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ganflow import GanflowError, PosteriorResult, load_prior, simulate, solve, to_arviz
from ganflow.arviz_export import require_arviz
from ganflow.chain_stats import ess_bulk, rhat_rank
from ganflow.diagnostics import psis


def _arviz():
    az = pytest.importorskip("arviz")
    warnings.filterwarnings("ignore", category=FutureWarning)
    return az


def _ar1(phi: float, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """AR(1) chains ``[C, S, k]`` with unit stationary variance: ESS / N -> (1 - phi) / (1 + phi)."""
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=shape) * math.sqrt(1 - phi**2)
    x = np.empty(shape)
    x[:, 0] = rng.normal(size=(shape[0], shape[2]))
    for t in range(1, shape[1]):
        x[:, t] = phi * x[:, t - 1] + eps[:, t]
    return x


def test_chain_stats_against_known_answers():
    # independent of ArviZ: the AR(1) process's ESS, and R-hat of mixed vs. separated chains
    x = _ar1(0.5, (4, 4000, 2), seed=0)
    assert np.all(np.abs(ess_bulk(x) / x[..., 0].size - 1 / 3) < 0.05 / 3 * 3)
    assert np.all(rhat_rank(x) < 1.01)
    shifted = x.copy()
    shifted[0] += 1.0  # one chain elsewhere
    assert np.all(rhat_rank(shifted) > 1.05)
    wide = x.copy()
    wide[0] *= 3.0  # one chain with the same mean but thrice the scale: the folded (tail) R-hat sees it
    assert np.all(rhat_rank(wide) > 1.05)


def test_chain_stats_equal_arviz_defaults():
    az = _arviz()
    rng = np.random.default_rng(1)
    for s in (50, 101, 400):  # an odd length drops the middle draw when splitting, as ArviZ does
        x = _ar1(0.8, (4, s, 3), seed=s) + rng.standard_t(3, size=(4, s, 3))
        x[1] *= 1.5
        idata = az.convert_to_inference_data(x)
        np.testing.assert_allclose(rhat_rank(x), az.rhat(idata)["x"].values, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ess_bulk(x), az.ess(idata)["x"].values, rtol=1e-6)


def test_pyro_estimators_are_arvizs_plain_ones_not_its_defaults():
    # why NUTS switched from pyro.ops.stats to ganflow.chain_stats: pyro's split R-hat is ArviZ's method="split"
    # (no rank normalisation, blind to a chain of another scale) and its ESS is ArviZ's method="identity" up to
    # the autocovariance's normalisation (chains not split, not rank-normalised), which misses a slow drift
    # within a chain: on 4 AR(1) chains of 200 draws, phi = 0.9 (exact ESS 42), it reads 50 and 51 where the
    # bulk ESS reads 29 and 23
    az = _arviz()
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    x = _ar1(0.9, (4, 200, 2), seed=2)
    t = torch.from_numpy(x)
    idata = az.convert_to_inference_data(x)
    np.testing.assert_allclose(split_gelman_rubin(t, chain_dim=0, sample_dim=1).numpy(),
                               az.rhat(idata, method="split")["x"].values, atol=1e-9)
    pyro_ess = effective_sample_size(t, chain_dim=0, sample_dim=1).numpy()
    np.testing.assert_allclose(pyro_ess, az.ess(idata, method="identity")["x"].values, rtol=0.02)
    assert np.all(pyro_ess > 1.5 * ess_bulk(x))


def test_psis_equals_arviz_psislw():
    # ganflow's PSIS (Zhang-Stephens fit with the weakly informative prior on k) is ArviZ's: same k-hat and
    # smoothed weights, from a good (k-hat < 0.5) to a useless (k-hat > 1) proposal
    az = _arviz()
    rng = np.random.default_rng(3)
    for n, scale in ((1000, 0.3), (4000, 1.0), (2000, 3.0)):
        log_w = rng.standard_t(4, size=n) * scale
        ours = psis(log_w)
        lw, khat = az.psislw(log_w.copy())
        assert abs(ours.khat - float(khat)) < 1e-6
        ours_norm = ours.log_weights - np.logaddexp.reduce(ours.log_weights)
        np.testing.assert_allclose(np.exp(ours_norm), np.exp(lw), atol=1e-9)


PRIOR = "ganflow.problems.linear_gaussian:generator"


def _lg_obs():
    return simulate("linear_gaussian", prior=load_prior(PRIOR), noise_relative=0.05, seed=0, prior_label=PRIOR)


@pytest.fixture(scope="module")
def nuts_posterior(tmp_path_factory):
    cfg = {"nuts": {"num_chains": 3, "num_samples": 80, "warmup_steps": 80},
           "solve": {"n_samples": 240, "representation_error": "off"}, "diagnostics": {"enabled": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short run may exceed the R-hat threshold
        result = solve(_lg_obs(), PRIOR, method="nuts", config=cfg, seed=0,
                       progress=False)
    return result.save(tmp_path_factory.mktemp("nuts") / "posterior.h5")


def test_export_keeps_nuts_chains_and_their_rhat_ess(nuts_posterior, tmp_path, cli):
    az = _arviz()
    out = tmp_path / "posterior.nc"
    r = cli("export", nuts_posterior, "--format", "arviz", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "3 chain(s) x 80 draws" in r.stdout
    idata = az.from_netcdf(out)
    for group in ("posterior", "log_likelihood", "posterior_predictive", "observed_data", "sample_stats"):
        assert group in idata.groups(), group
    z = idata.posterior["z"]
    assert z.sizes["chain"] == 3 and z.sizes["draw"] == 80
    recorded = PosteriorResult.load(nuts_posterior).attrs
    assert abs(float(az.rhat(idata)["z"].max()) - recorded["rhat_max"]) < 1e-6
    assert abs(float(az.ess(idata)["z"].min()) - recorded["ess_min"]) < 1e-6
    stats = idata.sample_stats
    assert int(stats["diverging"].sum()) == recorded["divergences"]
    assert np.all((stats["acceptance_rate"].values >= 0) & (stats["acceptance_rate"].values <= 1 + 1e-12))
    assert 0.5 < float(stats["acceptance_rate"].mean()) < 1.0  # adapted towards target_accept_prob 0.8
    assert np.allclose(stats["step_size"].values.std(axis=1), 0)  # fixed after warm-up
    # the chains are the draws in the order the sampler made them: the stored potential energies say so
    trace = PosteriorResult.load(nuts_posterior).trace["potential_energy"].reshape(3, 80)
    lp = stats["lp"].values
    assert np.allclose((lp + trace) - (lp + trace).mean(), 0, atol=1e-3)  # equal up to the constant
    again = cli("export", nuts_posterior, "-o", out)
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_flow_export_log_likelihood_and_loo():
    az = _arviz()
    cfg = {"flow": {"max_iter": 300, "min_iter": 300, "map_starts": 4, "progress": False},
           "solve": {"n_samples": 600, "representation_error": "off"}}
    obs = _lg_obs()
    result = solve(obs, PRIOR, method="flow", config=cfg, seed=0,
                   progress=False)
    idata = to_arviz(result, max_draws=500, seed=1)
    assert idata.posterior["z"].shape == (1, 500, result.latent_dim)
    # the per-observation log-likelihood, recomputed here by scipy from the generator and the operator
    from ganflow.problems.linear_gaussian import LinearGaussianProblem

    G, A = result.generator, LinearGaussianProblem().make_operator()
    z = torch.from_numpy(np.asarray(idata.posterior["z"].values[0, :3], np.float32))
    with torch.no_grad():
        pred = A(G(z)).double().numpy()
    expected = norm.logpdf(result.y.astype(np.float64), loc=pred, scale=result.noise_sigma)
    got = idata.log_likelihood["y"].values[0, :3]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert idata.observed_data["y"].shape == result.y.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ's note on large Pareto k of single observations
        loo = az.loo(idata)
    assert np.isfinite(float(loo["elpd_loo"])) and int(loo["n_data_points"]) == result.y.size


def test_missing_extra_is_one_line_naming_it(nuts_posterior, tmp_path, monkeypatch, cli):
    real_import = builtins.__import__

    def no_arviz(name, *args, **kwargs):
        if name == "arviz" or name.startswith("arviz."):
            raise ImportError("No module named 'arviz'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_arviz)
    with pytest.raises(GanflowError, match=r"ganflow\[arviz\]"):
        require_arviz()
    r = cli("export", nuts_posterior, "-o", tmp_path / "p.nc")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ganflow[arviz]" in lines[0]
    assert not (tmp_path / "p.nc").exists()


def test_chain_layout_of_each_method():
    from ganflow.posterior.base import LatentFit

    z = torch.arange(24.0).reshape(12, 2)
    nuts = LatentFit("nuts", samples=z, trace={"chain": np.repeat([0, 1, 2], 4)}).chains()
    assert nuts.shape == (3, 4, 2) and np.array_equal(nuts[1], z[4:8].numpy())  # chain after chain, in order
    assert LatentFit("langevin", samples=z).chains().shape == (1, 12, 2)  # independent end points: one chain
    assert LatentFit("flow", sampler=lambda n, g: torch.zeros(n, 2)).chains() is None
    uneven = LatentFit("nuts", samples=z, trace={"chain": np.repeat([0, 1], [5, 7])})
    assert uneven.chains() is None  # not a [C, S, k] block: no chain layout rather than a wrong one
