"""``posterior.h5``: the result of a solve, its schema, and the `PosteriorResult` object.

Schema (docs/files.md; extended, never changed):

    /latent/samples                 [N, k]            posterior latent draws
    /latent/chains                  [C, S, k]         the MCMC draws chain by chain, in order (NUTS; Langevin:
                                                      its independent end points as [1, N, k]); for ArviZ
    /field/mean, /field/std         [*field_shape]
    /field/q025, /field/q25, /field/q50, /field/q75, /field/q975   [*field_shape]
    /field/samples                  [M, *field_shape]
    /obs/y, /obs/pred_mean          [*obs_shape]      data and posterior-predictive mean of A(G(z))
    /truth/x, /truth/z              when known
    /trace/loss (+ method-specific traces)
    /flow/state/<param>             the fitted flow's weights (flow only), to draw new samples later
    /representation/state/<name>    the solve's representation-error noise model (`RepresentationNoise`:
                                    sigma, obs_shift, obs_basis, field_mean, field_basis) when it was on;
                                    ``ganflow predict`` adds ``r | z, y`` to its field draws from it
    /qoi/<name>/mean, std, q025, q25, q50, q75, q975   [*qoi_shape]   (``ganflow predict``; `QoIStats`)
    /qoi/<name>/samples             [S, *qoi_shape]   a few draws of the QoI
    /qoi/<name>/truth, error, inside_95   [*qoi_shape] when the truth is known (error = mean - truth)
        attrs: spec, n, n_quantile, weighting ("none" | "psis"), coverage_95, abs_error_mean
    /diagnostics/log_weights [N], /diagnostics/ppc_d_obs [N], /diagnostics/ppc_d_rep [N]
    (ganflow.diagnostics)
    /psis/field/mean, std, q025 ... [*field_shape]   PSIS-reweighted field statistics (``predict --reweight``)
    attrs: method, config (JSON), ganflow_version, seed, latent_dim, noise_sigma, n_forward_evals,
           wall_time_s, field_shape (JSON), prior, problem, operator, operator_kwargs (JSON), operator_settings
           (JSON: the options with make_operator's defaults filled in), problem_kwargs (JSON), n_samples,
           n_quantile; with a known truth rel_l2_error, coverage_95, chi2_per_dof;
           method-specific scalars (e.g. step_size, rhat_max, ess_min, elbo); diagnostics psis_khat,
           is_ess_ratio, is_ess_ratio_raw, is_n_draws, ppc_p_value, ppc_chi2_per_dof, ppc_chi2_rep_per_dof,
           ppc_n_draws (see `ganflow.diagnostics`); representation_error ("on" | "off" | "none"),
           recalibration ("on" | "off" | "none" | "not applied: why") and recalibration_scale
           (`ganflow.recalibration`: every field draw was scaled about the mean by it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from . import __version__
from .errors import GanflowError
from .field_stats import QUANTILES, FieldSummary
from .io import atomic_h5, check_output_path, open_h5, read_json_attr
from .posterior.base import LatentFit

__all__ = ["PosteriorResult", "QoIStats", "truth_metrics", "REQUIRED_DATASETS", "REQUIRED_ATTRS",
           "quantile_key", "write_qoi", "read_qoi", "DIAGNOSTIC_ATTRS"]

# Scalar diagnostics a posterior.h5 may carry (written by solve and by ``ganflow predict``).
DIAGNOSTIC_ATTRS = ("psis_khat", "is_ess_ratio", "is_ess_ratio_raw", "is_n_draws", "ppc_p_value",
                    "ppc_chi2_per_dof", "ppc_chi2_rep_per_dof", "ppc_n_draws", "ppc_p_value_psis",
                    "ppc_chi2_per_dof_psis", "rhat_max", "ess_min")

REQUIRED_DATASETS = (
    "latent/samples", "field/mean", "field/std", "field/q025", "field/q975", "field/samples", "obs/y",
    "obs/pred_mean", "trace/loss",
)
REQUIRED_ATTRS = (
    "method", "config", "ganflow_version", "seed", "latent_dim", "noise_sigma", "n_forward_evals", "wall_time_s",
)


def quantile_key(q: float) -> str:
    """0.025 -> 'q025', 0.5 -> 'q50', 0.975 -> 'q975'."""
    s = f"{q:.3f}".split(".")[1].rstrip("0")
    return "q" + (s if len(s) >= 2 else s.ljust(2, "0"))


def truth_metrics(mean: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray, x_true: np.ndarray,
                  y: np.ndarray | None = None, pred_mean: np.ndarray | None = None,
                  noise_sigma: float | None = None) -> dict[str, float]:
    """``rel_l2_error`` of the mean, ``coverage_95`` (fraction of entries inside their interval) and
    ``chi2_per_dof`` of the posterior-predictive mean, ``||y - E[A(G(z))]||^2 / (sigma^2 m)``."""
    out = {
        "rel_l2_error": float(np.linalg.norm(mean - x_true) / max(np.linalg.norm(x_true), 1e-30)),
        "coverage_95": float(np.mean((x_true >= q_lo) & (x_true <= q_hi))),
    }
    if y is not None and pred_mean is not None and noise_sigma:
        r = (np.asarray(y, np.float64) - pred_mean).ravel()
        out["chi2_per_dof"] = float(r @ r / (noise_sigma**2 * r.size))
    return out


@dataclass
class QoIStats:
    """Posterior-predictive statistics of one quantity of interest ``f(x)`` (values ``[*qoi_shape]``).

    ``mean``, ``std`` are over all ``n`` draws (exact streaming moments); ``quantiles`` (levels 2.5, 25, 50,
    75,
    97.5 %) over the first ``n_quantile`` draws; ``samples`` ``[S, *qoi_shape]`` a few draws. With a known
    truth:
    ``truth``, ``error = mean - truth`` and ``inside_95`` (truth inside the central 95 % interval).
    ``weighting`` is ``"psis"`` for PSIS-reweighted statistics (``ganflow predict --reweight``), else
    ``"none"``.
    """

    name: str
    mean: np.ndarray
    std: np.ndarray
    quantiles: dict[float, np.ndarray]
    samples: np.ndarray
    n: int
    n_quantile: int
    spec: str = ""
    weighting: str = "none"
    truth: np.ndarray | None = None

    @property
    def error(self) -> np.ndarray | None:
        return None if self.truth is None else self.mean - self.truth

    @property
    def inside_95(self) -> np.ndarray | None:
        if self.truth is None:
            return None
        return (self.truth >= self.quantiles[0.025]) & (self.truth <= self.quantiles[0.975])

    def quantile(self, q: float) -> np.ndarray:
        for level, arr in self.quantiles.items():
            if abs(level - q) < 1e-9:
                return arr
        raise GanflowError(f"QoI '{self.name}': quantile {q} is not stored (stored: "
                           f"{', '.join(str(v) for v in self.quantiles)})")

    def credible_interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Central interval ``(lo, hi)`` at ``level`` (0.5 or 0.95: the stored quantiles)."""
        a = (1 - level) / 2
        return self.quantile(round(a, 6)), self.quantile(round(1 - a, 6))


