"""ganflow predict: streaming QoI statistics vs numpy, a linear QoI vs the exact Gaussian posterior, PSIS
reweighting, sample-based posteriors, safe updates of posterior.h5 on bad QoIs, and the figures."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from ganflow.errors import GanflowError
from ganflow.field_stats import QUANTILES
from ganflow.io import write_obs
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior
from ganflow.qoi import WeightedMoments, predict, qoi_statistics, weighted_quantiles
from ganflow.results import PosteriorResult
from ganflow.simulate import simulate
from ganflow.solve import solve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIOR = os.path.join(ROOT, "problems", "linear_gaussian.py") + ":generator"
SMALL = {
    "flow": {"max_iter": 300, "min_iter": 100, "n_layers": 4, "hidden": 32},
    "solve": {"n_samples": 2000},
}


@pytest.fixture(scope="module")
def posterior(tmp_path_factory):
    """A flow posterior of linear_gaussian (truth known) and the exact posterior of the same data."""
    d = tmp_path_factory.mktemp("predict")
    obs = simulate(
        "linear_gaussian",
        prior=LinearGaussianProblem().generator(),
        noise_relative=0.2,
        seed=3,
        prior_label=PRIOR,
    )
    write_obs(d / "obs.h5", obs)
    result = solve(str(d / "obs.h5"), PRIOR, method="flow", config=SMALL, seed=0, progress=False)
    path = str(d / "posterior.h5")
    result.save(path)
    p = LinearGaussianProblem()
    exact = exact_posterior(p.generator(), p.make_operator(), obs.y, obs.noise_sigma)
    return path, exact, result


def _copy(path, tmp_path, name="p.h5"):
    dst = str(tmp_path / name)
    shutil.copyfile(path, dst)
    return dst


def test_streaming_statistics_match_numpy():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.gamma(2.0, size=(1003, 3, 4)))  # skewed, so quantiles are not symmetric
    qois = {"sum": ("", lambda f: f.reshape(f.shape[0], -1).sum(1)), "field": ("", lambda f: f)}
    stats = qoi_statistics(lambda a, b: x[a:b], 1003, qois, batch_size=97)  # uneven batches
    xs, xf = x.numpy().reshape(1003, -1).sum(1), x.numpy()
    for name, ref in (("sum", xs), ("field", xf)):
        s = stats[name]
        np.testing.assert_allclose(s.mean, ref.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.std, ref.std(0, ddof=1), rtol=1e-10)
        for q in QUANTILES:
            np.testing.assert_allclose(s.quantiles[q], np.quantile(ref, q, axis=0), rtol=1e-12)
        assert s.n == 1003 and s.n_quantile == 1003
    # weighted: equal weights give the same moments; random weights match numpy's weighted formulas
    w = rng.uniform(size=1003)
    w /= w.sum()
    wm = WeightedMoments((3, 4))
    for a in range(0, 1003, 97):
        wm.update(xf[a : a + 97], w[a : a + 97])
    mu = np.average(xf, axis=0, weights=w)
    var = np.average((xf - mu) ** 2, axis=0, weights=w) / (1 - (w**2).sum())
    np.testing.assert_allclose(wm.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(wm.std, np.sqrt(var), rtol=1e-10)
    # equal weights: the midpoint rule (cdf at (i - 1/2) / n, interpolated) is numpy's 'hazen' method exactly
    eq = weighted_quantiles(xf, np.full(1003, 7.0))
    for q in QUANTILES:
        np.testing.assert_allclose(eq[q], np.quantile(xf, q, axis=0, method="hazen"), rtol=1e-12)


def _is_quantile_se(q: float, n: int) -> float:
    """Asymptotic sd of the self-normalised importance-sampling quantile of Gamma(2, 1) from n Exp(1) draws with
    weights w(x) = x: sqrt(E_Exp[w^2 (1{x <= x_q} - q)^2] / n) / f(x_q) (quadrature)."""
    from scipy.integrate import quad
    from scipy.stats import gamma

    x_q = gamma.ppf(q, 2)
    below = quad(lambda t: t * t * (1 - q) ** 2 * np.exp(-t), 0, x_q)[0]
    above = quad(lambda t: t * t * q * q * np.exp(-t), x_q, np.inf)[0]
    return float(np.sqrt((below + above) / n) / gamma.pdf(x_q, 2))


def test_weighted_streaming_quantiles_match_numpy_and_importance_sampling():
    """Unequal weights through the streaming QoI path (uneven batches): draws x ~ Exp(1) weighted by w = x are
    a sample of Gamma(2, 1), so each weighted quantile must match scipy's Gamma(2) quantile within 4 standard
    errors of the importance-sampling estimate, and numpy's weighted quantile (inverted cdf) within 0.1 se (the
    two rules differ by about one order-statistic gap; measured <= 0.05 se over five seeds). A second column,
    independent of the weights (3 - Exp(1)), keeps its own distribution: its order is not the weights' order."""
    from scipy.stats import expon, gamma

    n = 20_000
    rng = np.random.default_rng(0)
    x = rng.exponential(size=(n, 2))
    x[:, 1] = 3.0 - x[:, 1]
    w = x[:, 0] / x[:, 0].sum()
    fields = torch.from_numpy(x)
    stats = qoi_statistics(lambda a, b: fields[a:b], n, {"v": ("", lambda f: f)}, weights=w, batch_size=997)
    got = stats["v"].quantiles
    for q in QUANTILES:
        # column 1: weights independent of the values, E[w^2] / E[w]^2 = 2 for w ~ Exp(1)
        se = np.array([_is_quantile_se(q, n), np.sqrt(2 * q * (1 - q) / n) / expon.pdf(expon.ppf(1 - q))])
        exact = np.array([gamma.ppf(q, 2), 3.0 - expon.ppf(1 - q)])
        ref = np.quantile(x, q, axis=0, weights=w, method="inverted_cdf")
        assert np.all(np.abs(got[q] - ref) < 0.1 * se), (q, got[q], ref, se)
        assert np.all(np.abs(got[q] - exact) < 4 * se), (q, got[q], exact, se)
    np.testing.assert_allclose(stats["v"].mean, np.average(x, axis=0, weights=w), rtol=1e-12)
    assert stats["v"].weighting == "psis" and stats["v"].n_quantile == n


