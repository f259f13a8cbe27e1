"""Batched Hamiltonian Monte Carlo: many chains in lock-step on one device, for reference posteriors on a GPU.

pyro's NUTS runs one chain per process; on a rugged posterior (the elliptic benchmark: about 250 gradients a draw,
ESS 4-5 per 200 draws) a converged reference then costs about 16 core-hours. Here every chain takes the same
leapfrog steps at once, so one batched value-and-gradient per step serves all of them, and a GPU runs a thousand
chains for the price of a few. The price of lock-step is that no chain has its own tree (no U-turn rule):
the trajectory length is fixed in the adapted frame and jittered from draw to draw.

Adaptation (all of it in the warm-up, then frozen):

- the frame ``z = a + B v``: the chains move in ``v`` with unit mass; ``a`` and ``B`` start as the given frame
  (e.g. a Laplace approximation) and are re-estimated at the end of each warm-up window from the pooled states
  of all chains in that window's second half (mean, Cholesky factor of the covariance), so the metric is the
  posterior's own covariance as soon as the chains have found it;
- the step size: dual averaging (Hoffman & Gelman 2014, Algorithm 5) of the mean acceptance probability over
  all chains towards ``target_accept``, restarted in each window; the sampling phase uses the window's averaged
  iterate, jittered by +-10 % per draw;
- the trajectory length ``trajectory`` (in posterior sd after whitening): ``ceil(trajectory / step)`` leapfrog
  steps a draw.

A proposal whose energy error is non-finite or above ``DIVERGENCE`` nats is rejected and counted as divergent.
Convergence is judged by the caller (split R-hat, ESS across chains: `pyro.ops.stats`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["HmcSettings", "run_batched_hmc", "pooled_frame"]

DIVERGENCE = 1000.0
MIN_WINDOW = 10
LogJointAndGrad = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class HmcSettings:
    """Warm-up windows (draws each), kept draws, and the adaptation's targets."""

    windows: tuple[int, ...] = (100, 100, 100)
    num_samples: int = 500
    trajectory: float = 1.5
    target_accept: float = 0.8
    init_step: float = 0.1
    max_leapfrog: int = 256  # NUTS's cap at its default tree depth 8
    deadline_s: float | None = None  # stop drawing (keeping the draws so far) this many seconds after the start
    window_s: tuple[float, ...] | None = None  # also end warm-up window i after window_s[i] s (>= MIN_WINDOW draws)


@dataclass
class _Frame:
    loc: Tensor  # [k]
    tril: Tensor  # [k, k]

    def to_z(self, v: Tensor) -> Tensor:
        return self.loc + v @ self.tril.T

    def to_v(self, z: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self.tril, (z - self.loc).T, upper=False).T

    def grad_v(self, grad_z: Tensor) -> Tensor:
        return grad_z @ self.tril


class _DualAveraging:
    """Hoffman & Gelman's step-size adaptation, fed the chains' mean acceptance probability each draw."""

    def __init__(self, step: float, target: float, gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75):
        self.mu, self.target, self.gamma, self.t0, self.kappa = math.log(10 * step), target, gamma, t0, kappa
        self.t, self.h_bar, self.log_step, self.log_avg = 0, 0.0, math.log(step), 0.0

    def update(self, accept: float) -> float:
        self.t += 1
        w = 1.0 / (self.t + self.t0)
        self.h_bar = (1 - w) * self.h_bar + w * (self.target - accept)
        self.log_step = self.mu - math.sqrt(self.t) / self.gamma * self.h_bar
        eta = self.t ** (-self.kappa)
        self.log_avg = eta * self.log_step + (1 - eta) * self.log_avg
        return math.exp(self.log_step)

    @property
    def final(self) -> float:
        return math.exp(self.log_avg)


class _InFrame:
    """``f`` in the frame's coordinates ``v``: ``log p`` at ``z(v)`` and its gradient in ``v``, what the shared
    leapfrog (`ganflow.posterior.kernels.leapfrog`) integrates."""

    def __init__(self, f: LogJointAndGrad, frame: _Frame):
        self.f, self.frame = f, frame

    def log_joint_and_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        lp, gz = self.f(self.frame.to_z(v))
        return lp, self.frame.grad_v(gz)


def _trajectory(f: LogJointAndGrad, frame: _Frame, v: Tensor, lp: Tensor, g: Tensor, step: float, n_leap: int,
                generator: torch.Generator):
    """One HMC draw for every chain: momentum refresh, ``n_leap`` leapfrog steps, Metropolis test (the kernels
    of `ganflow.posterior.kernels`; here with dual-averaged steps and divergences counted).
    Returns ``(v, lp, g, accept_prob [C], divergent [C])`` with ``g`` the gradient in ``v``."""
    from ..posterior.kernels import hmc_log_ratio, leapfrog

    p0 = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
    v1, lp1, g1, p = leapfrog(_InFrame(f, frame), v, g, p0, step, n_leap)
    log_ratio = torch.nan_to_num(hmc_log_ratio(lp, p0, lp1, p), nan=-math.inf)
    divergent = log_ratio < -DIVERGENCE
    accept_prob = torch.exp(torch.clamp(log_ratio, max=0.0))
    u = torch.rand(v.shape[0], generator=generator, dtype=v.dtype).to(v.device)
    take = (u < accept_prob) & torch.isfinite(g1).all(1)
    v = torch.where(take[:, None], v1, v)
    return v, torch.where(take, lp1, lp), torch.where(take[:, None], g1, g), accept_prob, divergent


