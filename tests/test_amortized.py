"""The amortised posterior q(z | y) (issue 19): accuracy against the exact linear-Gaussian posterior on fresh
observations, a broken variant that must fail, the CLI round trip, mismatch errors, resume and --refine."""

from __future__ import annotations

import copy
import dataclasses

import h5py
import numpy as np
import pytest
import torch

from ganflow.errors import GanflowError
from ganflow.posterior import amortized_training as am  # the training loop (monkeypatched below)
from ganflow.posterior.amortized import AmortizedSettings, load_amortized, train_amortized
from ganflow.problems.linear_gaussian import LinearGaussianProblem, exact_posterior
from ganflow.results import REQUIRED_ATTRS, REQUIRED_DATASETS, PosteriorResult
from tests.conftest import run_cli

SIGMA = 0.1
# A 4-dimensional latent on an 8x8 field (16 observations): q(z|y) is a conditional Gaussian (n_layers = 0),
# which the exact posterior is, so 400 steps (~10 s on one core) reach it.
SMALL = AmortizedSettings(n_layers=0, hidden=32, embed_hidden=64, embed_dim=32, batch_size=256, max_iter=400,
                          lr=3e-3, warmup=20, n_val=512, eval_every=50, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    p = LinearGaussianProblem(n=8, latent_dim=4)
    G, A = p.generator(), p.make_operator()
    path = tmp_path_factory.mktemp("amortized") / "amortized.pt"
    res = train_amortized(G, A, SIGMA, path, SMALL, seed=0)
    return G, A, path, res


def _errors(post, G, A, n_obs=50, n_draws=4000, seed=123):
    """Over ``n_obs`` fresh observations: mean |posterior-mean error| in exact posterior sds, and mean
    |sd ratio - 1|, of ``n_draws`` amortised draws against the closed form."""
    g = torch.Generator().manual_seed(seed)
    errs, sd_errs = [], []
    for _ in range(n_obs):
        z = torch.randn(1, G.latent_dim, generator=g)
        y = A(G(z))[0] + SIGMA * torch.randn(A.obs_shape, generator=g)
        ex = exact_posterior(G, A, y, SIGMA)
        zs = post.sample(y, n_draws, g)[0].double().numpy()
        errs.append(np.abs(zs.mean(0) - ex.latent_mean) / ex.latent_std)
        sd_errs.append(np.abs(zs.std(0) / ex.latent_std - 1))
    return float(np.mean(errs)), float(np.mean(sd_errs))


def test_amortized_matches_exact_posterior_on_fresh_observations(small):
    G, A, path, _ = small
    post = load_amortized(path)  # weights_only=True, as solve --amortized loads it
    mean_err, sd_err = _errors(post, G, A)
    # Monte-Carlo error of 4,000 draws: 1/sqrt(4000) = 0.016 sd on a mean, 1/sqrt(8000) = 1.1 % on an sd; the
    # bounds (0.2 sd, 10 %: those of issue 19 and tighter) leave the rest to the training error (measured 0.11
    # sd and 4.7 % with these settings).
    assert mean_err < 0.2, mean_err
    assert sd_err < 0.10, sd_err


def test_broken_variant_fails_the_same_check(small):
    G, A, path, _ = small
    post = load_amortized(path)
    with torch.no_grad():  # the context zeroed: q no longer depends on y
        for prm in post.model.embed.parameters():
            prm.zero_()
    mean_err, _ = _errors(post, G, A, n_obs=10, n_draws=500)
    assert mean_err > 1.0, mean_err


def test_checkpoint_is_weights_only_and_records_its_training(small):
    _, _, path, res = small
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kind"] == am.AMORTIZED_KIND and ckpt["phase"] == "done"
    assert ckpt["step"] == res.steps == 400 and ckpt["noise_sigma"] == SIGMA
    assert len(ckpt["val_losses"]) >= 8


def test_mismatch_is_one_line_error(small):
    G, A, path, _ = small
    post = load_amortized(path)
    y = torch.zeros(A.obs_shape)
    post.check(G, A, SIGMA, y)  # the trained combination passes
    with pytest.raises(GanflowError, match="noise_sigma"):
        post.check(G, A, 2 * SIGMA, y)
    with pytest.raises(GanflowError, match="another prior"):
        G2 = LinearGaussianProblem(n=8, latent_dim=4).generator()
        G2.b.add_(0.01)
        post.check(G2, A, SIGMA, y)
    A2 = LinearGaussianProblem(n=8, latent_dim=4).make_operator(blur_sigma=2.0)
    with pytest.raises(GanflowError, match="operator settings"):
        post.check(G, A2, SIGMA, y)


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    p = LinearGaussianProblem(n=8, latent_dim=4)
    G, A = p.generator(), p.make_operator()
    s = dataclasses.replace(SMALL, max_iter=40, eval_every=10, checkpoint_every_s=0.0)
    full = train_amortized(G, A, SIGMA, tmp_path / "full.pt", s, seed=3)
    real_step = am._forward_step

    def crashing(run):
        if run.step == 25:
            raise KeyboardInterrupt
        real_step(run)

    monkeypatch.setattr(am, "_forward_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_amortized(G, A, SIGMA, tmp_path / "cut.pt", s, seed=3)
    monkeypatch.setattr(am, "_forward_step", real_step)
    assert torch.load(tmp_path / "cut.pt", weights_only=True)["step"] == 25
    resumed = train_amortized(G, A, SIGMA, tmp_path / "cut.pt", s, seed=3, resume=True)
    a, b = full.posterior.model.state_dict(), resumed.posterior.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(GanflowError, match="seed"):
        train_amortized(G, A, SIGMA, tmp_path / "cut.pt", s, seed=4, resume=True)


CONFIG = """
[amortized]
n_layers = 1
hidden = 16
embed_hidden = 32
embed_dim = 16
batch_size = 64
n_val = 128
eval_every = 10
warmup = 5
[solve]
n_samples = 300
n_quantile = 300
n_field_samples = 8
[diagnostics]
n_draws = 200
[flow]
n_layers = 2
hidden = 16
batch_size = 16
max_iter = 30
min_iter = 0
warmup = 5
patience = 10
"""

PRIOR = "ganflow.problems.linear_gaussian:generator"


def _simulate(tmp_path, name, *extra):
    out = tmp_path / name
    r = run_cli("simulate", "--problem", "linear_gaussian", "--prior", PRIOR, "--seed", "5", "-o", out, *extra)
    assert r.returncode == 0, r.stderr
    return out


def test_cli_round_trip_single_stack_refine_and_mismatch(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    ckpt = tmp_path / "amortized.pt"
    r = run_cli("train-posterior", "--problem", "linear_gaussian", "--prior", PRIOR, "--noise-sigma", "0.05",
                "--steps", "20", "--config", cfg, "--no-progress", "-o", ckpt)
    assert r.returncode == 0, r.stderr
    assert "trained 20 forward-KL steps" in r.stdout
    single = _simulate(tmp_path, "obs.h5", "--noise-sigma", "0.05")
    stack = _simulate(tmp_path, "stack.h5", "--noise-sigma", "0.05", "--n-obs", "3")
    for obs, out, extra in ((single, "post.h5", ()), (stack, "stack_post.h5", ()),
                            (single, "refined.h5", ("--refine",))):
        r = run_cli("solve", "--obs", obs, "--amortized", ckpt, "--config", cfg, "--quiet", "-o", tmp_path / out,
                    *extra)
        assert r.returncode == 0, r.stderr
    res = PosteriorResult.load(tmp_path / "post.h5")
    assert res.method == "amortized" and res.attrs["amortized_refined"] == 0
    assert res.latent_samples.shape == (300, 16) and np.isfinite(res.attrs["coverage_95"])
    assert res.attrs["tail_check"] in ("agree", "resampled", "disagree")  # issue 38: written by every solve
    refined = PosteriorResult.load(tmp_path / "refined.h5")
    assert refined.attrs["amortized_refined"] == 1 and 0 < refined.attrs["iterations"] <= 30
    with h5py.File(tmp_path / "stack_post.h5") as f:
        assert f.attrs["n_obs"] == 3 and f.attrs["method"] == "amortized"
        for name in ("obs_0000", "obs_0002"):
            assert all(d in f[name] for d in REQUIRED_DATASETS)
            assert all(a in f[name].attrs for a in REQUIRED_ATTRS)
    # A mismatch is one line on stderr, exit 2, and no output file.
    other = _simulate(tmp_path, "other.h5", "--noise-sigma", "0.1")
    r = run_cli("solve", "--obs", other, "--amortized", ckpt, "--quiet", "-o", tmp_path / "bad.h5")
    assert r.returncode == 2 and "noise_sigma" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.h5").exists()
    wrong_op = _simulate(tmp_path, "wrong_op.h5", "--noise-sigma", "0.05", "--kw", "blur_sigma=2.0")
    r = run_cli("solve", "--obs", wrong_op, "--amortized", ckpt, "--quiet", "-o", tmp_path / "bad.h5")
    assert r.returncode == 2 and "operator settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("solve", "--obs", single, "--amortized", ckpt, "--method", "nuts", "-o", tmp_path / "bad.h5")
    assert r.returncode == 2 and "--amortized" in r.stderr


# --- the curved family (non-Gaussian posteriors; `ganflow bench --amortized`'s second record) ----------------
# Spline couplings for the bent, skewed posteriors; small enough to train in a few seconds on one core.
CURVED = AmortizedSettings(n_layers=2, hidden=32, embed_hidden=64, embed_dim=16, batch_size=256, max_iter=600,
                           lr=3e-3, warmup=20, n_val=512, eval_every=50, progress=False)
N_CURVED = 200


@pytest.fixture(scope="module")
def curved():
    """The trained q(z|y), 200 fresh observations with their z_true, and each one's quadrature moments (on the
    bench's grid, which the next test checks against the default one)."""
    from ganflow.bench.amortized import CURVED_GRID, CURVED_SIGMA, _observations
    from ganflow.bench.exact import CoefficientOperator, CurvedGenerator, ExactProblem, quadrature_moments

    G, A = CurvedGenerator(1.0), CoefficientOperator(weight=0.5)
    post = train_amortized(G, A, CURVED_SIGMA, None, CURVED, seed=0).posterior
    z, y = _observations(G, A, N_CURVED, CURVED_SIGMA, seed=7)
    ms = [quadrature_moments(ExactProblem("curved", G, A, y[i], CURVED_SIGMA, z[i].numpy()), *CURVED_GRID)
          for i in range(len(y))]
    return post, z, y, [(m["mean"], m["sd"]) for m in ms]


def test_curved_grid_holds_the_posterior():
    """The bench's coarse grid (step 0.04) against the default one (step 0.01) on the family's most extreme
    observation of the test's 200; a grid too narrow for it (half-width 2) must fail the same check."""
    from ganflow.bench.amortized import CURVED_GRID, CURVED_SIGMA, _observations
    from ganflow.bench.exact import CoefficientOperator, CurvedGenerator, ExactProblem, quadrature_moments

    G, A = CurvedGenerator(1.0), CoefficientOperator(weight=0.5)
    z, y = _observations(G, A, N_CURVED, CURVED_SIGMA, seed=7)
    i = int(z.norm(dim=1).argmax())
    p = ExactProblem("curved", G, A, y[i], CURVED_SIGMA, z[i].numpy())
    fine = quadrature_moments(p)

    def diff(m):
        return max(np.max(np.abs(m["mean"] - fine["mean"]) / fine["sd"]), np.max(np.abs(m["sd"] / fine["sd"] - 1)))

    coarse = quadrature_moments(p, *CURVED_GRID)
    assert coarse["edge_mass"] < 1e-5 and diff(coarse) < 1e-6, (coarse["edge_mass"], diff(coarse))
    assert diff(quadrature_moments(p, 2.0, 101)) > 1e-2


def test_amortized_curved_matches_quadrature(curved):
    """The bench's measurement of q(z|y) on non-Gaussian posteriors against quadrature over 200 observations:
    tighter than the issue-19 targets (0.2 sd, 15 %, coverage within 0.05), so that a posterior 20 % too wide
    or 90 % intervals taken for 95 % ones fail. Measured with these settings: 0.047 sd, 3.7 %, 0.955 (400 intervals:
    binomial sd 0.011)."""
    from ganflow.bench.amortized import _accuracy

    post, z, y, refs = curved
    acc = _accuracy(post, z, y, refs, 2000, seed=1)
    assert acc["latent_mean_err_sd"] < 0.1 and acc["latent_sd_rel_err"] < 0.08, acc
    assert abs(acc["sbc_coverage_95"] - 0.95) <= 0.035, acc


def test_curved_broken_variant_fails_the_same_check(curved):
    """q(z|y) with the context zeroed (it no longer depends on y) must fail the mean-error target (measured 1.6
    sd; its coverage, 0.92, shows that SBC alone would barely notice)."""
    from ganflow.bench.amortized import _accuracy

    post, z, y, refs = curved
    broken = dataclasses.replace(post, model=copy.deepcopy(post.model))
    with torch.no_grad():
        for prm in broken.model.embed.parameters():
            prm.zero_()
    acc = _accuracy(broken, z[:30], y[:30], refs, 500, seed=1)
    assert acc["latent_mean_err_sd"] > 0.5, acc
