"""Where the latent posterior's mass is, found before any method runs: the multi-start MAP search with its warm
restarts, the Laplace approximation at the most massive mode (MAP + finite-difference Hessian), the distinct modes
(hill-valley test) and the importance-sampling screen that keeps the modes that carry mass (`find_modes`). The flow
starts from them, Langevin and NUTS take their frames from them, and the benchmark's references run per mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import GanflowError
from .flows import LatentFlow
from .mixture import fit_mixture_weights
from .target import LatentTarget

__all__ = ["LaplaceMode", "map_search", "laplace_approximation", "laplace_modes", "most_massive_mode",
           "find_modes", "screen_modes", "laplace_flow", "log_joints", "MAP_RESTART_TOL"]

if TYPE_CHECKING:
    from .flow import FlowSettings


def latent_hessian(target: LatentTarget, z: Tensor, fd_step: float, chunk: int = 32) -> Tensor:
    """``-Hessian`` ``[k, k]`` (float64, symmetrised) of ``log p(y, z)`` at ``z`` ``[k]`` by central differences of
    the gradient (``2k`` points, in chunks: in one batch they were the memory peak of a 256x256 solve). Differences,
    not second-order autograd, which some operators refuse (the elliptic solver's adjoint)."""
    k = z.shape[0]
    eye = torch.eye(k)
    pts = torch.cat([z + fd_step * eye, z - fd_step * eye])
    g = torch.cat([target.log_joint_and_grad(c)[1] for c in pts.split(chunk)])
    H = (g[:k] - g[k:]).double() / (2 * fd_step)
    return -0.5 * (H + H.T)


def _latent_hessian_eig(target: LatentTarget, z: Tensor, fd_step: float, chunk: int) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of `latent_hessian`; eigenvalues floored at 1, the prior's precision, which a
    Gauss-Newton Hessian never falls below."""
    evals, evecs = torch.linalg.eigh(latent_hessian(target, z, fd_step, chunk))
    if not torch.isfinite(evals).all():
        raise GanflowError("Laplace approximation: the latent Hessian is not finite")
    return evals.clamp(min=1.0), evecs


def log_joints(target: LatentTarget, z: Tensor) -> Tensor:
    """``log p(y, z)`` ``[n]`` without gradients, NaN read as ``-inf`` (a point to rank last, not to crash on)."""
    with torch.no_grad():
        return torch.nan_to_num(target.log_joint(z), nan=-math.inf)


def most_massive_mode(target: LatentTarget, z: Tensor, fd_step: float = 1e-2, chunk: int = 32,
                      n_candidates: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of the ``n_candidates`` points of ``z`` ``[n, k]`` with the highest ``log p(y, z)``, the one with the most
    Laplace mass, ``log p(y, z*) + 1/2 log det Sigma``: a narrow spike can have the highest density and little
    mass (on the elliptic posterior the highest-density mode gave coverage 0.44, the most massive 0.62).
    Returns ``(z*, eigenvalues, eigenvectors of -Hessian at z*, log p(y, z*))``.
    """
    lp = log_joints(target, z)
    best_mass, chosen, error = -math.inf, None, None
    for i in torch.argsort(lp, descending=True)[:n_candidates].tolist():
        if not math.isfinite(float(lp[i])):
            continue
        try:
            evals, evecs = _latent_hessian_eig(target, z[i], fd_step, chunk)
        except GanflowError as e:
            error = e
            continue
        mass = float(lp[i]) - 0.5 * float(torch.log(evals).sum())
        if mass > best_mass:
            best_mass, chosen = mass, (z[i].clone(), evals, evecs, lp[i].detach())
    if chosen is None:
        raise error or GanflowError("Laplace approximation: log p(y, z) is not finite at any MAP start")
    return chosen


def _map_lr(it: int, s: FlowSettings) -> float:
    """The MAP search's cosine learning-rate schedule, 0.05 down to 1e-3 over ``map_iter``."""
    return 1e-3 + 0.5 * (0.05 - 1e-3) * (1 + math.cos(math.pi * it / s.map_iter))


def _map_stage(target: LatentTarget, z: Tensor, it: int, stage_end: int, s: FlowSettings,
               generator: torch.Generator | None) -> Tensor:
    """Adam uphill on ``log p(y, z)`` from iteration ``it`` to ``stage_end``; a start that diverges restarts from
    a prior draw of ``generator`` (or, without one, from the prior mean: the extra starts draw nothing)."""
    k = z.shape[1]
    z = z.detach().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=_map_lr(it, s))
    while it < stage_end:
        for group in opt.param_groups:
            group["lr"] = _map_lr(it, s)
        opt.zero_grad()
        lp = target.log_joint(z)
        it += 1
        if not torch.isfinite(lp).all():
            bad = ~torch.isfinite(lp)
            with torch.no_grad():  # restart diverged starts
                z[bad] = (torch.randn(int(bad.sum()), k, generator=generator) if generator is not None
                          else torch.zeros(int(bad.sum()), k, dtype=z.dtype, device=z.device))
            continue
        (-lp.sum()).backward()
        opt.step()
    return z.detach()


