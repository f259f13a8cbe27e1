"""Tempered sequential Monte Carlo (``--method smc``): a population of particles carried from the prior to the
latent posterior through the tempered laws

    pi_b(z) ∝ p(z) p(y | z)^b,      0 = b_0 < b_1 < ... < b_T = 1

(Del Moral, Doucet & Jasra, "Sequential Monte Carlo samplers", JRSS B 2006). Each stage ``t``:

1. **Temperature** (adaptive tempering, Jasra, Stephens, Doucet & Tsagaris, Scand. J. Stat. 2011): the particles
   carry equal weights (they were resampled), so the incremental weights ``w_i = p(y | z_i)^(b' - b)`` are the
   whole weights and their conditional ESS (Zhou, Johansen & Aston, JCGS 2016) is ``(sum w)^2 / sum w^2``;
   ``b'`` is found by bisection so that it is ``target_ess * N`` (``b' = 1`` when that already holds at 1).
2. **Evidence**: ``log Z_b' / Z_b ~ log mean_i w_i``, and ``log p(y) = sum_t`` of these (unbiased in ``Z``).
3. **Resample** by ``w`` (systematic or multinomial): ``N`` equally weighted particles of ``pi_b'``.
4. **Move**: MCMC transitions that leave ``pi_b'`` invariant, with the gradient (MALA, or HMC with ``leapfrog``
   steps: `ganflow.posterior.kernels`, as Langevin), in the frame ``z = m + L u`` of the particles' weighted
   mean and covariance (re-estimated every stage before resampling, so the metric follows the population as it
   narrows onto the ridge; ``frame = "identity"`` for comparison). The step size (in ``u``) is multiplied by
   ``exp(ADAPT_GAIN (acceptance - target_accept))`` after every transition and carried to the next stage.
   Transitions repeat until the particles have forgotten where the stage put them: the mean over
   the frame's coordinates of the correlation (across particles) between ``u`` now and at the stage's start is
   below ``max_correlation`` (pocoMC's criterion, Karamanis et al. 2022), at least ``min_moves`` and at most
   ``max_moves`` times.

**From a flow** (``start = "flow"``; ``init`` and ``init_log_prob`` of `run_smc`): the path starts at a fitted
flow ``q`` instead of the prior, ``pi_b(z) ∝ q(z)^(1 - b) p(y, z)^b``, so the incremental weights are
``(p(y, z) / q(z))^(b' - b)`` and the evidence ``log p(y)`` is estimated as before (``q`` is normalised). Where the
flow is close (a reverse-KL fit: too narrow, slightly off) few stages remain (on the 16-d linear-Gaussian test a
start half as wide and half an sd off takes 9 stages and 61 k evaluations against 36 and 244 k from the prior), and
the moves spread what the flow squeezed. It corrects the flow's width and position, not a mode the flow missed:
``q^(1 - b)`` holds the particles where ``q`` has mass until ``b`` is near 1, when a barrier already separates
the modes (twin exact problem, a one-mode flow: one stage, still one mode).

**Final sweeps** (``final_sweeps = S``): once ``b = 1``, every particle goes on as a plain MCMC chain with the
last stage's step and the final particles' frame, both frozen, its position recorded after every ``sweep_moves``
transitions: ``N x S`` draws (particle by particle) whose bulk ESS over the ``N`` chains is reported. The ``N``
particles alone are worth ``N/4``-``N/2`` independent draws; a reference needs more. The bulk ESS sees no
autocorrelation longer than the chains: ``sweep_correlation`` (the largest, over coordinates, correlation across
particles between the first and the last sweep) says how far they are from that. On the elliptic case, 20 sweeps
of 32-step HMC read ESS 983 with ``sweep_correlation`` 0.58, where the lag correlations put the integrated
autocorrelation at 1,300-2,800 gradients, an ESS nearer 300: a second seed's run, not the ESS, is the check.

**The evidence's Monte-Carlo error** (``log_evidence_se``): when the moves leave the particles (nearly)
independent draws of ``pi_b``, the stages' estimates are independent and, by the delta method, ``log mean w``
has variance ``Var(w) / (N mean(w)^2) = 1 / ESS_t - 1 / N``; the error is the square root of the sum over the
stages. It misses the dependence that moves which have not decorrelated the particles leave (then it is too
small); the exact tests check it against quadrature and closed-form evidences. The genealogy estimator of Lee &
Whiteley (2018) accounts for that dependence but collapses to zero once all particles share one stage-0 ancestor,
which happens within the tens of stages of a sharp posterior.

**Own code, not pocoMC**: pocoMC 1.2.6 (Karamanis et al., MNRAS 2022) with its defaults and gradient-free moves
reached ``b = 0.043`` in 12 minutes on the elliptic case (issue 33), needing 70-160 moves per stage; ganflow's
target gives the gradient for little more than the value (one adjoint), batched over the particles, and its
MALA / HMC kernels and frames are tested already. A normalising-flow frame (pocoMC's preconditioning) was
measured on the elliptic case and not added: fitted to the particles it is no better a density than their
Gaussian, and fitted to 10,000 posterior draws its HMC moves decorrelated more slowly than the covariance
frame's (docs/posteriors.md); longer trajectories (``leapfrog`` 16-32) are what helped there.

Resumable: with ``checkpoint_path`` the whole state (particles, temperature, step, evidence sums, traces, RNG)
is written atomically at every stage boundary; ``resume=True`` continues it (bit-identical on CPU).

Example:
    >>> import torch
    >>> from ganflow.problems.linear_gaussian import LinearGaussianProblem
    >>> from ganflow.posterior import LatentTarget
    >>> p = LinearGaussianProblem(latent_dim=4)
    >>> target = LatentTarget(p.generator(), p.make_operator(), torch.zeros(p.obs_shape), 0.5)
    >>> fit = run_smc(target, SmcSettings(n_particles=200, progress=False), torch.Generator().manual_seed(0))
    >>> fit.samples.shape, fit.attrs["log_evidence"] < 0
    (torch.Size([200, 4]), True)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from ..chain_stats import ess_bulk, rhat_rank
from ..errors import GanflowError
from ..progress import Progress
from .base import LatentFit
from .fit_checkpoint import target_fingerprint
from .frames import InitSampler, WhitenedTarget
from .kernels import hmc_step, mala_step
from .resampling import systematic_resample
from .target import LatentTarget

__all__ = ["SmcSettings", "run_smc", "SMC_CHECKPOINT_KIND"]

SMC_CHECKPOINT_KIND = "ganflow.smc_run"
SMC_CHECKPOINT_VERSION = 1
# may differ on resume: they change nothing already computed (more or fewer final sweeps extend or end the chains;
# a stage's moves may be any transitions that leave its tempered law invariant, so a run whose particles stopped
# decorrelating can go on with more of them)
_RESUME_FREE = {"progress", "max_stages", "final_sweeps", "sweep_moves", "max_moves"}
ADAPT_GAIN = 2.0  # step *= exp(ADAPT_GAIN (acceptance - target)): x0.3 at none accepted, x2.2 at all
BISECTION_ITERS = 60
LogDensity = Callable[[Tensor], Tensor]  # log q(z) [N] of a start sampler's law (a flow's log_prob)
START_LOG_Q_ATOL = 1e-3  # a resumed run's start density may differ from the checkpoint's by rounding only (nats)
SWEEP_BETA = 1.0  # the temperature of the final sweeps (the posterior; a module constant so a test can break it)


@dataclass(frozen=True)
class SmcSettings:
    """Settings of `run_smc` (TOML table ``[smc]``).

    Args:
        n_particles: ``N``; must exceed the latent dimension (the frame is their covariance).
        target_ess: the conditional ESS each new temperature keeps, as a fraction of ``N`` (0.5-0.9: higher
            means more, gentler stages).
        resampling: ``"systematic"`` (lower variance) or ``"multinomial"``.
        leapfrog: gradient steps per MCMC transition: 1 = MALA, ``L > 1`` = HMC with ``L`` leapfrog steps.
        step_size: the initial step in the frame's whitened coordinates (adapted from there).
        target_accept: the acceptance rate the step size is adapted toward.
        frame: ``"covariance"`` (the particles' mean and covariance, every stage) or ``"identity"``.
        max_correlation: moves stop once the mean correlation between the particles' positions now and at the
            stage's start is below this.
        min_moves, max_moves: bounds on the transitions per stage.
        max_stages: stop with an error when ``b`` has not reached 1 after this many stages.
        start: ``"prior"`` (tempering from ``p(z)``) or ``"flow"``: from a flow ``q`` fitted first (``ganflow solve``
            fits it by ``[flow]``), through ``q(z)^(1 - b) p(y, z)^b``: a correction of the flow, in a few stages
            where it is close, that keeps the evidence (module docstring).
        final_sweeps: after ``b`` reaches 1, this many sweeps of plain MCMC (step and frame frozen), each
            particle's positions after every sweep forming its chain: ``N x final_sweeps`` draws with split R-hat
            and ESS across ``N`` chains (0: the ``N`` final particles only).
        sweep_moves: transitions per sweep (between recorded draws).
        progress: a line per stage on stderr (`ganflow.progress`; a bar on a terminal).
    """

    n_particles: int = 1000
    target_ess: float = 0.7
    resampling: Literal["systematic", "multinomial"] = "systematic"
    leapfrog: int = 1
    step_size: float = 0.5
    target_accept: float = 0.6
    frame: Literal["covariance", "identity"] = "covariance"
    max_correlation: float = 0.2
    min_moves: int = 2
    max_moves: int = 50
    max_stages: int = 1000
    start: Literal["prior", "flow"] = "prior"
    final_sweeps: int = 0
    sweep_moves: int = 5
    progress: bool = True

    def validate(self) -> None:
        """Raise `GanflowError` (one line) on an impossible setting."""
        if self.n_particles < 2:
            raise GanflowError(f"smc.n_particles must be >= 2, got {self.n_particles}")
        if not 0 < self.target_ess < 1:
            raise GanflowError(f"smc.target_ess must be in (0, 1), got {self.target_ess}")
        if self.resampling not in ("systematic", "multinomial"):
            raise GanflowError(f"smc.resampling must be 'systematic' or 'multinomial', got {self.resampling!r}")
        if self.leapfrog < 1:
            raise GanflowError(f"smc.leapfrog must be >= 1, got {self.leapfrog}")
        if not self.step_size > 0:
            raise GanflowError(f"smc.step_size must be > 0, got {self.step_size}")
        if not 0 < self.target_accept < 1:
            raise GanflowError(f"smc.target_accept must be in (0, 1), got {self.target_accept}")
        if self.frame not in ("covariance", "identity"):
            raise GanflowError(f"smc.frame must be 'covariance' or 'identity', got {self.frame!r}")
        if not 0 < self.max_correlation < 1:
            raise GanflowError(f"smc.max_correlation must be in (0, 1), got {self.max_correlation}")
        if not 0 <= self.min_moves <= self.max_moves:
            raise GanflowError(f"smc: need 0 <= min_moves <= max_moves, got {self.min_moves}, {self.max_moves}")
        if self.max_stages < 1:
            raise GanflowError(f"smc.max_stages must be >= 1, got {self.max_stages}")
        if self.start not in ("prior", "flow"):
            raise GanflowError(f"smc.start must be 'prior' or 'flow', got {self.start!r}")
        if self.final_sweeps < 0 or self.sweep_moves < 1:
            raise GanflowError(f"smc: need final_sweeps >= 0 and sweep_moves >= 1, got {self.final_sweeps}, "
                               f"{self.sweep_moves}")


class _Tempered:
    """``log p(z) + b log p(y | z)``, or from a start density ``q``, ``(1 - b) log q(z) + b log p(y, z)``: the
    face of a `LatentTarget` that `WhitenedTarget` wraps."""

    def __init__(self, target: LatentTarget, beta: float, log_q: LogDensity | None = None):
        self.target, self.beta, self.log_q = target, float(beta), log_q
        self.y, self.latent_dim = target.y, target.latent_dim

    @property
    def n_forward_evals(self) -> int:
        return self.target.n_forward_evals

    def log_joint(self, z: Tensor) -> Tensor:
        if self.log_q is None:
            return self.target.log_prior(z) + self.beta * self.target.log_likelihood(z)
        out = self.beta * self.target.log_joint(z)
        return out if self.beta == 1.0 else out + (1.0 - self.beta) * self.log_q(z).to(out.dtype)


@dataclass
class _SmcState:
    """What a stage changes and a checkpoint stores."""

    z: Tensor  # [N, k] particles (equally weighted)
    log_lik: Tensor  # [N] float64, log p(y | z) (non-finite -> -inf)
    beta: float = 0.0
    step: float = 0.5
    log_z: float = 0.0
    log_z_var: float = 0.0
    evals_before: int = 0
    wall_before: float = 0.0
    trace: dict = field(default_factory=lambda: {k: [] for k in TRACE_KEYS})
    chains: list = field(default_factory=list)  # [N, k] positions after each final sweep at b = 1
    sweep_frame: tuple | None = None  # (loc, scale_tril) frozen for the final sweeps
    sweep_acceptance: list = field(default_factory=list)


TRACE_KEYS = ("beta", "ess", "moves", "acceptance", "step_size", "correlation", "log_evidence", "loss")


def _log_likelihood(target: LatentTarget, z: Tensor, log_q: LogDensity | None = None) -> Tensor:
    """What the temperature multiplies, ``[N]`` float64 without gradients: ``log p(y | z)``, or from a start
    density ``log p(y, z) - log q(z)``; a non-finite value counts as ``-inf``."""
    with torch.no_grad():
        ll = target.log_likelihood(z).double()
        if log_q is not None:
            ll = ll + target.log_prior(z).double() - log_q(z).double()
    return torch.nan_to_num(ll, nan=-math.inf, posinf=-math.inf)


def _log_base(target: LatentTarget, z: Tensor, log_q: LogDensity | None) -> Tensor:
    """The law at ``b = 0`` ``[N]`` float64: ``log p(z)`` or ``log q(z)``."""
    with torch.no_grad():
        return (target.log_prior(z) if log_q is None else log_q(z)).double()


def _ess(log_w: Tensor) -> float:
    """``(sum w)^2 / sum w^2`` of the weights ``exp(log_w)``."""
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def _next_beta(log_lik: Tensor, beta: float, target_ess: float) -> float:
    """The next temperature ``b' > b``: ``ESS(p(y|z)^(b' - b)) = target_ess * N`` by bisection (Jasra et al. 2011),
    or 1 when ``b' = 1`` keeps at least that."""
    want = target_ess * log_lik.numel()
    if _ess((1.0 - beta) * log_lik) >= want:
        return 1.0
    lo, hi = beta, 1.0
    for _ in range(BISECTION_ITERS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _ess((mid - beta) * log_lik) >= want else (lo, mid)
    return lo if lo > beta else hi  # particles with -inf likelihood can leave no b' > b with that ESS: step anyway


def _incremental_log_weights(log_lik: Tensor, beta: float, beta_new: float) -> Tensor:
    """``log w_i = (b' - b) log p(y | z_i)`` ``[N]`` float64 (``-inf`` where the likelihood is zero)."""
    return torch.where(torch.isfinite(log_lik), (beta_new - beta) * log_lik, -math.inf)


def _resample(log_w: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """``N`` ancestor indices drawn by ``kind`` resampling with weights ``exp(log_w)``."""
    n = log_w.numel()
    if kind == "systematic":
        return systematic_resample(log_w.numpy(), n, generator)
    return torch.multinomial(torch.exp(log_w - log_w.max()), n, replacement=True, generator=generator)


def _frame(z: Tensor, log_w: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """``(loc [k], scale_tril [k, k])`` of the moves: the weighted mean and covariance factor of the particles
    ``z`` ``[N, k]`` with weights ``exp(log_w)`` (before resampling, so every distinct particle counts), or the
    identity (also when the weights sit on too few particles for a covariance)."""
    k = z.shape[1]
    eye = torch.eye(k, dtype=torch.float64)
    w = torch.softmax(log_w, 0)[:, None]
    loc = (w * z.double()).sum(0)
    if kind == "identity":
        return torch.zeros(k, dtype=torch.float64), eye
    d = z.double() - loc
    cov = (w * d).T @ d / max(1e-12, 1.0 - float((w * w).sum()))
    cov = cov + 1e-10 * float(torch.diagonal(cov).mean()) * eye  # relative jitter, as `moment_frame`
    tril, info = torch.linalg.cholesky_ex(cov)
    ok = int(info) == 0 and bool(torch.isfinite(tril).all()) and bool((torch.diagonal(tril) > 0).all())
    return (loc, tril) if ok else (loc, eye)


def _coordinate_correlations(u0: Tensor, u: Tensor) -> Tensor:
    """``[k]``: each coordinate's correlation across particles between ``u0`` and ``u`` ``[N, k]``."""
    a, b = u0 - u0.mean(0), u - u.mean(0)
    denom = (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-30)
    return (a * b).sum(0) / denom


def _correlation(u0: Tensor, u: Tensor) -> float:
    """Mean over coordinates of the correlation across particles between ``u0`` and ``u`` ``[N, k]``."""
    return float(_coordinate_correlations(u0, u).mean())


def _transition(wt: WhitenedTarget, u: Tensor, lp: Tensor, g: Tensor, step: float, s: SmcSettings,
                generator: torch.Generator):
    """One MALA (``leapfrog = 1``) or HMC transition of every particle: ``(u, log p, grad, accepted)``."""
    if s.leapfrog > 1:
        return hmc_step(wt, u, lp, g, step, s.leapfrog, generator)
    return mala_step(wt, u, lp, g, step, generator)


def _move(target: LatentTarget, z: Tensor, frame: tuple[Tensor, Tensor], beta: float, step: float, s: SmcSettings,
          generator: torch.Generator, log_q: LogDensity | None = None) -> tuple[Tensor, float, dict]:
    """MCMC transitions of every particle that leave ``pi_beta`` invariant, in ``frame`` (`_frame`), until
    `_correlation` with the start is below ``max_correlation`` (``min_moves`` .. ``max_moves``). Returns the
    particles, the adapted step and ``moves``, ``acceptance`` (mean over the transitions), ``correlation``."""
    wt = WhitenedTarget(_Tempered(target, beta, log_q), *frame)
    u0 = wt.to_frame(z)
    u, (lp, g) = u0, wt.log_joint_and_grad(u0)
    accepted, corr, m = [], 1.0, 0
    for m in range(1, s.max_moves + 1):
        u, lp, g, acc = _transition(wt, u, lp, g, step, s, generator)
        rate = float(acc.double().mean())
        accepted.append(rate)
        step *= math.exp(ADAPT_GAIN * (rate - s.target_accept))
        corr = _correlation(u0, u)
        if m >= s.min_moves and corr < s.max_correlation:
            break
    else:
        m = s.max_moves
    info = {"moves": m, "acceptance": float(np.mean(accepted)) if accepted else math.nan, "correlation": corr}
    return wt.to_latent(u).to(z.dtype), step, info


def _stage(target: LatentTarget, st: _SmcState, s: SmcSettings, generator: torch.Generator,
           log_q: LogDensity | None = None) -> dict:
    """One stage: next temperature, evidence increment, resampling, moves, the new likelihoods. Returns the
    stage's record (its trace row)."""
    n = st.z.shape[0]
    beta_new = _next_beta(st.log_lik, st.beta, s.target_ess)
    log_w = _incremental_log_weights(st.log_lik, st.beta, beta_new)
    ess = _ess(log_w)
    st.log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
    st.log_z_var += max(0.0, 1.0 / ess - 1.0 / n)
    frame = _frame(st.z, log_w, s.frame)
    z = st.z[_resample(log_w, s.resampling, generator)]
    st.z, st.step, info = _move(target, z, frame, beta_new, st.step, s, generator, log_q)
    st.log_lik, st.beta = _log_likelihood(target, st.z, log_q), beta_new
    loss = -float((st.log_lik + _log_base(target, st.z, log_q)).mean())
    return {"beta": beta_new, "ess": ess, "step_size": st.step, "log_evidence": st.log_z, "loss": loss, **info}


def _sweep(target: LatentTarget, st: _SmcState, s: SmcSettings, generator: torch.Generator,
           log_q: LogDensity | None = None) -> float:
    """One final sweep at ``b = 1``: ``sweep_moves`` transitions of every particle with the step and frame
    frozen at the end of the tempering (so each particle is a plain Markov chain leaving the posterior invariant),
    its positions appended to the chains. Returns the sweep's acceptance rate."""
    if st.sweep_frame is None:
        st.sweep_frame = _frame(st.z, torch.zeros(st.z.shape[0], dtype=torch.float64), s.frame)
    wt = WhitenedTarget(_Tempered(target, SWEEP_BETA, log_q), *st.sweep_frame)
    u = wt.to_frame(st.z)
    lp, g = wt.log_joint_and_grad(u)
    rates = []
    for _ in range(s.sweep_moves):
        u, lp, g, acc = _transition(wt, u, lp, g, st.step, s, generator)
        rates.append(float(acc.double().mean()))
    st.z = wt.to_latent(u).to(st.z.dtype).detach()
    st.chains.append(st.z.clone())
    st.sweep_acceptance.append(float(np.mean(rates)))
    return st.sweep_acceptance[-1]


def _start(target: LatentTarget, s: SmcSettings, generator: torch.Generator, init: InitSampler | None = None,
           log_q: LogDensity | None = None) -> _SmcState:
    """Set-up: ``N`` draws of the law at ``b = 0`` (the prior, or the start sampler) and their likelihoods."""
    k = target.latent_dim
    if s.n_particles <= k and s.frame == "covariance":
        raise GanflowError(f"smc.n_particles ({s.n_particles}) must exceed the latent dimension {k} (the frame is "
                           "the particles' covariance)")
    dtype = target.y.dtype if target.y.is_floating_point() else torch.get_default_dtype()
    if init is None:
        z = torch.randn(s.n_particles, k, generator=generator, dtype=dtype)
    else:
        z = torch.as_tensor(init(s.n_particles, generator)).detach().to(dtype)
        if z.shape != (s.n_particles, k) or not bool(torch.isfinite(z).all()):
            raise GanflowError(f"smc start sampler: need finite ({s.n_particles}, {k}) draws, got {tuple(z.shape)}")
    return _SmcState(z=z, log_lik=_log_likelihood(target, z, log_q), step=s.step_size)


def _save(path, st: _SmcState, target: LatentTarget, s: SmcSettings, generator: torch.Generator, evals: int,
          wall: float, log_q: LogDensity | None = None) -> None:
    """The whole state at a stage boundary, atomically (weights-only loadable); with a start density, its values
    at the particles, so a resume can check it was given the same one."""
    from ..checkpoint import save_checkpoint

    save_checkpoint(path, {
        "kind": SMC_CHECKPOINT_KIND, "format_version": SMC_CHECKPOINT_VERSION, "settings": asdict(s),
        "target": target_fingerprint(target), "z": st.z.clone(), "log_lik": st.log_lik.clone(),
        "beta": st.beta, "step": st.step, "log_z": st.log_z, "log_z_var": st.log_z_var, "rng": generator.get_state(),
        "trace": {key: torch.tensor(v, dtype=torch.float64) for key, v in st.trace.items()},
        "n_forward_evals": evals, "wall_time_s": wall,
        "chains": torch.stack(st.chains, 1) if st.chains else torch.zeros(0),
        "sweep_frame": list(st.sweep_frame) if st.sweep_frame is not None else [],
        "sweep_acceptance": torch.tensor(st.sweep_acceptance, dtype=torch.float64),
        "start_log_q": _log_base(target, st.z, log_q) if log_q is not None else torch.zeros(0),
    })


def _load(path, target: LatentTarget, s: SmcSettings, generator: torch.Generator,
          log_q: LogDensity | None = None) -> _SmcState:
    """The interrupted run's state, refused unless it ran with these settings on this target (and from this start
    density)."""
    from ..checkpoint import load_of_kind

    if path is None or not os.path.exists(path):
        raise GanflowError(f"--resume: no SMC checkpoint at {path}")
    ck = load_of_kind(path, "smc checkpoint", "ganflow SMC checkpoint", SMC_CHECKPOINT_KIND, SMC_CHECKPOINT_VERSION)
    now = asdict(s)
    then = {**asdict(SmcSettings()), **ck["settings"]}  # a setting added since ran as its default (``start``)
    bad = sorted(key for key in set(then) | set(now) if key not in _RESUME_FREE and then.get(key) != now.get(key))
    if bad:
        raise GanflowError(f"--resume: smc settings differ from the checkpoint's: {', '.join(bad)}")
    if ck["target"] != target_fingerprint(target):
        raise GanflowError(f"--resume: {path} was run on other data, noise or prior")
    if log_q is not None and not torch.allclose(_log_base(target, ck["z"], log_q), ck["start_log_q"], rtol=0,
                                                atol=START_LOG_Q_ATOL):
        raise GanflowError(f"--resume: {path} started from another flow (the start density differs at its particles)")
    generator.set_state(ck["rng"])
    return _SmcState(z=ck["z"], log_lik=ck["log_lik"], beta=float(ck["beta"]), step=float(ck["step"]),
                     log_z=float(ck["log_z"]), log_z_var=float(ck["log_z_var"]),
                     evals_before=int(ck["n_forward_evals"]), wall_before=float(ck["wall_time_s"]),
                     trace={key: ck["trace"][key].tolist() for key in TRACE_KEYS},
                     chains=list(ck["chains"].unbind(1)) if "chains" in ck and ck["chains"].numel() else [],
                     sweep_frame=tuple(ck["sweep_frame"]) if ck.get("sweep_frame") else None,
                     sweep_acceptance=ck["sweep_acceptance"].tolist() if "sweep_acceptance" in ck else [])


def _figures(rec: dict, n: int) -> dict:
    """A stage's figures for the progress report."""
    return {"beta": f"{rec['beta']:.4g}", "ESS": f"{rec['ess']:.0f}/{n}", "moves": rec["moves"],
            "acceptance": f"{rec['acceptance']:.2f}", "step": f"{rec['step_size']:.3g}",
            "correlation": f"{rec['correlation']:.2f}", "logZ": f"{rec['log_evidence']:.2f}"}


def _result(st: _SmcState, s: SmcSettings, n_evals: int, wall: float) -> LatentFit:
    """The equally weighted final particles as the posterior draws (or, after final sweeps, every chain's draws,
    particle by particle: ``[N * S, k]``), the evidence and the per-stage trace."""
    tr = st.trace
    attrs = {"log_evidence": st.log_z, "log_evidence_se": math.sqrt(st.log_z_var), "n_stages": len(tr["beta"]),
             "n_particles": s.n_particles, "acceptance_rate": tr["acceptance"][-1], "step_size": st.step,
             "final_correlation": tr["correlation"][-1], "total_moves": int(sum(tr["moves"]))}
    samples = st.z
    if st.chains:
        chains = torch.stack(st.chains, 1).double()  # [N, S, k]
        samples = chains.reshape(-1, chains.shape[-1])
        attrs.update(n_chains=chains.shape[0], final_sweeps=chains.shape[1],
                     sweep_acceptance_rate=float(np.mean(st.sweep_acceptance)))
        # chains shorter than their autocorrelation: the ESS below cannot see it and overstates (module docstring)
        attrs["sweep_correlation"] = float(_coordinate_correlations(chains[:, 0], chains[:, -1]).max())
        if chains.shape[1] >= 4:  # split R-hat needs two halves of at least two draws
            attrs.update(rhat_max=float(rhat_rank(chains.numpy()).max()), ess_min=float(ess_bulk(chains.numpy()).min()))
    return LatentFit(method="smc", samples=samples.detach().float(), attrs=attrs, settings=asdict(s),
                     trace={key: np.asarray(v, np.float64) for key, v in tr.items()}, n_forward_evals=n_evals,
                     wall_time_s=wall)


def run_smc(target: LatentTarget, settings: SmcSettings | None = None, generator: torch.Generator | None = None,
            checkpoint_path: str | os.PathLike | None = None, resume: bool = False, init: InitSampler | None = None,
            init_log_prob: LogDensity | None = None) -> LatentFit:
    """Tempered SMC on ``target`` (module docstring): ``N`` equally weighted posterior draws ``samples`` ``[N, k]``,
    ``attrs`` ``log_evidence``, ``log_evidence_se``, ``n_stages``, and the per-stage ``trace`` (``beta``, ``ess``,
    ``moves``, ``acceptance``, ``step_size``, ``correlation``, ``log_evidence``; ``loss`` = minus the particles'
    mean ``log p(y, z)``). ``checkpoint_path``: written at every stage boundary; ``resume``: continue from it.
    ``init``, ``init_log_prob``: with ``start = "flow"``, the start law's sampler and ``log q(z)`` (a fitted flow's
    ``sampler`` and ``model.log_prob``, differentiable)."""
    s = settings or SmcSettings()
    s.validate()
    if (s.start == "flow") != (init is not None and init_log_prob is not None):
        raise GanflowError("smc.start = 'flow' needs the flow's sampler and log density (ganflow solve fits it); "
                           "'prior' takes neither")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    t0, evals0 = time.perf_counter(), target.n_forward_evals
    log_q = init_log_prob
    st = _load(checkpoint_path, target, s, generator, log_q) if resume else _start(target, s, generator, init, log_q)

    def evals() -> int:
        return st.evals_before + target.n_forward_evals - evals0

    def wall() -> float:
        return st.wall_before + time.perf_counter() - t0

    # a line per stage (ganflow.progress's plain lines with no interval; a bar on a terminal)
    with Progress(None, "smc stage", enabled=s.progress, initial=len(st.trace["beta"]), unit="stage",
                  max_interval_s=0.0) as bar:
        while st.beta < 1.0:
            if len(st.trace["beta"]) >= s.max_stages:
                raise GanflowError(f"smc: b = {st.beta:.3g} after max_stages = {s.max_stages} stages (raise "
                                   "smc.max_stages, or lower smc.target_ess)")
            rec = _stage(target, st, s, generator, log_q)
            for key in TRACE_KEYS:
                st.trace[key].append(rec[key])
            if checkpoint_path is not None:
                _save(checkpoint_path, st, target, s, generator, evals(), wall(), log_q)
            bar.set_postfix(**_figures(rec, s.n_particles))
            bar.update(1)
    if len(st.chains) < s.final_sweeps:
        with Progress(s.final_sweeps, "smc sweep at b = 1", enabled=s.progress, initial=len(st.chains),
                      unit="sweep") as bar:
            while len(st.chains) < s.final_sweeps:
                rate = _sweep(target, st, s, generator, log_q)
                if checkpoint_path is not None:
                    _save(checkpoint_path, st, target, s, generator, evals(), wall(), log_q)
                bar.set_postfix(acceptance=f"{rate:.2f}")
                bar.update(1)
    return _result(st, s, evals(), wall())
