"""Posterior-predictive statistics of quantities of interest (QoIs), written into posterior.h5.

A QoI is a function ``f`` mapping a batch of fields ``[B, *field_shape]`` to values ``[B, *qoi_shape]`` (any
shape): the problem's ``qois()`` by name, or a user spec ``path/file.py:attr`` / ``package.module:attr``
(``NAME=SPEC`` renames it). For ``N`` posterior latent draws ``z_i`` -- fresh draws of the stored flow, or
the stored draws of a sample-based method (Langevin, NUTS) -- the values ``f(x_i)`` are streamed, where
``x_i = G(z_i)`` plus, when the solve used the representation error, a draw of ``r | z_i, y`` from the noise
model stored in ``/representation/state``, scaled about the posterior mean by ``recalibration_scale`` when the
solve applied one (the same field draws the solve summarised):

    mean, std      exact over all N draws (parallel Welford update, float64; weighted with --reweight)
    quantiles      2.5, 25, 50, 75, 97.5 % over the first ``n_quantile`` draws (all of them by default)

and written under ``/qoi/NAME/`` (see `ganflow.results`). With a known truth ``x*`` (``/truth/x``), also
``f(x*)``, the error ``mean - f(x*)`` and whether ``f(x*)`` lies in the central 95 % interval.

With ``reweight=True`` (flow only) every statistic is taken under the Pareto-smoothed importance weights of the
draws (`ganflow.diagnostics.psis`): ``E_p[f] ~= sum_i w_i f(G(z_i))``, which corrects a flow that is slightly off;
PSIS-reweighted field statistics go to ``/psis/field``. The diagnostics (PSIS ``k_hat``, ESS/N, posterior-predictive
check) are recomputed from the same draws and replace the solve's attributes.

posterior.h5 is updated safely: everything is computed first, then the file is copied to a temporary name
beside it, modified, and renamed into place; on any error the original file is untouched.

Example:
    >>> report = predict("posterior.h5", qois=["total"], n=4000, seed=0)   # doctest: +SKIP
    >>> report.qois["total"].mean, report.qois["total"].credible_interval(0.95)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from .diagnostics import DiagnosticsResult, diagnose_draws, draw_flow, khat_warning
from .errors import GanflowError
from .field_stats import QUANTILES, StreamingMoments, WeightedMoments, weighted_quantiles
from .io import atomic_path
from .plugins import check_spec_from_file, load_problem, resolve_spec
from .posterior.flow import flow_from_state
from .posterior.target import LatentTarget
from .results import PosteriorResult, QoIStats, quantile_key, write_qoi

__all__ = [
    "predict",
    "PredictReport",
    "resolve_qois",
    "WeightedMoments",
    "weighted_quantiles",
    "qoi_statistics",
    "posterior_latent_draws",
]

DEFAULT_FLOW_DRAWS = 4_000


def _qoi_name(spec: str) -> str:
    attr = spec.rsplit(":", 1)[1]
    return attr.rsplit(".", 1)[-1]


def resolve_qois(specs, problem: str | None, problem_kwargs: dict | None) -> dict[str, tuple[str, Callable]]:
    """``NAME`` (a ``qois()`` entry of the problem), ``SPEC`` or ``NAME=SPEC`` -> ``{name: (spec, fn)}``.

    No specs: every QoI of the problem. A spec's ``attr`` may be the function itself or a zero-argument
    factory returning it (a class instance with ``__call__`` is used as is).
    """
    specs = list(specs or ())
    problem_qois = None

    def from_problem() -> dict:
        nonlocal problem_qois
        if problem_qois is None:
            if not problem:
                raise GanflowError(
                    "this posterior names no problem: give --problem P, or QoIs as --qoi path/file.py:attr"
                )
            p = load_problem(problem, **(problem_kwargs or {}))
            fn = getattr(p, "qois", None)
            problem_qois = dict(fn()) if callable(fn) else {}
        return problem_qois

    if not specs:
        found = from_problem()
        if not found:
            raise GanflowError(f"problem '{problem}' defines no qois(); give --qoi path/file.py:attr")
        return {name: (f"{problem}:qois()[{name}]", fn) for name, fn in found.items()}
    out: dict[str, tuple[str, Callable]] = {}
    for spec in specs:
        spec = spec.strip()
        name = None
        if "=" in spec.split(":", 1)[0]:
            name, spec = (s.strip() for s in spec.split("=", 1))
        if ":" in spec:
            obj = resolve_spec(spec)
            if isinstance(obj, type) or (callable(obj) and _takes_no_args(obj)):
                try:
                    obj = obj()
                except Exception as e:  # a user's factory failed: their error, one line
                    raise GanflowError(
                        f"QoI spec '{spec}': calling the factory failed: {type(e).__name__}: {e}"
                    ) from None
            if not callable(obj):
                raise GanflowError(f"QoI spec '{spec}' is not callable")
            name = name or _qoi_name(spec)
            out[name] = (spec, obj)
        else:
            found = from_problem()
            if spec not in found:
                raise GanflowError(
                    f"unknown QoI '{spec}' (problem '{problem}' has: "
                    f"{', '.join(sorted(found)) or 'none'}; or give path/file.py:attr)"
                )
            out[name or spec] = (f"{problem}:qois()[{spec}]", found[spec])
    for name in out:
        if not name or "/" in name or name.startswith("."):
            raise GanflowError(f"invalid QoI name '{name}' (no '/', not empty)")
    return out


def _takes_no_args(fn) -> bool:
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return (
        all(
            p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in sig.parameters.values()
        )
        and len(sig.parameters) == 0
    )


def _apply_qoi(name: str, fn: Callable, x: Tensor) -> np.ndarray:
    """``fn(x)`` ``[B, ...]`` as float64 numpy, with one-line errors for failures and wrong shapes."""
    try:
        with torch.no_grad():
            v = fn(x)
    except GanflowError:
        raise
    except Exception as e:  # the user's QoI failed: report it as their error, in one line
        raise GanflowError(
            f"QoI '{name}' failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    try:
        v = v.detach().cpu().double().numpy() if isinstance(v, Tensor) else np.asarray(v, np.float64)
    except (TypeError, ValueError) as e:
        raise GanflowError(
            f"QoI '{name}' must return a tensor or array, got {type(v).__name__} ({e})"
        ) from None
    if v.ndim == 0 or v.shape[0] != x.shape[0]:
        raise GanflowError(
            f"QoI '{name}' returned shape {tuple(v.shape)} for a batch of {x.shape[0]} fields; "
            f"it must map [B, *field_shape] to [B, ...]"
        )
    if not np.isfinite(v).all():
        raise GanflowError(f"QoI '{name}' returned non-finite values")
    return v


def qoi_statistics(
    fields: Callable[[int, int], Tensor],
    n: int,
    qois: dict[str, tuple[str, Callable]],
    weights: np.ndarray | None = None,
    batch_size: int = 500,
    n_quantile: int | None = None,
    n_keep: int | None = None,
    x_true: np.ndarray | None = None,
) -> dict[str, QoIStats]:
    """Stream QoI statistics over ``n`` posterior fields.

    Args:
        fields: ``fields(start, stop) -> [stop - start, *field_shape]``, the posterior draws in a fixed order.
        weights: optional ``[n]`` normalised importance weights (PSIS); default equal weights.
        n_quantile: draws (the first ones) used for the quantiles; default all ``n``.
        n_keep: draws stored as samples; default 1,000 for QoIs of at most 16 values, else 16.
        x_true: the true field ``[*field_shape]``; adds ``truth`` to each result.
    """
    n_quantile = n if n_quantile is None else min(n_quantile, n)
    moments: dict[str, StreamingMoments | WeightedMoments] = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in qois}
    keep_n: dict[str, int] = {}
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        x = fields(done, done + b)
        for name, (_, fn) in qois.items():
            v = _apply_qoi(name, fn, x)
            if name not in moments:
                moments[name] = (
                    WeightedMoments(v.shape[1:]) if weights is not None else StreamingMoments(v.shape[1:])
                )
                keep_n[name] = (
                    n_keep if n_keep is not None else (1000 if int(np.prod(v.shape[1:])) <= 16 else 16)
                )
            elif v.shape[1:] != moments[name].shape:
                raise GanflowError(f"QoI '{name}' changed its value shape between batches")
            if weights is not None:
                moments[name].update(v, weights[done : done + b])
            else:
                moments[name].update(v)
            if done < max(n_quantile, keep_n[name]):
                kept[name].append(v[: max(n_quantile, keep_n[name]) - done])
        done += b
    out = {}
    for name, (spec, fn) in qois.items():
        vals = np.concatenate(kept[name], 0)
        qv = vals[:n_quantile]
        if weights is not None:
            quantiles = weighted_quantiles(qv, weights[:n_quantile])
        else:
            quantiles = {q: np.quantile(qv, q, axis=0) for q in QUANTILES}
        truth = None
        if x_true is not None:
            truth = _apply_qoi(name, fn, torch.as_tensor(x_true, dtype=torch.float32)[None])[0]
        out[name] = QoIStats(
            name=name,
            mean=moments[name].mean,
            std=moments[name].std,
            quantiles=quantiles,
            samples=vals[: keep_n[name]].astype(np.float32),
            n=n,
            n_quantile=qv.shape[0],
            spec=spec,
            weighting="psis" if weights is not None else "none",
            truth=truth,
        )
    return out


def posterior_latent_draws(
    result: PosteriorResult, n: int | None, generator: torch.Generator, batch_size: int = 500
) -> tuple[Tensor, Tensor | None]:
    """Latent draws ``[n, k]`` and, for a flow, their ``log q`` ``[n]``.

    A flow posterior is rebuilt from ``/flow/state`` and the ``config`` attribute and draws ``n`` fresh
    samples
    (default 4,000); a sample-based method returns its stored ``/latent/samples`` (all of them by default, a
    random subset of ``n`` otherwise; asking for more than are stored is an error).
    """
    if result.method == "flow" and result.flow_state:
        settings = result.config.get("flow")
        if not isinstance(settings, dict):
            raise GanflowError(
                f"{result.path}: the config attribute has no [flow] settings to rebuild the flow"
            )
        try:
            flow = flow_from_state(result.latent_dim, settings, result.flow_state)
        except (RuntimeError, TypeError, KeyError) as e:
            raise GanflowError(f"{result.path}: cannot rebuild the flow from /flow/state ({e})") from None
        return draw_flow(flow, n or DEFAULT_FLOW_DRAWS, generator, batch_size)
    stored = torch.from_numpy(np.asarray(result.latent_samples, np.float32))
    N = stored.shape[0]
    if n is None or n == N:
        return stored, None
    if n > N:
        raise GanflowError(
            f"--n {n}: method '{result.method}' stores {N} posterior draws; ask for at most {N}"
        )
    return stored[torch.randperm(N, generator=generator)[:n]], None


@dataclass
class PredictReport:
    """What `predict` computed and wrote: ``qois`` (name -> `QoIStats`), ``diagnostics`` (scalar attrs),
    ``warnings`` (lines for the user), ``n`` draws, ``weighting``, ``path``."""

    path: str
    method: str
    n: int
    weighting: str
    qois: dict[str, QoIStats] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _json_attr(attrs: dict, key: str) -> dict:
    import json

    v = attrs.get(key)
    try:
        return json.loads(v) if isinstance(v, str) and v else (v or {})
    except json.JSONDecodeError:
        raise GanflowError(f"posterior attribute '{key}' is not valid JSON") from None


def _specs_to_resolve(result: PosteriorResult, problem: str | None, operator: str | None):
    """The problem and operator specs `predict` resolves: the caller's as given; in their absence the
    posterior's ``problem`` and ``operator`` attributes, each under the trust rule (`check_spec_from_file`)."""
    a, where = result.attrs, f"{result.path}: attribute"
    recorded_op = a.get("operator")
    if problem is None and operator is None and isinstance(recorded_op, str) and ":" in recorded_op:
        operator = check_spec_from_file(recorded_op, f"{where} 'operator'", "--operator")
    if problem is None and a.get("problem"):
        problem = check_spec_from_file(str(a["problem"]), f"{where} 'problem'", "--problem")
    return problem, operator


