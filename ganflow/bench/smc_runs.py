"""SMC reference runs of the benchmark's cases (issue 33): one seeded, resumable tempered-SMC run per call
(`ganflow.posterior.smc`), the agreement of independent runs with each other and with a stored reference, and
independent runs pooled into a stored reference (`ganflow.bench.stored.reference_from_draws`).

A run file (HDF5, written atomically) holds ``draws`` ``[N, k]`` (the final particles) or, with final sweeps,
``[N * S, k]`` (particle by particle: `run_chains`), ``log_joint`` (one per draw), ``/trace/<name>`` (per stage)
and attributes ``problem``, ``seed`` (the benchmark observation), ``run_seed``, ``settings`` (JSON),
``log_evidence``, ``log_evidence_se``, ``n_stages``, ``n_forward_evals``, ``wall_s`` (and ``n_chains``,
``final_sweeps``, ``rhat_max``, ``ess_min`` with sweeps).

Agreement (issue 33, item 3): latent means within 0.1 reference sd, sds within 10 %, log-evidences within 0.5.
The final sweeps are what make the first two reachable: the mean of ``k`` coordinates from two runs differs by
``sqrt(2 / ESS)`` sd each, so the largest of 24 stays under 0.1 only with an ESS of ~1,200 a run, more than
``N = 500`` resampled particles are worth.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch

__all__ = ["case_target", "run_case", "load_run", "agreement", "pair_agreement", "run_chains", "runs_agreement",
           "store_runs", "MEAN_SD_GOAL", "SD_REL_GOAL", "LOG_Z_GOAL"]

MEAN_SD_GOAL, SD_REL_GOAL, LOG_Z_GOAL = 0.1, 0.10, 0.5
LOG_JOINT_BATCH = 1000


def case_target(problem: str, seed: int):
    """The benchmark observation ``seed`` of ``problem`` as a `LatentTarget` (the generator as bench runs it)."""
    from ..demo import DEMOS
    from ..errors import GanflowError
    from ..posterior import LatentTarget
    from .cases import _make_case

    if problem not in (*DEMOS, "curved"):
        raise GanflowError(f"no benchmark case '{problem}' (choose from {', '.join((*DEMOS, 'curved'))})")
    case = _make_case(problem, seed)
    if isinstance(case, str):
        raise GanflowError(case)
    return LatentTarget(case.G, case.op, case.obs.y, case.obs.noise_sigma)


def run_case(problem: str, seed: int, run_seed: int, settings, output: str, resume: bool = False) -> dict:
    """One SMC run on the case, checkpointed at ``output + ".ckpt"`` at every stage (``resume``: continue it),
    written to ``output``; returns the run (`load_run`). The checkpoint is kept after the run: the same call with
    ``resume`` and a larger ``final_sweeps`` extends every chain (a reference grows over several sessions)."""
    import h5py

    from ..io import atomic_path
    from ..posterior.smc import run_smc

    target = case_target(problem, seed)
    ckpt = output + ".ckpt"
    fit = run_smc(target, settings, torch.Generator().manual_seed(run_seed), checkpoint_path=ckpt, resume=resume)
    z = fit.samples.double()
    with torch.no_grad():  # in batches: 32,000 elliptic draws at once took 18 GB and the OOM killer
        log_joint = torch.cat([target.log_joint(b.to(target.y.dtype)).double()
                               for b in fit.samples.split(LOG_JOINT_BATCH)]).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_path(output) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("draws", data=z.numpy())
        f.create_dataset("log_joint", data=log_joint)
        for key, v in fit.trace.items():
            f.create_dataset(f"trace/{key}", data=v)
        f.attrs.update({"problem": problem, "seed": seed, "run_seed": run_seed,
                        "settings": json.dumps(dataclasses.asdict(settings)), "wall_s": fit.wall_time_s,
                        "n_forward_evals": fit.n_forward_evals,
                        **{k: fit.attrs[k] for k in ("log_evidence", "log_evidence_se", "n_stages", "n_chains",
                                                      "final_sweeps", "rhat_max", "ess_min", "sweep_correlation")
                           if k in fit.attrs}})
    return load_run(output)


def load_run(path: str) -> dict:
    """A run file as ``{"draws", "log_joint", "trace", **attrs}``."""
    import h5py

    with h5py.File(path, "r") as f:
        run = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        run.update(draws=f["draws"][()], log_joint=f["log_joint"][()],
                   trace={k: f[f"trace/{k}"][()] for k in f["trace"]})
    return run


def agreement(draws: np.ndarray, ref_draws: np.ndarray, log_z: float | None = None,
              ref_log_z: float | None = None) -> dict:
    """``mean_sd`` (largest latent mean difference in the reference's sd), ``sd_rel`` (largest relative sd
    difference), ``log_z_diff`` when both evidences are given, and whether each meets the issue's bound."""
    sd = ref_draws.std(0, ddof=1)
    out = {"mean_sd": float(np.max(np.abs(draws.mean(0) - ref_draws.mean(0)) / sd)),
           "sd_rel": float(np.max(np.abs(draws.std(0, ddof=1) / sd - 1)))}
    out["means_agree"], out["sds_agree"] = out["mean_sd"] < MEAN_SD_GOAL, out["sd_rel"] < SD_REL_GOAL
    if log_z is not None and ref_log_z is not None:
        out["log_z_diff"] = float(abs(log_z - ref_log_z))
        out["log_z_agree"] = out["log_z_diff"] < LOG_Z_GOAL
    return out