def write_qoi(f: h5py.File, stats: QoIStats) -> None:
    """Write ``/qoi/<name>/`` (replacing an existing group of that name)."""
    key = f"qoi/{stats.name}"
    if key in f:
        del f[key]
    grp = f.create_group(key)
    grp.create_dataset("mean", data=np.asarray(stats.mean, np.float64))
    grp.create_dataset("std", data=np.asarray(stats.std, np.float64))
    for q, arr in stats.quantiles.items():
        grp.create_dataset(quantile_key(q), data=np.asarray(arr, np.float64))
    grp.create_dataset("samples", data=np.asarray(stats.samples, np.float32))
    grp.attrs.update({"spec": stats.spec, "n": int(stats.n), "n_quantile": int(stats.n_quantile),
                      "weighting": stats.weighting})
    if stats.truth is not None:
        grp.create_dataset("truth", data=np.asarray(stats.truth, np.float64))
        grp.create_dataset("error", data=np.asarray(stats.error, np.float64))
        grp.create_dataset("inside_95", data=np.asarray(stats.inside_95, bool))
        grp.attrs["coverage_95"] = float(np.mean(stats.inside_95))
        grp.attrs["abs_error_mean"] = float(np.mean(np.abs(stats.error)))


def read_qoi(grp: h5py.Group, name: str) -> QoIStats:
    """Read one ``/qoi/<name>`` group."""
    quantiles = {q: grp[quantile_key(q)][()] for q in QUANTILES if quantile_key(q) in grp}

    def attr(key, default):
        v = grp.attrs.get(key, default)
        return v.decode() if isinstance(v, bytes) else v

    return QoIStats(name=name, mean=grp["mean"][()], std=grp["std"][()], quantiles=quantiles,
                    samples=grp["samples"][()], n=int(attr("n", 0)), n_quantile=int(attr("n_quantile", 0)),
                    spec=str(attr("spec", "")), weighting=str(attr("weighting", "none")),
                    truth=grp["truth"][()] if "truth" in grp else None)


