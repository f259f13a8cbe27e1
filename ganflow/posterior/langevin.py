"""Short-run Langevin posterior with a variationally chosen step size.

A batch of chains starts from ``q_0`` (the prior ``N(0, I_k)``, or any initial sampler such as a fitted flow)
and runs ``K`` unadjusted Langevin steps on the latent posterior (Nijkamp et al., ECCV 2020; Pang et al., EACL
2021):

    z_{t+1} = z_t + (s_t^2 / 2) grad log p(z_t | y) + s_t eps_t,     eps_t ~ N(0, I_k),

with no accept/reject; each chain's end point ``z_K`` is one draw of ``q_s``.

The chains run in an affine frame ``z = mu + L u`` (`WhitenedTarget`: the recursion above on ``u`` with ``log
p(y, mu + L u) + log|det L|``, so every KL below is the same in either frame). ``init = "laplace"`` (default)
takes ``mu`` and ``L L^T = (-Hessian)^-1`` from the flow's Laplace approximation and starts from ``u ~ N(0, I)``:
the posterior of ``u`` has unit scale in every direction, so one step size suits all of them, where unpreconditioned
chains from the prior cannot reach a posterior hundreds of times narrower in 20 steps. ``init = "flow"`` starts from
a fitted flow, in the frame of its draws' moments (`moment_frame`; the refiner); ``init = "prior"`` is the seed's
method (identity frame). An unadjusted step that is divergent (non-finite, or a Metropolis log ratio below
``-DIVERGENCE_NATS``) is refused and that chain's step halved. The step size ``s`` (``s_t = s``, or a geometric
decrease ``s_t = s * decay^(t / (K-1))``) is chosen by minimising an estimate of

    KL(q_s || p(z|y)) - log p(y) = E_q[log q_s(z_K) - log p(y, z_K)] = -H(q_s) - E_q[log p(y, z_K)]

(``log p(y)`` is unknown in general and does not depend on ``s``; the stored ``kl_estimates`` are this
negative ELBO). ``E_q[log p(y, z_K)]`` is a plain Monte-Carlo average; the entropy ``H(q_s)`` has no closed
form and is estimated in one of three ways (``LangevinSettings.entropy``):

``"path"`` -- condition on the noise.  Given ``eps_{0..K-1}`` the chain is a bijection ``z_0 -> z_K`` with
    Jacobian ``prod_t J_t``, ``J_t = I + (s_t^2/2) Hess log p(z_t|y)``, so
    ``log q(z_K | eps) = log q_0(z_0) - sum_t log|det J_t|`` exactly.  But ``E[-log q(z_K|eps)] = H(z_K | eps)
    = H(z_K) - I(z_K; eps)``: the entropy is *under*-estimated by the mutual information between the end point
    and the noise path, so the estimate is an upper bound on the KL (it is the KL between the joint laws of
    ``(z_K, eps)``).  The bias is not constant in ``s``: it grows as the chain forgets ``z_0`` (the injected
    noise then carries all of ``z_K``'s spread), so this estimator systematically picks too small a step size
    exactly when the chain mixes well (measured in docs/posteriors.md: about half the optimal ``s`` on
    linear_gaussian).  Kept as a diagnostic and a guaranteed bound (``trace["kl_path_bound"]``).
``"linearized"`` (default for ``k <= hessian_max_dim``) -- the same Jacobians, but the noise enters the
    entropy too: along each chain the step is linearised, ``z_{t+1} ~ J_t z_t + s_t eps_t``, and a covariance
    is propagated, ``C_0 = Cov(q_0)``, ``C_{t+1} = J_t C_t J_t^T + s_t^2 I``; ``H ~ mean_i 1/2 log det(2 pi e
    C_K^(i))``. Exact when ``log p(z|y)`` is quadratic (then ``q_s`` is Gaussian with covariance ``C_K``);
    otherwise a local Gaussian approximation, neither a bound (it ignores the entropy between modes, which
    errs towards a larger KL) nor exact.
``"gaussian"`` (default beyond ``hessian_max_dim``) -- the entropy of the Gaussian with the chains' sample
    covariance: an upper bound on ``H(q_s)`` (maximum entropy), so the KL is under-estimated for non-Gaussian
    ``q_s``; needs no Hessians and more chains than dimensions.

The Hessians are exact (``k`` double-backward passes per step), so ``"path"`` and ``"linearized"`` are limited
to ``k <= hessian_max_dim`` (64 by default).  A Hutchinson / power-series estimate of ``log det(I + h Hess)``
was not adopted: the series converges only for ``h |lambda_max| < 1`` while the KL-optimal step sits near the
stability limit ``h |lambda_max| ~ 1..2``, where it diverges.

The search is done with common random numbers (the same ``z_0`` and ``eps`` for every ``s``, so the estimated
curve is a smooth function of ``s``): a log-spaced grid over ``[search_min, search_max]``, then golden-section
refinement in ``log s`` between the grid neighbours of the best point.  Step sizes whose chains overflow count
as ``+inf``.  With ``mala = true`` each step is a Metropolis-adjusted Langevin proposal (asymptotically exact;
run longer chains); the step size is then still chosen on the unadjusted chain and the acceptance rate is
recorded.

With ``mala`` and ``leapfrog = L > 1`` each step is a Hamiltonian Monte Carlo transition instead: ``L`` leapfrog
steps of size ``s`` from a fresh momentum ``p ~ N(0, I)``, then one Metropolis test on the energy (``L = 1`` is
MALA). Where the local curvature varies across the posterior (phase retrieval: the local Hessian's eigenvalues
in the frame of the flow's moments span 0.1 .. 30, up to 130), MALA's step is set by the stiffest
direction and its moves are diffusive, so a soft direction takes ``~ 1 / (s^2 lambda)`` steps to relax; an HMC
trajectory moves ``~ L`` steps' distance for its ``L`` gradients. The KL of the unadjusted one-step chain says
nothing about an ``L``-step trajectory, so its step size is chosen by acceptance instead (`HMC_TARGET_ACCEPT`,
`acceptance_step_size`).

Example:
    >>> import torch
    >>> from ganflow.problems.linear_gaussian import LinearGaussianProblem
    >>> from ganflow.posterior import LatentTarget
    >>> p = LinearGaussianProblem(latent_dim=4)
    >>> target = LatentTarget(p.generator(), p.make_operator(), torch.zeros(p.obs_shape), 0.5)
    >>> fit = run_langevin(target, LangevinSettings(n_samples=100, search_chains=64, search_grid=7,
    ...                    search_refine=4), torch.Generator().manual_seed(0))
    >>> fit.samples.shape
    torch.Size([100, 4])
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import GanflowError
from ..progress import Progress
from .base import LatentFit
from .frames import InitSampler, WhitenedTarget, draw_start, finite, identity_frame, laplace_frame, moment_frame
from .kernels import hmc_step, mala_step, ula_step
from .resampling import importance_resampler
from .step_size import (
    HMC_TARGET_ACCEPT,
    MAX_BACKOFF_FRACTION,
    acceptance_step_size,
    langevin_kl_estimate,
    search_step_size,
    step_schedule,
    twice_differentiable,
)
from .target import LatentTarget

# The frames, kernels, resampler and step-size rules live in their own modules (frames, kernels, resampling,
# step_size); the names users and scripts import from here stay importable from here.
__all__ = ["LangevinSettings", "run_langevin", "langevin_kl_estimate", "HAND_SET_STEP_SIZE", "WhitenedTarget",
           "identity_frame", "laplace_frame", "moment_frame", "importance_resampler", "HMC_TARGET_ACCEPT"]

# A typical hand-set short-run step size (K = 20 .. 40 steps of s = 0.1 in the short-run inference
# literature); what one would ship without the search, and the baseline the search is tested against.
HAND_SET_STEP_SIZE = 0.1

@dataclass(frozen=True)
class LangevinSettings:
    """Settings of `run_langevin` (TOML table ``[langevin]``).

    Args:
        n_steps: ``K``, Langevin steps per chain (20; use a few hundred with ``mala``).
        n_samples: number of chains in the final run = number of posterior draws.
        batch_size: chains run at once in the final run.
        step_size: a fixed ``s`` (skips the search); unset = choose ``s`` by minimising the KL estimate.
        step_decay: ``s_K-1 / s_0`` of a geometric step schedule, in ``(0, 1]`` (1 = constant step).
        search_min, search_max: the search interval for ``s``.
        search_grid: log-spaced grid points of the coarse search.
        search_refine: golden-section iterations after the grid (each shrinks the bracket by 0.618).
        search_chains: chains per KL estimate (common random numbers across step sizes).
        entropy: ``"auto"`` | ``"linearized"`` | ``"path"`` | ``"gaussian"`` (see the module docstring).
        hessian_max_dim: largest latent dimension for which exact Hessians are used.
        init: ``"laplace"`` (default: chains run in the whitened Laplace frame ``z = mu + L u``, started from
            ``u ~ N(0, I)``), ``"flow"`` (chains start from a fitted flow; the caller passes its sampler and
            may pass a frame, e.g. `moment_frame`) or ``"prior"`` (the seed's method: identity frame, prior
            start).
        map_starts, map_iter, map_restarts: the MAP search of ``init = "laplace"`` (as `FlowSettings`).
        mala: Metropolis-adjust every step (asymptotically exact; records the acceptance rate).
        leapfrog: with ``mala``, leapfrog steps per Metropolis test: 1 = MALA; ``L > 1`` = each of ``n_steps``
            is a Hamiltonian Monte Carlo trajectory of ``L`` gradients, its step size chosen by acceptance
            (module docstring).
        resample: with a start sampler whose density is known (the refiner: ``init_log_prob``), draw
            ``resample_pool`` times the chains from it and importance-resample them by ``p(y, z) / q(z)``
            (Pareto-smoothed weights, systematic resampling) before the chains run: a flow that is too narrow
            or off-centre is corrected by the weights, and the chains then separate the duplicates. Skipped
            (the raw draws are used, with a warning) when the weights' PSIS ``k_hat`` exceeds 0.7.
        resample_pool: the pool of start draws per chain (costs ``resample_pool`` forward evaluations per
            chain, without gradients).
    """

    n_steps: int = 20
    n_samples: int = 2000
    batch_size: int = 500
    step_size: float | None = None
    step_decay: float = 1.0
    search_min: float = 1e-3
    search_max: float = 2.0  # the Laplace frame has unit scale; its KL-optimal steps reach ~1
    search_grid: int = 13
    search_refine: int = 10
    search_chains: int = 256
    entropy: Literal["auto", "linearized", "path", "gaussian"] = "auto"
    hessian_max_dim: int = 64
    init: Literal["laplace", "flow", "prior"] = "laplace"
    map_starts: int = 8
    map_iter: int = 300
    map_restarts: int = 0
    mala: bool = False
    leapfrog: int = 1
    resample: bool = True
    resample_pool: int = 4

    def validate(self) -> None:
        """Raise `GanflowError` (one line) on an impossible setting."""
        if self.n_steps < 1:
            raise GanflowError(f"langevin.n_steps must be >= 1, got {self.n_steps}")
        if self.n_samples < 1:
            raise GanflowError(f"langevin.n_samples must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise GanflowError(f"langevin.batch_size must be >= 1, got {self.batch_size}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise GanflowError(f"langevin.step_size must be > 0, got {self.step_size}")
        if not (0 < self.step_decay <= 1):
            raise GanflowError(f"langevin.step_decay must be in (0, 1], got {self.step_decay}")
        if not (0 < self.search_min < self.search_max):
            raise GanflowError(
                "langevin.search_min and search_max need 0 < min < max, "
                f"got {self.search_min}, {self.search_max}"
            )
        if self.search_grid < 3:
            raise GanflowError(f"langevin.search_grid must be >= 3, got {self.search_grid}")
        if self.search_refine < 0:
            raise GanflowError(f"langevin.search_refine must be >= 0, got {self.search_refine}")
        if self.search_chains < 2:
            raise GanflowError(f"langevin.search_chains must be >= 2, got {self.search_chains}")
        if self.entropy not in ("auto", "linearized", "path", "gaussian"):
            raise GanflowError(
                f"langevin.entropy must be auto, linearized, path or gaussian, got {self.entropy!r}"
            )
        if self.hessian_max_dim < 1:
            raise GanflowError(f"langevin.hessian_max_dim must be >= 1, got {self.hessian_max_dim}")
        if self.init not in ("laplace", "flow", "prior"):
            raise GanflowError(f"langevin.init must be 'laplace', 'flow' or 'prior', got {self.init!r}")
        if self.map_starts < 1 or self.map_iter < 1:
            raise GanflowError("langevin.map_starts and langevin.map_iter must be >= 1")
        if self.map_restarts < 0:
            raise GanflowError(f"langevin.map_restarts must be >= 0, got {self.map_restarts}")
        if self.leapfrog < 1:
            raise GanflowError(f"langevin.leapfrog must be >= 1, got {self.leapfrog}")
        if self.leapfrog > 1 and not self.mala:
            raise GanflowError("langevin.leapfrog > 1 (Hamiltonian Monte Carlo) needs mala = true")
        if self.resample_pool < 1:
            raise GanflowError(f"langevin.resample_pool must be >= 1, got {self.resample_pool}")


def _run_chains(target: WhitenedTarget, z: Tensor, steps: list[float], mala: bool, generator: torch.Generator,
                sums: dict[str, np.ndarray], leapfrog: int = 1) -> tuple[Tensor, int]:
    """Run one batch of chains; accumulate the per-step sums of the log joint, (MALA) acceptances and
    non-finite proposals in ``sums``. Returns the end points and the number of chains that backed off."""
    lp, g = target.log_joint_and_grad(z)
    if not finite(lp, g):
        raise GanflowError(f"langevin: non-finite gradient at step 0 (step size {steps[0]:.3g})")
    scale = torch.ones(z.shape[0], dtype=z.dtype)  # per-chain step multiplier (halved on a non-finite step)
    for t, s in enumerate(steps):
        if mala:
            if leapfrog > 1:
                z, lp, g, accept = hmc_step(target, z, lp, g, s, leapfrog, generator)
            else:
                z, lp, g, accept = mala_step(target, z, lp, g, s, generator)
            sums["accept"][t] += float(accept.double().sum())
        else:
            z, lp, g, step, failed = ula_step(target, z, lp, g, s * scale, generator)
            scale = step / s
            sums["nonfinite"][t] += float(failed.double().sum())
        sums["log_joint"][t] += float(lp.double().sum())
    return z, int((scale < 1).sum())


def _check_backoff(n_backed: int, n: int, sums: dict[str, np.ndarray], steps: list[float]) -> None:
    """Stop when more than `MAX_BACKOFF_FRACTION` of the chains needed a smaller step."""
    if n_backed > MAX_BACKOFF_FRACTION * n:
        t = int(np.flatnonzero(sums["nonfinite"])[0])
        raise GanflowError(
            f"langevin: non-finite gradient at step {t} (or a divergent step) in {n_backed} of {n} chains "
            f"(step size {steps[t]:.3g}); lower step_size or search_max"
        )


def _resolve_entropy(settings: LangevinSettings, target: LatentTarget) -> str:
    k = target.latent_dim
    entropy = settings.entropy
    if entropy == "auto":
        entropy = "linearized" if k <= settings.hessian_max_dim and twice_differentiable(target) else "gaussian"
    elif entropy in ("linearized", "path"):
        if k > settings.hessian_max_dim:
            raise GanflowError(
                f"langevin.entropy = '{entropy}' needs exact Hessians, but latent_dim {k} > hessian_max_dim "
                f"{settings.hessian_max_dim}; use entropy = 'gaussian' or raise hessian_max_dim"
            )
        if not twice_differentiable(target):
            raise GanflowError(
                f"langevin.entropy = '{entropy}' needs exact Hessians, but the target's log density cannot be "
                f"differentiated twice (its operator or generator refuses it); use entropy = 'gaussian'"
            )
    if entropy == "gaussian" and settings.search_chains <= 2 * k:
        raise GanflowError(
            f"langevin.entropy = 'gaussian' needs search_chains > 2 * latent_dim = {2 * k}, "
            f"got {settings.search_chains}"
        )
    return entropy


def _chain_frame(target: LatentTarget, settings: LangevinSettings, init: InitSampler | None,
                 frame: tuple[Tensor, Tensor] | None, generator: torch.Generator) -> tuple[WhitenedTarget, str]:
    """The frame the chains run in, and its name: a given one, the Laplace frame, or the identity."""
    if settings.init == "flow" and init is None:
        raise GanflowError("langevin.init = 'flow' needs a fitted flow's sampler (`solve` fits the [flow] first)")
    if frame is not None:
        if init is None and settings.init == "prior":
            raise GanflowError("langevin: a frame applies to init 'laplace' or 'flow', not 'prior'")
        return WhitenedTarget(target, *frame), "given"
    if init is None and settings.init == "laplace":
        return laplace_frame(target, settings, generator), "laplace"
    return identity_frame(target), "identity"


def run_langevin(target: LatentTarget, settings: LangevinSettings | None = None,
                 generator: torch.Generator | None = None, init: InitSampler | None = None,
                 frame: tuple[Tensor, Tensor] | None = None,
                 init_log_prob: Callable[[Tensor], Tensor] | None = None, progress: bool = True) -> LatentFit:
    """Short-run Langevin posterior draws with a KL-optimal step size (see the module docstring); ``progress``
    reports the final run's chains on stderr (`ganflow.progress`).

    Args:
        target: the latent posterior.
        settings: `LangevinSettings` (defaults if None).
        generator: the source of all randomness (MAP starts, start points, search noise, chain noise).
        init: ``init(n, generator) -> [n, k]`` start points (e.g. a fitted flow's sampler); None = ``N(0, I)``
            in the chain's frame (the Laplace approximation for ``init = "laplace"``, the prior for ``"prior"``).
        frame: ``(loc [k], scale_tril [k, k])``: run the chains in ``z = loc + L u`` (e.g. `moment_frame` of a
            flow's sampler, or its Laplace affine map ``flow.loc, flow.scale_tril``); None = the Laplace frame
            for ``init = "laplace"`` without a sampler, else the identity.
        init_log_prob: ``log q(z)`` ``[n]`` of ``init``'s draws (e.g. ``flow.log_prob``); with
            ``settings.resample`` the starts are importance-resampled from a pool (`importance_resampler`).

    Returns:
        A `LatentFit` with ``samples`` ``[n_samples, k]``; ``trace``: ``step_sizes``, ``kl_estimates``,
        ``kl_path_bound`` (sorted by ``s``), ``loss`` (the search objective in evaluation order; with
        ``leapfrog > 1`` ``step_sizes`` and ``search_acceptance`` instead), ``mean_log_joint`` per step of the
        final run (and ``acceptance`` per step with MALA); ``attrs``: ``step_size``, ``n_steps``,
        ``kl_estimate`` (``KL - log p(y)`` at the chosen ``s``; nan with ``leapfrog > 1``), ``entropy``,
        ``step_decay``, ``mala``, ``leapfrog``, ``init`` (``"sampler"`` when one is given), ``frame`` (``"laplace"``,
        ``"given"``, ``"identity"``), ``backed_off_chains`` (and ``acceptance_rate`` with MALA; ``psis_khat``
        with the linearised entropy: the PSIS shape of the search's chains at the chosen ``s``, weights from
        their linearised laws; with resampled starts ``start_khat``, ``start_ess_ratio`` and
        ``start_resampled`` of the final run's last batch). ``n_forward_evals`` counts the evaluations made by
        this call (MAP search, step-size search and final run), not those made on ``target`` before it.
    """
    settings = settings or LangevinSettings()
    settings.validate()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    entropy = _resolve_entropy(settings, target)
    dtype = target.y.dtype if target.y.is_floating_point() else torch.get_default_dtype()
    evals0 = target.n_forward_evals
    t0 = time.perf_counter()
    chain_target, frame_name = _chain_frame(target, settings, init, frame, generator)
    resampling: dict = {}
    if init is not None and init_log_prob is not None and settings.resample:
        init = importance_resampler(target, init, init_log_prob, chain_target, settings.resample_pool,
                                    settings.batch_size, resampling)
    if settings.leapfrog > 1:
        step_size, info = acceptance_step_size(chain_target, settings, init, generator, dtype)
    else:
        step_size, info = search_step_size(chain_target, settings, entropy, init, generator, dtype,
                                            warn_low=frame_name == "identity" and init is None)
    steps = step_schedule(step_size, settings.n_steps, settings.step_decay)
    samples, sums, n_backed = _final_run(chain_target, settings, steps, init, generator, dtype, progress)
    trace, attrs = _record(settings, info, sums, chain_target, step_size, entropy, init, frame_name, n_backed,
                           resampling)
    return LatentFit(
        method="langevin",
        samples=chain_target.to_latent(samples).detach(),
        trace=trace,
        attrs=attrs,
        settings=dataclasses.asdict(settings),
        n_forward_evals=target.n_forward_evals - evals0,
        wall_time_s=time.perf_counter() - t0,
    )


def _record(settings: LangevinSettings, info: dict, sums: dict, chain_target: WhitenedTarget, step_size: float,
            entropy: str, init: InitSampler | None, frame_name: str, n_backed: int, resampling: dict
            ) -> tuple[dict, dict]:
    """The fit's ``trace`` and ``attrs`` (listed in `run_langevin`) from the search's ``info`` and the final run's
    per-step ``sums``."""
    trace = {key: info[key] for key in ("step_sizes", "kl_estimates", "kl_path_bound", "loss",
                                        "search_acceptance") if key in info}
    trace["mean_log_joint"] = sums["log_joint"] / settings.n_samples - chain_target.log_det  # log p(y, z)
    attrs = {
        "step_size": float(step_size),
        "n_steps": settings.n_steps,
        "kl_estimate": float(info["kl_estimate"]),
        "entropy": entropy,
        "step_decay": settings.step_decay,
        "mala": settings.mala,
        "leapfrog": settings.leapfrog,
        "init": settings.init if init is None else "sampler",
        "frame": frame_name,
        "backed_off_chains": n_backed,
    }
    attrs.update({f"start_{key}": value for key, value in resampling.items()})
    if info["psis_khat"] is not None and not settings.mala:  # the weights are the unadjusted chain's
        attrs["psis_khat"] = info["psis_khat"]
    if settings.mala:
        trace["acceptance"] = sums["accept"] / settings.n_samples
        attrs["acceptance_rate"] = float(sums["accept"].sum() / (settings.n_samples * settings.n_steps))
    return trace, attrs


def _final_run(target: WhitenedTarget, settings: LangevinSettings, steps: list[float], init: InitSampler | None,
               generator: torch.Generator, dtype, progress: bool = True) -> tuple[Tensor, dict, int]:
    """The ``n_samples`` chains in batches: end points in the frame, the per-step sums, chains backed off."""
    K = settings.n_steps
    sums = {"log_joint": np.zeros(K), "accept": np.zeros(K), "nonfinite": np.zeros(K)}
    draws, n_backed = [], 0
    with Progress(settings.n_samples, "langevin", enabled=progress, unit="chain") as bar:
        for start in range(0, settings.n_samples, settings.batch_size):
            n = min(settings.batch_size, settings.n_samples - start)
            u0 = draw_start(n, target, init, generator, dtype)
            u, backed = _run_chains(target, u0, steps, settings.mala, generator, sums, settings.leapfrog)
            draws.append(u)
            n_backed += backed
            if settings.mala:
                bar.set_postfix(acceptance=f"{sums['accept'].sum() / ((start + n) * K):.2f}")
            bar.update(n)
    _check_backoff(n_backed, settings.n_samples, sums, steps)
    return torch.cat(draws), sums, n_backed