def _operator_for(result: PosteriorResult, problem: str | None, operator: str | None) -> nn.Module:
    """The forward operator from the specs `_specs_to_resolve` returned, with the posterior's recorded options."""
    from .solve import resolve_operator

    if operator is not None:
        op, _ = resolve_operator(None, operator=operator, operator_kwargs=_json_attr(result.attrs, "operator_kwargs"))
    elif problem:
        op, _ = resolve_operator(None, problem=problem, operator_kwargs=_json_attr(result.attrs, "operator_kwargs"),
                                 problem_kwargs=_json_attr(result.attrs, "problem_kwargs"))
    else:
        raise GanflowError("the posterior records neither a problem nor an operator spec")
    return op


def _generator_for(result: PosteriorResult, prior) -> nn.Module:
    """The caller's prior, else the one the posterior records (weights-only checkpoint, or a trusted spec)."""
    from .solve import load_prior, load_recorded_prior

    if prior is not None:
        G = load_prior(prior)
    else:
        prior = result.attrs.get("prior")
        if prior is None or not str(prior):
            raise GanflowError(f"{result.path} records no prior: give --prior")
        G = load_recorded_prior(str(prior), f"{result.path}: attribute 'prior'")
    if int(G.latent_dim) != result.latent_dim or tuple(G.field_shape) != tuple(result.field_shape):
        raise GanflowError(
            f"prior {prior} (latent_dim {G.latent_dim}, field_shape {tuple(G.field_shape)}) does not "
            f"match the posterior (latent_dim {result.latent_dim}, field_shape {result.field_shape})"
        )
    return G