def test_linear_qoi_matches_exact_posterior(posterior, tmp_path):
    path, exact, _ = posterior
    p = _copy(path, tmp_path)
    report = predict(p, ["total", "center"], n=4000, seed=1)
    ones = np.ones(exact.field_mean.size)
    mean_exact = float(ones @ exact.field_mean.ravel())
    std_exact = float(np.sqrt(ones @ exact.field_cov @ ones))
    s = report.qois["total"]
    assert abs(float(s.mean) - mean_exact) < 0.1 * std_exact, (float(s.mean), mean_exact, std_exact)
    assert abs(float(s.std) - std_exact) < 0.1 * std_exact, (float(s.std), std_exact)
    # the center pixel: a linear QoI too (e_c^T x)
    c = 8 * 16 + 8
    m_c, sd_c = exact.field_mean.ravel()[c], np.sqrt(exact.field_cov[c, c])
    assert abs(float(report.qois["center"].mean) - m_c) < 0.1 * sd_c
    assert abs(float(report.qois["center"].std) - sd_c) < 0.1 * sd_c
    # written into posterior.h5 and readable through PosteriorResult.qoi
    r = PosteriorResult.load(p)
    t = r.qoi("total")
    assert float(t.mean) == pytest.approx(float(s.mean))
    assert t.truth is not None and float(t.error) == pytest.approx(float(s.mean - t.truth))
    lo, hi = t.credible_interval(0.95)
    assert bool(t.inside_95) == bool(lo <= t.truth <= hi)
    with h5py.File(p) as f:
        assert set(f["qoi/total"]) >= {
            "mean",
            "std",
            "q025",
            "q25",
            "q50",
            "q75",
            "q975",
            "samples",
            "truth",
            "error",
            "inside_95",
        }
        assert f["qoi/total/samples"].shape[0] == 1000
        assert f.attrs["is_n_draws"] == 2000 and "ppc_p_value" in f.attrs
    with pytest.raises(GanflowError, match="no QoI 'nope'"):
        r.qoi("nope")


