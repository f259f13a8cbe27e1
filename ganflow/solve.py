"""Stage two end to end: observation + prior + operator -> posterior statistics (`PosteriorResult`).

    result = ganflow.solve("obs.h5", prior="prior.pt", method="flow", seed=0)
    result.mean, result.std, result.sample(100), result.save("posterior.h5")

The operator is rebuilt from the observation's ``problem`` and ``operator_kwargs`` attributes unless an
operator (object or spec) or a problem is given. A ``problem`` read from obs.h5 is resolved under the trust
rule (`ganflow.plugins.check_spec_from_file`): a registered name or ganflow's own package, else the user
passes it explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .config import ALL_TABLES, Config
from .errors import GanflowError
from .field_stats import summarize_fields
from .io import Observation, read_obs
from .operators import check_compatible, check_observation
from .plugins import (
    check_spec_from_file,
    load_generator_spec,
    load_operator,
    load_problem,
    normalize_spec,
    operator_settings,
)
from .posterior.base import LatentFit
from .posterior.flow import FlowSettings, fit_flow
from .posterior.target import LatentTarget
from .recalibration import recalibrate_summary, recalibration_applies, scaled_field_fn
from .results import PosteriorResult, truth_metrics

__all__ = ["SolveSettings", "solve", "load_prior", "load_recorded_prior", "resolve_operator", "SOLVE_TABLES",
           "METHODS"]

METHODS = ("flow", "langevin", "nuts", "smc")
CHECKPOINTED = ("flow", "smc")  # the methods that write a resumable checkpoint
# Config tables `ganflow solve` understands.
SOLVE_TABLES = ALL_TABLES


@dataclass(frozen=True)
class SolveSettings:
    """Settings of the posterior summary (TOML table ``[solve]``)."""

    method: Literal["flow", "langevin", "nuts", "smc"] = "flow"
    n_samples: int = 10_000  # posterior draws streamed for the field statistics
    n_quantile: int = 2_000  # of which the first n_quantile give the quantiles and the predictive mean
    n_field_samples: int = 64  # field draws stored in /field/samples
    batch_size: int = 500
    device: Literal["cpu", "cuda"] = "cpu"
    # The prior's representation error (x = G(z) + r, ganflow.posterior.representation): "on" uses the
    # checkpoint's residual statistics when it has them (a generator spec has none: nothing changes).
    representation_error: Literal["on", "off"] = "on"
    representation_n_diag: int = 64  # random columns that carry the per-pixel remainder of the residuals
    # The prior's conformal interval scale (ganflow.recalibration, `ganflow calibrate --recalibrate`): "auto"
    # applies it when it was learned for this problem, operator settings and representation-error setting.
    recalibrate: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> None:
        if self.n_samples < 1 or self.n_quantile < 1 or self.n_field_samples < 0 or self.batch_size < 1:
            raise GanflowError("solve: n_samples, n_quantile and batch_size must be >= 1, n_field_samples >= 0")
        if self.representation_error not in ("on", "off"):
            raise GanflowError(f"solve.representation_error must be 'on' or 'off', got {self.representation_error!r}")
        if self.representation_n_diag < 0:
            raise GanflowError("solve.representation_n_diag must be >= 0")
        if self.recalibrate not in ("auto", "on", "off"):
            raise GanflowError(f"solve.recalibrate must be 'auto', 'on' or 'off', got {self.recalibrate!r}")


def _is_checkpoint_path(prior: str) -> bool:
    return prior.endswith((".pt", ".pth")) or (os.path.isfile(prior) and ":" not in prior)


def load_prior(prior: str | os.PathLike | nn.Module, device: str = "cpu") -> nn.Module:
    """A generator: a module as is, a ganflow checkpoint (``.pt``), or a generator spec string."""
    if isinstance(prior, nn.Module):
        gen = prior
    else:
        prior = os.fspath(prior)
        if _is_checkpoint_path(prior):
            try:
                from .prior import load_prior as load_checkpoint
            except ImportError as e:  # pragma: no cover - stage one not installed
                raise GanflowError(f"cannot load checkpoint {prior}: {e}") from None
            gen = load_checkpoint(prior)
        else:
            gen = load_generator_spec(prior)
    gen = gen.to(device)
    gen.eval()
    return gen


def load_recorded_prior(prior: str, where: str, device: str = "cpu") -> nn.Module:
    """The prior a file names (``where``: the file and attribute): a checkpoint path is loaded weights-only, a
    spec string only under the trust rule (else the user passes it with ``--prior``)."""
    prior = str(prior)
    if not _is_checkpoint_path(prior):
        prior = check_spec_from_file(prior, where, "--prior")
    return load_prior(prior, device)


def resolve_operator(obs: Observation | None, operator: Any = None, problem: Any = None,
                     operator_kwargs: dict | None = None, problem_kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """The forward operator and a description of where it came from (for the result's attributes).

    Precedence: an explicit operator (module or spec) or an explicit problem (not both) > the observation's
    ``problem`` attribute, which for an observation read from a file (``obs.path`` set) must pass the trust rule.
    ``operator_kwargs`` override the observation's when the observation's problem is used.
    """
    if operator is not None and problem is not None:
        raise GanflowError("give --operator or --problem, not both (the operator would make the problem unused)")
    if isinstance(operator, nn.Module):
        return operator, {"operator": type(operator).__name__, "operator_kwargs": {}}
    if isinstance(operator, str):
        op = load_operator(operator, **(operator_kwargs or {}))
        return op, {"operator": normalize_spec(operator), "operator_kwargs": operator_kwargs or {}}
    if problem is not None:
        kw = operator_kwargs or {}
        from_spec = isinstance(problem, str)  # an object already built: load_operator refuses its options
        obj = load_problem(problem, **(problem_kwargs or {})) if from_spec else problem
        op = load_operator(problem=obj, problem_kwargs=None if from_spec else problem_kwargs, **kw)
        name = problem if isinstance(problem, str) else getattr(problem, "name", type(problem).__name__)
        return op, {"problem": normalize_spec(name) if isinstance(name, str) else name, "operator_kwargs": kw,
                    "operator_settings": operator_settings(obj, kw), "problem_kwargs": problem_kwargs or {}}
    if obs is None or not obs.problem:
        raise GanflowError("no operator: give --problem or --operator (the observation names no problem)")
    recorded = obs.problem
    if obs.path is not None:
        recorded = check_spec_from_file(recorded, f"{obs.path}: attribute 'problem'", "--problem (or --operator)")
    kw = dict(obs.operator_kwargs or {})
    kw.update(operator_kwargs or {})
    pkw = dict(obs.problem_kwargs or {})
    pkw.update(problem_kwargs or {})
    obj = load_problem(recorded, **pkw)
    op = load_operator(problem=obj, **kw)
    return op, {"problem": recorded, "operator_kwargs": kw, "operator_settings": operator_settings(obj, kw),
                "problem_kwargs": pkw}


def _checkpoint_options(method: str, checkpoint_path, resume: bool) -> dict | None:
    """`fit_flow`'s (`run_smc`'s) checkpoint options; an option the method cannot use is an error, not ignored."""
    if resume and method not in CHECKPOINTED:
        raise GanflowError(f"--resume of a single solve applies to --method flow or smc, not {method}")
    if checkpoint_path is not None and method not in CHECKPOINTED:
        raise GanflowError(f"checkpoint_path applies to methods flow and smc (those that checkpoint), not {method}")
    if resume and checkpoint_path is None:
        raise GanflowError("resume=True needs the checkpoint_path of the interrupted fit")
    return {"checkpoint_path": checkpoint_path, "resume": resume} if checkpoint_path is not None else None


def _run_method(method: str, target: LatentTarget, cfg: Config, gen: torch.Generator, progress: bool,
                checkpoint: dict | None = None, amortized: Any = None, refine: bool = False) -> LatentFit:
    if method == "amortized":  # issue 19: q(z | y) as it is, or the flow fit started from it
        if not refine:
            return amortized.fit(target.y)
        fs = cfg.section(FlowSettings, "flow")
        if not progress:
            fs = dataclasses.replace(fs, progress=False)
        return amortized.refine(target, fs, gen, **(checkpoint or {}))
    if method == "flow":
        fs = cfg.section(FlowSettings, "flow")
        if not progress:
            fs = dataclasses.replace(fs, progress=False)
        # issue 9: periodic, resumable checkpoints of the fit (`checkpoint` = fit_flow's checkpoint options)
        return fit_flow(target, fs, gen, **(checkpoint or {}))
    if method == "langevin":
        from .posterior.langevin import LangevinSettings, moment_frame, run_langevin

        ls = cfg.section(LangevinSettings, "langevin")
        init = frame = flow_fit = log_q = None
        if ls.init == "flow":  # the refiner: chains from the flow, in the frame of its draws' moments
            flow_fit = _start_flow(target, cfg, gen, progress)
            init, frame, log_q = flow_fit.sampler, moment_frame(flow_fit.sampler, gen), flow_fit.model.log_prob
        evals_before = target.n_forward_evals
        fit = run_langevin(target, ls, gen, init=init, frame=frame, init_log_prob=log_q, progress=progress)
        return _with_start_cost(fit, flow_fit, target, evals_before)
    if method == "nuts":
        from .posterior.nuts import NutsSettings, run_nuts

        return run_nuts(target, cfg.section(NutsSettings, "nuts"), gen, progress=progress)
    if method == "smc":  # issue 33: tempered SMC, checkpointed at stage boundaries
        from .posterior.smc import SmcSettings, run_smc

        ss = cfg.section(SmcSettings, "smc")
        if not progress:
            ss = dataclasses.replace(ss, progress=False)
        # issue 34's correction; the fitted flow is kept beside the checkpoint, so --resume does not refit it
        flow_fit = _start_flow(target, cfg, gen, progress, checkpoint) if ss.start == "flow" else None
        start = {} if flow_fit is None else {"init": flow_fit.sampler, "init_log_prob": flow_fit.model.log_prob}
        evals_before = target.n_forward_evals
        fit = run_smc(target, ss, gen, **(checkpoint or {}), **start)
        return _with_start_cost(fit, flow_fit, target, evals_before)
    raise GanflowError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def _start_flow(target: LatentTarget, cfg: Config, gen: torch.Generator, progress: bool,
                checkpoint: dict | None = None) -> LatentFit:
    """The flow (``[flow]`` settings) that a sampler starts from: Langevin's refiner, SMC's ``start = "flow"``.

    With ``checkpoint`` (the sampler's options) the fitted flow is saved to ``start_flow_path`` of its path, and
    a resume loads it from there instead of fitting again."""
    from .posterior.fit_checkpoint import load_fitted_flow, save_fitted_flow

    path = None if checkpoint is None else start_flow_path(checkpoint["checkpoint_path"])
    if path is not None and checkpoint["resume"] and os.path.exists(path):
        return load_fitted_flow(target, path)
    fs = cfg.section(FlowSettings, "flow")
    if not progress:
        fs = dataclasses.replace(fs, progress=False)
    fit = fit_flow(target, fs, gen)
    if path is not None:
        save_fitted_flow(fit, target, path)
    return fit


def start_flow_path(checkpoint_path: str | os.PathLike) -> str:
    """Where a sampler checkpointed at ``checkpoint_path`` keeps the flow it started from."""
    return os.fspath(checkpoint_path) + ".flow"


def _with_start_cost(fit: LatentFit, flow_fit: LatentFit | None, target: LatentTarget, evals_before: int) -> LatentFit:
    """A sampler's fit that started from a flow counts the flow's evaluations and time as its own."""
    if flow_fit is not None:
        fit.n_forward_evals = target.n_forward_evals - evals_before + flow_fit.n_forward_evals
        fit.wall_time_s += flow_fit.wall_time_s
        fit.attrs["init_flow_elbo"] = flow_fit.attrs.get("elbo")
    return fit


def solve(
    obs: Observation | str | os.PathLike,
    prior: str | os.PathLike | nn.Module,
    *,
    operator: Any = None,
    problem: Any = None,
    method: str | None = None,
    config: Config | dict | str | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    amortized: Any = None,
    refine: bool = False,
) -> PosteriorResult:
    """Solve the inverse problem in the latent space of ``prior`` and summarise the field posterior.

    Args:
        obs: an `Observation` or the path of ``obs.h5``.
        prior: a generator module, a ganflow checkpoint, or a generator spec string.
        operator: a forward-operator module or spec string (overrides the observation's problem).
        problem: a problem spec or object whose ``make_operator`` builds the operator.
        method: ``flow`` (default), ``langevin``, ``nuts`` or ``smc``; overrides ``[solve] method``.
        config: a `Config`, a dict of tables, or a TOML path.
        seed: every random draw of the solve comes from ``torch.Generator().manual_seed(seed)``.
        checkpoint_path: where ``method="flow"`` writes its fit state every ``[flow] checkpoint_every_s``
            (``smc``: at every stage boundary; atomically; the other methods do not checkpoint and refuse it);
            ``resume=True`` continues from it (bit-identical on CPU). The caller deletes it after saving the result.
        amortized: an amortised posterior (``amortized.pt`` from ``ganflow train-posterior``, or a loaded
            `AmortizedPosterior`) used instead of a fit (method ``amortized``); ``prior`` may then be None (the
            one it records). It must have been trained for this prior, operator, noise level and observation
            shape. ``refine=True`` fine-tunes it on this observation by the flow fit (``[flow]`` settings).
    """
    t0 = time.perf_counter()
    cfg = _as_config(config)
    ss = cfg.section(SolveSettings, "solve")
    amortized, prior, method = resolve_amortized(amortized, refine, prior, method)
    method = method or ss.method
    if method not in METHODS + ("amortized",):
        raise GanflowError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if not isinstance(obs, Observation):
        obs = read_obs(obs)
    generator_module, op, op_info, target = _set_up(obs, prior, operator, problem, cfg, ss.device)
    x_true = _truth_field(obs, generator_module)  # bad input fails before the fit, not after it
    gen = torch.Generator().manual_seed(seed)
    ckpt = _checkpoint_options("flow" if refine else method, checkpoint_path, resume)
    target, re_attrs = _likelihood(target, amortized, generator_module, op, obs, cfg, ss, seed)
    fit = _run_method(method, target, cfg, gen, progress, ckpt, amortized, refine)
    chains = fit.chains()  # the MCMC draws in chain order, for ArviZ (`ganflow.arviz_export`)
    fit, diag_attrs = _diagnosed(fit, target, cfg, ss, seed)
    summary, field_fn, rec_attrs = _field_posterior(fit, target, op, ss, gen, generator_module, op_info, re_attrs,
                                                    seed)
    y = obs.y.cpu().numpy()
    attrs = _result_attrs(fit, {**re_attrs, **rec_attrs}, op_info, prior, obs, seed)
    if x_true is not None:
        attrs.update(truth_metrics(summary.mean, summary.quantiles[0.025], summary.quantiles[0.975], x_true,
                                   y, summary.obs_pred_mean, obs.noise_sigma))
    attrs.update(diag_attrs)
    attrs["wall_time_s"] = float(time.perf_counter() - t0)
    return PosteriorResult(
        method=method,
        latent_dim=target.latent_dim,
        field_shape=tuple(generator_module.field_shape),
        noise_sigma=obs.noise_sigma,
        summary=summary,
        y=y,
        trace=fit.trace,
        attrs=attrs,
        config={"solve": dataclasses.asdict(dataclasses.replace(ss, method=method)), method: fit.settings,
                "operator": op_info.get("operator_kwargs", {})},
        x_true=x_true,
        z_true=obs.z_true.numpy() if obs.z_true is not None else None,
        flow_state=fit.state if method == "flow" else {},
        fit=fit,
        generator=generator_module,
        field_fn=field_fn,
        representation_state=target.noise.state() if hasattr(target.noise, "residual_draws") else {},
        latent_chains=chains,
    )


def _diagnosed(fit: LatentFit, target: LatentTarget, cfg: Config, ss: SolveSettings, seed: int
               ) -> tuple[LatentFit, dict]:
    """The fit's diagnostics (PSIS k-hat and ESS/N of a flow, the tail check, the predictive check for every
    method; own seeded draws, `ganflow.diagnostics`) and the fit the summary is taken from: importance-resampled
    where the tail check failed and the weights can repair it (issue 38), else the fit itself."""
    from .diagnostics import solve_diagnostics
    from .tails import needs_resampling, resampled_fit

    diag_attrs = solve_diagnostics(target, fit, cfg.data.get("diagnostics"), seed)
    if needs_resampling(diag_attrs):
        fit = resampled_fit(fit, target, ss.n_samples, torch.Generator().manual_seed(seed + 0x7A11), ss.batch_size)
    return fit, diag_attrs


def _likelihood(target: LatentTarget, amortized, generator_module: nn.Module, op: nn.Module, obs: Observation,
                cfg: Config, ss: SolveSettings, seed: int) -> tuple[LatentTarget, dict]:
    """The target with the representation error when the solve uses it, and attributes that say so. An
    amortised posterior was trained on the plain likelihood (and is checked against this problem): off."""
    if amortized is not None:
        amortized.check(generator_module, op, obs.noise_sigma, obs.y)
        return target, {"representation_error": "off"}
    if ss.device != "cpu":
        return target, {}
    return with_representation_error(target, cfg, ss, seed)


def _field_posterior(fit: LatentFit, target: LatentTarget, op: nn.Module, ss: SolveSettings, gen: torch.Generator,
                     generator_module: nn.Module, op_info: dict, re_attrs: dict, seed: int):
    """The field statistics, the field sampler (``G(z)`` plus ``r | z, y``), both recalibrated when the prior's
    recalibration applies, and the recalibration's attributes."""
    summary = _summarise(fit, target, op, ss, gen)
    field_fn = field_sampler(target, torch.Generator().manual_seed(seed + 1))
    scale, rec_attrs = _recalibration_scale(generator_module, op_info, ss, re_attrs)
    if scale is not None:
        summary, field_fn = recalibrate_summary(summary, scale), scaled_field_fn(field_fn, summary.mean, scale)
    return summary, field_fn, rec_attrs


def _recalibration_scale(generator_module: nn.Module, op_info: dict, ss: SolveSettings,
                         re_attrs: dict) -> tuple[float | None, dict]:
    """The prior's conformal interval scale when ``[solve] recalibrate`` asks for it and it applies, with the
    attributes that say what was done (``recalibration_scale``, or ``recalibration`` = why not)."""
    rec = getattr(generator_module, "recalibration", None)
    if rec is None or ss.recalibrate == "off":
        return None, {"recalibration": "off" if rec is not None else "none"}
    why_not = recalibration_applies(rec, op_info, str(re_attrs.get("representation_error", "none")))
    if why_not is not None and ss.recalibrate == "auto":
        return None, {"recalibration": f"not applied: {why_not}"}
    return float(rec["scale"]), {"recalibration": "on", "recalibration_scale": float(rec["scale"]),
                                 "recalibration_level": float(rec["level"])}


def resolve_amortized(amortized: Any, refine: bool, prior: Any, method: str | None) -> tuple[Any, Any, str | None]:
    """issue 19: the loaded amortised posterior, the prior (its recorded one when none is given) and the method
    (``amortized``); a combination that would leave an argument unused is an error."""
    if amortized is None:
        if refine:
            raise GanflowError("--refine applies to --amortized")
        if prior is None:
            raise GanflowError("no prior: give --prior (or --amortized)")
        return None, prior, method
    if method not in (None, "amortized"):
        raise GanflowError(f"--amortized replaces the posterior method; drop --method {method}")
    from .posterior.amortized import AmortizedPosterior, load_amortized

    post = amortized if isinstance(amortized, AmortizedPosterior) else load_amortized(amortized)
    if prior is None:
        recorded = post.record.get("prior", "")
        if "/" not in recorded and ":" not in recorded:  # a module's class name: nothing to load
            raise GanflowError(f"{post.path} records no loadable prior ({recorded!r}); give --prior")
        prior = load_recorded_prior(recorded, f"{post.path}: record 'prior'")
    return post, prior, "amortized"


def _summarise(fit: LatentFit, target: LatentTarget, op: nn.Module, ss: SolveSettings, gen: torch.Generator):
    """Field and data statistics (`summarize_fields`) over ``ss.n_samples`` posterior draws of ``fit``, drawn
    from ``gen``."""

    def draw(b: int) -> torch.Tensor:
        return fit.draw(b, gen).to(ss.device)

    return summarize_fields(
        draw, field_sampler(target, gen), op, n_samples=ss.n_samples, batch_size=ss.batch_size,
        n_quantile=ss.n_quantile, n_keep=ss.n_field_samples,
    )


def _as_config(config: Config | dict | str | os.PathLike | None) -> Config:
    """``solve``'s ``config`` argument as a `Config` (a dict of tables or a TOML path is read and checked)."""
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config(config, known=SOLVE_TABLES)
    return Config.from_file(config, known=SOLVE_TABLES)


def _set_up(obs: Observation, prior: str | os.PathLike | nn.Module, operator: Any, problem: Any, cfg: Config,
            device: str) -> tuple[nn.Module, nn.Module, dict, LatentTarget]:
    """The generator, the operator (and where it came from) and the latent target, checked against each other
    and placed on ``device``."""
    check_observation(obs.y, obs.noise_sigma)
    if device == "cuda" and not torch.cuda.is_available():
        raise GanflowError("--device cuda requested but CUDA is not available")
    generator_module = load_prior(prior, device)
    op, op_info = resolve_operator(obs, operator, problem, cfg.table("operator") or None, cfg.table("problem") or None)
    op = op.to(device)
    check_compatible(generator_module, op, obs.y.to(device))
    if device == "cpu":
        target = LatentTarget(generator_module, op, obs.y.to(device), obs.noise_sigma, check=False)
    else:  # --- issue 10: G and A on the device, latents on the host (see _DeviceTarget)
        target = _DeviceTarget(generator_module, op, obs.y, obs.noise_sigma, device)
    return generator_module, op, op_info, target


def _truth_field(obs: Observation, generator_module: nn.Module):
    """The observation's ``/x_true`` as an array ``[*field_shape]`` (None without one); a shape that is not the
    prior's field shape is an error."""
    if obs.x_true is None:
        return None
    x_true = obs.x_true.numpy()
    if tuple(x_true.shape) != tuple(generator_module.field_shape):
        raise GanflowError(f"/x_true shape {tuple(x_true.shape)} does not match field_shape "
                           f"{tuple(generator_module.field_shape)}")
    return x_true


def _result_attrs(fit: LatentFit, re_attrs: dict, op_info: dict, prior, obs: Observation, seed: int) -> dict:
    """The result's attributes from the fit, the representation error and the provenance (seed, cost, the prior,
    the observation and the operator's origin)."""
    attrs: dict[str, Any] = dict(fit.attrs)
    attrs.update(re_attrs)
    attrs.update({
        "seed": int(seed),
        "n_forward_evals": int(fit.n_forward_evals),
        "fit_wall_time_s": float(fit.wall_time_s),
        "prior": prior if isinstance(prior, str) and ":" in prior else (
            os.path.abspath(os.fspath(prior)) if not isinstance(prior, nn.Module) else type(prior).__name__),
        "obs_path": os.path.abspath(obs.path) if obs.path else "",
    })
    for key, value in op_info.items():
        attrs[key] = value
    return attrs


def with_representation_error(target: LatentTarget, cfg: Config, ss: SolveSettings,
                              seed: int) -> tuple[LatentTarget, dict]:
    """``target`` with the prior's representation error in its likelihood, and attributes that say so.

    The residual is pushed through the operator at the MAP of the plain target (a cheaper multi-start search:
    at most 16 starts); the prior's statistics come from its checkpoint (`ganflow.prior.residuals`).
    """
    stats = getattr(target.generator, "representation_error", None)
    if stats is None or ss.representation_error == "off":
        return target, {"representation_error": "off" if stats is not None else "none"}
    from .posterior.flow import laplace_approximation
    from .posterior.representation import representation_noise

    fs = cfg.section(FlowSettings, "flow")
    fs = dataclasses.replace(fs, map_starts=min(fs.map_starts, 16), progress=False)
    evals0 = target.n_forward_evals
    z_ref, _, _ = laplace_approximation(target, fs, torch.Generator().manual_seed(seed + 7919))
    with torch.no_grad():
        x_ref = target.generator(z_ref[None])[0]
    noise = representation_noise(stats, target.operator, x_ref, target.noise_sigma,
                                 torch.Generator().manual_seed(seed + 104729), ss.representation_n_diag)
    new = LatentTarget(target.generator, target.operator, target.y, target.noise_sigma, check=False, noise=noise)
    new.n_forward_evals = target.n_forward_evals
    return new, {"representation_error": "on", "representation_rank": noise.rank,
                 "representation_ref_forward_evals": int(target.n_forward_evals - evals0)}


def field_sampler(target: LatentTarget, gen: torch.Generator):
    """``z [B, k] -> x [B, *field_shape]``: ``G(z)``, plus a draw of the residual ``r | z, y`` when the target
    carries the representation error."""
    residual_draws = getattr(target.noise, "residual_draws", None)
    if residual_draws is None:
        return target.generator

    def fields(z: torch.Tensor) -> torch.Tensor:
        x = target.generator(z)
        return x + residual_draws(target.operator(x), target.y, gen).to(x.dtype)

    return fields


# --- issue 10: --device cuda ---
class _DeviceTarget(LatentTarget):
    """A `LatentTarget` whose generator and operator run on ``device`` while its face stays on the host.

    The posterior methods work on ``[B, k]`` latents with CPU ``torch.Generator`` s (flow, MAP, Langevin,
    NUTS): the latents cross to the device and only the ``[B]`` log-likelihoods come back in the fitting loops,
    so the costly ``A(G(z))`` runs on the device and nothing large moves per step. ``y`` and ``predict`` are on
    the host for the callers (diagnostics, summaries) that combine them with host tensors.
    """

    def __init__(self, generator: nn.Module, operator: nn.Module, y: torch.Tensor, noise_sigma: float,
                 device: str):
        super().__init__(generator, operator, y.detach().cpu(), noise_sigma, check=False)
        self._y_device = y.detach().to(device)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return super().predict(z.to(self._y_device.device)).to(z.device)

    def log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        pred = super().predict(z.to(self._y_device.device))
        return self.noise.log_likelihood(pred, self._y_device).to(z.device)
# --- end issue 10 ---