def map_search(target: LatentTarget, s: FlowSettings, generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """The screened multi-start MAP search: ``(survivors [m, k] after map_iter and the warm restarts, the starts
    the screen dropped [n, k] as they were at the screen, the screen's iteration)``."""
    z = torch.randn(s.map_starts, target.latent_dim, generator=generator)
    # Screening: every start runs the first third of the iterations, then only the best quarter goes on. On a
    # multimodal posterior (phase retrieval) many starts find the good basin far more often than few, and
    # the screen makes 4x the starts cost about 2x the evaluations.
    screen = s.map_starts >= 8 and s.map_iter >= 3
    if not screen:
        z = _map_stage(target, z, 0, s.map_iter, s, generator)
        return _map_restart(target, z, s, generator), z[:0], s.map_iter
    it_screen = s.map_iter // 3
    z = _map_stage(target, z, 0, it_screen, s, generator)
    lp = log_joints(target, z)
    order = torch.argsort(lp, descending=True)
    keep = max(1, s.map_starts // 4)
    survivors = _map_stage(target, z[order[:keep]], it_screen, s.map_iter, s, generator)
    return _map_restart(target, survivors, s, generator), z[order[keep:]], it_screen


MAP_RESTART_TOL = 0.5  # nats: a warm restart that raises the best log p(y, z) by less ends the restarts


def _map_restart(target: LatentTarget, z: Tensor, s: FlowSettings, generator: torch.Generator | None) -> Tensor:
    """Up to ``map_restarts`` more cycles of the search's schedule from ``z`` (warm restarts), while each raises
    the best ``log p(y, z)`` by at least `MAP_RESTART_TOL`. Each start keeps the better of its old and new
    point, so no start ends lower than it began."""
    if s.map_restarts == 0:
        return z
    lp = log_joints(target, z)
    for _ in range(s.map_restarts):
        z_new = _map_stage(target, z.clone(), 0, s.map_iter, s, generator)  # it updates its input in place
        lp_new = log_joints(target, z_new)
        gain = float(lp_new.max() - lp.max())
        better = lp_new > lp
        z, lp = torch.where(better[:, None], z_new, z), torch.where(better, lp_new, lp)
        if not gain >= MAP_RESTART_TOL:
            break
    return z


def _scale_tril(evals: Tensor, evecs: Tensor) -> Tensor:
    """``L`` with ``L L^T = V diag(1 / evals) V^T``, the Laplace covariance."""
    cov = (evecs * (1.0 / evals)) @ evecs.T
    return torch.linalg.cholesky(0.5 * (cov + cov.T)).float()


def laplace_approximation(target: LatentTarget, settings: FlowSettings, generator: torch.Generator,
                          fd_step: float = 1e-2) -> tuple[Tensor, Tensor, Tensor]:
    """MAP of ``log p(z|y)`` from several prior starts, and ``L`` with ``L L^T = (-Hessian)^-1`` at the MAP.

    The Hessian is taken by central finite differences of the gradient (``2k`` points, in batches),
    which works for any operator, including ones whose backward is not itself differentiable; its
    eigenvalues are floored at 1 (the prior's precision, which a Gauss-Newton Hessian never falls below).
    Returns ``(map [k], scale_tril [k, k], log_joint_at_map)``.
    """
    survivors, _, _ = map_search(target, settings, generator)
    z_map, evals, evecs, lp_map = most_massive_mode(target, survivors, fd_step, max(settings.batch_size, 32))
    return z_map, _scale_tril(evals, evecs), lp_map


@dataclass(frozen=True)
class LaplaceMode:
    """A local mode of ``p(z|y)``: the MAP ``loc`` ``[k]``, ``scale_tril`` ``[k, k]`` (``L L^T`` the Laplace
    covariance), ``log_joint`` ``log p(y, z*)`` and ``log_mass`` ``log p(y, z*) + 1/2 log det Sigma`` (the Laplace
    evidence, up to the constant ``k/2 log 2 pi`` common to all modes)."""

    loc: Tensor
    scale_tril: Tensor
    log_joint: float
    log_mass: float


def _mode(z: Tensor, evals: Tensor, evecs: Tensor, lp) -> LaplaceMode:
    return LaplaceMode(z.detach().clone(), _scale_tril(evals, evecs), float(lp),
                       float(lp) - 0.5 * float(torch.log(evals).sum()))


def _valleys(target: LatentTarget, z: Tensor, lp: float, anchors: Tensor, lp_anchors: Tensor, barrier: float,
             n_points: int = 5) -> Tensor:
    """``[m]``: whether the segment from ``z`` to each anchor dips more than ``barrier`` nats below its lower end
    (the hill-valley test, Ursem 1999): the two lie on different hills of ``log p(y, z)``."""
    t = torch.linspace(0, 1, n_points + 2, dtype=z.dtype, device=z.device)[1:-1]
    pts = z + t[None, :, None] * (anchors[:, None, :] - z)
    lp_path = log_joints(target, pts.reshape(-1, z.shape[0]))
    return lp_path.reshape(anchors.shape[0], n_points).amin(1) < torch.clamp(lp_anchors, max=lp) - barrier


def _distinct(target: LatentTarget, z: Tensor, s: FlowSettings, max_new: int,
              anchors: Tensor | None = None) -> Tensor:
    """The points of ``z`` ``[n, k]`` (best ``log p`` first) on hills that no anchor and no better point holds:
    at most ``max_new`` of them."""
    lp = log_joints(target, z)
    with torch.no_grad():
        lp_anchors = None if anchors is None else target.log_joint(anchors)
    kept: list[int] = []
    for i in torch.argsort(lp, descending=True).tolist():
        if len(kept) >= max_new or not math.isfinite(float(lp[i])):
            break
        pool = [anchors] if anchors is not None else []
        pool_lp = [lp_anchors] if anchors is not None else []
        pool, pool_lp = torch.cat(pool + [z[kept]]), torch.cat(pool_lp + [lp[kept]])
        if pool.shape[0] == 0 or bool(_valleys(target, z[i], float(lp[i]), pool, pool_lp, s.mode_barrier).all()):
            kept.append(i)
    return z[kept]


def laplace_modes(target: LatentTarget, settings: FlowSettings, generator: torch.Generator,
                  fd_step: float = 1e-2) -> list[LaplaceMode]:
    """The distinct modes of ``p(z|y)`` with their Laplace approximations, most massive first.

    The first is `laplace_approximation`'s (same draws from ``generator``, same numbers). Then every other
    optimum of the search, and every start the screen dropped, that lies on a hill of its own (a valley deeper
    than ``mode_barrier`` on the segment to each mode found) is a candidate: dropped starts are first polished
    to ``map_iter`` like the survivors (drawing nothing from ``generator``). The costs are capped for the many
    minor hills of a rugged posterior (phase retrieval: 8 of 16 survivors, all with < 1e-3 of the mass): at most
    ``max_modes`` dropped starts are polished and ``max_modes`` Hessians taken, the highest first. The
    ``max_modes`` most massive modes are kept, less any with under ``mode_min_mass`` of their total Laplace mass.
    """
    s = settings
    survivors, dropped, it_screen = map_search(target, s, generator)
    chunk = max(s.batch_size, 32)
    modes = [_mode(*most_massive_mode(target, survivors, fd_step, chunk))]
    if s.max_modes == 1:
        return modes
    reps = _distinct(target, survivors, s, 2 * s.max_modes)
    new = _distinct(target, dropped, s, s.max_modes, reps) if dropped.shape[0] else dropped
    if new.shape[0]:
        new = _map_stage(target, new, it_screen, s.map_iter, s, None)
    for z in _distinct(target, torch.cat([reps, new]), s, s.max_modes, modes[0].loc[None]):
        try:
            with torch.no_grad():
                lp = target.log_joint(z[None])[0]
            modes.append(_mode(z, *_latent_hessian_eig(target, z, fd_step, chunk), lp))
        except GanflowError:
            continue  # a non-finite Hessian: not a mode to fit
    modes = sorted(modes, key=lambda m: -m.log_mass)[: s.max_modes]
    total = torch.logsumexp(torch.tensor([m.log_mass for m in modes]), 0)
    return [m for m in modes if m.log_mass - float(total) >= math.log(max(s.mode_min_mass, 1e-300))]


def find_modes(target: LatentTarget, s: FlowSettings, g: torch.Generator, evals0: int) -> tuple[list, dict]:
    """The Laplace modes to start from (``[None]`` for ``init="identity"``) and their attributes."""
    if s.init != "laplace":
        return [None], {}
    modes = laplace_modes(target, s, g)
    attrs = {"laplace_log_joint_map": modes[0].log_joint,
             "laplace_forward_evals": target.n_forward_evals - evals0}
    if len(modes) > 1:
        modes, attrs["mode_screen_weights"] = screen_modes(target, s, g, modes)
    return modes, attrs


def screen_modes(target: LatentTarget, s: FlowSettings, g: torch.Generator,
                  modes: list[LaplaceMode]) -> tuple[list[LaplaceMode], list[float]]:
    """Before a flow is fitted per mode: each mode's share of the mass by importance sampling from the Laplace
    approximations (`fit_mixture_weights`, ``weight_draws`` draws each), and the modes under ``mode_min_mass``
    dropped (the first, the MAP's, always stays). The Laplace mass trusts a quadratic fit at a hill's top; on a
    rugged posterior it is far too large for minor hills (phase retrieval: 2 % each by Laplace, 1e-6 by
    importance sampling), and each kept mode costs a whole flow fit."""
    flows = [laplace_flow(target.latent_dim, s, m) for m in modes]
    log_w, _ = fit_mixture_weights(target, flows, g, s.weight_draws, batch=max(s.batch_size, 32))
    w = [float(v) for v in log_w.exp()]
    keep = [m for j, m in enumerate(modes) if j == 0 or w[j] >= s.mode_min_mass]
    return keep, [round(v, 6) for v in w]


def laplace_flow(latent_dim: int, s: FlowSettings, mode: LaplaceMode) -> LatentFlow:
    """A flow at its Laplace start, built without touching the caller's global RNG (its state is loaded or it
    stays the identity on top of the Laplace map)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LatentFlow(latent_dim, s, mode.loc, mode.scale_tril)
