"""Figures of a posterior (matplotlib, Agg backend; each PNG written atomically).

``plot_posterior(result, outdir)`` writes

- ``fields.png``: truth, posterior mean, std, |error| and the 95 %-interval coverage map (2-D fields), or the
  mean with its 95 % band and the truth (1-D fields);
- ``samples.png``: a grid of posterior field samples;
- ``trace.png``: the per-iteration objective (and any other traces);
- ``obs.png``: data against the posterior-predictive mean;
- ``qoi.png``: histograms of each computed QoI (``ganflow predict``) with the 95 % interval and the truth;
- ``diagnostics.png``: the largest importance weights with the PSIS k-hat (flow), and the posterior-predictive
  check, ``D_obs`` against ``D_rep`` with its p-value.
Diagnostic values (error, coverage, chi^2, k-hat, ESS/N, predictive p-value, R-hat, ESS) go in the titles.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .diagnostics import KHAT_BAD  # noqa: E402
from .errors import GanflowError  # noqa: E402
from .io import atomic_path  # noqa: E402

__all__ = ["plot_posterior", "FIGURE_NAMES", "save_figure", "plot_qoi_hist", "plot_qois", "plot_diagnostics"]

# the next step a fields figure names when the flow's PSIS k-hat says it is unreliable (`khat_warning`)
KHAT_NEXT_STEP = "next: refine ([langevin] init = \"flow\"), check with --method nuts, or predict --reweight"


def save_figure(fig, path: str) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _title_metrics(result) -> str:
    m = result.metrics
    parts = []
    if "rel_l2_error" in m:
        parts.append(f"rel. L2 err {m['rel_l2_error']:.3f}")
    if "coverage_95" in m:
        parts.append(f"95% coverage {m['coverage_95']:.2f}")
    if "chi2_per_dof" in m:
        parts.append(f"chi2/dof {m['chi2_per_dof']:.2f}")
    return ", ".join(parts)


def _title_diagnostics(result) -> str:
    """k-hat, ESS/N (flow), predictive chi^2/dof and p-value (every method), R-hat and ESS (NUTS)."""
    a = result.attrs
    parts = []
    if "psis_khat" in a:
        parts.append(f"k-hat {a['psis_khat']:.2f}" + (" (UNRELIABLE)" if a["psis_khat"] > KHAT_BAD else ""))
    if "is_ess_ratio" in a:
        parts.append(f"ESS/N {a['is_ess_ratio']:.2f}")
    if "ppc_chi2_per_dof" in a:
        parts.append(f"PPC chi2/dof {a['ppc_chi2_per_dof']:.2f}")
    if "ppc_p_value" in a:
        parts.append(f"p {a['ppc_p_value']:.2f}")
    if "rhat_max" in a:
        parts.append(f"R-hat {a['rhat_max']:.3f}")
    if "ess_min" in a:
        parts.append(f"ESS min {a['ess_min']:.0f}")
    return ", ".join(parts)


def plot_qoi_hist(stats, ax=None):
    """Histogram of a QoI's stored draws (its first value if not scalar), mean, 95 % interval, truth."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    samples = np.asarray(stats.samples, float).reshape(len(stats.samples), -1)[:, 0]
    first = lambda a: float(np.asarray(a).reshape(-1)[0])  # noqa: E731
    ax.hist(samples, bins=min(40, max(5, samples.size // 10)), color="C0", alpha=0.6, density=True)
    lo, hi = stats.credible_interval(0.95)
    ax.axvspan(first(lo), first(hi), color="C0", alpha=0.15, label="95% interval")
    ax.axvline(first(stats.mean), color="C0", label="mean")
    title = f"{stats.name}" + ("" if np.asarray(stats.mean).size == 1 else "[0]")
    title += f": {first(stats.mean):.3g} ± {first(stats.std):.2g}"
    if stats.truth is not None:
        ax.axvline(first(stats.truth), color="k", ls="--", label="truth")
        title += f", error {first(stats.error):.2g}"
    if stats.weighting != "none":
        title += f" ({stats.weighting})"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return ax


def plot_qois(result, path: str) -> str | None:
    """``qoi.png``: one histogram panel per computed QoI; None when there are none."""
    if not result.qois:
        return None
    n = len(result.qois)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for ax, stats in zip(axes[0], result.qois.values(), strict=True):
        plot_qoi_hist(stats, ax)
    fig.suptitle(f"{result.method}: quantities of interest", fontsize=10)
    return save_figure(fig, path)


def plot_diagnostics(result, path: str) -> str | None:
    """``diagnostics.png``: sorted log importance weights (flow) and the predictive-check scatter."""
    arr = result.diagnostic_arrays
    panels = [p for p in ("log_weights", "ppc") if (p in arr) or (p == "ppc" and "ppc_d_obs" in arr)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    a = result.attrs
    for ax, p in zip(axes[0], panels, strict=True):
        if p == "log_weights":
            lw = np.sort(np.asarray(arr["log_weights"], float))[::-1]
            lw = lw[np.isfinite(lw)]
            ax.plot(np.arange(1, lw.size + 1), lw - lw.max(), lw=1)
            m = int(np.ceil(min(0.2 * lw.size, 3 * np.sqrt(lw.size))))
            ax.axvline(m, color="gray", ls=":", label=f"tail M={m}")
            ax.set_xscale("log")
            ax.set_xlabel("rank")
            ax.set_ylabel("log w - max")
            ax.legend(fontsize=7)
            ax.set_title(f"importance weights: k-hat {a.get('psis_khat', float('nan')):.2f}, "
                         f"ESS/N {a.get('is_ess_ratio', float('nan')):.2f}", fontsize=8)
        else:
            d_obs, d_rep = np.asarray(arr["ppc_d_obs"], float), np.asarray(arr["ppc_d_rep"], float)
            ax.scatter(d_obs, d_rep, s=3, alpha=0.4)
            lims = [min(d_obs.min(), d_rep.min()), max(d_obs.max(), d_rep.max())]
            ax.plot(lims, lims, "k--", lw=0.8)
            ax.set_xlabel("D(y, z) = ||y - A(G(z))||²/σ²")
            ax.set_ylabel("D(y_rep, z)")
            ax.set_title(f"predictive check: p {a.get('ppc_p_value', float('nan')):.2f}, chi2/dof "
                         f"{a.get('ppc_chi2_per_dof', float('nan')):.2f}", fontsize=8)
    fig.suptitle(f"{result.method}: diagnostics", fontsize=10)
    return save_figure(fig, path)


def _imshow(ax, img, title, cmap="viridis", vmin=None, vmax=None):
    im = ax.imshow(img, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _as_image(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a
    if a.ndim == 3:  # channels first: show the first channel
        return a[0]
    raise GanflowError(f"cannot plot a field of shape {a.shape}")


# Every figure plot_posterior may write, checked together before any is written.
FIGURE_NAMES = ("fields.png", "samples.png", "trace.png", "obs.png", "qoi.png", "diagnostics.png")


def _check_figure_dir(outdir: str, force: bool) -> None:
    parent = os.path.dirname(os.path.abspath(outdir))
    if not os.path.isdir(parent):
        raise GanflowError(f"output directory's parent does not exist: {parent}")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise GanflowError(f"output path is a file, not a directory: {outdir}")
    existing = [n for n in FIGURE_NAMES if os.path.exists(os.path.join(outdir, n))]
    if existing and not force:
        raise GanflowError(f"{outdir} already holds {', '.join(existing)} (use --force to overwrite)")


def plot_posterior(result, outdir: str | os.PathLike, force: bool = False) -> list[str]:
    """Write the posterior figures into ``outdir`` (created if missing); return their paths. Figures already
    there are an error unless ``force``."""
    outdir = os.fspath(outdir)
    _check_figure_dir(outdir, force)
    os.makedirs(outdir, exist_ok=True)
    path = lambda name: os.path.join(outdir, name)  # noqa: E731
    if result.mean.ndim == 1:
        written = [_plot_band(result, path("fields.png"))]
    else:
        written = [_plot_field_maps(result, path("fields.png")), _plot_samples(result, path("samples.png"))]
    written += [
        _plot_traces(result, path("trace.png")),
        _plot_data_fit(result, path("obs.png")),
        plot_qois(result, path("qoi.png")),
        plot_diagnostics(result, path("diagnostics.png")),
    ]
    return [p for p in written if p is not None]


def _suptitle(result) -> str:
    """The method, the error metrics and the diagnostics, for the title of ``fields.png``."""
    suptitle = f"{result.method} posterior" + (f" - {_title_metrics(result)}" if _title_metrics(result) else "")
    if _title_diagnostics(result):
        suptitle += "\n" + _title_diagnostics(result)
    if result.attrs.get("psis_khat", 0.0) > KHAT_BAD:  # the figure a user shares says what to do, as the console does
        suptitle += "\n" + KHAT_NEXT_STEP
    return suptitle


def _plot_band(result, path: str) -> str:
    """``fields.png`` of a 1-D field: the posterior mean with its 95 % band, and the truth."""
    mean, truth = result.mean, result.x_true
    lo, hi = result.credible_interval(0.95)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    t = np.arange(mean.size)
    ax.fill_between(t, lo, hi, alpha=0.3, label="95% interval")
    ax.plot(t, mean, label="posterior mean")
    if truth is not None:
        ax.plot(t, truth, "k--", label="truth")
    ax.legend(fontsize=8)
    ax.set_title(_suptitle(result), fontsize=9)
    return save_figure(fig, path)


def _plot_field_maps(result, path: str) -> str:
    """``fields.png`` of a 2-D field: truth, mean, std, |error| and the 95 %-interval coverage map."""
    mean, std, truth = result.mean, result.std, result.x_true
    lo, hi = result.credible_interval(0.95)
    panels = []
    if truth is not None:
        panels.append(("truth", _as_image(truth), "viridis"))
    panels.append(("posterior mean", _as_image(mean), "viridis"))
    panels.append(("posterior std", _as_image(std), "magma"))
    if truth is not None:
        panels.append(("|mean - truth|", np.abs(_as_image(mean) - _as_image(truth)), "magma"))
        inside = ((truth >= lo) & (truth <= hi)).astype(float)
        panels.append(("truth inside 95% interval", _as_image(inside), "RdYlGn"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    axes = np.atleast_1d(axes)
    vmin = vmax = None
    if truth is not None:  # truth and mean on one colour scale, so they compare by eye
        vmin, vmax = float(min(truth.min(), mean.min())), float(max(truth.max(), mean.max()))
    for ax, (title, img, cmap) in zip(axes, panels, strict=True):
        shared = title in ("truth", "posterior mean")
        _imshow(ax, img, title, cmap, vmin if shared else None, vmax if shared else None)
    text = _suptitle(result)
    # a third line (the next step) rises above the panels' titles; the tight bounding box keeps it on the page
    fig.suptitle(text, fontsize=10, y=0.98 + 0.06 * max(0, text.count("\n") - 1))
    return save_figure(fig, path)


def _plot_samples(result, path: str) -> str | None:
    """``samples.png``: up to 16 posterior field samples (2-D fields); None when there are none."""
    samples = result.summary.samples[:16]
    if not len(samples):
        return None
    n = len(samples)
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(_as_image(samples[i]), origin="lower", cmap="viridis")
    fig.suptitle(f"{result.method}: posterior samples", fontsize=10)
    return save_figure(fig, path)


def _plot_traces(result, path: str) -> str | None:
    """``trace.png``: one panel per per-iteration trace; None when there are none."""
    trace_items = [(k, v) for k, v in result.trace.items() if np.asarray(v).ndim == 1 and np.asarray(v).size > 1]
    if not trace_items:
        return None
    fig, axes = plt.subplots(1, len(trace_items), figsize=(4 * len(trace_items), 3), squeeze=False)
    for ax, (name, arr) in zip(axes[0], trace_items, strict=True):
        arr = np.asarray(arr, float)
        ax.plot(arr, lw=0.8)
        ax.set_title(name, fontsize=9)
        if name in ("loss",) and np.all(np.isfinite(arr)) and arr.size > 20:
            lo_, hi_ = np.percentile(arr, [1, 99])
            ax.set_ylim(lo_ - 0.1 * abs(hi_ - lo_), hi_ + 0.1 * abs(hi_ - lo_))
    fig.suptitle(f"{result.method}: traces", fontsize=10)
    return save_figure(fig, path)


def _plot_data_fit(result, path: str) -> str | None:
    """``obs.png``: the data against the posterior-predictive mean; None without a finite prediction."""
    pred = result.summary.obs_pred_mean
    if pred is None or not np.all(np.isfinite(pred)):
        return None
    y = np.asarray(result.y).ravel()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.errorbar(y, np.asarray(pred).ravel(), xerr=2 * result.noise_sigma, fmt=".", ms=3, alpha=0.6, lw=0.5)
    lims = [min(y.min(), pred.min()), max(y.max(), pred.max())]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set_xlabel("observed y (±2σ)")
    ax.set_ylabel("posterior-predictive mean")
    ax.set_title("data fit", fontsize=9)
    return save_figure(fig, path)
