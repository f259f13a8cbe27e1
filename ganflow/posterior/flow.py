"""Stage two: a normalizing-flow variational posterior in the latent space, fitted by reverse KL.

The flow is ``z = T_phi(eps)``, ``eps ~ N(0, I_k)`` (a fixed, non-trainable base), with

    T_phi = (affine a) o (coupling layers, normflows)

where the optional fixed affine map ``a(u) = mu + L u`` comes from a Laplace approximation (MAP and the
latent Hessian; ``init="laplace"``) or is the identity (``init="identity"``), and the coupling layers start at
the identity. It is fitted by minimising

    KL(q_phi || p(z|y)) = E_eps[ log q_phi(T_phi(eps)) - log p(y, T_phi(eps)) ] + log p(y),

i.e. maximising the ELBO ``E_q[log p(y, z) - log q(z)] <= log p(y)``, with a batch of draws per step
(Dasgupta et al., CMAME 2024). The default gradient estimator is "sticking the landing" (Roeder, Wu &
Duvenaud, NeurIPS 2017): ``log q`` is evaluated with the flow's parameters held fixed, which drops a
zero-mean score term and makes the gradient variance vanish as ``q`` approaches the posterior.

Coupling layers:

- ``kind="affine"`` (default): masked affine couplings (Dinh et al. 2017) with one conditioner MLP (normflows)
  giving both the log-scale and the shift, its last layer zero-initialised (identity start); log-scales are
  soft-clamped, ``c * tanh(s / c)``, so that one step can never blow a scale up.
- ``kind="realnvp"``: the same couplings as normflows' ``MaskedAffineFlow``, with two conditioner MLPs (one for
  the log-scale, one for the shift): twice the small matrix products per layer, which at the small batches of a
  fit is most of the flow's own cost (the earlier default, kept so that posterior files written with it load).
- ``kind="spline"``: rational-quadratic spline couplings (Durkan et al. 2019), identity-initialised.

Both are as fast in the sampling direction as in the density direction.

Multimodal posteriors: `laplace_modes` finds the distinct modes of the MAP search (hill-valley test, Laplace
masses); with more than one, `fit_flow` fits one flow per mode and returns their `MixtureFlow`, weighted by
importance sampling (`ganflow.posterior.mixture`). With one mode it is the single flow, draw for draw.

Example:
    >>> import torch
    >>> flow = LatentFlow(4, FlowSettings(n_layers=2, hidden=8))
    >>> z, log_q = flow.sample(3, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(flow.log_prob(z), log_q, atol=1e-5))
    True
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import GanflowError
from ..progress import Progress
from .base import LatentFit
from .fit_checkpoint import load_flow_checkpoint, load_resume_checkpoint, restore_fit, save_fit_checkpoint, snapshot
from .flows import LatentFlow
from .mixture import MixtureFlow, fit_mixture_weights
from .modes import LaplaceMode, find_modes, laplace_approximation, laplace_flow, laplace_modes, most_massive_mode
from .objectives import StopGradientTwin, fit_step, temper_end
from .target import LatentTarget

# The flow family (flows), the mode search (modes), the objective (objectives) and the fit's checkpoints
# (fit_checkpoint) live in their own modules; what users import from here stays importable from here.
__all__ = ["FlowSettings", "LatentFlow", "LaplaceMode", "fit_flow", "laplace_approximation", "laplace_modes",
           "most_massive_mode", "flow_from_state", "load_flow_checkpoint", "affine_frame"]


@dataclass(frozen=True)
class FlowSettings:
    """Settings of the flow posterior (TOML table ``[flow]``)."""

    kind: Literal["affine", "realnvp", "spline"] = "affine"
    n_layers: int = 8  # coupling layers
    hidden: int = 64  # hidden units of each conditioner
    n_hidden_layers: int = 2
    scale_clamp: float = 2.0  # soft bound on each layer's log-scale (affine, realnvp)
    spline_bins: int = 8
    spline_tail_bound: float = 4.0
    # "laplace": start from the Laplace approximation (MAP + latent Hessian), so training only has to learn
    # the non-Gaussian part; converges ~10x faster than "identity" on near-Gaussian posteriors.
    init: Literal["identity", "laplace"] = "laplace"
    # random starts of the MAP search (init="laplace"); from 8 on, the best quarter is kept after a third of
    # map_iter. Multimodal posteriors (phase retrieval: 64) need many.
    map_starts: int = 8
    map_iter: int = 300
    # Warm restarts of the search's survivors (the cosine schedule run again from the top, at most map_restarts
    # times; stopped once a cycle raises the best log p(y, z) by less than MAP_RESTART_TOL nats). On a rugged
    # posterior one cycle stops in a shallow local optimum, and the restart's large steps leave it: on the
    # benchmark's phase-retrieval observation the best of 64 starts rose from log p 2321.7, 5.4 posterior sd
    # from the NUTS mean, to 2340.2, 1.1 sd from it, in 5 cycles (+15 s); the flow fitted from the first one
    # stayed 0.36 sd off. 0 keeps the single cycle.
    map_restarts: int = 0
    # Multimodal posteriors (init="laplace"): the distinct modes of the MAP search (a valley deeper than
    # mode_barrier nats on the segment between two optima; starts the screen dropped are checked too) each get a
    # flow, at most max_modes of them (the most massive by Laplace mass), and modes with less than
    # mode_min_mass of the total Laplace mass are dropped. One mode left: the single flow, exactly as before.
    # The mixture weights come from weight_draws importance draws of each component (see posterior/mixture.py).
    max_modes: int = 4
    mode_min_mass: float = 1e-3
    mode_barrier: float = 1.0
    weight_draws: int = 1024
    batch_size: int = 64  # draws per step
    max_iter: int = 2000
    min_iter: int = 100
    lr: float = 3e-3
    lr_final: float = 1e-5  # cosine decay from lr to lr_final over max_iter
    warmup: int = 100  # linear warm-up steps
    grad_clip: float = 10.0  # max global gradient norm
    estimator: Literal["stl", "standard", "dreg"] = "stl"
    # estimator "dreg": the importance-weighted bound over groups of iw_group draws (batch_size a multiple)
    iw_group: int = 8
    # estimator "dreg": the Renyi (VR) bound of order iw_alpha over each group, 1/(1-a) log mean w^(1-a):
    # 0 is the importance-weighted bound, towards 1 the ELBO (milder weights, lower gradient variance)
    iw_alpha: float = 0.0
    # Tempering: over the first temper_fraction of max_iter the fit's target is p(z) p(y|z)^beta, beta rising
    # geometrically from temper_beta0 to 1, so the flow spreads before it sharpens; 0 is off. A mixture's
    # components are not tempered (each must stay in its mode).
    temper_fraction: float = 0.0
    temper_beta0: float = 0.1
    patience: int = 100  # stop when the smoothed ELBO has not improved by `tol` for this many steps
    tol: float = 0.01  # nats
    smoothing: float = 0.99  # EMA factor of the smoothed ELBO
    max_failures: int = 20  # non-finite steps tolerated (each undone, lr halved)
    checkpoint_every_s: float = 60.0  # resumable fit checkpoints (when a checkpoint path is given)
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.n_layers >= 1, "flow.n_layers must be >= 1"),
            (self.hidden >= 1, "flow.hidden must be >= 1"),
            (self.n_hidden_layers >= 1, "flow.n_hidden_layers must be >= 1"),
            (self.scale_clamp > 0, "flow.scale_clamp must be > 0"),
            (self.spline_bins >= 2, "flow.spline_bins must be >= 2"),
            (self.spline_tail_bound > 0, "flow.spline_tail_bound must be > 0"),
            (self.batch_size >= 2, "flow.batch_size must be >= 2"),
            (self.max_iter >= 0, "flow.max_iter must be >= 0"),
            (0 <= self.min_iter, "flow.min_iter must be >= 0"),
            (self.lr > 0 and self.lr_final > 0, "flow.lr and flow.lr_final must be > 0"),
            (self.warmup >= 0, "flow.warmup must be >= 0"),
            (self.grad_clip > 0, "flow.grad_clip must be > 0"),
            (self.patience >= 1, "flow.patience must be >= 1"),
            (0 <= self.smoothing < 1, "flow.smoothing must be in [0, 1)"),
            (self.max_failures >= 0, "flow.max_failures must be >= 0"),
            (self.checkpoint_every_s >= 0, "flow.checkpoint_every_s must be >= 0"),
            (self.map_starts >= 1 and self.map_iter >= 1, "flow.map_starts and flow.map_iter must be >= 1"),
            (self.map_restarts >= 0, "flow.map_restarts must be >= 0"),
            (self.max_modes >= 1, "flow.max_modes must be >= 1"),
            (0 <= self.mode_min_mass < 1, "flow.mode_min_mass must be in [0, 1)"),
            (self.mode_barrier > 0, "flow.mode_barrier must be > 0"),
            (self.weight_draws >= 10, "flow.weight_draws must be >= 10"),
            (self.iw_group >= 1 and self.batch_size % self.iw_group == 0,
             "flow.iw_group must be >= 1 and divide flow.batch_size"),
            (0 <= self.iw_alpha < 1, "flow.iw_alpha must be in [0, 1)"),
            (0 <= self.temper_fraction <= 1, "flow.temper_fraction must be in [0, 1]"),
            (0 < self.temper_beta0 <= 1, "flow.temper_beta0 must be in (0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GanflowError(msg)


def _lr_factor(step: int, s: FlowSettings) -> float:
    if step < s.warmup:
        return (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, s.max_iter - s.warmup))
    ratio = s.lr_final / s.lr
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class _FlowFit:
    """One flow fit: what it was set up with, and the state each step changes and a checkpoint stores."""

    target: LatentTarget
    settings: FlowSettings
    generator: torch.Generator
    t0: float  # perf_counter when this process started the fit
    evals0: int  # the target's forward evaluations before this process started the fit
    flow: LatentFlow
    opt: torch.optim.Optimizer
    params: list[Tensor]
    loc: Tensor | None  # the fixed affine start (Laplace), or None for the identity
    scale_tril: Tensor | None
    attrs: dict
    good: tuple[dict, dict]  # the last good (flow, optimiser) snapshot a non-finite step rolls back to
    lr_scale: float = 1.0
    losses: list = field(default_factory=list)
    elbo_smooth: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    smooth: float | None = None
    best_smooth: float = -math.inf
    best_step: int = 0
    failures: int = 0
    step: int = 0
    evals_before: int = 0  # forward evaluations of the interrupted run(s)
    # a component of a mixture over modes: it must stay in its mode, so estimator "dreg" (mass-covering) falls
    # back to "stl" there (measured: on the twin problem DReG components spread over both modes and diverged)
    component: bool = False
    wall_before: float = 0.0

    def n_forward_evals(self) -> int:
        return self.evals_before + self.target.n_forward_evals - self.evals0

    def wall_time_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0


def _start_fit(target: LatentTarget, s: FlowSettings, g: torch.Generator, ckpt: dict | None,
               t0: float, evals0: int, mode: LaplaceMode | None = None, attrs: dict | None = None,
               start: nn.Module | None = None) -> _FlowFit:
    """Set-up: the affine start (the Laplace ``mode``, or the checkpoint's), the flow, its optimiser and the
    first snapshot. ``start``: a flow to begin from instead (a copy is trained; `ganflow.posterior.amortized`
    refinement)."""
    attrs = dict(attrs or {})
    loc = scale_tril = None
    if ckpt is not None:
        if ckpt.get("init_loc") is not None:
            loc, scale_tril = ckpt["init_loc"], ckpt["init_scale_tril"]
        attrs.update(ckpt.get("attrs", {}))
    elif start is not None:
        attrs["init"] = "given"
    elif mode is not None:
        loc, scale_tril = mode.loc, mode.scale_tril
    # Layer initialisation draws from torch's global RNG: seed it from `g` (and restore it) so the fit
    # depends only on the generator passed in. (On resume the draw is repeated but overwritten below.)
    init_seed = int(torch.randint(0, 2**62, (1,), generator=g)) if ckpt is None else 0
    if start is not None:
        flow = copy.deepcopy(start).train().requires_grad_(True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            flow = LatentFlow(target.latent_dim, s, loc, scale_tril)
    params = [p for p in flow.parameters() if p.requires_grad]
    # fused: one kernel for all parameters (at batch 16 the per-tensor loop cost 2.3 ms a step, fused 0.7 ms)
    opt = torch.optim.Adam(params, lr=s.lr, fused=True)
    return _FlowFit(target=target, settings=s, generator=g, t0=t0, evals0=evals0, flow=flow, opt=opt,
                    params=params, loc=loc, scale_tril=scale_tril, attrs=attrs, good=snapshot(flow, opt))


def _roll_back(fit: _FlowFit) -> None:
    """Undo a non-finite step: model and optimiser back to the last good snapshot, learning rate halved."""
    fit.failures += 1
    fit.flow.load_state_dict(fit.good[0])
    # A copy: the optimiser adopts the given tensors and updates them in place, which would corrupt the
    # snapshot for a second rollback.
    fit.opt.load_state_dict(copy.deepcopy(fit.good[1]))
    fit.lr_scale *= 0.5


def _record(fit: _FlowFit, elbo: float, lr: float) -> None:
    """Book a good step: snapshot every 50 steps, the smoothed ELBO, the traces and the best so far."""
    s = fit.settings
    if fit.step % 50 == 0:
        fit.good = snapshot(fit.flow, fit.opt)
    fit.smooth = elbo if fit.smooth is None else s.smoothing * fit.smooth + (1 - s.smoothing) * elbo
    fit.losses.append(-elbo)
    fit.elbo_smooth.append(fit.smooth)
    fit.lrs.append(lr)
    if fit.smooth > fit.best_smooth + s.tol or fit.step < temper_end(fit):  # patience counts from the posterior
        fit.best_smooth, fit.best_step = fit.smooth, fit.step
    fit.step += 1


def _converged(fit: _FlowFit) -> bool:
    """The stopping rule: past min_iter and warm-up, no gain of ``tol`` in the smoothed ELBO for ``patience``."""
    s = fit.settings
    return fit.step >= max(s.min_iter, s.warmup, temper_end(fit)) and fit.step - fit.best_step > s.patience


def _optimise(fit: _FlowFit, checkpoint_path, monitor, monitor_every: int, mixture: dict | None = None,
              desc: str = "flow") -> str:
    """The loop: step until ``max_iter`` or the stopping rule, checkpointing on the clock (with ``mixture``, the
    mixture fit's own state); why it stopped."""
    s = fit.settings
    twin = StopGradientTwin(fit.flow)

    def observe() -> None:
        if monitor is not None:
            with torch.no_grad():
                monitor(fit.step, fit.flow)

    observe()
    t_last_save = time.perf_counter()
    bar = Progress(s.max_iter, desc, enabled=s.progress, initial=fit.step)
    stopped = "max_iter"
    while fit.step < s.max_iter:
        lr = s.lr * _lr_factor(fit.step, s) * fit.lr_scale
        loss = fit_step(fit, twin, lr)
        if loss is None:
            _roll_back(fit)
            if fit.failures > s.max_failures:
                bar.close()
                raise GanflowError(
                    f"flow fit: {fit.failures} non-finite steps (loss or gradient); the target or operator "
                    "returns NaN/Inf; check the operator with `ganflow check-operator`"
                )
            continue
        _record(fit, -float(loss), lr)
        bar.update(1)
        if fit.step % 10 == 0:
            bar.set_postfix(elbo=f"{fit.smooth:.3f}")
        if fit.step % monitor_every == 0:
            observe()
        if _converged(fit):
            stopped = "converged"
            break
        if checkpoint_path is not None and time.perf_counter() - t_last_save >= s.checkpoint_every_s:
            save_fit_checkpoint(fit, checkpoint_path, mixture)
            t_last_save = time.perf_counter()
    bar.close()
    if fit.step % monitor_every != 0:
        observe()
    return stopped


def flow_sampler(model: nn.Module) -> Callable[[int, torch.Generator], Tensor]:
    """A `LatentFit` sampler of a fitted flow (or mixture, or conditioned flow): ``n`` draws, no gradient."""

    def sampler(n: int, gen: torch.Generator) -> Tensor:
        with torch.no_grad():
            return model.sample(n, gen)[0]

    return sampler


def _freeze(flow: nn.Module) -> nn.Module:
    flow.eval()
    for p in flow.parameters():
        p.requires_grad_(False)
    return flow


def _fit_result(fit: _FlowFit, stopped: str) -> LatentFit:
    """Write-out: freeze the flow and hand back its sampler, traces, attributes and state."""
    flow = _freeze(fit.flow)
    sampler = flow_sampler(flow)
    fit.attrs.update({
        "iterations": fit.step,
        "stopped": stopped,
        "elbo": float(fit.elbo_smooth[-1]) if fit.elbo_smooth else float("nan"),
        "nonfinite_steps": fit.failures,
        "flow_kind": fit.settings.kind,
        "n_modes": 1,
    })
    return LatentFit(
        method="flow",
        sampler=sampler,
        trace={"loss": np.asarray(fit.losses), "elbo_smooth": np.asarray(fit.elbo_smooth),
               "lr": np.asarray(fit.lrs)},
        attrs=fit.attrs,
        state={k_: v.detach().cpu().clone() for k_, v in flow.state_dict().items()},
        settings=asdict(fit.settings),
        n_forward_evals=fit.n_forward_evals(),
        wall_time_s=fit.wall_time_s(),
        model=flow,
    )


def _mixture_payload(modes: list[LaplaceMode], done: list[dict]) -> dict:
    """What a mixture fit's checkpoint adds: the modes and the finished components."""
    return {"locs": torch.stack([m.loc for m in modes]), "scale_trils": torch.stack([m.scale_tril for m in modes]),
            "log_joints": [m.log_joint for m in modes], "log_masses": [m.log_mass for m in modes], "done": done}


def _modes_from_checkpoint(mixture: dict) -> list[LaplaceMode]:
    return [LaplaceMode(loc, tril, float(lj), float(lm)) for loc, tril, lj, lm in
            zip(mixture["locs"], mixture["scale_trils"], mixture["log_joints"], mixture["log_masses"], strict=True)]


def _component_record(fit: _FlowFit, stopped: str) -> dict:
    """A finished component: its weights, traces and how it stopped (plain types, for the checkpoint)."""
    return {"state": {k_: v.detach().cpu().clone() for k_, v in fit.flow.state_dict().items()},
            "losses": torch.tensor(fit.losses, dtype=torch.float64),
            "elbo_smooth": torch.tensor(fit.elbo_smooth, dtype=torch.float64),
            "lrs": torch.tensor(fit.lrs, dtype=torch.float64), "stopped": stopped, "failures": fit.failures}


def _mixture_view(target: LatentTarget, s: FlowSettings, modes: list[LaplaceMode], flows: list) -> MixtureFlow:
    """For the monitor: the fitted components so far, the one in training, and the rest at their Laplace start,
    weighted by Laplace mass (the fitted weights come at the end)."""
    pending = [laplace_flow(target.latent_dim, s, m) for m in modes[len(flows):]]
    return MixtureFlow(flows + pending, torch.tensor([m.log_mass for m in modes]))


def _fit_components(target: LatentTarget, s: FlowSettings, g: torch.Generator, modes: list[LaplaceMode],
                    attrs: dict, ckpt: dict | None, clock: tuple[float, int], checkpoint_path, monitor,
                    monitor_every: int) -> tuple[list, list[dict], _FlowFit]:
    """One flow per mode, one after the other from the same generator (a checkpoint resumes the one it was
    taken in). Returns the flows, their records and the last component's fit (for the totals)."""
    done = list(ckpt["mixture"]["done"]) if ckpt is not None else []
    flows = []
    for m, rec in zip(modes, done, strict=False):
        flow = laplace_flow(target.latent_dim, s, m)
        flow.load_state_dict(rec["state"])
        flows.append(_freeze(flow))
    fit, first = None, len(done)
    for j in range(first, len(modes)):
        resume_here = ckpt if j == first else None  # only the component the checkpoint was taken in
        fit = _start_fit(target, s, g, resume_here, *clock, mode=modes[j], attrs=attrs)
        fit.component = True
        fit.evals_before = int(ckpt["n_forward_evals"]) if ckpt is not None else 0
        fit.wall_before = float(ckpt["wall_time_s"]) if ckpt is not None else 0.0
        if resume_here is not None:
            restore_fit(fit, ckpt, checkpoint_path)
        view = None if monitor is None else _mixture_view(target, s, modes, flows + [fit.flow])
        offset = sum(len(r["losses"]) for r in done)
        watch = None if monitor is None else (lambda step, _flow, o=offset, v=view: monitor(o + step, v))
        stopped = _optimise(fit, checkpoint_path, watch, monitor_every, _mixture_payload(modes, done),
                            desc=f"flow {j + 1}/{len(modes)}")
        done.append(_component_record(fit, stopped))
        flows.append(_freeze(fit.flow))
    return flows, done, fit


def _fit_mixture(target: LatentTarget, s: FlowSettings, g: torch.Generator, modes: list[LaplaceMode], attrs: dict,
                 ckpt: dict | None, clock: tuple[float, int], checkpoint_path, monitor,
                 monitor_every: int) -> LatentFit:
    """Several modes: a flow per mode (`_fit_components`), then the mixture weights by importance sampling
    (`fit_mixture_weights`); a `LatentFit` of the mixture, whose ``log_prob`` is exact."""
    flows, done, fit = _fit_components(target, s, g, modes, attrs, ckpt, clock, checkpoint_path, monitor,
                                       monitor_every)
    log_w, w_attrs = fit_mixture_weights(target, flows, g, s.weight_draws, batch=max(s.batch_size, 32))
    mixture = _freeze(MixtureFlow(flows, log_w))
    laplace_w = torch.softmax(torch.tensor([m.log_mass for m in modes], dtype=torch.float64), 0)
    cat = lambda key: np.concatenate([np.asarray(r[key]) for r in done])  # noqa: E731
    stops = [r["stopped"] for r in done]
    fit.attrs.update({
        "iterations": int(sum(len(r["losses"]) for r in done)),
        "stopped": "converged" if all(x == "converged" for x in stops) else "max_iter",
        "nonfinite_steps": int(sum(int(r["failures"]) for r in done)),
        "flow_kind": s.kind,
        "n_modes": len(modes),
        "mode_weights": [float(v) for v in mixture.weights],
        "mode_laplace_weights": [float(v) for v in laplace_w],
        "mode_locs": [[round(float(v), 4) for v in m.loc] for m in modes],
        **w_attrs,
    })
    if monitor is not None:
        monitor(int(fit.attrs["iterations"]), mixture)
    sampler = flow_sampler(mixture)
    return LatentFit(
        method="flow", sampler=sampler,
        trace={"loss": cat("losses"), "elbo_smooth": cat("elbo_smooth"), "lr": cat("lrs"),
               "component": np.concatenate([np.full(len(r["losses"]), j) for j, r in enumerate(done)])},
        attrs=fit.attrs, state={k_: v.detach().cpu().clone() for k_, v in mixture.state_dict().items()},
        settings=asdict(s), n_forward_evals=fit.n_forward_evals(), wall_time_s=fit.wall_time_s(), model=mixture,
    )


def _warn_single_flow_settings(s: FlowSettings, n_modes: int) -> None:
    """A mixture's components run STL, untempered (each must stay in its mode): say so when the settings asked for
    DReG or tempering, which would otherwise be dropped without a word (issue 34: on the elliptic benchmark case
    the search finds two modes, and a DReG / Renyi fit there was the plain fit, number for number)."""
    asked = [name for name, on in (("estimator = 'dreg'", s.estimator == "dreg"),
                                   ("temper_fraction > 0", s.temper_fraction > 0)) if on]
    if asked:
        warnings.warn(f"flow: the MAP search found {n_modes} modes, so the posterior is a mixture of one flow per "
                      f"mode, fitted by reverse KL without tempering; {' and '.join(asked)} apply to a single flow "
                      f"only (set flow.max_modes = 1 to keep them)", RuntimeWarning, stacklevel=3)


def fit_flow(target: LatentTarget, settings: FlowSettings | None = None, generator: torch.Generator | None = None,
             *, checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
             monitor: Callable[[int, LatentFlow], None] | None = None, monitor_every: int = 25,
             start: nn.Module | None = None) -> LatentFit:
    """Fit ``q_phi`` to ``p(z|y)`` by reverse KL; return a `LatentFit` whose ``sampler`` draws from it.

    Each step draws ``batch_size`` base samples from ``generator``, so the same seed gives the same fit on CPU.
    A step whose loss or gradient is not finite is undone (model and optimiser go back to the last good
    snapshot) and the learning rate is halved; after ``max_failures`` such steps the fit stops with an error.

    Multimodal posteriors: when the MAP search finds several distinct modes (`laplace_modes`), one flow is
    fitted per mode and the result is their `MixtureFlow` (``model``; ``attrs``: ``n_modes``, ``mode_weights``,
    ``mode_weights_se``, ``mode_laplace_weights``, ``mode_locs``, ``log_evidence``; ``trace["component"]``). With
    one mode the fit is the single flow, draw for draw as before mode finding existed.

    With ``checkpoint_path`` the whole fit state (flow, optimiser, rollback snapshot, the generator's RNG state,
    step, traces, the Laplace start, a mixture's modes and finished components) is written there atomically
    every ``settings.checkpoint_every_s`` seconds (tensors and plain types: ``weights_only``-loadable).
    ``resume=True`` continues from that file instead of starting over; on CPU the result is bit-identical to an
    uninterrupted fit with the same generator seed, and ``generator`` is left in the same state. The caller
    deletes the file once the result is saved.

    ``monitor(step, flow)``, when given, is called with the current flow (for a mixture: all components, the
    unfitted ones at their Laplace start) before the first step (the Laplace start), every ``monitor_every``
    steps and after the last; it must not train the flow or draw from ``generator`` (``ganflow bench`` uses it
    to time the fit to a given accuracy).

    ``start``, when given, is the flow to begin from instead of the Laplace / identity start: a module with
    `LatentFlow`'s ``transform(eps)``, ``log_prob(z)`` and ``sample(n, generator)`` (a copy is trained; used by
    ``solve --amortized --refine``). A resumed fit must be given the same ``start`` (its weights are restored).
    """
    s = settings or FlowSettings()
    s.validate()
    if monitor_every < 1:
        raise GanflowError(f"monitor_every must be >= 1, got {monitor_every}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    clock = (time.perf_counter(), target.n_forward_evals)
    ckpt = load_resume_checkpoint(target, s, checkpoint_path) if resume else None
    if ckpt is not None and "mixture" in ckpt:
        modes = _modes_from_checkpoint(ckpt["mixture"])
        return _fit_mixture(target, s, g, modes, dict(ckpt.get("attrs", {})), ckpt, clock, checkpoint_path, monitor,
                            monitor_every)
    modes, attrs = find_modes(target, s, g, clock[1]) if ckpt is None and start is None else ([None], {})
    if len(modes) > 1:
        _warn_single_flow_settings(s, len(modes))
        return _fit_mixture(target, s, g, modes, attrs, None, clock, checkpoint_path, monitor, monitor_every)
    fit = _start_fit(target, s, g, ckpt, *clock, mode=modes[0], attrs=attrs, start=start)
    if ckpt is not None:
        restore_fit(fit, ckpt, checkpoint_path)
    stopped = _optimise(fit, checkpoint_path, monitor, monitor_every)
    return _fit_result(fit, stopped)


def flow_from_state(latent_dim: int, settings: dict, state: dict[str, Tensor]) -> nn.Module:
    """Rebuild a fitted `LatentFlow`, or `MixtureFlow` (its state holds ``log_weights``), from what
    ``posterior.h5`` stores (settings JSON and the state dict)."""
    known = {f for f in FlowSettings.__dataclass_fields__}
    s = FlowSettings(**{k: v for k, v in settings.items() if k in known})
    if "log_weights" in state:
        K = int(state["log_weights"].shape[0])
        flow = MixtureFlow([LatentFlow(latent_dim, s) for _ in range(K)], torch.zeros(K))
    else:
        flow = LatentFlow(latent_dim, s)
    flow.load_state_dict(state)
    flow.eval()
    return flow


def affine_frame(model: nn.Module) -> tuple[Tensor, Tensor]:
    """``(loc, scale_tril)`` of a fitted flow's affine (Laplace) frame, for chains preconditioned by it; for a
    mixture over modes, the heaviest mode's (the modes of one posterior are shaped alike)."""
    if hasattr(model, "components"):
        model = model.components[int(model.weights.argmax())]
    return model.loc, model.scale_tril
