"""Simulation-based calibration (SBC; Talts, Betancourt, Simpson, Vehtari & Gelman 2018, arXiv 1804.06788).

If the truth is drawn from the prior, ``z* ~ N(0, I)``, ``x* = G(z*)``, ``y ~ p(y | z*)``, and the posterior
is
exact, then for every scalar ``theta`` (a latent coordinate, a field entry):

- the rank of ``theta*`` among ``L`` independent posterior draws is uniform on ``{0, ..., L}``;
- the central ``alpha`` credible interval contains ``theta*`` with probability exactly ``alpha``.

`calibrate` draws ``T`` truths, simulates data, solves each with the chosen method (by default a cheaper
flow),
and reports the empirical coverage of the 50 / 90 / 95 % central intervals (pooled over the latent
coordinates, and over the field entries), rank histograms (pooled, and of a few tracked coordinates) with a
chi-square uniformity test (``scipy.stats.chisquare``), a figure and a JSON summary.

How to read it: coverage below nominal (and a U-shaped rank histogram) means an overconfident posterior;
above nominal (a hump) an over-dispersed one; a sloped histogram a biased one. Pooled entries of one truth
are correlated, so the pooled chi-square p-value is anti-conservative (it rejects too often); the coverage
numbers are the primary result, the histograms show the shape.

``shrink`` (a diagnostic aid, not a method): latent posterior draws are scaled about their mean,
``z -> mean + shrink (z - mean)``, to make a deliberately overconfident posterior and check that the
calibration detects it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from . import __version__
from .calibrate_state import CHECKPOINT_NAME, load_records, run_identity, save_records
from .config import Config, parse_settings
from .errors import GanflowError
from .io import atomic_path
from .progress import Progress
from .recalibration import central_interval, conformal_scale, interval_scores, scaled_coverage
from .simulate import simulate
from .solve import METHODS, SOLVE_TABLES, load_prior, solve

__all__ = [
    "CalibrateSettings",
    "calibrate",
    "run_calibration_cli",
    "CALIBRATE_TABLES",
    "CHEAP_SOLVE_CONFIG",
    "coverage_indicators",
    "sbc_ranks",
    "rank_uniformity",
]

CALIBRATE_TABLES = SOLVE_TABLES + ("calibrate",)
LEVELS = (0.5, 0.9, 0.95)

# A cheaper solve per truth (each table is overridden key by key by the user's config).
CHEAP_SOLVE_CONFIG = {
    "flow": {"max_iter": 500, "min_iter": 100, "patience": 100, "n_layers": 4, "hidden": 32, "map_starts": 4},
    "solve": {"n_samples": 1000, "n_quantile": 1000, "n_field_samples": 1},
}


@dataclass(frozen=True)
class CalibrateSettings:
    """Settings of a calibration run (TOML table ``[calibrate]``)."""

    n_truths: int = 20
    method: str = "flow"
    noise_sigma: float | None = None  # absolute; or
    noise_relative: float | None = None  # fraction of max |A(x*)| (default 0.1 when neither is given)
    shrink: float = 1.0  # diagnostic aid: scale latent draws about their mean (< 1: overconfident)
    n_rank_draws: int = 99  # L posterior draws (evenly spaced among the stored ones) for the ranks
    n_bins: int = 10  # rank histogram bins
    n_track_latent: int = 4  # latent coordinates shown individually
    n_track_field: int = 4  # field entries shown individually

    def validate(self) -> None:
        if self.n_truths < 2:
            raise GanflowError("calibrate.n_truths must be >= 2")
        if self.method not in METHODS:
            raise GanflowError(f"calibrate.method must be one of {', '.join(METHODS)}")
        if self.noise_sigma is not None and self.noise_relative is not None:
            raise GanflowError("give only one of calibrate.noise_sigma and calibrate.noise_relative")
        if not (self.shrink > 0):
            raise GanflowError(f"--shrink must be > 0, got {self.shrink}")
        if self.n_rank_draws < self.n_bins or self.n_bins < 2:
            raise GanflowError("calibrate.n_bins must be >= 2 and n_rank_draws >= n_bins")
        if self.n_track_latent < 0 or self.n_track_field < 0:
            raise GanflowError("calibrate.n_track_* must be >= 0")


def coverage_indicators(draws: np.ndarray, truth: np.ndarray, level: float) -> np.ndarray:
    """``[d]`` booleans: truth ``[d]`` inside the central ``level`` interval of ``draws`` ``[N, d]``."""
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a], axis=0)
    return (truth >= lo) & (truth <= hi)


def sbc_ranks(draws: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[d]`` ranks in ``{0..L}``: the number of the ``L`` draws ``[L, d]`` below the truth ``[d]``."""
    return (draws < truth[None]).sum(0)


