"""Stored reference posteriors of the benchmark's GAN cases: converged NUTS runs, made once and read back.

On elliptic and phase retrieval there is no closed-form posterior, and a NUTS run that converges (split R-hat
< 1.01 on every latent coordinate, bulk ESS >= 1,000 from >= 4 chains) costs far more than the methods it
judges. `make_reference` runs it once per benchmark observation (`scripts/make_references.py`) and writes a
small HDF5 file beside the bundled prior (``references/<problem>_seed<seed>.h5``); `ganflow bench` reads it
(`load_reference`) instead of rerunning NUTS unless asked to (``--reference-run``).

A reference is tied to what it was computed for: the prior's fingerprint (`prior_sha1`, of the weights), the
operator's fingerprint, the observation ``y`` and the noise level, all compared to rounding (the reader's CPU is
not the maker's; `ganflow.fingerprint`, `Y_TOL_SIGMA`). A mismatch (a retrained bundled prior, a changed
operator) is refused with a one-line error that names the command that remakes it. Once accepted, the stored
``y`` and sigma define the observation the benchmark solves for.

Multimodal posteriors are handled per mode: the distinct modes of the screened multi-start MAP search
(`laplace_modes`, then the importance-sampling screen that drops modes under ``mode_min_mass``) each get their
own chains, started in and preconditioned by that mode's Laplace approximation, and their own convergence
figures. The modes' relative masses are estimated by multiple importance sampling from Gaussians fitted to each
mode's NUTS draws (`fit_mixture_weights`). The reference draws of the benchmark are the modes' draws pooled in
proportion to these masses.

File layout (``format = "ganflow-reference"``, ``version = 1``)::

    attrs   problem, seed, prior_sha1, operator_fingerprint, noise_sigma, command, created, nuts_settings (JSON),
            n_modes, rhat_max, ess_min, wall_s, n_forward_evals, divergences
    y                    the observation
    mode_mass            [K]        relative masses of the modes
    mode_<j>/draws       [C, S, k]  latent draws, chain by chain
    mode_<j>/potential   [C, S]     -log p(y, z) of each draw
    mode_<j>/rhat, ess   [k]        rank-normalised split R-hat and bulk ESS per coordinate (files made before
                                    these were ArviZ's defaults hold pyro's split R-hat and ESS)
    mode_<j>  attrs      rhat_max, ess_min, wall_s, n_forward_evals, divergences, step_size
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GanflowError

__all__ = ["StoredReference", "make_reference", "reference_from_draws", "save_checked", "load_reference",
           "reference_path", "long_run_path", "MAKE_COMMAND"]

FORMAT, VERSION = "ganflow-reference", 1
MAKE_COMMAND = "python scripts/make_references.py --problem {problem}"
RHAT_GOAL, ESS_GOAL, MIN_CHAINS = 1.01, 1000.0, 4


@dataclass
class StoredReference:
    """A stored reference: per-mode draws ``[C, S, k]``, the modes' masses and the run's figures."""

    problem: str
    seed: int
    y: np.ndarray  # the observation it was made for
    draws: list[np.ndarray]  # per mode [C, S, k]
    potential: list[np.ndarray]  # per mode [C, S]: -log p(y, z) of each draw
    mode_mass: np.ndarray  # [K]
    mode_attrs: list[dict]  # per mode: rhat_max, ess_min, wall_s, n_forward_evals, divergences, step_size
    attrs: dict  # the whole run's (the file's root attributes)

    def pooled(self, n: int, seed: int) -> np.ndarray:
        """``[n, k]`` draws: the modes' draws resampled in proportion to their masses (all of them with one)."""
        if len(self.draws) == 1:
            return self.draws[0].reshape(-1, self.draws[0].shape[-1])
        return _resample([d.reshape(-1, d.shape[-1]) for d in self.draws], self.mode_mass, n,
                         np.random.default_rng(seed))

    def halves(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Two independent halves (each mode's chains split in two), each pooled over the modes by mass."""
        parts = [(d[: len(d) // 2], d[len(d) // 2 :]) for d in self.draws]
        flat = [[p[side].reshape(-1, p[side].shape[-1]) for p in parts] for side in (0, 1)]
        if len(parts) == 1:
            return flat[0][0], flat[1][0]
        rng = np.random.default_rng(seed)
        a, b = (_resample(f, self.mode_mass, min(len(x) for x in f), rng) for f in flat)
        return a, b

    def time_split(self) -> dict:
        """The reference's disagreement with itself: each mode's chains cut in time, first halves against second
        halves (pooled over chains), as ``mean_sd`` (the largest mean difference in the mode's sd) and ``sd_rel``
        (the largest relative sd difference), over the modes. For a run that has not converged this is what
        its own draws say about its error: Monte-Carlo noise (twice that of the whole run's mean) plus any drift
        still under way. It cannot see a region no chain has reached. An SMC reference's chains are its particles'
        few final sweeps, where a time split sees nothing of how far a run is off: its independent runs against
        each other (``run_agreement``, the largest over the pairs) stand in."""
        if self.attrs.get("sampler") == "smc" and "run_agreement" in self.attrs:
            rows = json.loads(self.attrs["run_agreement"]).values()
            return {k: max(float(r[k]) for r in rows) for k in ("mean_sd", "sd_rel")}
        mean_sd = sd_rel = 0.0
        for d in self.draws:
            first, second = (h.reshape(-1, d.shape[-1]) for h in (d[:, : d.shape[1] // 2], d[:, d.shape[1] // 2 :]))
            sd = d.reshape(-1, d.shape[-1]).std(0, ddof=1)
            mean_sd = max(mean_sd, float(np.max(np.abs(first.mean(0) - second.mean(0)) / sd)))
            sd_rel = max(sd_rel, float(np.max(np.abs(first.std(0, ddof=1) / second.std(0, ddof=1) - 1))))
        return {"mean_sd": mean_sd, "sd_rel": sd_rel}

    def converged(self) -> bool:
        """NUTS (and batched HMC): every mode has split R-hat < 1.01 and bulk ESS >= 1,000 from at least 4 chains.
        Tempered SMC (``sampler = "smc"``): at least two independent runs that agree with each other
        (``runs_agree``, `ganflow.bench.smc_runs.agreement`). A run's particles are not long chains: R-hat over
        them after a few final sweeps is inflated by their shortness (1.10-1.14 on the curved exact problem,
        400 chains of 16 draws, whose moments the same draws match to Monte-Carlo error), while runs from other
        seeds that end in the same place are what shows that tempering missed no mass."""
        if self.attrs.get("sampler") == "smc":
            return bool(self.attrs.get("runs_agree", False)) and int(self.attrs.get("n_runs", 0)) >= 2
        return bool(self.attrs["rhat_max"] < RHAT_GOAL and self.attrs["ess_min"] >= ESS_GOAL
                    and min(d.shape[0] for d in self.draws) >= MIN_CHAINS)


def _resample(parts: list[np.ndarray], mass: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws from the mixture of the draw sets ``parts`` with weights ``mass``."""
    counts = rng.multinomial(n, mass / mass.sum())
    return np.concatenate([p[rng.choice(len(p), size=c, replace=c > len(p))]
                           for p, c in zip(parts, counts, strict=True)])


def long_run_path(path: str) -> str:
    """Where a reference that did not converge is kept beside the converged one's ``path``: bench falls back to
    it (as a long run in the posterior's mode, judged with its own uncertainty) when there is no converged one."""
    return path[: -len(".h5")] + ".unconverged.h5"


def reference_path(prior_path: str, problem: str, seed: int) -> str:
    """Where the reference of ``problem``'s benchmark observation ``seed`` lives: beside the bundled prior."""
    return os.path.join(os.path.dirname(os.path.abspath(prior_path)), "references", f"{problem}_seed{seed}.h5")


def _identity(target) -> dict:
    from ..fingerprint import operator_fingerprint, prior_fingerprint

    return {
        "prior_sha1": prior_fingerprint(target.generator),
        "operator_fingerprint": operator_fingerprint(target.operator),
        "noise_sigma": float(target.noise_sigma),
    }


def make_reference(target, problem: str, seed: int, settings, generator: torch.Generator, echo=print,
                   map_starts: int = 64) -> StoredReference:
    """Per-mode NUTS runs (`run_nuts` with ``settings``, init "laplace") on ``target`` and the modes' masses.
    The modes are the flow's own (`ganflow.posterior.modes.find_modes`: the multi-start MAP search, then the
    importance-sampling screen)."""
    from ..posterior.flow import FlowSettings
    from ..posterior.mixture import fit_mixture_weights
    from ..posterior.modes import find_modes, laplace_flow
    from ..posterior.nuts import run_nuts

    fs = FlowSettings(map_starts=map_starts)
    modes, found = find_modes(target, fs, generator, target.n_forward_evals)
    echo(f"[{problem}] {len(modes)} mode(s) kept (importance-sampling shares of the Laplace modes: "
         f"{found.get('mode_screen_weights', [1.0])})")
    settings = dataclasses.replace(settings, init="laplace")
    fits = []
    for j, mode in enumerate(modes):
        fit = run_nuts(target, settings, generator, modes=[mode])
        fits.append(fit)
        echo(f"[{problem}] mode {j}: R-hat {fit.attrs['rhat_max']:.4f}, ESS {fit.attrs['ess_min']:.0f}, "
             f"{fit.wall_time_s:.0f} s, {fit.n_forward_evals} evaluations")
    mass = np.ones(1)
    if len(fits) > 1:
        gauss = [laplace_flow(target.latent_dim, fs, _fitted_mode(f.samples)) for f in fits]
        log_w, _ = fit_mixture_weights(target, gauss, generator, 4096, batch=64)
        mass = log_w.exp().double().numpy()
    return _stored(problem, seed, target, settings, fits, mass)


def _fitted_mode(samples: torch.Tensor):
    """A `LaplaceMode`-shaped Gaussian fitted to one mode's NUTS draws (the importance-sampling proposal)."""
    from ..posterior.modes import LaplaceMode

    z = samples.double()
    mean = z.mean(0)
    cov = torch.cov(z.T) + 1e-9 * torch.eye(z.shape[1], dtype=z.dtype)
    return LaplaceMode(loc=mean.float(), scale_tril=torch.linalg.cholesky(cov).float(), log_joint=0.0, log_mass=0.0)


def _mode_attrs(fit) -> dict:
    return {"rhat_max": float(fit.attrs["rhat_max"]), "ess_min": float(fit.attrs["ess_min"]),
            "wall_s": float(fit.wall_time_s), "n_forward_evals": int(fit.n_forward_evals),
            "divergences": int(fit.attrs["divergences"]), "step_size": float(fit.attrs["step_size"])}


def _run_attrs(target, per_mode: list[dict], settings_json: str, command: str) -> dict:
    """The file's root attributes: what the reference is tied to, and the run's figures over its modes."""
    return {
        **_identity(target),
        "nuts_settings": settings_json,
        "n_modes": len(per_mode),
        "rhat_max": max(m["rhat_max"] for m in per_mode),
        "ess_min": min(m["ess_min"] for m in per_mode),
        "wall_s": sum(m["wall_s"] for m in per_mode),
        "n_forward_evals": sum(m["n_forward_evals"] for m in per_mode),
        "divergences": sum(m["divergences"] for m in per_mode),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def save_checked(ref: StoredReference, path: str) -> tuple[bool, str]:
    """Write ``ref`` at ``path`` when it converged, else beside it as ``*.unconverged.h5`` (`long_run_path`: bench
    reads it only while there is no converged one, and then judges no accuracy target of the flow against it).
    Returns ``(converged, the path written)``."""
    ok = ref.converged()
    if not ok:
        path = long_run_path(path)
    save_reference(ref, path)
    return ok, path


def _stored(problem: str, seed: int, target, settings, fits: list, mass: np.ndarray) -> StoredReference:
    C, S = settings.num_chains, settings.num_samples
    per_mode = [_mode_attrs(f) for f in fits]
    attrs = _run_attrs(target, per_mode, json.dumps(dataclasses.asdict(settings)), MAKE_COMMAND.format(problem=problem))
    return StoredReference(
        problem, seed, y=target.y.detach().double().numpy(),
        draws=[f.samples.double().numpy().reshape(C, S, -1) for f in fits],
        potential=[np.asarray(f.trace["potential_energy"]).reshape(C, S) for f in fits],
        mode_mass=mass, mode_attrs=per_mode, attrs=attrs)


def reference_from_draws(target, problem: str, seed: int, draws: list[np.ndarray], log_joint: list[np.ndarray],
                         runs: list[dict], command: str, settings: dict) -> StoredReference:
    """A one-mode-per-entry reference from another sampler's chains (``draws`` ``[C, S, k]`` and ``log p(y, z)``
    ``[C, S]`` per mode; ``runs`` per mode: ``step_size``, ``divergences``, ``n_gradients`` per chain,
    ``wall_s``), e.g. the GPU's batched HMC (`scripts/gpu_elliptic_reference.py`). R-hat and ESS are those of
    the stored draws (rank-normalised split R-hat, bulk ESS: `ganflow.chain_stats`). With more than one mode the
    masses are not estimated here: refused."""
    from ..chain_stats import ess_bulk, rhat_rank

    if len(draws) != 1:
        raise GanflowError("bench: a reference from draws takes one mode (mode masses need make_reference)")
    per_mode = []
    for d, run in zip(draws, runs, strict=True):
        per_mode.append({
            "rhat_max": float(rhat_rank(d).max()),
            "ess_min": float(ess_bulk(d).min()),
            "wall_s": float(run["wall_s"]), "n_forward_evals": int(run["n_gradients"]) * int(settings["chains"]),
            "divergences": int(run["divergences"]), "step_size": float(run["step_size"])})
    attrs = {**_run_attrs(target, per_mode, json.dumps(settings), command),
             "sampler": str(settings.get("sampler", ""))}
    return StoredReference(problem, seed, y=target.y.detach().double().numpy(), draws=draws,
                           potential=[-lj for lj in log_joint], mode_mass=np.ones(1), mode_attrs=per_mode,
                           attrs=attrs)


def save_reference(ref: StoredReference, path: str) -> None:
    """Write ``ref`` to ``path`` (atomically)."""
    import h5py

    from ..chain_stats import ess_bulk, rhat_rank
    from ..io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"format": FORMAT, "version": VERSION, "problem": ref.problem, "seed": ref.seed})
        f.attrs.update(ref.attrs)
        f.create_dataset("y", data=ref.y)
        f.create_dataset("mode_mass", data=ref.mode_mass)
        for j, (d, pot, mode_attrs) in enumerate(zip(ref.draws, ref.potential, ref.mode_attrs, strict=True)):
            g = f.create_group(f"mode_{j}")
            g.create_dataset("draws", data=d.astype(np.float32), compression="gzip")
            g.create_dataset("potential", data=pot)
            g.create_dataset("rhat", data=rhat_rank(d))  # rank-normalised split R-hat and bulk ESS, as NUTS records
            g.create_dataset("ess", data=ess_bulk(d))
            g.attrs.update(mode_attrs)


def load_reference(path: str, target, problem: str, seed: int) -> StoredReference:
    """The stored reference at ``path`` for this ``target`` (prior, operator, ``y``, noise); a one-line
    `GanflowError` when it is missing, not a reference file, or made for something else."""
    import h5py

    remake = f"remake it with `{MAKE_COMMAND.format(problem=problem)}` or run NUTS with `ganflow bench --reference-run`"
    if not os.path.isfile(path):
        raise GanflowError(f"bench: no stored reference for {problem} at {path}; {remake}")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT or int(f.attrs.get("version", -1)) != VERSION:
            raise GanflowError(f"bench: {path} is not a ganflow reference (version {VERSION}); {remake}")
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        y = f["y"][()]
        groups = [f[f"mode_{j}"] for j in range(int(attrs["n_modes"]))]
        draws = [g["draws"][()].astype(np.float64) for g in groups]
        potential = [g["potential"][()] for g in groups]
        mode_attrs = [{k: (v.item() if hasattr(v, "item") else v) for k, v in g.attrs.items()} for g in groups]
        mass = f["mode_mass"][()]
    _check_identity(attrs, target, y, path, problem, seed, remake)
    return StoredReference(problem, seed, y, draws, potential, mass, mode_attrs, attrs)


# What may differ between the machine that made a reference and the one reading it: rounding. The re-simulated y
# (float32 generator and FFT) differs by ~1e-4 sigma between CPUs; another seed or prior moves it by ~sigma.
Y_TOL_SIGMA = 1e-3  # tolerance of the re-simulated y, in units of the noise sigma
SIGMA_RTOL = 1e-4  # sigma is the data's scale times noise_relative, summed in float32 on the reader's machine


def _check_identity(attrs: dict, target, y: np.ndarray, path: str, problem: str, seed: int, remake: str) -> None:
    """Refuse a reference made for another prior, operator, noise level, observation, problem or seed. Floating
    point is compared to rounding (`ganflow.fingerprint`, `Y_TOL_SIGMA`, `SIGMA_RTOL`), never to the bit."""
    from ..fingerprint import same_fingerprint

    now = _identity(target)
    what = [k for k in ("prior_sha1", "operator_fingerprint") if not same_fingerprint(attrs.get(k, ""), now[k])]
    sigma = float(attrs.get("noise_sigma", np.nan))
    if not abs(sigma - now["noise_sigma"]) <= SIGMA_RTOL * sigma:
        what.append(f"noise_sigma ({now['noise_sigma']:.6g}, stored {sigma:.6g})")
    y_now = target.y.detach().double().numpy()
    if y.shape != y_now.shape:
        what.append(f"observation y (shape {y_now.shape}, stored {y.shape})")
    else:
        gap, tol = float(np.max(np.abs(y - y_now), initial=0.0)), Y_TOL_SIGMA * sigma
        if not gap <= tol:
            what.append(f"observation y (largest difference {gap:.3g} > tolerance {tol:.3g} = {Y_TOL_SIGMA:g} sigma)")
    if attrs.get("problem") != problem or int(attrs.get("seed", -1)) != seed:
        what.append("problem/seed")
    if what:
        raise GanflowError(f"bench: the stored reference {path} was made for another {', '.join(what)} "
                           f"(a retrained prior?); {remake}")