def test_solve_writes_diagnostics_and_flow_is_reliable(posterior):
    """The flow judged against the exact Gaussian posterior, not by its own diagnostics.

    Draws whitened by the exact posterior, u = L^-1 (z - mu), must be N(0, I): each mean within 4 / sqrt(N), the
    eigenvalues of their sample covariance inside the Marchenko-Pastur range (1 +- sqrt(k / N))^2 of a true
    N(0, I) sample, widened by 0.05 (the edges' own fluctuation is ~N^(-2/3)), and their mean (the total
    variance) within 4 se = 4 (2 / (N k))^(1/2) of 1. The predictive check's
    E[||y - A(G(z))||^2] / (sigma^2 m), computed by the solve from its own 2,000 flow draws, must match the
    exact posterior's (||r||^2 + tr(H Sigma H^T)) / (sigma^2 m) within 4 standard errors."""
    _, exact, result = posterior
    a = result.attrs
    z = np.asarray(result.latent_samples, np.float64)
    N, k = z.shape
    chol = np.linalg.cholesky(exact.latent_cov)
    u = np.linalg.solve(chol, (z - exact.latent_mean).T).T
    assert np.abs(u.mean(0)).max() < 4 / np.sqrt(N), u.mean(0)
    eig = np.linalg.eigvalsh(np.cov(u.T))
    lo, hi = (1 - np.sqrt(k / N)) ** 2 - 0.05, (1 + np.sqrt(k / N)) ** 2 + 0.05
    assert lo < eig.min() and eig.max() < hi, (eig, lo, hi)
    assert abs(eig.mean() - 1) < 4 * np.sqrt(2 / (N * k)), eig.mean()  # the total variance: se 0.8 %

    p = LinearGaussianProblem()
    G, A = p.generator(), p.make_operator()
    M, W, b = A.M.double().numpy(), G.W.double().numpy(), G.b.double().numpy()
    H = M @ W
    sigma, y = float(result.noise_sigma), np.asarray(result.y, np.float64).reshape(-1)
    r = y - M @ (W @ exact.latent_mean + b)
    S = H @ exact.latent_cov @ H.T  # covariance of A(G(z)) under the posterior
    m = y.size
    chi2 = (r @ r + np.trace(S)) / (sigma**2 * m)
    # D = ||r - H delta||^2 / sigma^2, delta ~ N(0, Sigma): Var D = (2 tr(S^2) + 4 r^T S r) / sigma^4
    se = np.sqrt((2 * np.trace(S @ S) + 4 * r @ S @ r) / sigma**4 / a["is_n_draws"]) / m
    assert abs(a["ppc_chi2_per_dof"] - chi2) < 4 * se, (a["ppc_chi2_per_dof"], chi2, se)
    # the diagnostics are written (their values are the library's own judgement, checked elsewhere)
    assert a["is_n_draws"] == 2000 and 0.0 <= a["ppc_p_value"] <= 1.0
    assert np.isfinite(a["psis_khat"]) and 0.0 < a["is_ess_ratio"] <= 1.0