def rank_uniformity(ranks: np.ndarray, n_draws: int, n_bins: int) -> dict:
    """Rank histogram (``n_bins`` bins over ``{0..L}``) and the chi-square test of uniformity (scipy)."""
    from scipy.stats import chisquare

    ranks = np.asarray(ranks).ravel()
    edges = np.linspace(0, n_draws + 1, n_bins + 1)
    counts, _ = np.histogram(ranks, bins=edges)
    # When n_bins does not divide L + 1 the bins hold different numbers of rank values; the expected counts
    # follow how many of 0..L the same histogram puts in each bin (not a formula for it, which can disagree
    # with np.histogram's edge rule and flag a calibrated posterior).
    widths, _ = np.histogram(np.arange(n_draws + 1), bins=edges)
    expected = counts.sum() * widths / widths.sum()
    stat, p = chisquare(counts, expected)
    return {
        "counts": counts.tolist(),
        "expected": expected.tolist(),
        "chi2": float(stat),
        "p_value": float(p),
        "n": int(ranks.size),
    }


def _solve_config(cfg: Config, recalibrate: bool = False) -> dict:
    data = copy.deepcopy(CHEAP_SOLVE_CONFIG)
    for name, table in cfg.data.items():
        if name == "calibrate":
            continue
        data.setdefault(name, {}).update(table)
    if recalibrate:  # learn from the model's own intervals, not from a previous recalibration's
        data.setdefault("solve", {})["recalibrate"] = "off"
    return data


def _learn_recalibration(intervals: list, attrs: dict, s: CalibrateSettings, truths) -> dict:
    """The conformal scale at 95 % learned on the even-numbered truths' field intervals, the odd ones'
    coverage before and after it, and what it was learned for (the problem, operator settings, noise and
    representation-error setting of the solves)."""
    learn, check = intervals[0::2], intervals[1::2]
    if not check:
        raise GanflowError("--recalibrate needs at least 2 held-out truths (one half learns, the other checks)")
    scale = conformal_scale(np.concatenate([interval_scores(iv[0.95], t) for iv, t in learn]), 0.95)

    def coverage(c: float) -> dict:
        return {str(int(lvl * 100)): float(np.mean([scaled_coverage(iv[lvl], t, c).mean() for iv, t in check]))
                for lvl in LEVELS}

    return {
        "scale": float(scale), "level": 0.95, "method": "split-conformal scale about the posterior mean",
        "problem": str(attrs.get("problem", attrs.get("operator", ""))),
        "operator_kwargs": dict(attrs.get("operator_kwargs") or {}),
        **({"operator_settings": dict(attrs["operator_settings"])} if "operator_settings" in attrs else {}),
        "representation_error": str(attrs.get("representation_error", "none")),
        "noise_sigma": s.noise_sigma, "noise_relative": s.noise_relative,
        "truths": os.path.basename(os.fspath(truths)), "n_learn": len(learn), "n_check": len(check),
        "check_coverage_before": coverage(1.0), "check_coverage_after": coverage(scale),
        "ganflow_version": __version__,
    }