def run_chains(run: dict) -> np.ndarray:
    """A run's draws as chains ``[C, S, k]``: its particles' final sweeps (``n_chains`` chains of ``S`` draws),
    or each final particle alone (``S = 1``) for a run without sweeps."""
    d = run["draws"]
    c = int(run.get("n_chains", len(d)))
    return d.reshape(c, len(d) // c, d.shape[-1])


def pair_agreement(run: dict, other: dict) -> dict:
    """`agreement` of two runs judged with each one's sd as the scale in turn, the worse of the two: neither run
    is the reference, so the verdict must not depend on their order (on elliptic the two scales gave 0.105 and
    0.112 sd for the same pair)."""
    one, two = (agreement(a["draws"], b["draws"], a["log_evidence"], b["log_evidence"])
                for a, b in ((run, other), (other, run)))
    worse = {k: max(one[k], two[k]) for k in ("mean_sd", "sd_rel", "log_z_diff")}
    return {**worse, **{k: one[k] and two[k] for k in ("means_agree", "sds_agree", "log_z_agree")}}


def runs_agreement(runs: list[dict]) -> tuple[bool, dict]:
    """Every pair of runs against each other (`pair_agreement`): whether all pairs meet every bound, and the rows
    by pair ``"i-j"``."""
    rows = {f"{i}-{j}": pair_agreement(runs[i], runs[j]) for i in range(len(runs)) for j in range(i + 1, len(runs))}
    ok = len(runs) >= 2 and all(r["means_agree"] and r["sds_agree"] and r["log_z_agree"] for r in rows.values())
    return ok, rows


def store_runs(paths: list[str], output: str | None = None, thin: int = 1) -> tuple[bool, str]:
    """Independent runs of one case pooled into the case's stored reference: every run's chains (`run_chains`)
    side by side, its R-hat and ESS over them recorded; converged (`StoredReference.converged`) when at least
    two runs agree pairwise within the issue's bounds. Written beside the bundled prior unless ``output``;
    `save_checked` keeps it as ``*.unconverged.h5`` otherwise. ``thin``: keep every ``thin``-th sweep of each
    chain in the stored file (a bundled file stays small; the agreement is judged on every draw). Returns
    ``(converged, path)``."""
    from ..errors import GanflowError
    from .cases import _make_case
    from .stored import reference_from_draws, reference_path, save_checked

    runs = [load_run(p) for p in paths]
    problem, seed = runs[0]["problem"], int(runs[0]["seed"])
    if any((r["problem"], int(r["seed"])) != (problem, seed) for r in runs):
        raise GanflowError("store: the runs are of different cases")
    if thin < 1:
        raise GanflowError(f"store: --thin must be >= 1, got {thin}")
    chains = [run_chains(r) for r in runs]
    if len({c.shape[1:] for c in chains}) != 1:
        raise GanflowError("store: the runs have chains of different lengths (final_sweeps)")
    draws = np.concatenate([c[:, ::thin] for c in chains])
    log_joint = np.concatenate([r["log_joint"].reshape(c.shape[:2])[:, ::thin] for r, c in zip(runs, chains,
                                                                                                 strict=True)])
    run = {"step_size": float(np.mean([r["trace"]["step_size"][-1] for r in runs])), "divergences": 0,
           "n_gradients": int(sum(r["n_forward_evals"] for r in runs) // len(runs)),
           "wall_s": float(sum(r["wall_s"] for r in runs))}
    settings = {"sampler": "smc", "chains": len(runs), "smc": json.loads(runs[0]["settings"]),
                "run_seeds": [int(r["run_seed"]) for r in runs],
                "log_evidence": [float(r["log_evidence"]) for r in runs],
                "log_evidence_se": [float(r["log_evidence_se"]) for r in runs]}
    target = case_target(problem, seed)
    ref = reference_from_draws(target, problem, seed, [draws], [log_joint], [run],
                               f"python scripts/smc_reference.py store {' '.join(paths)}"
                               + (f" --thin {thin}" if thin > 1 else ""), settings)
    ok, rows = runs_agreement(runs)
    ref.attrs.update(n_runs=len(runs), runs_agree=ok, run_agreement=json.dumps(rows))
    return save_checked(ref, output or reference_path(_make_case(problem, seed).prior_path, problem, seed))