def predict(
    posterior: str | os.PathLike,
    qois=(),
    *,
    n: int | None = None,
    seed: int = 0,
    reweight: bool = False,
    prior: str | os.PathLike | nn.Module | None = None,
    problem: str | None = None,
    operator: str | None = None,
    batch_size: int = 500,
    n_quantile: int | None = None,
    n_keep: int | None = None,
    diag_draws: int = 2_000,
    write: bool = True,
) -> PredictReport:
    """Compute QoI statistics and diagnostics of ``posterior`` (posterior.h5) and write them into it.

    Args:
        qois: QoI names / specs (see `resolve_qois`); empty: all of the problem's ``qois()``.
        n: posterior draws (flow: fresh draws, default 4,000; others: stored draws, default all).
        seed: seeds the one ``torch.Generator`` every draw comes from.
        reweight: PSIS-reweighted statistics (flow only); the diagnostics then use all ``n`` draws.
        prior: the generator (module, checkpoint or spec); default the posterior's ``prior`` attribute (a
            checkpoint path, or a spec under the trust rule).
        problem, operator: specs for the QoIs and the diagnostics' operator; default the posterior's ``problem``
            and ``operator`` attributes under the trust rule (a spec from the file that names code outside the
            registered problems and ganflow's own package must be passed here).
        diag_draws: draws (the first ones) used for the diagnostics when not reweighting.
        write: update posterior.h5 (atomically); False only computes.
    """
    path = os.fspath(posterior)
    result = PosteriorResult.load(path)
    _check_arguments(result, n, batch_size, diag_draws, reweight)
    G = _generator_for(result, prior)
    problem, operator = _specs_to_resolve(result, problem, operator)
    qoi_fns = resolve_qois(qois, problem, _json_attr(result.attrs, "problem_kwargs"))

    gen = torch.Generator().manual_seed(int(seed))
    z, log_q = posterior_latent_draws(result, n, gen, batch_size)
    n_draws = int(z.shape[0])
    report = PredictReport(
        path=path, method=result.method, n=n_draws, weighting="psis" if reweight else "none"
    )
    # diagnostics first: --reweight needs the weights of every draw before any statistic is taken
    m = n_draws if reweight else min(n_draws, diag_draws)
    op, noise = _operator_and_noise(result, problem, operator, reweight, report)
    diag = _diagnose(result, G, op, noise, z[:m], None if log_q is None else log_q[:m], gen, batch_size, report)
    weights = np.exp(diag.psis.log_weights) if reweight else None
    fields = _field_batches(G, z, _field_transform(result, op, noise, gen))
    report.qois = qoi_statistics(
        fields, n_draws, qoi_fns, weights, batch_size, n_quantile, n_keep, result.x_true
    )
    psis_field = None
    if reweight:
        # the reweighted field summary: the field itself as a QoI (quantiles over at most 2,000 draws, as
        # solve)
        field_qoi = {"field": ("identity", lambda x: x)}
        psis_field = qoi_statistics(
            fields,
            n_draws,
            field_qoi,
            weights,
            batch_size,
            min(n_draws, 2_000) if n_quantile is None else n_quantile,
            0,
        )["field"]
    if write:
        _write_update(path, report, diag, psis_field, seed)
    return report


