"""Prior-quality report: generated fields ``x_g = G(z)`` against held-out real fields ``x_r``.

The three headline figures, each beside its data-vs-data baseline (the same figure between two independent
halves ``A``, ``B`` of the held-out fields, so "as good as another draw of real data" reads as a ratio near 1).
Each compares ``M/2`` generated fields with half ``A``:

- ``pixel_w1``: the Wasserstein-1 distance between the pixel-value distributions, in units of the real values'
  sd (``pixel_w1_reference``: ``B`` against ``A``);
- ``std_rel_err = ||s_g - s_A|| / ||s_A||`` of the per-pixel std maps (``std_rel_err_reference``);
- ``swd``, the sliced Wasserstein distance below (``swd_reference``).

Further statistics (all in physical units), each set summarised the same way:

- mean and std maps ``m, s`` ``[*field_shape]``;
  ``mean_rel_err = ||m_g - m_r|| / ||(m_r^2 + s_r^2)^(1/2)||`` (relative to the real fields' RMS, so a
  zero-mean field does not divide by ~0);
- 2-D: the radially averaged power spectrum ``P(k) = <|FFT(x - m)|^2>`` over integer rings ``k = 1..n/2``,
  ``psd_log10_err = mean_k |log10 P_g(k) - log10 P_r(k)|``;
  1-D: the two-point correlation ``C(r) = <(x_i - m_i)(x_{i+r} - m_{i+r})> / <(x_i - m_i)^2>``,
  ``corr_max_abs_err = max_r |C_g(r) - C_r(r)|``;
- value histograms on common bins, ``hist_tv`` = total-variation distance ``(1/2) sum |p_g - p_r|``;
- the sliced Wasserstein distance ``SWD(a, b) = (mean_l W_2^2(<a, v_l>, <b, v_l>))^(1/2)`` over ``n_proj``
  random unit directions ``v_l`` of the flattened fields. ``swd`` compares ``M/2`` generated fields with one
  half of the held-out fields and ``swd_reference`` the two held-out halves with each other (same sample
  sizes), so ``swd / swd_reference`` near 1 means the prior is as close as another draw of real data.

Files: ``<prefix>.h5`` (``/real/{mean,std}``, ``/generated/{mean,std}``, ``/structure/{x,real,generated}``
with attr ``kind`` = ``psd`` or ``corr``, ``/hist/{edges,real,generated}``, ``/samples/{real,generated}``;
attrs: the metrics, ``n_real``, ``n_generated``, ``seed``) and ``<prefix>.png``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from ..errors import GanflowError
from ..io import atomic_h5, atomic_path

__all__ = [
    "sliced_wasserstein",
    "pixel_wasserstein1",
    "radial_power_spectrum",
    "two_point_correlation",
    "compute_report",
    "write_report",
    "prior_report",
    "format_summary",
]


def sliced_wasserstein(
    a: Tensor, b: Tensor, n_proj: int = 128, generator: torch.Generator | None = None
) -> float:
    """SWD between two equal-size samples ``a, b`` ``[m, ...]`` (flattened), ``n_proj`` random directions."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise GanflowError(
            f"sliced_wasserstein needs equal sample sizes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    v = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    v = v / v.norm(dim=0, keepdim=True)
    pa, pb = (a @ v).sort(0).values, (b @ v).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def pixel_wasserstein1(a: Tensor, b: Tensor) -> float:
    """W1 between the value distributions of two equal-size samples (all pixels pooled), in ``b``'s sd.

    For equal sizes the optimal coupling pairs the sorted values: ``W1 = mean |sort(a) - sort(b)|``.
    """
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    if a.shape != b.shape:
        raise GanflowError(f"pixel_wasserstein1 needs equal sizes, got {a.numel()} and {b.numel()} values")
    return float((a.sort().values - b.sort().values).abs().mean() / b.std().clamp_min(1e-30))


def _std_rel_err(a: Tensor, b: Tensor) -> float:
    """``||std_a - std_b|| / ||std_b||`` of the per-pixel std maps."""
    s_a, s_b = a.std(0), b.std(0)
    return float((s_a - s_b).norm() / s_b.norm().clamp_min(1e-30))


