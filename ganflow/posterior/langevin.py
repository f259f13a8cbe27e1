"""Short-run Langevin posterior with a variationally chosen step size.

A batch of chains starts from ``q_0`` (the prior ``N(0, I_k)``, or any initial sampler such as a fitted flow)
and runs ``K`` unadjusted Langevin steps on the latent posterior (Nijkamp et al., ECCV 2020; Pang et al., EACL
2021):

    z_{t+1} = z_t + (s_t^2 / 2) grad log p(z_t | y) + s_t eps_t,     eps_t ~ N(0, I_k),

with no accept/reject; each chain's end point ``z_K`` is one draw of ``q_s``. The step size ``s`` (``s_t =
s``, or a geometric decrease ``s_t = s * decay^(t / (K-1))``) is chosen by minimising an estimate of

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
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import GanflowError
from .base import LatentFit
from .target import LatentTarget

__all__ = ["LangevinSettings", "run_langevin", "langevin_kl_estimate", "HAND_SET_STEP_SIZE"]

# A typical hand-set short-run step size (K = 20 .. 40 steps of s = 0.1 in the short-run inference
# literature); what one would ship without the search, and the baseline the search is tested against.
HAND_SET_STEP_SIZE = 0.1

InitSampler = Callable[[int, torch.Generator], Tensor]


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
        init: ``"prior"`` or ``"flow"`` (chains start from a fitted flow; the caller passes its sampler).
        mala: Metropolis-adjust every step (asymptotically exact; records the acceptance rate).
    """

    n_steps: int = 20
    n_samples: int = 2000
    batch_size: int = 500
    step_size: float | None = None
    step_decay: float = 1.0
    search_min: float = 1e-3
    search_max: float = 1.0
    search_grid: int = 13
    search_refine: int = 10
    search_chains: int = 256
    entropy: Literal["auto", "linearized", "path", "gaussian"] = "auto"
    hessian_max_dim: int = 64
    init: Literal["prior", "flow"] = "prior"
    mala: bool = False

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
        if self.init not in ("prior", "flow"):
            raise GanflowError(f"langevin.init must be 'prior' or 'flow', got {self.init!r}")


def _schedule(step_size: float, n_steps: int, decay: float) -> list[float]:
    """``s_t = s * decay^(t / (K-1))``, t = 0..K-1."""
    if n_steps == 1:
        return [step_size]
    return [step_size * decay ** (t / (n_steps - 1)) for t in range(n_steps)]