def pooled_frame(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(loc, scale_tril)``: the mean and the Cholesky factor of the covariance of pooled states ``[N, k]``."""
    cov = torch.cov(z.T) + 1e-10 * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    return z.mean(0), torch.linalg.cholesky(cov)


def _refit_frame(frame: _Frame, states: list[Tensor]) -> _Frame:
    """The frame of the window's kept states ``[C, k]`` each (`pooled_frame`, in z)."""
    return _Frame(*pooled_frame(torch.cat([frame.to_z(v) for v in states])))


def _n_leap(trajectory: float, step: float, cap: int) -> int:
    return max(1, min(cap, math.ceil(trajectory / step)))


def run_batched_hmc(f: LogJointAndGrad, z0: Tensor, frame: tuple[Tensor, Tensor], settings: HmcSettings,
                    generator: torch.Generator, progress: Callable[[str], None] | None = None) -> dict:
    """HMC chains started at ``z0`` ``[C, k]`` for ``f(z) -> (log p [C], grad [C, k])``, in the starting frame
    ``(loc [k], scale_tril [k, k])`` (adapted in the warm-up, see the module docstring).

    ``generator`` is a CPU `torch.Generator` (the draws are moved to ``z0``'s device): the same seed gives the
    same chains on CPU. Returns ``draws`` ``[C, S, k]`` and ``log_joint`` ``[C, S]`` (CPU), ``accept``
    ``[S]`` (mean acceptance probability per draw), ``last`` (the chains' end states ``[C, k]`` in ``z0``'s dtype,
    CPU: with ``frame`` and ``step_size`` all a later run needs to continue them, ``windows=()`` and
    ``init_step=step_size``), ``step_size``, ``n_leapfrog`` (per draw, warm-up included),
    ``divergences`` (in the kept draws), ``warmup_divergences``, ``n_gradients`` (per chain), ``frame`` (the
    adapted ``(loc, scale_tril)``), ``wall_s``.
    """
    t0 = time.perf_counter()
    fr = _Frame(frame[0].to(z0), frame[1].to(z0))
    v = fr.to_v(z0)
    lp, gz = f(z0)
    g = fr.grad_v(gz)
    step, n_grad, leaps, divergences, warm_div = settings.init_step, 1, [], 0, 0
    for w, n_draws in enumerate(settings.windows):
        da, kept, t_window = _DualAveraging(step, settings.target_accept), [], time.perf_counter()
        for i in range(n_draws):
            if (settings.window_s is not None and i >= MIN_WINDOW
                    and time.perf_counter() - t_window > settings.window_s[w]):
                break
            n = _n_leap(settings.trajectory, step, settings.max_leapfrog)
            v, lp, g, acc, div = _trajectory(f, fr, v, lp, g, step, n, generator)
            n_grad, warm_div = n_grad + n, warm_div + int(div.sum())
            leaps.append(n)
            step = da.update(float(acc.mean()))
            kept.append(v)
            if progress and (i + 1) % 10 == 0:
                progress(f"warm-up window {w + 1}, draw {i + 1}: acceptance {float(acc.mean()):.2f}, "
                         f"{n} leapfrog steps, next step {step:.4g}, {time.perf_counter() - t0:.0f} s")
        step = da.final
        if w < len(settings.windows) - 1 and kept:  # the last window only tunes the step for the final frame
            z = fr.to_z(v)
            fr = _refit_frame(fr, kept[len(kept) // 2:])
            v, g = fr.to_v(z), fr.grad_v(f(z)[1])
            n_grad += 1
        if progress:
            progress(f"warm-up window {w + 1}/{len(settings.windows)}: step {step:.4g}, "
                     f"{leaps[-1]} leapfrog steps a draw, {time.perf_counter() - t0:.0f} s")
    draws, log_joint, accept = [], [], []
    for i in range(settings.num_samples):
        if settings.deadline_s is not None and time.perf_counter() - t0 > settings.deadline_s:
            break
        jitter = step * (0.9 + 0.2 * float(torch.rand(1, generator=generator)))
        n = _n_leap(settings.trajectory, jitter, settings.max_leapfrog)
        v, lp, g, acc, div = _trajectory(f, fr, v, lp, g, jitter, n, generator)
        n_grad, divergences = n_grad + n, divergences + int(div.sum())
        leaps.append(n)
        draws.append(fr.to_z(v).float().cpu())
        log_joint.append(lp.double().cpu())
        accept.append(float(acc.mean()))
        if progress and (i + 1) % max(1, settings.num_samples // 10) == 0:
            progress(f"draw {i + 1}/{settings.num_samples}: acceptance {sum(accept[-50:]) / len(accept[-50:]):.2f}"
                     f", {time.perf_counter() - t0:.0f} s")
    C, k = z0.shape
    return {
        "draws": torch.stack(draws, 1) if draws else torch.zeros(C, 0, k),
        "log_joint": torch.stack(log_joint, 1) if draws else torch.zeros(C, 0, dtype=torch.float64),
        "accept": torch.tensor(accept),
        "last": fr.to_z(v).cpu(), "step_size": step, "n_leapfrog": leaps, "divergences": divergences,
        "warmup_divergences": warm_div,
        "n_gradients": n_grad,
        "frame": (fr.loc.cpu(), fr.tril.cpu()), "wall_s": time.perf_counter() - t0,
    }