def _headline(gen: Tensor, real: Tensor, seed: int, n_proj: int) -> dict:
    """The three headline figures of ``gen`` against half ``A`` of ``real``, each with its B-vs-A baseline."""
    half = real.shape[0] // 2
    perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(int(seed) + 1))
    a, b, g = real[perm[:half]], real[perm[half : 2 * half]], gen[:half]
    swd = lambda u: sliced_wasserstein(u, a, n_proj, torch.Generator().manual_seed(int(seed) + 2))  # noqa: E731
    return {
        "pixel_w1": pixel_wasserstein1(g, a),
        "pixel_w1_reference": pixel_wasserstein1(b, a),
        "std_rel_err": _std_rel_err(g, a),
        "std_rel_err_reference": _std_rel_err(b, a),
        "swd": swd(g),
        "swd_reference": swd(b),
    }


def radial_power_spectrum(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``[M, n, n]`` -> (``k = 1..n/2``, ring-averaged ``<|FFT(x - mean)|^2>`` / n^2)."""
    x = x.double()
    x = x - x.mean(0)
    n = x.shape[-1]
    p = (torch.fft.fft2(x).abs() ** 2).mean(0).numpy() / n**2
    f = np.fft.fftfreq(n) * n
    r = np.rint(np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)).astype(int)
    k = np.arange(1, n // 2 + 1)
    return k, np.array([p[r == kk].mean() for kk in k])


def two_point_correlation(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``[M, d]`` -> (lags ``r = 0..d-1``, normalised correlation ``C(r)``)."""
    x = x.double()
    x = x - x.mean(0)
    d = x.shape[1]
    var = (x * x).mean()
    c = np.array([float((x[:, : d - r] * x[:, r:]).mean() / var) if var > 0 else 0.0 for r in range(d)])
    return np.arange(d), c


@torch.no_grad()
def _generate(generator, n: int, seed: int, batch: int = 256) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    param = next(iter(list(generator.parameters()) + list(generator.buffers())), None)
    device = param.device if param is not None else torch.device("cpu")
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), generator.latent_dim, generator=g)
        out.append(generator(z.to(device)).float().cpu())
    return torch.cat(out)


def compute_report(
    generator, real: Tensor, *, seed: int = 0, n_proj: int = 128, n_bins: int = 60, n_show: int = 8
) -> dict:
    """Compare ``generator`` (``[B, k] -> [B, *field_shape]``) with held-out ``real`` ``[M, *field_shape]``.

    ``M >= 4``.

    Returns a dict: ``metrics`` (floats), and arrays for the file and figure.
    """
    real = torch.as_tensor(real).float().cpu()
    shape = tuple(int(s) for s in generator.field_shape)
    if tuple(real.shape[1:]) != shape:
        raise GanflowError(f"report: real fields {tuple(real.shape[1:])} do not match the prior's {shape}")
    M = real.shape[0]
    if M < 4:
        raise GanflowError(f"report: need at least 4 held-out fields, got {M}")
    n_gen = max(M, 512)
    gen = _generate(generator, n_gen, seed)
    m_r, s_r, m_g, s_g = real.mean(0), real.std(0), gen.mean(0), gen.std(0)
    rms = (m_r**2 + s_r**2).sqrt()
    metrics = _headline(gen, real, seed, n_proj)
    metrics["mean_rel_err"] = float((m_g - m_r).norm() / rms.norm().clamp_min(1e-30))
    if len(shape) == 2:
        kx, p_r = radial_power_spectrum(real)
        _, p_g = radial_power_spectrum(gen)
        tiny = 1e-30
        metrics["psd_log10_err"] = float(np.mean(np.abs(np.log10(p_g + tiny) - np.log10(p_r + tiny))))
        structure = ("psd", kx, p_r, p_g)
    else:
        kx, c_r = two_point_correlation(real.reshape(M, -1))
        _, c_g = two_point_correlation(gen.reshape(n_gen, -1))
        metrics["corr_max_abs_err"] = float(np.max(np.abs(c_g - c_r)))
        structure = ("corr", kx, c_r, c_g)
    lo, hi = float(real.min()), float(real.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, n_bins + 1)
    h_r = np.histogram(real.numpy().clip(lo, hi), edges)[0] / real.numel()
    h_g = np.histogram(gen.numpy().clip(lo, hi), edges)[0] / gen.numel()
    metrics["hist_tv"] = float(0.5 * np.abs(h_r - h_g).sum())
    return {
        "metrics": metrics,
        "n_real": M,
        "n_generated": n_gen,
        "seed": int(seed),
        "real": {"mean": m_r.numpy(), "std": s_r.numpy()},
        "generated": {"mean": m_g.numpy(), "std": s_g.numpy()},
        "structure": structure,
        "hist": (edges, h_r, h_g),
        "samples": (real[:n_show].numpy(), gen[:n_show].numpy()),
    }


