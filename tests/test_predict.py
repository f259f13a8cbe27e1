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
from ganflow.io import write_obs
from ganflow.predict import WeightedMoments, predict, qoi_statistics, weighted_quantiles
from ganflow.predictive import QUANTILES
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior
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
    eq = weighted_quantiles(xs, np.ones(1003))
    for q in QUANTILES:  # the midpoint rule on equal weights sits within one order-statistic gap of numpy's
        gap = np.diff(np.sort(xs)).max()
        assert abs(eq[q] - np.quantile(xs, q)) <= gap


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
    _, _, result = posterior
    a = result.attrs
    assert a["is_n_draws"] == 2000 and a["psis_khat"] < 0.5 and a["is_ess_ratio"] > 0.8
    assert 0.0 < a["ppc_p_value"] < 1.0 and 0.5 < a["ppc_chi2_per_dof"] < 2.0


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
