"""NUTS reference posterior (pyro) on the latent target.

The gold standard against which the flow and short-run Langevin are validated: pyro's No-U-Turn sampler
(Hoffman & Gelman 2014, multinomial variant) on the potential energy

    U(z) = -log p(y, z) = ||y - A(G(z))||^2 / (2 sigma^2) + ||z||^2 / 2 + const,

with Stan-style windowed warm-up adapting the step size (dual averaging to ``target_accept_prob``) and the
mass matrix (dense when ``k <= dense_max_dim``, diagonal beyond). Several chains start from over-dispersed
points (prior draws, as the Gelman-Rubin diagnostic assumes) or from a seeded partial optimisation; the draws
of all chains are concatenated. Convergence is summarised by the largest rank-normalised split R-hat and the
smallest bulk effective sample size over the latent coordinates (`ganflow.chain_stats`, ArviZ's default
estimators); R-hat above ``rhat_threshold`` warns. Each chain reports its progress (`ganflow.progress`: warm-up or
sampling, draws done, divergences so far).

Chains run one after another in this process, or with ``jobs > 1`` in that many forked worker processes
of one torch thread each (the long reference runs of the benchmark). pyro's own ``num_chains > 1`` is not
used: it oversubscribes a small CPU (each worker keeps its own torch threads) and makes the global-RNG seeding
per chain less transparent. Every chain's start point and seed are drawn in this process before any chain
runs, so the draws do not depend on ``jobs`` beyond floating-point summation order. Each chain reseeds pyro's
global RNG (``pyro.set_rng_seed``) from
``generator``; the caller's global RNG state (torch, numpy, random) is restored afterwards.

Example:
    >>> import torch
    >>> from ganflow.problems.linear_gaussian import LinearGaussianProblem
    >>> from ganflow.posterior import LatentTarget
    >>> p = LinearGaussianProblem(latent_dim=2)
    >>> target = LatentTarget(p.generator(), p.make_operator(), torch.zeros(p.obs_shape), 0.5)
    >>> fit = run_nuts(target, NutsSettings(num_chains=2, num_samples=50, warmup_steps=50),
    ...                torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> fit.samples.shape  # doctest: +SKIP
    torch.Size([100, 2])
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import pyro
import torch
from pyro.infer.mcmc import MCMC, NUTS

from ..chain_stats import ess_bulk, rhat_rank
from ..errors import GanflowError
from ..progress import Progress, progress_mode
from .base import LatentFit
from .target import LatentTarget

__all__ = ["NutsSettings", "run_nuts"]


@dataclass(frozen=True)
class NutsSettings:
    """Settings of `run_nuts` (TOML table ``[nuts]``).

    Args:
        num_chains: independent chains (run sequentially).
        num_samples: kept draws per chain.
        warmup_steps: adaptation steps per chain (discarded).
        target_accept_prob: dual-averaging target of the step-size adaptation.
        max_tree_depth: NUTS tree-depth cap (at most ``2^depth`` gradients per draw).
        mass_matrix: ``"auto"`` (dense if ``k <= dense_max_dim``), ``"dense"`` or ``"diag"``.
        dense_max_dim: the ``"auto"`` switch.
        init: ``"prior"`` (over-dispersed prior draws), ``"optimize"`` (prior draws moved ``init_opt_steps``
            Adam steps uphill on ``log p(y, z)``; faster warm-up on stiff posteriors, less over-dispersed), or
            ``"laplace"`` (draws from the Laplace approximations at the distinct modes of the flow's screened
            multi-start search, ``init_map_starts`` starts; chain ``c`` starts in mode ``c mod K``, so when the
            chains cannot cross between the modes R-hat says so, and the warning names the modes).
        init_opt_steps: Adam steps for ``init = "optimize"``.
        init_map_starts: MAP starts for ``init = "laplace"``.
        rhat_threshold: warn when the largest rank-normalised split R-hat exceeds it.
        jobs: worker processes running the chains (1: in this process). Each worker runs one torch thread,
            so ``jobs`` = the number of cores is the fast setting for a long run.
    """

    num_chains: int = 4
    num_samples: int = 1000
    warmup_steps: int = 1000
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    mass_matrix: Literal["auto", "dense", "diag"] = "auto"
    dense_max_dim: int = 64
    init: Literal["prior", "optimize", "laplace"] = "prior"
    init_opt_steps: int = 200
    init_map_starts: int = 64
    rhat_threshold: float = 1.01
    jobs: int = 1

    def validate(self) -> None:
        """Raise `GanflowError` (one line) on an impossible setting."""
        if self.num_chains < 1:
            raise GanflowError(f"nuts.num_chains must be >= 1, got {self.num_chains}")
        if self.num_samples < 4:
            raise GanflowError(
                f"nuts.num_samples must be >= 4 (split R-hat needs 4 draws), got {self.num_samples}"
            )
        if self.warmup_steps < 0:
            raise GanflowError(f"nuts.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (0 < self.target_accept_prob < 1):
            raise GanflowError(f"nuts.target_accept_prob must be in (0, 1), got {self.target_accept_prob}")
        if self.max_tree_depth < 1:
            raise GanflowError(f"nuts.max_tree_depth must be >= 1, got {self.max_tree_depth}")
        if self.mass_matrix not in ("auto", "dense", "diag"):
            raise GanflowError(f"nuts.mass_matrix must be auto, dense or diag, got {self.mass_matrix!r}")
        if self.dense_max_dim < 1:
            raise GanflowError(f"nuts.dense_max_dim must be >= 1, got {self.dense_max_dim}")
        if self.init not in ("prior", "optimize", "laplace"):
            raise GanflowError(f"nuts.init must be 'prior', 'optimize' or 'laplace', got {self.init!r}")
        if self.init_map_starts < 1:
            raise GanflowError(f"nuts.init_map_starts must be >= 1, got {self.init_map_starts}")
        if self.init_opt_steps < 0:
            raise GanflowError(f"nuts.init_opt_steps must be >= 0, got {self.init_opt_steps}")
        if self.jobs < 1:
            raise GanflowError(f"nuts.jobs must be >= 1, got {self.jobs}")
        if not self.rhat_threshold > 1:
            raise GanflowError(f"nuts.rhat_threshold must be > 1, got {self.rhat_threshold}")


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    """Seed pyro's global RNGs for one chain, then restore the caller's torch / numpy / random states."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        pyro.set_rng_seed(seed)
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _laplace_frame(target: LatentTarget, settings: NutsSettings, generator: torch.Generator,
                   dtype: torch.dtype, modes: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``[(z_map, L), ...]``: the Laplace approximations of the distinct modes of the flow's mode search (or of
    the given ``modes``), most massive first, for ``init = "laplace"`` (else None)."""
    if settings.init != "laplace":
        return None
    from .flow import FlowSettings
    from .modes import laplace_modes

    if modes is None:
        modes = laplace_modes(target, FlowSettings(map_starts=settings.init_map_starts), generator)
    return [(m.loc.to(dtype), m.scale_tril.to(dtype)) for m in modes]


def _initial_points(target: LatentTarget, settings: NutsSettings, generator: torch.Generator,
                    dtype: torch.dtype, frame: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """``[num_chains, k]`` start points: prior draws, optionally moved uphill by Adam; with a Laplace
    ``frame`` ``(z_map, L)``, draws ``z_map + L eps`` of the Laplace approximation."""
    z = torch.randn(settings.num_chains, target.latent_dim, generator=generator, dtype=dtype)
    if frame is not None:  # chain c starts in mode c mod K: chains that cannot cross between modes show in R-hat
        which = torch.arange(settings.num_chains) % len(frame)
        for j, (loc, L) in enumerate(frame):
            z[which == j] = loc + z[which == j] @ L.T
    elif settings.init == "optimize" and settings.init_opt_steps > 0:
        z = z.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(settings.init_opt_steps):
            opt.zero_grad()
            loss = -target.log_joint(z).sum()
            loss.backward()
            opt.step()
        z = z.detach()
    lp, grad = target.log_joint_and_grad(z)
    # pyro would silently treat a NaN energy as a divergence and never move; fail loudly instead
    if not (bool(torch.isfinite(lp).all()) and bool(torch.isfinite(grad).all())):
        raise GanflowError("nuts: non-finite log p(y, z) or gradient at the initial points")
    return z


def run_nuts(target: LatentTarget, settings: NutsSettings | None = None,
             generator: torch.Generator | None = None, modes: list | None = None,
             progress: bool = True) -> LatentFit:
    """NUTS draws of the latent posterior (see the module docstring).

    Args:
        target: the latent posterior.
        settings: `NutsSettings` (defaults if None).
        generator: seeds the start points and each chain's pyro seed.
        modes: with init = "laplace", the `LaplaceMode` s to start in instead of a new mode search (one mode:
            every chain in it; the per-mode references of the benchmark).
        progress: report each chain's progress on stderr (`ganflow.progress`).

    Returns:
        A `LatentFit` with ``samples`` ``[num_chains * num_samples, k]`` (chain after chain); ``trace``:
        ``potential_energy`` (= ``loss``) ``-log p(y, z)`` of every draw, ``chain`` (its chain index),
        ``diverging`` (1 where the transition to it diverged), ``accept_prob`` (its mean Metropolis acceptance
        probability over the tree) and ``step_size`` (its chain's adapted step size);
        ``attrs``: ``rhat_max``, ``ess_min``, ``rhat_potential``, ``num_chains``, ``num_samples``,
        ``n_start_modes`` (modes the chains start in; 0 unless init = "laplace"),
        ``warmup_steps``, ``step_size`` (mean adapted step size), ``mass_matrix``, ``divergences``,
        ``accept_rate``. ``n_forward_evals`` counts the evaluations made by this call (one per potential
        gradient, plus the final batched potential-energy pass).
    """
    settings = settings or NutsSettings()
    settings.validate()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    k = target.latent_dim
    dense = settings.mass_matrix == "dense" or (settings.mass_matrix == "auto" and k <= settings.dense_max_dim)
    dtype = target.y.dtype if target.y.is_floating_point() else torch.get_default_dtype()
    evals0 = target.n_forward_evals
    t0 = time.perf_counter()

    to_z, u_init, n_modes = _chain_coordinates(target, settings, generator, dtype, modes)

    def potential_fn(params: dict) -> torch.Tensor:
        return -target.log_joint(to_z(params["z"].unsqueeze(0)))[0]

    seeds = torch.randint(0, 2**31 - 1, (settings.num_chains,), generator=generator).tolist()
    runs = _run_chains(target, potential_fn, u_init, [int(x) for x in seeds], settings, dense, progress)
    grouped, step_sizes, divergences, accept = _gather(runs, to_z, settings.num_samples, k)  # [C, S, k]
    samples = grouped.reshape(-1, k)
    with torch.no_grad():
        potential = -target.log_joint(samples).double()
    return LatentFit(
        method="nuts",
        samples=samples,
        trace=_trace(runs, potential, step_sizes, settings),
        attrs={
            **_convergence(grouped, potential, settings, divergences, n_modes),
            "num_chains": settings.num_chains,
            "num_samples": settings.num_samples,
            "n_start_modes": n_modes,
            "warmup_steps": settings.warmup_steps,
            "step_size": float(np.mean(step_sizes)),
            "mass_matrix": "dense" if dense else "diag",
            "divergences": divergences,
            "accept_rate": float(np.mean(accept)),
        },
        settings=dataclasses.asdict(settings),
        n_forward_evals=target.n_forward_evals - evals0,
        wall_time_s=time.perf_counter() - t0,
    )


def _gather(runs: list, to_z, num_samples: int, k: int) -> tuple[torch.Tensor, list[float], int, list[float]]:
    """The chains' draws in ``z`` ``[C, S, k]`` (a non-finite draw is an error), their step sizes, the number of
    divergent transitions and every draw's acceptance probability."""
    chains, step_sizes, divergences, accept = [], [], 0, []
    for c, (draws, step_size, n_divergent, chain_accept, _) in enumerate(runs):
        draws = to_z(draws.reshape(num_samples, k))
        if not bool(torch.isfinite(draws).all()):
            raise GanflowError(f"nuts: chain {c} produced non-finite draws (non-finite gradient of the target?)")
        chains.append(draws)
        step_sizes.append(step_size)
        divergences += n_divergent
        accept.extend(chain_accept)
    return torch.stack(chains), step_sizes, divergences, accept


def _trace(runs: list, potential: torch.Tensor, step_sizes: list[float], settings: NutsSettings) -> dict:
    """Per draw: ``-log p(y, z)`` (also ``loss``), its chain, divergence, acceptance and its chain's step size."""
    return {
        "loss": potential.numpy(),
        "potential_energy": potential.numpy(),
        "chain": np.repeat(np.arange(settings.num_chains), settings.num_samples),
        "diverging": np.concatenate([r[4]["diverging"] for r in runs]),
        "accept_prob": np.concatenate([r[4]["accept_prob"] for r in runs]),
        "step_size": np.repeat(step_sizes, settings.num_samples),
    }


def _chain_coordinates(target: LatentTarget, settings: NutsSettings, generator: torch.Generator,
                       dtype: torch.dtype, modes: list | None = None
                       ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, int]:
    """The map ``u -> z`` from the coordinates the chains run in, the chains' start points ``[C, k]`` in u, and
    the number of modes they start in (0 without init = "laplace").

    With init = "laplace" the chains run in the whitened coordinates u of the Laplace approximation,
    z = z_map + L u (a linear map: the posterior is only translated and rescaled, its draws are mapped back).
    There the posterior is close to isotropic, so the short warm-up's step size and mass matrix suit it; in
    z the GAN posteriors are so anisotropic that 150 warm-up steps left chains with ESS 2-16 of 600 draws.
    The frame is the most massive mode's; chains of other modes start at their own. Otherwise u = z.
    """
    frame = _laplace_frame(target, settings, generator, dtype, modes)
    z_init = _initial_points(target, settings, generator, dtype, frame)
    if frame is None:
        return (lambda u: u), z_init, 0
    loc, L = frame[0]

    def to_z(u: torch.Tensor) -> torch.Tensor:
        return loc + u @ L.T

    return to_z, torch.linalg.solve_triangular(L, (z_init - loc).T, upper=False).T, len(frame)


# (target, potential_fn, u_init, seeds, settings, dense, progress) of the running `_run_chains`, inherited by its
# workers
_WORKER_JOB: tuple | None = None


def _worker_chain(c: int) -> tuple[tuple, int]:
    """Chain ``c`` of `_WORKER_JOB` in a forked worker: its `_run_chain` result and the forward evaluations."""
    torch.set_num_threads(1)  # one core per worker
    target, potential_fn, u_init, seeds, settings, dense, progress = _WORKER_JOB
    evals0 = target.n_forward_evals
    # bars of several processes would overwrite each other's line: workers report in plain lines
    mode = "lines" if progress_mode(progress) == "bar" else None
    return (_run_chain(potential_fn, u_init[c], seeds[c], settings, dense, c, progress, mode),
            target.n_forward_evals - evals0)


def _run_chains(target: LatentTarget, potential_fn: Callable[[dict], torch.Tensor], u_init: torch.Tensor,
                seeds: list[int], settings: NutsSettings, dense: bool, progress: bool = True) -> list[tuple]:
    """Every chain's `_run_chain` result, in chain order: here, or in ``settings.jobs`` forked workers (fork, so
    the target need not be picklable: the workers inherit it; their forward evaluations are added to the
    target's count here)."""
    jobs = min(settings.jobs, settings.num_chains)
    if jobs == 1:
        return [_run_chain(potential_fn, u_init[c], seeds[c], settings, dense, c, progress)
                for c in range(len(seeds))]
    import multiprocessing

    global _WORKER_JOB
    _WORKER_JOB = (target, potential_fn, u_init, seeds, settings, dense, progress)
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_worker_chain, range(len(seeds)), chunksize=1)
    finally:
        _WORKER_JOB = None
    target.n_forward_evals += sum(n for _, n in results)
    return [r for r, _ in results]


