"""Posteriors on the built-in problems with their bundled demo priors: truths drawn from the prior (the model
is well specified and z_true is known; issue 4 and 5 acceptance), and held-out truths from the problems' own
samplers with the representation error on (issue 21). Small flow budgets keep them fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganflow import load_prior, load_problem, simulate, solve
from ganflow.config import Config

# Truths here are draws from the prior itself, exactly in the range of G: the plain likelihood is the exact model,
# so the representation error (on by default, for real fields) is off.
# Held-out truths: below, and tests/test_representation_error.py.
SOLVE_FAST = {"solve": {"n_samples": 2000, "n_quantile": 2000, "n_field_samples": 8, "representation_error": "off"},
              "diagnostics": {"n_draws": 300}}


def _bundled(problem):
    path = problem.bundled_prior()
    if path is None:
        pytest.fail(f"bundled prior for {problem.name} is missing from problems/data/")
    return load_prior(path)


def test_phase_retrieval_posterior_with_bundled_prior():
    """Two truths drawn from the bundled prior (z_true known), each observed through half the frequencies
    with 2 % noise: the posterior mean is close modulo the twin and the 95 % bands hold the truth at about
    the nominal rate (pixel fraction, averaged over the truths: Bayesian calibration is a statement about
    truths drawn from the prior, not about one field)."""
    from ganflow.problems.phase_retrieval import error_modulo_twin, twin

    problem = load_problem("phase_retrieval", n=32)
    G = _bundled(problem)
    op_kw = {"oversampling": 2, "mask_fraction": 0.5, "mask_seed": 0}
    # 256 screened MAP starts with warm restarts. With the clipped-read-out prior, the best MAP of the search (two
    # search seeds each, error modulo the twin): 64 starts missed the truth's mode on truth seeds 5 (0.47, 0.59)
    # and 7 (0.43 or 0.51), 256 on seed 4 (0.29, 0.30); 256 with up to 8 restarts found it on 4, 5 and 7
    # (0.01-0.05), ~45 s a search.
    cfg = dict(SOLVE_FAST, flow={"batch_size": 16, "max_iter": 600, "patience": 150, "map_starts": 256,
                                 "map_restarts": 8, "progress": False})
    # Coverage is counted where it says something. The clipped read-out draws the zero background exactly, so the
    # 95 % band there is [0, 0] and holds a truth and its twin alike (85 % of the pixels): the calibration is
    # judged on the pixels where the truth or its twin is non-zero, and "the truth's mode, not its twin's" on the
    # pixels where the two differ by more than 0.05 (the phantoms' levels are 0.1-1).
    errs, covs, cov_truth, cov_twins, chi2s = [], [], [], [], []
    # Truth seeds 4 and 5: the two whose MAP search needs the 256 starts and the restarts (seed 6, an easy one,
    # was dropped to keep the suite under 15 minutes: it cost ~160 s of one core and gave 0.033 / 0.99 / 0.91).
    for seed in (4, 5):
        obs = simulate("phase_retrieval", prior=G, operator_kwargs=op_kw, problem_kwargs={"n": 32},
                       noise_relative=0.02, seed=seed)
        result = solve(obs, G, method="flow", config=Config(cfg), seed=0, progress=False)
        x_true = torch.as_tensor(result.x_true)
        errs.append(float(error_modulo_twin(torch.as_tensor(result.mean), x_true)))
        lo, hi = result.credible_interval(0.95)
        xt, tw = result.x_true, twin(x_true).numpy()
        inside, inside_twin = (xt >= lo) & (xt <= hi), (tw >= lo) & (tw <= hi)
        support, differ = (xt != 0) | (tw != 0), np.abs(xt - tw) > 0.05
        covs.append(inside[support].mean())
        cov_truth.append(inside[differ].mean())
        cov_twins.append(inside_twin[differ].mean())
        chi2s.append(result.attrs["chi2_per_dof"])
    print(f"phase retrieval: err mod twin {np.round(errs, 3)}, coverage on the support {np.round(covs, 2)}; where "
          f"truth and twin differ: of the truth {np.round(cov_truth, 2)}, of the twin {np.round(cov_twins, 2)}; "
          f"chi2/dof {np.round(chi2s, 2)}")
    # Measured (bundled prior, 64 screened MAP starts): err mod twin 0.08 / 0.05 / 0.08, coverage
    # 0.89 / 0.95 / 0.80 (mean 0.88; seeds 7 and 8 give 0.85 and 0.92), of the twin 0.23-0.52: the posterior
    # sits on the truth's orientation. With 16 unscreened starts seed 4 fell into a poorer mode (coverage 0.41).
    # The 23,170-step prior (bundled since): err mod twin 0.038 / 0.040 / 0.040, coverage 0.79 / 0.98 / 0.87
    # (mean 0.88), of the twin 0.18-0.30, chi2/dof 1.00 / 0.91 / 1.05.
    # The clipped-read-out prior (bundled since; 256 starts, 8 restarts): err mod twin 0.053 / 0.056 / 0.033,
    # coverage on the support 0.98 / 0.97 / 0.99; where truth and twin differ, of the truth 0.80 / 0.74 / 0.91 and
    # of the twin 0.02 / 0.01 / 0.05; chi2/dof 1.00 / 0.90 / 1.05 (4 min for the three on 2 cores). Counted over all
    # pixels, the twin's coverage was 0.92 (the exact background): the old twin check could no longer fail.
    assert max(errs) < 0.2
    assert 0.75 < np.mean(covs) < 0.99  # two-sided: bands so wide they cover everything also fail
    assert np.mean(cov_truth) > np.mean(cov_twins) + 0.3  # one mode, the truth's, not a blur of both
    assert max(chi2s) < 1.5


def test_elliptic_posterior_with_bundled_prior():
    problem = load_problem("elliptic", n=32)
    G = _bundled(problem)
    # hIPPYlib's layout: 50 sensors in the lower part of the domain [0.1, 0.9] x [0.1, 0.5], so "far from the
    # sensors" (the upper part) is a real region and the std should grow there.
    op_kw = {"sensors": "hippylib"}
    obs = simulate("elliptic", prior=G, operator_kwargs=op_kw, problem_kwargs={"n": 32}, noise_relative=0.01,
                   seed=2)
    cfg = dict(SOLVE_FAST, flow={"batch_size": 16, "max_iter": 400, "patience": 150, "progress": False})
    result = solve(obs, G, method="flow", config=Config(cfg), seed=0, progress=False)
    m = result.attrs
    print(f"elliptic: rel err {m['rel_l2_error']:.3f}, coverage {m['coverage_95']:.3f}, chi2 {m['chi2_per_dof']:.2f}")
    # What the data buy, against the prior alone (an independent baseline: 4,000 draws of G with no data). If the
    # solve ignored the data, the posterior would be the prior: the predictive mean would misfit the data as the
    # prior mean does, and the channel layout (the sign of m - mid-level) in the sensed lower half (y < 0.5) would
    # agree with the truth no better than the prior mean's. Pressure data are smooth functionals of the
    # conductivity, so several layouts fit them: the posterior mean's L2 error need not beat the prior mean's.
    # Measured (seed 2, hippylib sensors): chi2/dof 1.44 (prior mean 35.9), agreement 0.62 (prior mean 0.45); the
    # flow is over-confident on this prior (coverage 0.58 with a prior truth, PSIS k-hat > 1): see issue 17.
    op = problem.make_operator(**op_kw)
    mid = 0.5 * (np.log(12.0) + np.log(3.0))
    lower = slice(0, 16)  # rows i <-> y = (i + 0.5) / 32: the sensed half
    with torch.no_grad():
        prior_mean = G(torch.randn(4000, G.latent_dim, generator=torch.Generator().manual_seed(99))).mean(0)
        chi2_prior = float(((op(prior_mean[None])[0] - obs.y) ** 2).mean() / obs.noise_sigma**2)
    prior_mean = prior_mean.numpy()

    def agreement(mean):
        return np.mean((mean[lower] > mid) == (result.x_true[lower] > mid))

    print(f"chi2/dof {m['chi2_per_dof']:.2f} (prior mean {chi2_prior:.1f}); sensed-half agreement "
          f"{agreement(result.mean):.2f} (prior mean {agreement(prior_mean):.2f})")
    assert m["chi2_per_dof"] < 2.0 and chi2_prior > 5 * m["chi2_per_dof"]
    assert agreement(result.mean) > agreement(prior_mean) + 0.1
    # the posterior std is larger away from the sensors than near them
    sensors = op.sensor_xy.numpy()  # [S, 2] (x, y)
    n = 32
    centers = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(centers, centers)  # [i, j] -> x = centers[j], y = centers[i]
    d = np.min(np.hypot(xx[..., None] - sensors[:, 0], yy[..., None] - sensors[:, 1]), axis=-1)
    near, far = result.std[d < np.quantile(d, 0.25)].mean(), result.std[d > np.quantile(d, 0.75)].mean()
    assert far > near


# ---------------------------------------------------------------- held-out truths (issue 21)
# Truths from the problem's own sampler (`sample_fields`), not from G: the prior can only approximate them, so
# the solve runs with its defaults, the representation error on. The bundled priors' training fields came from
# seed 0 (`ganflow data`); these seeds were never used for training.
HELD_OUT_SEEDS = (9001, 9002, 9003)
N_PRIOR = 2000  # draws of G with no data: the prior-only baseline
N_PRIOR_PRED = 500  # of which pushed through the operator


def held_out_runs(name: str, problem_kwargs: dict, operator_kwargs: dict, noise_relative: float, cfg: dict,
                  errors: dict, seeds=HELD_OUT_SEEDS, noise_scale: float = 1.0, generator=None) -> dict:
    """Solve ``y = A(x) + eta`` for held-out truths ``x`` through the bundled prior; per truth the posterior
    mean's errors ``errors[key](mean, x)`` (as ``key``) and the prior mean's (as ``key_prior``), the 95 %
    coverage of the posterior's bands and of the prior's (``N_PRIOR`` draws of G), and chi^2/dof of the
    posterior-predictive mean and of the prior-predictive mean.
    ``noise_scale`` and ``generator`` exist to break the solve on purpose (see the commit messages)."""
    problem = load_problem(name, **problem_kwargs)
    G = generator if generator is not None else _bundled(problem)
    op = problem.make_operator(**operator_kwargs)
    with torch.no_grad():
        prior_x = G(torch.randn(N_PRIOR, G.latent_dim, generator=torch.Generator().manual_seed(99)))
        # The prior-predictive mean E[A(G(z))]: what the posterior-predictive mean becomes when the data are
        # ignored (A is nonlinear: not A of the prior mean).
        prior_pred = torch.cat([op(b) for b in prior_x[:N_PRIOR_PRED].split(50)]).mean(0)
    prior_mean = prior_x.mean(0)
    prior_lo, prior_hi = torch.quantile(prior_x, 0.025, dim=0), torch.quantile(prior_x, 0.975, dim=0)
    keys = [k + p for k in errors for p in ("", "_prior")]
    out = {k: [] for k in keys + ["cov", "cov_prior", "chi2", "chi2_prior"]}
    for seed in seeds:
        x = problem.sample_fields(1, torch.Generator().manual_seed(seed))[0]
        obs = simulate(name, truth=x, operator_kwargs=operator_kwargs, problem_kwargs=problem_kwargs,
                       noise_relative=noise_relative, seed=seed)
        sigma = obs.noise_sigma
        obs.noise_sigma = sigma * noise_scale
        result = solve(obs, G, method="flow", config=Config(cfg), seed=0, progress=False)
        lo, hi = (torch.as_tensor(b) for b in result.credible_interval(0.95))
        mean = torch.as_tensor(result.mean)
        for key, error in errors.items():
            out[key].append(float(error(mean, x)))
            out[key + "_prior"].append(float(error(prior_mean, x)))
        out["cov"].append(_coverage(x, lo, hi, mean, name))
        out["cov_prior"].append(_coverage(x, prior_lo, prior_hi, prior_mean, name))
        out["chi2"].append(result.attrs["chi2_per_dof"] * noise_scale**2)  # against the true noise level
        out["chi2_prior"].append(float(((prior_pred - obs.y) ** 2).mean()) / sigma**2)
    out = {k: np.array(v) for k, v in out.items()}
    print(f"{name} held out: " + ", ".join(f"{k} {np.round(v, 3)}" for k, v in out.items()))
    return out


def _coverage(x, lo, hi, mean, name) -> float:
    """Fraction of pixels of ``x`` inside ``[lo, hi]``; for phase retrieval, of ``x`` or its twin, whichever the
    mean is closer to (the data cannot tell them apart)."""
    if name == "phase_retrieval":
        from ganflow.problems.phase_retrieval import twin

        tw = twin(x)
        x = tw if (mean - tw).norm() < (mean - x).norm() else x
    return float(((x >= lo) & (x <= hi)).float().mean())


def _rel_l2(m, x):
    return (m - x).norm() / x.norm()


def _rel_l2_coarse(m, x):
    """Relative L2 error of the 8x8-pixel block means (a 4x4 grid on 32x32): the scales pressure data see."""
    pool = lambda f: torch.nn.functional.avg_pool2d(f[None, None].float(), 8)  # noqa: E731
    return _rel_l2(pool(m), pool(x))


def ratio(run: dict, key: str) -> float:
    """Posterior-mean error over prior-mean error, summed over the truths."""
    return float(run[key].sum() / run[key + "_prior"].sum())


# Small budgets (150-200 flow steps from the Laplace start, 500 draws, 50 diagnostic draws); the flow is not
# converged, which the bands below allow for.
# The bundled priors carry a conformal recalibration for these operators (issue 15): off, so the bands tested
# are the model's own (the recalibration is checked by `calibrate --recalibrate`'s held-out half).
HELD_OUT_SOLVE = {"solve": {"n_samples": 500, "n_quantile": 500, "n_field_samples": 8, "recalibrate": "off"},
                  "diagnostics": {"n_draws": 50}}


def elliptic_held_out(**kwargs) -> dict:
    # The default 8 MAP starts: with 4 (200 iterations) truth 9001 fell into a poorer layout (error 0.47,
    # chi^2 4.7, coverage 0.72).
    cfg = dict(HELD_OUT_SOLVE, flow={"batch_size": 16, "max_iter": 150, "patience": 150, "progress": False})
    return held_out_runs("elliptic", {"n": 32}, {"sensors": "grid:8"}, 0.01, cfg,
                         {"err": _rel_l2, "err_coarse": _rel_l2_coarse}, **kwargs)


def check_elliptic_held_out(run: dict) -> None:
    """What the data buy on held-out elliptic truths (the demo's 8x8 sensors, 1 % noise), against the prior
    alone. Tolerances from measured values, 3 truths (seeds 9001-9003):
    - coverage (mean over truths): 0.84 / 0.86 / 0.87 with the representation error, 0.62 / 0.67 / 0.72
      with it off (10 truths of seed 2026 earlier: 0.83 against 0.65); the prior's own bands hold 1.00. A
      truth's coverage is a mean over 1,024 strongly correlated pixels: the per-truth spread (0.02-0.05) is the
      estimate's error, so the mean of 3 has sd ~0.03. Band [0.75, 0.97]: 3 sd below the measured 0.86,
      above the run without the term; the upper bound excludes the prior's everything-covering bands.
    - chi^2/dof of the predictive mean: 0.99 / 1.91 / 1.20 (chi^2 is against the white noise only, so the
      representation error's share of the misfit shows); the prior-predictive mean's is 20 / 90 / 131. Band
      [0.3, 3] and 5 times below the prior-predictive's.
    - errors of the posterior mean relative to the prior mean's, summed over the truths. 64 pressures at 1 %
      pin the coarse layout, not the channel edges: the full-resolution L2 error is the prior mean's
      (0.36 / 0.36 / 0.41 against 0.38 / 0.35 / 0.42, ratio 0.99; 1.14 with the representation error off),
      the error of 8x8-pixel block means is not (ratio 0.76: 0.18 / 0.12 / 0.27 against 0.20 / 0.24 / 0.31).
      With the multi-mode search (issue 21 item 4) the Laplace start can be another, higher optimum and these
      150-step flows land elsewhere: 0.38 / 0.42 / 0.42 (full, ratio 1.07) and 0.22 / 0.24 / 0.26 (coarse,
      ratio 0.96), coverage 0.89 / 0.76 / 0.84, chi^2 0.91 / 2.83 / 1.36. The mean is only as good as 64
      pressures make it; the discriminating checks are coverage and chi^2. So: coarse ratio < 1.0 and full
      ratio < 1.1 (a posterior whose mean is worse than the prior's has learnt something wrong).
    Broken on purpose (commit message): data ignored (noise sd x 1e4) fails coverage, chi^2 and the coarse
    ratio (1.02); the representation error off fails coverage and the full ratio (1.14)."""
    assert 0.75 <= np.mean(run["cov"]) <= 0.97, run["cov"]
    assert np.mean(run["cov_prior"]) > 0.97  # the band excludes the prior alone
    assert 0.3 < np.mean(run["chi2"]) < 3 and np.mean(run["chi2_prior"]) > 5 * np.mean(run["chi2"]), run
    assert ratio(run, "err_coarse") < 1.0, run
    assert ratio(run, "err") < 1.1, run


def test_elliptic_held_out_truths():
    check_elliptic_held_out(elliptic_held_out())


def _error_modulo_twin(m, x):
    from ganflow.problems.phase_retrieval import error_modulo_twin

    return error_modulo_twin(m, x)


def _error_modulo_twin_shift(m, x):
    from ganflow.problems.phase_retrieval import error_modulo_twin

    return error_modulo_twin(m, x, translations=True)


def phase_retrieval_held_out(**kwargs) -> dict:
    cfg = dict(HELD_OUT_SOLVE, flow={"batch_size": 16, "max_iter": 200, "patience": 150, "map_starts": 64,
                                     "progress": False})
    return held_out_runs("phase_retrieval", {"n": 32}, {"oversampling": 2, "mask_fraction": 0.5, "mask_seed": 0},
                         0.02, cfg, {"err": _error_modulo_twin, "err_shift": _error_modulo_twin_shift}, **kwargs)


def check_phase_retrieval_held_out(run: dict) -> None:
    """What the data buy on held-out phantoms (the demo's operator: 2x oversampling, half the frequencies, 2 %
    noise), against the prior alone computed here, so that the bounds hold for any prior that learnt the
    phantoms at least as well as the bundled one (which may be replaced by a better one).
    Measured with the 1,500-step prior (held-out projection error 0.76: it represented fresh phantoms poorly)
    and with the 23,170-step prior bundled since (projection error 0.45), seeds 9001-9003:
    - error of the mean modulo the twin and cyclic translations (the oversampled magnitudes cannot see either):
      old prior 0.88 of the prior mean's (sum over truths); new prior 0.32 / 0.16 / 0.22 against 0.53 / 0.45 /
      0.40, ratio 0.51. Modulo the twin only, the new prior's is 0.57 / 0.37 / 0.49 against 0.54 / 0.49 / 0.40
      (ratio 0.99): the posterior finds the object but not always where the prior mean sits. Bound: the
      translation-free ratio < 0.75 (the prior alone has 1 by construction, a posterior that ignores the data
      1 up to the Monte-Carlo error of its mean, ~0.01), and the twin-only ratio < 1.1 (not worse than the prior).
    - chi^2/dof of the predictive mean: new prior 1.24 / 1.01 / 1.32 against the prior-predictive mean's 3.4 /
      3.2 / 3.3 (old prior 1.81 / 2.11 / 1.61 against 7.2 / 6.2 / 4.9). With the representation error on, the
      predictive mean carries the off-range part's shift, so even a solve that ignores the data got 3.4 with the
      old prior: band [0.3, 2.7] and at most half the prior-predictive's.
    - 95 % coverage (of the truth or its twin, whichever the mean is nearer): new prior 0.58 / 0.79 / 0.72,
      mean 0.70 (old prior 0.49; the bundled prior's recalibration, off here, widens the bands the rest of the
      way); the prior's bands hold 0.98-1.00. Per truth
      the spread is 0.1, so the mean of 3 has sd ~0.06: floor 0.45 (4 sd below the measured mean). Ceiling
      0.97: bands as wide as the prior's say nothing.
    Broken on purpose (commit message): data ignored (noise sd x 1e4) and the representation error's
    covariance scaled by 0."""
    assert ratio(run, "err_shift") < 0.75, run
    assert ratio(run, "err") < 1.1, run
    assert 0.3 < np.mean(run["chi2"]) < 2.7 and np.mean(run["chi2"]) < 0.5 * np.mean(run["chi2_prior"]), run
    assert 0.45 <= np.mean(run["cov"]) <= 0.97, run


def test_phase_retrieval_held_out_truths():
    check_phase_retrieval_held_out(phase_retrieval_held_out())