def _read_state(f: h5py.File, group: str) -> dict[str, Tensor]:
    """The datasets under ``group`` (nested names joined by '/') as tensors; empty when it is absent."""
    state: dict[str, Tensor] = {}
    if group in f:
        f[group].visititems(lambda name, obj: state.__setitem__(name, torch.from_numpy(np.asarray(obj[()])))
                            if isinstance(obj, h5py.Dataset) else None)
    return state


@dataclass
class PosteriorResult:
    """A posterior over fields, with its statistics; returned by `ganflow.solve` and read from posterior.h5.

    In the process that solved, ``sample(n)`` draws new posterior fields (fresh flow draws, or stored MCMC
    draws resampled); a result read back from disk knows its statistics and stored samples.
    """

    method: str
    latent_dim: int
    field_shape: tuple[int, ...]
    noise_sigma: float
    summary: FieldSummary
    y: np.ndarray
    trace: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    x_true: np.ndarray | None = None
    z_true: np.ndarray | None = None
    flow_state: dict[str, Tensor] = field(default_factory=dict)
    fit: LatentFit | None = None
    generator: Any = None
    path: str | None = None
    qois: dict[str, QoIStats] = field(default_factory=dict)  # /qoi (ganflow predict)
    diagnostic_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # /diagnostics
    field_fn: Any = None  # z [B, k] -> field draws [B, *field_shape] (with r | z, y); in the solving process
    # the representation-error noise model of the solve (RepresentationNoise.state(); /representation/state)
    representation_state: dict[str, Tensor] = field(default_factory=dict)
    latent_chains: np.ndarray | None = None  # [C, S, k] /latent/chains (`LatentFit.chains`)

    # statistics -----------------------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        return self.summary.mean

    @property
    def std(self) -> np.ndarray:
        return self.summary.std

    @property
    def latent_samples(self) -> np.ndarray:
        return self.summary.latent_samples

    def quantile(self, q: float) -> np.ndarray:
        """A pixel-wise quantile of the field (stored levels: 2.5, 25, 50, 75, 97.5 %)."""
        for level, arr in self.summary.quantiles.items():
            if abs(level - q) < 1e-9:
                return arr
        raise GanflowError(f"quantile {q} is not stored (stored: {', '.join(str(v) for v in self.summary.quantiles)})")

    def credible_interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        a = (1 - level) / 2
        return self.quantile(round(a, 6)), self.quantile(round(1 - a, 6))

    @property
    def metrics(self) -> dict[str, float]:
        keys = ("rel_l2_error", "coverage_95", "chi2_per_dof")
        return {k: self.attrs[k] for k in keys if k in self.attrs}

    def qoi(self, name: str) -> QoIStats:
        """Statistics of a computed quantity of interest (``ganflow predict`` / `ganflow.qoi.predict`):
        ``r.qoi("total").mean``, ``.std``, ``.quantile(0.5)``, ``.credible_interval(0.95)``, ``.error``."""
        if name not in self.qois:
            known = ", ".join(sorted(self.qois)) or "none"
            raise GanflowError(f"no QoI '{name}' in this posterior (computed: {known}); run `ganflow predict "
                               f"posterior.h5 --qoi {name}`")
        return self.qois[name]

    @property
    def diagnostics(self) -> dict[str, float]:
        """The scalar diagnostics present: ``psis_khat``, ``is_ess_ratio`` (flow), ``ppc_p_value``,
        ``ppc_chi2_per_dof`` (every method), ``rhat_max``, ``ess_min`` (NUTS); see `ganflow.diagnostics`."""
        return {k: self.attrs[k] for k in DIAGNOSTIC_ATTRS if k in self.attrs}

    # figures --------------------------------------------------------------------------------------
    def plot(self, outdir: str | os.PathLike, force: bool = False) -> list[str]:
        """Write all figures (fields, samples, traces, data fit, QoIs, diagnostics) into ``outdir`` (existing
        figures there need ``force``)."""
        from .plots import plot_posterior  # plots sit above results in the layering

        return plot_posterior(self, outdir, force=force)

    def plot_qoi(self, name: str, ax=None):
        """Histogram of a scalar QoI's stored draws with its mean, 95 % interval and the truth; returns the
        axes."""
        from .plots import plot_qoi_hist

        return plot_qoi_hist(self.qoi(name), ax=ax)

    # sampling -------------------------------------------------------------------------------------
    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        if self.fit is not None:
            return self.fit.draw(n, g)
        stored = torch.from_numpy(self.latent_samples)
        return LatentFit(self.method, samples=stored).draw(n, g)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, *field_shape]`` posterior field draws (needs the generator: available after a solve); in the
        solving process they include the representation error's ``r | z, y`` when the solve used it."""
        if self.generator is None:
            raise GanflowError("this result has no generator attached: set result.generator = "
                               "ganflow.load_prior(PRIOR) (the prior it was solved with)")
        with torch.no_grad():
            return (self.field_fn or self.generator)(self.sample_latent(n, generator))

    # files ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, force: bool = False) -> str:
        """Write ``posterior.h5`` atomically (refuses to overwrite an existing file unless ``force``)."""
        path = check_output_path(path, force, "posterior")
        s = self.summary
        with atomic_h5(path) as f:
            f.create_dataset("latent/samples", data=np.asarray(s.latent_samples, np.float32))
            if self.latent_chains is not None:
                # the dtype the sampler ran in: ArviZ then recomputes its R-hat and ESS to the last digit
                f.create_dataset("latent/chains", data=np.asarray(self.latent_chains))
            f.create_dataset("field/mean", data=s.mean)
            f.create_dataset("field/std", data=s.std)
            for q, arr in s.quantiles.items():
                f.create_dataset(f"field/{quantile_key(q)}", data=arr)
            f.create_dataset("field/samples", data=np.asarray(s.samples, np.float32), compression="gzip")
            f.create_dataset("obs/y", data=np.asarray(self.y, np.float32))
            pred = s.obs_pred_mean if s.obs_pred_mean is not None else np.full_like(self.y, np.nan, np.float32)
            f.create_dataset("obs/pred_mean", data=np.asarray(pred, np.float32))
            if self.x_true is not None:
                f.create_dataset("truth/x", data=np.asarray(self.x_true, np.float32))
            if self.z_true is not None:
                f.create_dataset("truth/z", data=np.asarray(self.z_true, np.float32))
            for name, arr in self.trace.items():
                f.create_dataset(f"trace/{name}", data=np.asarray(arr))
            if "loss" not in self.trace:
                f.create_dataset("trace/loss", data=np.zeros(0))
            for name, t in self.flow_state.items():
                f.create_dataset(f"flow/state/{name}", data=t.detach().cpu().numpy())
            for name, t in self.representation_state.items():
                f.create_dataset(f"representation/state/{name}", data=t.detach().cpu().numpy())
            for stats in self.qois.values():
                write_qoi(f, stats)
            for name, arr in self.diagnostic_arrays.items():
                f.create_dataset(f"diagnostics/{name}", data=np.asarray(arr))
            attrs = dict(self.attrs)
            attrs.update({
                "method": self.method,
                "config": json.dumps(self.config, default=str),
                "ganflow_version": __version__,
                "latent_dim": int(self.latent_dim),
                "noise_sigma": float(self.noise_sigma),
                "field_shape": json.dumps(list(self.field_shape)),
                "n_samples": int(s.n),
                "n_quantile": int(s.n_quantile),
            })
            for key, value in attrs.items():
                if value is None:
                    continue
                if isinstance(value, (dict, list, tuple)):
                    value = json.dumps(value, default=str)
                f.attrs[key] = value
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PosteriorResult":
        """Read ``posterior.h5`` (statistics, stored draws, traces, attributes)."""
        path = os.fspath(path)
        with open_h5(path, "posterior file") as f:
            missing = [d for d in REQUIRED_DATASETS if d not in f]
            missing += [f"@{a}" for a in REQUIRED_ATTRS if a not in f.attrs]
            if missing:
                raise GanflowError(f"{path} is not a ganflow posterior file (missing {', '.join(missing)})")
            try:
                quantiles = {}
                for q in QUANTILES:
                    key = f"field/{quantile_key(q)}"
                    if key in f:
                        quantiles[q] = f[key][()]
                summary = FieldSummary(
                    n=int(f.attrs.get("n_samples", f["latent/samples"].shape[0])),
                    mean=f["field/mean"][()],
                    std=f["field/std"][()],
                    quantiles=quantiles,
                    samples=f["field/samples"][()],
                    latent_samples=f["latent/samples"][()],
                    obs_pred_mean=f["obs/pred_mean"][()],
                    n_quantile=int(f.attrs.get("n_quantile", 0)),
                )
                attrs = {}
                for key, value in f.attrs.items():
                    if isinstance(value, bytes):
                        value = value.decode()
                    if isinstance(value, np.generic):
                        value = value.item()
                    attrs[key] = value
                config = read_json_attr(f, "config", {}, path)
                field_shape = tuple(read_json_attr(f, "field_shape", list(summary.mean.shape), path))
                trace = {k: f["trace"][k][()] for k in f["trace"]}
                flow_state = _read_state(f, "flow/state")
                representation_state = _read_state(f, "representation/state")
                qois = {name: read_qoi(f["qoi"][name], name) for name in f["qoi"]} if "qoi" in f else {}
                diagnostic_arrays = ({k: f["diagnostics"][k][()] for k in f["diagnostics"]}
                                     if "diagnostics" in f else {})
                return cls(
                    method=str(attrs["method"]),
                    latent_dim=int(attrs["latent_dim"]),
                    field_shape=field_shape,
                    noise_sigma=float(attrs["noise_sigma"]),
                    summary=summary,
                    y=f["obs/y"][()],
                    trace=trace,
                    attrs=attrs,
                    config=config,
                    x_true=f["truth/x"][()] if "truth/x" in f else None,
                    z_true=f["truth/z"][()] if "truth/z" in f else None,
                    flow_state=flow_state,
                    representation_state=representation_state,
                    path=path,
                    qois=qois,
                    diagnostic_arrays=diagnostic_arrays,
                    latent_chains=f["latent/chains"][()] if "latent/chains" in f else None,
                )
            except (KeyError, OSError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise GanflowError(f"{path}: cannot read posterior file ({e})") from None