def _grad_and_hessian(target: LatentTarget, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log p(y, z)`` ``[N]``, its gradient ``[N, k]`` and Hessian ``[N, k, k]`` (exact, ``k`` backward
    passes; rows of the batch are independent so one backward per coordinate serves every chain)."""
    k = z.shape[1]
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        lp = target.log_joint(z)
        (g,) = torch.autograd.grad(lp.sum(), z, create_graph=True)
        rows = [torch.autograd.grad(g[:, j].sum(), z, retain_graph=j < k - 1)[0] for j in range(k)]
    return lp.detach(), g.detach(), torch.stack(rows, 1).detach()


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _gaussian_logdet_cov(x: Tensor) -> float:
    """``log det`` of the sample covariance of ``x`` ``[N, k]`` (float64); ``-inf`` if singular."""
    c = torch.cov(x.double().T).reshape(x.shape[1], x.shape[1])
    sign, logdet = torch.linalg.slogdet(c)
    return float(logdet) if sign > 0 else -math.inf


def langevin_kl_estimate(
    target: LatentTarget,
    step_size: float,
    z0: Tensor,
    noise: Tensor,
    step_decay: float = 1.0,
    entropy: Literal["linearized", "path", "gaussian"] = "linearized",
    init_is_prior: bool = True,
) -> dict:
    """Estimate ``KL(q_s || p(z|y)) - log p(y)`` from given start points and noise (common random numbers).

    Args:
        target: the latent posterior.
        step_size: ``s`` (the first step of the schedule).
        z0: ``[N, k]`` start points drawn from ``q_0``.
        noise: ``[K, N, k]`` standard normal ``eps_t``.
        step_decay: see `LangevinSettings`.
        entropy: ``"linearized"``, ``"path"`` or ``"gaussian"`` (module docstring).
        init_is_prior: ``q_0 = N(0, I)``; otherwise ``q_0`` is replaced by the Gaussian with ``z0``'s sample
            mean and covariance in the entropy term (its density is not available from a sampler).

    Returns:
        ``{"kl": float, "kl_path": float, "failed_step": int | None}``: the estimate with the chosen
        entropy, the noise-conditioned upper bound (``nan`` for ``"gaussian"``, which computes no Hessians),
        and the first step whose gradient or Hessian was non-finite (then both are ``inf``).
    """
    N, k = z0.shape
    steps = _schedule(step_size, noise.shape[0], step_decay)
    use_hessian = entropy in ("linearized", "path")
    eye = torch.eye(k, dtype=torch.float64)
    if init_is_prior:
        cov0 = eye
        log_q0 = (-0.5 * (z0.double() ** 2).sum(1) - 0.5 * k * math.log(2 * math.pi))
    else:
        mean0 = z0.double().mean(0)
        # the jitter keeps a (nearly) degenerate initial sampler from giving log det = -inf
        cov0 = torch.cov(z0.double().T).reshape(k, k) + 1e-10 * eye
        log_q0 = torch.distributions.MultivariateNormal(mean0, cov0).log_prob(z0.double())
    cov = cov0.expand(N, k, k).clone()
    path_logdet = torch.zeros(N, dtype=torch.float64)
    z = z0.clone()
    for t, s in enumerate(steps):
        h = 0.5 * s * s
        if use_hessian:
            _, g, hess = _grad_and_hessian(target, z)
            if not _finite(g, hess):
                return {"kl": math.inf, "kl_path": math.inf, "failed_step": t}
            J = eye + h * hess.double()
            cov = J @ cov @ J.transpose(1, 2) + (s * s) * eye
            path_logdet += torch.linalg.slogdet(J).logabsdet
        else:
            _, g = target.log_joint_and_grad(z)
            if not _finite(g):
                return {"kl": math.inf, "kl_path": math.inf, "failed_step": t}
        z = z + h * g + s * noise[t]
    with torch.no_grad():
        lp = target.log_joint(z).double()
    if not _finite(lp, z):
        return {"kl": math.inf, "kl_path": math.inf, "failed_step": len(steps)}
    kl_path = math.nan
    if use_hessian:
        # log q(z_K | eps) = log q_0(z_0) - sum_t log|det J_t|
        kl_path = float((log_q0 - path_logdet - lp).mean())
    if entropy == "path":
        kl = kl_path
    elif entropy == "linearized":
        sign, logdet = torch.linalg.slogdet(cov)
        ent = 0.5 * (logdet + k * math.log(2 * math.pi * math.e))
        kl = float((-ent - lp).mean()) if bool((sign > 0).all()) else math.inf
    else:
        ent = 0.5 * (_gaussian_logdet_cov(z) + k * math.log(2 * math.pi * math.e))
        kl = float(-ent - lp.mean())
    if not math.isfinite(kl):
        kl = math.inf
    return {"kl": kl, "kl_path": kl_path, "failed_step": None}


def _golden_section(f: Callable[[float], float], a: float, b: float, n_iter: int) -> None:
    """Shrink ``[a, b]`` around a minimum of ``f`` (values are recorded by ``f`` itself)."""
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(n_iter):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)


def _draw_init(n: int, k: int, init: InitSampler | None, generator: torch.Generator, dtype) -> Tensor:
    if init is None:
        return torch.randn(n, k, generator=generator, dtype=dtype)
    z0 = torch.as_tensor(init(n, generator)).detach().to(dtype)
    if z0.shape != (n, k):
        raise GanflowError(f"langevin init sampler returned shape {tuple(z0.shape)}, expected ({n}, {k})")
    if not _finite(z0):
        raise GanflowError("langevin init sampler returned non-finite latent vectors")
    return z0


def _search_step_size(target: LatentTarget, settings: LangevinSettings, entropy: str,
                      init: InitSampler | None, generator: torch.Generator, dtype) -> tuple[float, dict]:
    """Minimise the KL estimate over ``log s`` with common random numbers; returns ``s`` and the curve."""
    k, K, N = target.latent_dim, settings.n_steps, settings.search_chains
    z0 = _draw_init(N, k, init, generator, dtype)
    noise = torch.randn(K, N, k, generator=generator, dtype=dtype)
    curve: dict[float, dict] = {}

    def objective(s: float) -> float:
        if s not in curve:
            curve[s] = langevin_kl_estimate(target, s, z0, noise, settings.step_decay, entropy, init is None)
        return curve[s]["kl"]

    if settings.step_size is not None:
        objective(settings.step_size)
        chosen = settings.step_size
    else:
        grid = np.linspace(math.log(settings.search_min), math.log(settings.search_max), settings.search_grid)
        values = [objective(math.exp(x)) for x in grid]
        if not any(math.isfinite(v) for v in values):
            t = min(c["failed_step"] for c in curve.values() if c["failed_step"] is not None)
            raise GanflowError(
                f"langevin: non-finite gradient at step {t} for every step size in "
                f"[{settings.search_min:g}, {settings.search_max:g}] (check the target, or lower search_min)"
            )
        i = int(np.argmin(values))
        if i in (0, len(grid) - 1):
            warnings.warn(
                f"langevin: the KL estimate is smallest at the search bound s = {math.exp(grid[i]):.3g}; "
                "widen [langevin] search_min / search_max",
                RuntimeWarning,
                stacklevel=3,
            )
        lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
        if settings.search_refine > 0:
            _golden_section(lambda log_s: objective(math.exp(log_s)), lo, hi, settings.search_refine)
        chosen = min(curve, key=lambda s: curve[s]["kl"])
    ordered = sorted(curve)
    info = {
        "step_sizes": np.array(ordered, dtype=np.float64),
        "kl_estimates": np.array([curve[s]["kl"] for s in ordered], dtype=np.float64),
        "kl_path_bound": np.array([curve[s]["kl_path"] for s in ordered], dtype=np.float64),
        # the search objective in evaluation order (dicts keep insertion order)
        "loss": np.array([c["kl"] for c in curve.values()], dtype=np.float64),
        "kl_estimate": curve[chosen]["kl"],
    }
    return chosen, info


def _run_chains(target: LatentTarget, z: Tensor, steps: list[float], mala: bool, generator: torch.Generator,
                log_joint_sum: np.ndarray, accept_sum: np.ndarray) -> Tensor:
    """Run one batch of chains; accumulate the per-step mean log joint and (MALA) acceptance."""
    lp, g = target.log_joint_and_grad(z)
    for t, s in enumerate(steps):
        if not _finite(lp, g):
            raise GanflowError(f"langevin: non-finite gradient at step {t} (step size {s:.3g})")
        h = 0.5 * s * s
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        proposal = z + h * g + s * eps
        lp_new, g_new = target.log_joint_and_grad(proposal)
        if mala:
            u = torch.rand(z.shape[0], generator=generator, dtype=z.dtype)
            # log q(z | z') - log q(z' | z) for the Gaussian proposal N(z + h grad, s^2 I)
            fwd = (eps * eps).sum(1)
            back = ((z - proposal - h * g_new) ** 2).sum(1) / (s * s)
            log_alpha = lp_new - lp - 0.5 * back + 0.5 * fwd
            # a proposal with a non-finite density or gradient is rejected, as Metropolis-Hastings prescribes
            ok = torch.isfinite(lp_new) & torch.isfinite(g_new).all(1)
            accept = ok & (torch.log(u) < torch.nan_to_num(log_alpha, nan=-math.inf))
            z = torch.where(accept[:, None], proposal, z)
            lp = torch.where(accept, lp_new, lp)
            g = torch.where(accept[:, None], g_new, g)
            accept_sum[t] += float(accept.double().sum())
        else:
            z, lp, g = proposal, lp_new, g_new
        log_joint_sum[t] += float(lp.double().sum())
    if not _finite(lp, g):
        raise GanflowError(f"langevin: non-finite gradient at step {len(steps)} (step size {steps[-1]:.3g})")
    return z


def run_langevin(target: LatentTarget, settings: LangevinSettings | None = None,
                 generator: torch.Generator | None = None, init: InitSampler | None = None) -> LatentFit:
    """Short-run Langevin posterior draws with a KL-optimal step size (see the module docstring).

    Args:
        target: the latent posterior.
        settings: `LangevinSettings` (defaults if None).
        generator: the source of all randomness (start points, search noise, chain noise).
        init: ``init(n, generator) -> [n, k]`` start points (e.g. a fitted flow's sampler); None = the prior.

    Returns:
        A `LatentFit` with ``samples`` ``[n_samples, k]``; ``trace``: ``step_sizes``, ``kl_estimates``,
        ``kl_path_bound`` (sorted by ``s``), ``loss`` (the search objective in evaluation order),
        ``mean_log_joint`` per step of the final run (and ``acceptance`` per step with MALA); ``attrs``:
        ``step_size``, ``n_steps``, ``kl_estimate`` (``KL - log p(y)`` at the chosen ``s``), ``entropy``,
        ``step_decay``, ``mala``, ``init`` (and ``acceptance_rate``). ``n_forward_evals`` counts the
        evaluations made by this call (search and final run), not those made on ``target`` before it.
    """
    settings = settings or LangevinSettings()
    settings.validate()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if settings.init == "flow" and init is None:
        raise GanflowError("langevin.init = 'flow' needs a fitted flow's sampler (solve with --init flow)")
    k = target.latent_dim
    entropy = settings.entropy
    if entropy == "auto":
        entropy = "linearized" if k <= settings.hessian_max_dim else "gaussian"
    if entropy in ("linearized", "path") and k > settings.hessian_max_dim:
        raise GanflowError(
            f"langevin.entropy = '{entropy}' needs exact Hessians, but latent_dim {k} > hessian_max_dim "
            f"{settings.hessian_max_dim}; use entropy = 'gaussian' or raise hessian_max_dim"
        )
    if entropy == "gaussian" and settings.search_chains <= 2 * k:
        raise GanflowError(
            f"langevin.entropy = 'gaussian' needs search_chains > 2 * latent_dim = {2 * k}, "
            f"got {settings.search_chains}"
        )
    dtype = target.y.dtype if target.y.is_floating_point() else torch.get_default_dtype()
    evals0 = target.n_forward_evals
    t0 = time.perf_counter()

    step_size, info = _search_step_size(target, settings, entropy, init, generator, dtype)
    steps = _schedule(step_size, settings.n_steps, settings.step_decay)

    log_joint_sum = np.zeros(settings.n_steps)
    accept_sum = np.zeros(settings.n_steps)
    draws = []
    for start in range(0, settings.n_samples, settings.batch_size):
        n = min(settings.batch_size, settings.n_samples - start)
        z0 = _draw_init(n, k, init, generator, dtype)
        draws.append(_run_chains(target, z0, steps, settings.mala, generator, log_joint_sum, accept_sum))
    samples = torch.cat(draws).detach()

    trace = {key: info[key] for key in ("step_sizes", "kl_estimates", "kl_path_bound", "loss")}
    trace["mean_log_joint"] = log_joint_sum / settings.n_samples
    attrs = {
        "step_size": float(step_size),
        "n_steps": settings.n_steps,
        "kl_estimate": float(info["kl_estimate"]),
        "entropy": entropy,
        "step_decay": settings.step_decay,
        "mala": settings.mala,
        "init": "prior" if init is None else "sampler",
    }
    if settings.mala:
        trace["acceptance"] = accept_sum / settings.n_samples
        attrs["acceptance_rate"] = float(accept_sum.sum() / (settings.n_samples * settings.n_steps))
    return LatentFit(
        method="langevin",
        samples=samples,
        trace=trace,
        attrs=attrs,
        settings=dataclasses.asdict(settings),
        n_forward_evals=target.n_forward_evals - evals0,
        wall_time_s=time.perf_counter() - t0,
    )