class _ChainMonitor:
    """pyro's MCMC hook for chain ``c``: its progress (warm-up or sampling, draws done, divergences so far) and the
    mean acceptance probability of every kept draw (from the kernel's running mean over the sampling phase)."""

    def __init__(self, c: int, settings: NutsSettings, progress: bool, mode: str | None = None):
        self.bar = Progress(settings.warmup_steps + settings.num_samples, f"nuts chain {c + 1}/{settings.num_chains}",
                            enabled=progress, unit="draw", mode=mode)
        self.accept_prob: list[float] = []
        self._mean = 0.0

    def __call__(self, kernel, params, stage: str, i: int) -> None:
        sampling = stage.startswith("Sample")
        if sampling:  # pyro's running mean restarts with the sampling phase: recover each draw's term
            mean = float(kernel._mean_accept_prob)
            self.accept_prob.append((i + 1) * mean - i * self._mean)
            self._mean = mean
        self.bar.set_postfix(phase="sampling" if sampling else "warm-up", draws=i + 1 if sampling else 0,
                             divergences=len(kernel._divergences), step=f"{float(kernel.step_size):.3g}")
        self.bar.update(1)


def _run_chain(potential_fn: Callable[[dict], torch.Tensor], u_init: torch.Tensor, seed: int,
               settings: NutsSettings, dense: bool, c: int = 0, progress: bool = True,
               mode: str | None = None) -> tuple[torch.Tensor, float, int, list[float], dict]:
    """One chain (number ``c``) from ``u_init`` ``[k]`` under pyro's global RNG seeded with ``seed``: its kept
    draws ``[num_samples, k]`` (chain coordinates), adapted step size, divergent transitions, acceptance rates
    and per-draw statistics (``diverging``, ``accept_prob``: ``[num_samples]``)."""
    monitor = _ChainMonitor(c, settings, progress, mode)
    kernel = NUTS(
        potential_fn=potential_fn,
        adapt_step_size=True,
        adapt_mass_matrix=True,
        full_mass=dense,
        target_accept_prob=settings.target_accept_prob,
        max_tree_depth=settings.max_tree_depth,
    )
    mcmc = MCMC(
        kernel,
        num_samples=settings.num_samples,
        warmup_steps=settings.warmup_steps,
        initial_params={"z": u_init.clone()},
        num_chains=1,
        disable_progbar=True,  # its bar is a terminal's only; `_ChainMonitor` reports in the form that fits
        hook_fn=monitor,
    )
    with _seeded_global_rng(seed):
        try:
            mcmc.run()
        finally:
            monitor.bar.close()
    # the kernel resets its counters after a run; MCMC keeps each chain's diagnostics
    diag = mcmc.diagnostics()
    divergent = [int(i) for v in diag["divergences"].values() for i in v]
    accept = [float(v) for v in diag["acceptance rate"].values()]
    diverging = np.zeros(settings.num_samples, np.int8)
    diverging[[i for i in divergent if 0 <= i < settings.num_samples]] = 1
    stats = {"diverging": diverging, "accept_prob": np.asarray(monitor.accept_prob, np.float64)}
    return mcmc.get_samples()["z"].detach(), float(kernel.step_size), len(divergent), accept, stats