def write_report(rep: dict, prefix: str | os.PathLike) -> tuple[str, str]:
    """Write ``<prefix>.h5`` and ``<prefix>.png`` atomically; returns both paths."""
    prefix = os.fspath(prefix)
    h5_path, png_path = prefix + ".h5", prefix + ".png"
    with atomic_h5(h5_path) as f:
        for group in ("real", "generated"):
            for k, v in rep[group].items():
                f.create_dataset(f"{group}/{k}", data=np.asarray(v, np.float32))
        kind, x, s_r, s_g = rep["structure"]
        f.create_dataset("structure/x", data=x)
        f.create_dataset("structure/real", data=s_r)
        f.create_dataset("structure/generated", data=s_g)
        f["structure"].attrs["kind"] = kind
        edges, h_r, h_g = rep["hist"]
        f.create_dataset("hist/edges", data=edges)
        f.create_dataset("hist/real", data=h_r)
        f.create_dataset("hist/generated", data=h_g)
        f.create_dataset("samples/real", data=rep["samples"][0])
        f.create_dataset("samples/generated", data=rep["samples"][1])
        for k, v in rep["metrics"].items():
            f.attrs[k] = v
        for k in ("n_real", "n_generated", "seed"):
            f.attrs[k] = rep[k]
    with atomic_path(png_path) as tmp:
        _figure(rep).savefig(tmp, format="png", dpi=90)
    return h5_path, png_path


def _figure(rep: dict):
    """The report's figure: the field statistics and samples (2-D maps or 1-D curves), the two-point statistic
    and the value histogram, real against generated, under the summary line."""
    # matplotlib.figure.Figure needs no pyplot backend, so this works headless and in threads.
    import textwrap

    from matplotlib.figure import Figure

    real_s = rep["samples"][0]
    two_d = real_s.ndim == 3
    n_show = real_s.shape[0]
    fig = Figure(figsize=(max(10, 1.3 * n_show), 9 if two_d else 7), layout="constrained")
    gs = fig.add_gridspec(4 if two_d else 2, max(n_show, 4))
    ax_s, ax_h = (_maps_panels if two_d else _curves_panels)(fig, gs, rep)
    _structure_panel(ax_s, rep["structure"])
    _histogram_panel(ax_h, rep["hist"])
    fig.suptitle("\n".join(textwrap.wrap(format_summary(rep["metrics"]), 140)), fontsize=9)
    return fig