def test_reweight_and_user_spec(posterior, tmp_path):
    path, exact, _ = posterior
    p = _copy(path, tmp_path)
    spec = tmp_path / "my_qoi.py"
    spec.write_text("def corner(x):\n    return x[:, :4, :4].reshape(x.shape[0], -1)  # [B, 16]\n")
    report = predict(p, [f"{spec}:corner", "total"], n=3000, seed=2, reweight=True)
    assert report.weighting == "psis" and report.diagnostics["is_n_draws"] == 3000
    ones = np.ones(exact.field_mean.size)
    std_exact = float(np.sqrt(ones @ exact.field_cov @ ones))
    assert abs(float(report.qois["total"].mean) - float(ones @ exact.field_mean.ravel())) < 0.1 * std_exact
    corner = report.qois["corner"]
    assert corner.mean.shape == (16,) and corner.inside_95.shape == (16,)
    with h5py.File(p) as f:
        assert f["qoi/corner"].attrs["weighting"] == "psis"
        assert f["psis/field/mean"].shape == (16, 16)
        np.testing.assert_allclose(
            f["psis/field/mean"][()], exact.field_mean, atol=0.15 * exact.field_std.max()
        )


def test_sample_based_posterior_uses_stored_draws(posterior, tmp_path):
    path, _, _ = posterior
    p = _copy(path, tmp_path)
    with h5py.File(p, "a") as f:  # turn it into a sample-based result: no flow to draw from
        f.attrs["method"] = "langevin"
        del f["flow"]
        z = f["latent/samples"][()]
    report = predict(p, ["total"], seed=0)
    assert report.n == z.shape[0]
    G = LinearGaussianProblem().generator()
    ref = G(torch.from_numpy(z)).double().numpy().reshape(z.shape[0], -1).sum(1)
    assert float(report.qois["total"].mean) == pytest.approx(ref.mean(), rel=1e-5)
    assert float(report.qois["total"].std) == pytest.approx(ref.std(ddof=1), rel=1e-4)
    assert "psis_khat" not in report.diagnostics and "ppc_p_value" in report.diagnostics
    with pytest.raises(GanflowError, match="--reweight needs a flow"):
        predict(p, ["total"], reweight=True)


BAD_QOIS = {
    "raises": "def f(x):\n    raise ValueError('boom')\n",
    "scalar": "def f(x):\n    return x.sum()\n",  # not per field
    "short": "def f(x):\n    return x[:1].sum((1, 2))\n",  # wrong batch size
    "nan": "import torch\ndef f(x):\n    return torch.full((x.shape[0],), float('nan'))\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_QOIS))
def test_bad_qoi_leaves_posterior_unharmed(posterior, tmp_path, kind):
    path, _, _ = posterior
    p = _copy(path, tmp_path)
    before = open(p, "rb").read()
    spec = tmp_path / "bad.py"
    spec.write_text(BAD_QOIS[kind])
    with pytest.raises(GanflowError):
        predict(p, [f"{spec}:f"], n=600, seed=0)
    assert open(p, "rb").read() == before
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_cli_bad_qoi_one_line_exit_2(posterior, tmp_path, cli):
    path, _, _ = posterior
    p = _copy(path, tmp_path)
    before = open(p, "rb").read()
    spec = tmp_path / "bad.py"
    spec.write_text(BAD_QOIS["short"])
    r = cli("predict", p, "--qoi", f"{spec}:f", "--n", "500")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "batch" in lines[0], r.stderr
    assert open(p, "rb").read() == before


def test_cli_predict_and_plot(posterior, tmp_path):
    from click.testing import CliRunner

    from ganflow.cli import cli as group

    path, _, _ = posterior
    p = _copy(path, tmp_path)
    r = CliRunner().invoke(group, ["predict", p, "--n", "1000", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "total: mean" in r.output and "PSIS k-hat" in r.output
    r = CliRunner().invoke(group, ["plot", p, "-o", str(tmp_path / "figs")])
    assert r.exit_code == 0, r.output
    names = set(os.listdir(tmp_path / "figs"))
    assert {"fields.png", "qoi.png", "diagnostics.png"} <= names
    from ganflow.plots import _title_diagnostics

    title = _title_diagnostics(PosteriorResult.load(p))
    assert "k-hat" in title and "ESS/N" in title and "PPC chi2/dof" in title