def _convergence(grouped: torch.Tensor, potential: torch.Tensor, settings: NutsSettings,
                 divergences: int, n_modes: int = 0) -> dict:
    """``rhat_max``, ``ess_min`` over the latent coordinates of the draws ``grouped`` ``[C, S, k]`` and
    ``rhat_potential`` of their potential energies ``[C * S]``; warns on R-hat above the threshold and on
    divergent transitions."""
    draws = grouped.double().cpu().numpy()
    rhat, ess = rhat_rank(draws), ess_bulk(draws)
    rhat_pot = rhat_rank(potential.cpu().numpy().reshape(settings.num_chains, settings.num_samples))
    rhat_max, ess_min = float(rhat.max()), float(ess.min())
    # stacklevel 3: the warning points at run_nuts' caller, as before the split
    if not rhat_max <= settings.rhat_threshold:
        msg = (f"nuts: max R-hat {rhat_max:.4f} > {settings.rhat_threshold} over {settings.num_chains} "
               f"chains; the draws may not represent the posterior (more warmup_steps / num_samples)")
        if n_modes > 1:
            msg += f"; the chains started in {n_modes} distinct modes and may not cross between them"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        print(msg, file=sys.stderr)
    if divergences:
        warnings.warn(
            f"nuts: {divergences} divergent transitions after warm-up", RuntimeWarning, stacklevel=3
        )
    return {"rhat_max": rhat_max, "ess_min": ess_min, "rhat_potential": float(rhat_pot.max())}