def _maps_panels(fig, gs, rep: dict):
    """2-D fields: mean and std maps (top row), samples (two bottom rows); returns the axes of the structure
    and histogram panels (second row)."""
    real_s, gen_s = rep["samples"]
    n_show = real_s.shape[0]
    width, third = max(n_show, 4), max(n_show, 4) // 3
    row = [fig.add_subplot(gs[0, i * width // 4 : (i + 1) * width // 4]) for i in range(4)]
    vm = (min(rep["real"]["mean"].min(), rep["generated"]["mean"].min()),
          max(rep["real"]["mean"].max(), rep["generated"]["mean"].max()))
    vs = (0, max(rep["real"]["std"].max(), rep["generated"]["std"].max()))
    for ax, img, title, lim in zip(
        row,
        [rep["real"]["mean"], rep["generated"]["mean"], rep["real"]["std"], rep["generated"]["std"]],
        ["real mean", "generated mean", "real std", "generated std"],
        [vm, vm, vs, vs],
        strict=True,
    ):
        ax.imshow(img, vmin=lim[0], vmax=lim[1], cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    lo, hi = min(real_s.min(), gen_s.min()), max(real_s.max(), gen_s.max())
    for i in range(n_show):
        for r, (arr, name) in enumerate(((real_s, "real"), (gen_s, "generated"))):
            ax = fig.add_subplot(gs[2 + r, i])
            ax.imshow(arr[i], vmin=lo, vmax=hi, cmap="viridis")
            ax.axis("off")
            if i == 0:
                ax.set_title(name, fontsize=8, loc="left")
    return fig.add_subplot(gs[1, : 2 * third]), fig.add_subplot(gs[1, 2 * third :])


def _curves_panels(fig, gs, rep: dict):
    """1-D fields: mean +- std and the samples as curves; returns the structure and histogram axes."""
    real_s, gen_s = rep["samples"]
    third = max(real_s.shape[0], 4) // 3
    ax_m = fig.add_subplot(gs[0, :third])
    t = np.arange(rep["real"]["mean"].shape[0])
    for name, c in (("real", "k"), ("generated", "C1")):
        m, s = rep[name]["mean"], rep[name]["std"]
        ax_m.plot(t, m, color=c, label=f"{name} mean")
        ax_m.fill_between(t, m - s, m + s, color=c, alpha=0.2)
    ax_m.legend(fontsize=7)
    ax_m.set_title("mean ± std", fontsize=9)
    ax_x = fig.add_subplot(gs[1, :])
    for arr, c in ((real_s, "k"), (gen_s, "C1")):
        for i in range(arr.shape[0]):
            ax_x.plot(arr[i], color=c, alpha=0.5, lw=0.8)
    ax_x.set_title("samples: real (black), generated (orange)", fontsize=9)
    return fig.add_subplot(gs[0, third : 2 * third]), fig.add_subplot(gs[0, 2 * third :])


def _structure_panel(ax, structure) -> None:
    """The radial power spectrum (``kind = "psd"``) or the two-point correlation, real against generated."""
    kind, x, s_r, s_g = structure
    plot = ax.loglog if kind == "psd" else ax.plot
    plot(x, s_r, "k-", label="real")
    plot(x, s_g, "C1--", label="generated")
    ax.set_xlabel("wavenumber k" if kind == "psd" else "lag r")
    ax.set_title("radial power spectrum" if kind == "psd" else "two-point correlation", fontsize=9)
    ax.legend(fontsize=7)


def _histogram_panel(ax, hist) -> None:
    edges, h_r, h_g = hist
    centers = 0.5 * (edges[1:] + edges[:-1])
    ax.plot(centers, h_r, "k-", label="real")
    ax.plot(centers, h_g, "C1--", label="generated")
    ax.set_title("value histogram", fontsize=9)
    ax.legend(fontsize=7)


def format_summary(metrics: dict) -> str:
    """One line: the three headline figures, each with its data-vs-data baseline, then the others."""
    parts = []
    if "pixel_w1" in metrics:  # reports written before the headline figures lack it
        parts.append(f"pixel W1 {metrics['pixel_w1']:.3f} sd (data vs data {metrics['pixel_w1_reference']:.3f})")
    ref = metrics.get("std_rel_err_reference")
    parts.append(f"std err {metrics['std_rel_err']:.3f}" + (f" (data vs data {ref:.3f})" if ref is not None else ""))
    ratio = metrics["swd"] / metrics["swd_reference"] if metrics["swd_reference"] > 0 else math.inf
    parts.append(f"SWD ratio {ratio:.2f} ({metrics['swd']:.4g} vs data-vs-data {metrics['swd_reference']:.4g})")
    parts.append(f"mean err {metrics['mean_rel_err']:.3f}")
    if "psd_log10_err" in metrics:
        parts.append(f"PSD log10 err {metrics['psd_log10_err']:.3f}")
    if "corr_max_abs_err" in metrics:
        parts.append(f"corr err {metrics['corr_max_abs_err']:.3f}")
    parts.append(f"hist TV {metrics['hist_tv']:.3f}")
    return "prior report: " + ", ".join(parts)


def prior_report(generator, real: Tensor, prefix: str | os.PathLike, *, seed: int = 0) -> dict:
    """Compute the report, write ``<prefix>.h5`` / ``<prefix>.png``; returns the metrics dict."""
    rep = compute_report(generator, real, seed=seed)
    write_report(rep, prefix)
    return rep["metrics"]