def calibrate(
    problem: str,
    prior,
    settings: CalibrateSettings | None = None,
    config: Config | dict | None = None,
    seed: int = 0,
    progress: bool | Callable[[str], None] | None = None,
    truths: str | os.PathLike | None = None,
    recalibrate: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> dict:
    """Run SBC and return the summary dict (written as ``calibration.json`` by `run_calibration_cli`).

    ``progress``: True reports the truths done on stderr (`ganflow.progress`); a callable receives one line
    per truth; None or False: nothing.

    Truth ``t`` is simulated with seed ``seed * 100_003 + t`` and solved with seed ``seed * 100_003 + t +
    50_000``. The truths are ``G(z)``, ``z ~ N(0, I)``, or with ``truths`` (a fields.h5 or .npy/.npz file of
    held-out fields) the first ``n_truths`` of those fields: what users have, off the range of ``G``; then
    only the field coverage is defined (there is no true latent). Field draws include the representation
    error when the solve uses it.
    With ``recalibrate`` (held-out ``truths`` only) the solves run without any stored recalibration, and a
    conformal interval scale is learned on the even-numbered truths and checked on the odd ones
    (`ganflow.recalibration`; key ``recalibration``, which `run_calibration_cli` stores in the prior).
    ``checkpoint``: the truths done are kept there after each one (`ganflow.calibrate_state`) and the file is
    removed at the end; ``resume`` continues the run it holds (on one machine, with the numbers an uninterrupted
    run gives).
    Returns keys ``coverage`` (``{"latent"|"field": {"50"|"90"|"95": fraction}}``), ``n_indicators``,
    ``rank_test`` (pooled), ``tracked`` (per-coordinate histograms), ``per_truth``, ``settings``, ``warning``.
    """
    s = settings or CalibrateSettings()
    s.validate()
    cfg = config if isinstance(config, Config) else Config(config or {}, known=CALIBRATE_TABLES)
    solve_cfg = Config(_solve_config(cfg, recalibrate), known=SOLVE_TABLES)
    if recalibrate and truths is None:
        raise GanflowError("--recalibrate learns from held-out fields: give --truths FILE")
    G = load_prior(prior)
    held_out = _held_out_truths(truths, G, s.n_truths) if truths is not None else None
    if held_out is not None:
        s = CalibrateSettings(**{**asdict(s), "n_truths": int(held_out.shape[0])})
    if s.noise_sigma is None and s.noise_relative is None:
        s = CalibrateSettings(**{**asdict(s), "noise_relative": 0.1})
    kinds = ("field",) if held_out is not None else ("latent", "field")
    ckpt = os.fspath(checkpoint) if checkpoint is not None else None
    identity = run_identity(problem=problem, prior=prior if isinstance(prior, str) else type(prior).__name__,
                            truths=truths, settings=asdict(s), seed=seed, solve=solve_cfg.data, recalibrate=recalibrate)
    records, wall_before = load_records(ckpt, identity, resume)
    t_start = time.perf_counter()
    bar = Progress(s.n_truths, "calibrate", enabled=progress is True, unit="truth", initial=len(records))
    for t in range(len(records), s.n_truths):
        source = {"truth": held_out[t]} if held_out is not None else {"prior": G}
        records.append(_calibrate_truth(t, problem, G, source, s, solve_cfg, seed, kinds, recalibrate))
        if ckpt is not None:
            save_records(ckpt, identity, records, wall_before + time.perf_counter() - t_start)
        row, nan = records[-1]["row"], float("nan")
        bar.set_postfix(rel_l2_error=f"{row.get('rel_l2_error', nan):.3f}",
                        coverage_95=f"{row.get('coverage_95', nan):.3f}")
        bar.update(1)
        if callable(progress):
            progress(f"truth {t + 1}/{s.n_truths}: {row['wall_time_s']:.1f} s, rel. L2 error "
                     f"{row.get('rel_l2_error', nan):.3f}, 95 % coverage {row.get('coverage_95', nan):.3f}")
    bar.close()
    cover = {kind: {lvl: [r["cover"][kind][lvl] for r in records] for lvl in LEVELS} for kind in kinds}
    ranks = {kind: [r["ranks"][kind] for r in records] for kind in kinds}
    out = _summary(problem, prior, truths, s, seed, solve_cfg, G, cover, ranks, int(records[-1]["L"]))
    out["per_truth"] = [r["row"] for r in records]
    out["wall_time_s"] = wall_before + time.perf_counter() - t_start
    out["warning"] = _verdict(out)
    if recalibrate:
        out["recalibration"] = _learn_recalibration([r["interval"] for r in records],
                                                    json.loads(records[-1]["attrs"]), s, truths)
    if ckpt is not None:  # written after every truth, this call's or an earlier one's
        os.remove(ckpt)
    out["_ranks"] = {kind: np.stack(ranks[kind]) for kind in ranks}  # for the figure; not written to JSON
    return out


def _calibrate_truth(t: int, problem: str, G, source: dict, s: CalibrateSettings, solve_cfg: Config, seed: int,
                     kinds: tuple, recalibrate: bool) -> dict:
    """Simulate truth ``t``, solve it, and return what it adds to the calibration: its coverage indicators and
    SBC ranks per kind, its summary row, and (``recalibrate``) its field intervals with the solve's context."""
    t0 = time.perf_counter()
    obs = simulate(problem, operator_kwargs=solve_cfg.table("operator"), problem_kwargs=solve_cfg.table("problem"),
                   noise_sigma=s.noise_sigma, noise_relative=s.noise_relative, seed=seed * 100_003 + t, **source)
    result = solve(obs, G, method=s.method, config=solve_cfg, seed=seed * 100_003 + t + 50_000, progress=False)
    draws = _draws(result, G, s.shrink, obs, seed * 100_003 + t)
    L = min(s.n_rank_draws, draws["field"][0].shape[0])
    rec = {"cover": {}, "ranks": {}, "L": int(L)}
    for kind in kinds:
        x, truth = draws[kind]
        rec["cover"][kind] = {lvl: coverage_indicators(x, truth, lvl) for lvl in LEVELS}
        idx = np.linspace(0, x.shape[0] - 1, L).round().astype(int)  # evenly spaced: thins MCMC draws
        rec["ranks"][kind] = sbc_ranks(x[idx], truth)
    if recalibrate:
        rec["interval"] = ({lvl: central_interval(draws["field"][0], lvl) for lvl in LEVELS}, draws["field"][1])
        keys = ("problem", "operator", "operator_kwargs", "operator_settings", "representation_error")
        rec["attrs"] = json.dumps({k: result.attrs[k] for k in keys if k in result.attrs}, default=str)
    rec["row"] = _truth_row(t, obs, result, t0)
    return rec


def _summary(problem, prior, truths, s: CalibrateSettings, seed: int, solve_cfg: Config, G, cover: dict,
             ranks: dict, L: int) -> dict:
    """The JSON summary: coverage and rank tests per kind (``latent`` only with truths from the prior)."""
    sizes = {"latent": int(G.latent_dim), "field": int(np.prod(G.field_shape))}
    kinds = tuple(cover)
    out = {
        "problem": problem,
        "prior": prior if isinstance(prior, str) else type(prior).__name__,
        "truths": os.fspath(truths) if truths is not None else "prior",
        "method": s.method,
        "seed": int(seed),
        "settings": asdict(s),
        "solve_config": solve_cfg.data,
        "latent_dim": sizes["latent"],
        "field_size": sizes["field"],
        "n_rank_draws": int(L),
        "coverage": {kind: {str(int(lvl * 100)): float(np.mean(cover[kind][lvl])) for lvl in LEVELS} for kind in kinds},
        "n_indicators": {kind: s.n_truths * sizes[kind] for kind in kinds},
        "rank_test": {kind: rank_uniformity(np.stack(ranks[kind]), L, s.n_bins) for kind in kinds},
        "ganflow_version": __version__,
    }
    n_track = {"latent": s.n_track_latent, "field": s.n_track_field}
    track = {kind: _tracked_indices(sizes[kind], n_track[kind], kind == "latent") for kind in kinds}
    out["tracked"] = {
        kind: [{"index": i, **rank_uniformity(np.stack(ranks[kind])[:, i], L, s.n_bins)} for i in track[kind]]
        for kind in track
    }
    return out


def _held_out_truths(path, G, n_truths: int) -> torch.Tensor:
    """The first ``n_truths`` fields of ``path`` (all of them if fewer), checked against the prior's shape."""
    from .data import load_fields

    fd = load_fields(path)
    if tuple(fd.field_shape) != tuple(G.field_shape):
        raise GanflowError(
            f"--truths {fd.path}: fields {fd.field_shape} do not match the prior's {tuple(G.field_shape)}")
    if fd.fields.shape[0] < 2:
        raise GanflowError(f"--truths {fd.path}: need at least 2 fields, got {fd.fields.shape[0]}")
    return fd.fields[:n_truths]


def _draws(result, G, shrink: float, obs, seed: int) -> dict:
    """``{"latent"|"field": (draws [N, d], truth [d])}`` from a solve; fields through the solve's own field
    sampler (with the representation error when it is on)."""
    z = np.asarray(result.latent_samples, np.float64)
    if shrink != 1.0:
        z = z.mean(0) + shrink * (z - z.mean(0))
    fields = result.field_fn or G
    with torch.no_grad():
        parts = [torch.from_numpy(z[i : i + 1000]).float() for i in range(0, z.shape[0], 1000)]
        x = np.concatenate([fields(p).double().reshape(p.shape[0], -1).numpy() for p in parts])
    out = {"field": (x, obs.x_true.double().numpy().reshape(-1))}
    if obs.z_true is not None:
        out["latent"] = (z, obs.z_true.double().numpy())
    return out


def _truth_row(t: int, obs, result, t0: float) -> dict:
    row = {"truth": t, "noise_sigma": float(obs.noise_sigma), "wall_time_s": time.perf_counter() - t0}
    for key in ("rel_l2_error", "coverage_95", "psis_khat", "is_ess_ratio", "ppc_p_value"):
        if key in result.attrs:
            row[key] = float(result.attrs[key])
    return row


def _tracked_indices(size: int, n: int, leading: bool) -> list[int]:
    if leading:
        return list(range(min(n, size)))
    return [int(i) for i in np.linspace(0, size - 1, n + 2)[1:-1].round()] if n else []


def _verdict(out: dict) -> str | None:
    """A warning when the 90/95 % coverage is off by more than 3 binomial standard errors plus 2 points
    (the entries are correlated, so the naive standard error is too small; the 2 points absorb that)."""
    msgs = []
    for kind in out["coverage"]:
        for lvl in ("90", "95"):
            c = out["coverage"][kind][lvl]
            nominal = int(lvl) / 100
            se = np.sqrt(nominal * (1 - nominal) / out["n_indicators"][kind])
            if abs(c - nominal) > 3 * se + 0.02:
                msgs.append(f"{kind} {lvl}% coverage {c:.3f} ({'under' if c < nominal else 'over'}-coverage)")
    if msgs:
        return "miscalibrated posterior: " + "; ".join(msgs)
    return None


def _check_recalibration_target(prior: str, truths) -> None:
    """Before any solve: ``--recalibrate`` needs held-out truths and a writable checkpoint to store into."""
    if truths is None:
        raise GanflowError("--recalibrate learns from held-out fields: give --truths FILE")
    if not (isinstance(prior, str) and os.path.isfile(prior)):
        raise GanflowError(f"--recalibrate stores its scale in the prior checkpoint: {prior} is not a file")
    if not os.access(prior, os.W_OK):
        raise GanflowError(f"--recalibrate: cannot write the prior checkpoint {prior}")


def _store_recalibration(prior: str, rec: dict) -> None:
    """Add ``rec`` to the checkpoint ``prior`` (atomically; everything else unchanged)."""
    from .prior.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(prior)
    ckpt["recalibration"] = rec
    save_checkpoint(prior, ckpt)


def plot_calibration(out: dict, path: str) -> str:
    """The calibration figure: coverage vs nominal, pooled and per-coordinate rank histograms."""
    from .plots import plt, save_figure

    tracked = {kind: out["tracked"].get(kind, []) for kind in ("latent", "field")}
    ncols = max(3, len(tracked["latent"]), len(tracked["field"]))
    nrows = 1 + (1 if tracked["latent"] else 0) + (1 if tracked["field"] else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    ax = axes[0, 0]
    ax.set_visible(True)
    nominal = [int(v) / 100 for v in ("50", "90", "95")]
    for kind, marker in (("latent", "o"), ("field", "s")):
        if kind not in out["coverage"]:
            continue
        ax.plot(nominal, [out["coverage"][kind][v] for v in ("50", "90", "95")], marker, ls="-", label=kind)
    ax.plot([0.4, 1], [0.4, 1], "k--", lw=0.8)
    ax.set_xlabel("nominal")
    ax.set_ylabel("empirical coverage")
    ax.legend(fontsize=7)
    ax.set_title(
        f"coverage, T={out['settings']['n_truths']} ({'held-out' if out.get('truths', 'prior') != 'prior' else 'prior'}"
        f" truths), shrink={out['settings']['shrink']:g}", fontsize=8
    )

    def hist(ax, test, title):
        ax.set_visible(True)
        counts = np.asarray(test["counts"])
        expected = np.asarray(test["expected"])
        ax.bar(np.arange(counts.size), counts, width=1.0, color="C0", alpha=0.7)
        # 99 % band of a bin count under uniformity (binomial)
        p = expected / expected.sum()
        sd = np.sqrt(expected.sum() * p * (1 - p))
        ax.fill_between(
            np.arange(counts.size),
            expected - 2.58 * sd,
            expected + 2.58 * sd,
            step="mid",
            color="gray",
            alpha=0.3,
        )
        ax.set_title(f"{title}\nchi2 p={test['p_value']:.2g}", fontsize=8)
        ax.set_xticks([])

    for j, kind in enumerate(("latent", "field")):
        if kind in out["rank_test"]:
            hist(axes[0, 1 + j], out["rank_test"][kind], f"ranks, all {kind} {'coords' if j == 0 else 'entries'}")
    row = 1
    for kind in ("latent", "field"):
        if not tracked[kind]:
            continue
        for j, test in enumerate(tracked[kind]):
            hist(axes[row, j], test, f"{kind}[{test['index']}]")
        row += 1
    fig.suptitle(
        f"SBC: {out['problem']}, {out['method']}" + (f" - {out['warning']}" if out["warning"] else ""),
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def run_calibration_cli(
    *,
    problem: str,
    prior: str,
    n_truths: int | None,
    method: str | None,
    noise_sigma: float | None,
    noise_relative: float | None,
    shrink: float | None,
    outdir: str,
    config_path: str | None,
    seed: int,
    progress: bool | Callable[[str], None] | None,
    truths: str | None = None,
    recalibrate: bool = False,
    resume: bool = False,
) -> dict:
    """`calibrate` with settings from ``[calibrate]`` overridden by options; writes
    ``outdir/calibration.json``
    and ``outdir/calibration.png``; returns the summary with their paths under ``json`` and ``figure``.
    With ``recalibrate`` the learned scale is also stored in the prior checkpoint (key ``recalibration``).
    The truths done are kept in ``outdir/calibration.ckpt`` after each one; ``resume`` continues from it."""
    cfg = Config.from_file(config_path, known=CALIBRATE_TABLES)
    table = cfg.table("calibrate")
    for key, value in (("n_truths", n_truths), ("method", method), ("shrink", shrink)):
        if value is not None:
            table[key] = value
    if noise_sigma is not None or noise_relative is not None:
        table.pop("noise_sigma", None)
        table.pop("noise_relative", None)
        if noise_sigma is not None:
            table["noise_sigma"] = noise_sigma
        if noise_relative is not None:
            table["noise_relative"] = noise_relative
    settings = parse_settings(CalibrateSettings, table, "calibrate")
    outdir = os.fspath(outdir)
    parent = os.path.dirname(os.path.abspath(outdir))
    if not os.path.isdir(parent):
        raise GanflowError(f"output directory's parent does not exist: {parent}")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise GanflowError(f"output path is a file: {outdir}")
    if recalibrate:
        _check_recalibration_target(prior, truths)
    out = calibrate(problem, prior, settings, cfg, seed, progress, truths=truths, recalibrate=recalibrate,
                    checkpoint=os.path.join(outdir, CHECKPOINT_NAME), resume=resume)
    # created only after the inputs proved valid (the checkpoint makes it after the first truth), so a bad call
    # leaves nothing behind
    os.makedirs(outdir, exist_ok=True)
    if recalibrate:
        _store_recalibration(prior, out["recalibration"])
    ranks = out.pop("_ranks")
    json_path = os.path.join(outdir, "calibration.json")
    with atomic_path(json_path) as tmp:
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1, default=str)
    fig_path = plot_calibration(out, os.path.join(outdir, "calibration.png"))
    out["_ranks"] = ranks
    out["json"], out["figure"] = json_path, fig_path
    return out