def _check_arguments(result: PosteriorResult, n: int | None, batch_size: int, diag_draws: int,
                     reweight: bool) -> None:
    """`predict`'s arguments against each other and the posterior (``--reweight`` needs a flow)."""
    if n is not None and n < 2:
        raise GanflowError(f"--n must be >= 2, got {n}")
    if batch_size < 1 or diag_draws < 10:
        raise GanflowError("batch_size must be >= 1 and diag_draws >= 10")
    if reweight and not (result.method == "flow" and result.flow_state):
        raise GanflowError(
            f"--reweight needs a flow posterior (a density q(z)); this one is '{result.method}'"
        )


def _operator_and_noise(result: PosteriorResult, problem: str | None, operator: str | None, reweight: bool,
                        report: PredictReport) -> tuple[nn.Module | None, nn.Module | None]:
    """The forward operator (None, with a warning, when it cannot be rebuilt and nothing needs it) and the
    solve's representation-error noise model (None when it was off)."""
    noise = None
    if result.representation_state:
        from .posterior.representation import RepresentationNoise

        noise = RepresentationNoise.from_state(result.representation_state, np.shape(result.y), result.field_shape)
    try:
        return _operator_for(result, problem, operator), noise
    except GanflowError as e:
        if reweight:
            raise GanflowError(f"--reweight needs the forward operator: {e}") from None
        if noise is not None:
            raise GanflowError(f"the posterior carries the representation error, whose r | z, y needs the forward "
                               f"operator: {e}") from None
        report.warnings.append(f"diagnostics skipped: cannot rebuild the operator ({e})")
        return None, None


def _diagnose(result: PosteriorResult, G: nn.Module, op: nn.Module | None, noise: nn.Module | None, z: Tensor,
              log_q: Tensor | None, gen: torch.Generator, batch_size: int,
              report: PredictReport) -> DiagnosticsResult | None:
    """Diagnostics (PSIS k-hat, ESS/N, predictive check) of the draws ``z`` ``[m, k]`` (``log_q`` ``[m]`` for a
    flow) under the solve's own likelihood, recorded in ``report``; None without the operator."""
    if op is None:
        return None
    target = LatentTarget(G, op, torch.as_tensor(result.y, dtype=torch.float32), result.noise_sigma, noise=noise)
    diag = diagnose_draws(target, z, log_q, gen, batch_size)
    report.diagnostics = dict(diag.attrs)
    warn = khat_warning(diag.attrs.get("psis_khat"))
    if warn:
        report.warnings.append(warn)
    return diag


def _field_transform(result: PosteriorResult, op: nn.Module | None, noise: nn.Module | None,
                     gen: torch.Generator) -> Callable[[Tensor], Tensor] | None:
    """What the solve did to ``G(z)``: add a draw of ``r | z, y`` (representation error), then scale about the
    mean (``recalibration_scale``); None when neither."""
    scale = result.attrs.get("recalibration_scale")
    if noise is None and scale is None:
        return None
    y = torch.as_tensor(result.y, dtype=torch.float32)
    mean = torch.as_tensor(result.mean, dtype=torch.float32)

    def transform(x: Tensor) -> Tensor:
        if noise is not None:
            x = x + noise.residual_draws(op(x), y, gen).to(x.dtype)
        if scale is not None:
            x = mean + float(scale) * (x - mean)
        return x

    return transform


def _field_batches(G: nn.Module, z: Tensor, transform: Callable[[Tensor], Tensor] | None = None
                   ) -> Callable[[int, int], Tensor]:
    """``(start, stop) -> G(z[start:stop])`` ``[stop - start, *field_shape]`` (then ``transform``); a non-finite
    field is an error."""

    def fields(start: int, stop: int) -> Tensor:
        with torch.no_grad():
            x = G(z[start:stop])
            if transform is not None:
                x = transform(x)
        if not torch.isfinite(x).all():
            raise GanflowError("the generator produced non-finite fields for some posterior draws")
        return x

    return fields


def _write_update(
    path: str, report: PredictReport, diag: DiagnosticsResult | None, psis_field: QoIStats | None, seed: int
) -> None:
    """Copy posterior.h5 beside itself, add the results, rename into place (the original is never opened for
    writing, so a failure leaves it byte-identical)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        try:
            with h5py.File(tmp, "a") as f:
                for stats in report.qois.values():
                    write_qoi(f, stats)
                if diag is not None:
                    for key, value in diag.attrs.items():
                        f.attrs[key] = value
                    if "psis_khat" not in diag.attrs:
                        for key in ("psis_khat", "is_ess_ratio", "is_ess_ratio_raw", "is_n_draws"):
                            if key in f.attrs:
                                del f.attrs[key]
                    for name, arr in diag.arrays.items():
                        key = f"diagnostics/{name}"
                        if key in f:
                            del f[key]
                        f.create_dataset(key, data=np.asarray(arr))
                if psis_field is not None:
                    if "psis/field" in f:
                        del f["psis/field"]
                    grp = f.create_group("psis/field")
                    grp.create_dataset("mean", data=psis_field.mean.astype(np.float32))
                    grp.create_dataset("std", data=psis_field.std.astype(np.float32))
                    for q, arr in psis_field.quantiles.items():
                        grp.create_dataset(quantile_key(q), data=np.asarray(arr, np.float32))
                f.attrs["predict_n"] = int(report.n)
                f.attrs["predict_seed"] = int(seed)
                f.attrs["predict_weighting"] = report.weighting
        except OSError as e:
            raise GanflowError(f"cannot update {path}: {e}") from None
