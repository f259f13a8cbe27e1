"""Many observations: solve every observation of a stacked ``obs.h5``, sharded over torchrun ranks, resumable.

A stacked ``obs.h5`` (attribute ``n_obs`` = M; ``/y`` ``[M, *obs_shape]``, see `ganflow.io.read_obs_stack`)
is solved observation by observation with `ganflow.solve`; observation ``i`` uses seed ``seed + i``, so its
result is exactly that of ``ganflow solve`` on observation ``i`` alone with ``--seed seed+i``, whatever the
number of processes. Under ``torchrun`` the observations still to do are dealt round robin to the ranks.

Files. Each finished observation is written atomically, in the single-observation ``posterior.h5`` schema
(`PosteriorResult.save`), to ``<output>.parts/obs_0007.h5``; a crash loses at most the observations in flight.
When all M parts exist, rank 0 merges them into ``<output>`` (atomically) and removes the parts directory:

    /obs_0000/ ... /obs_<M-1>/      each the posterior.h5 schema (datasets and attributes), plus attrs
                                    ``obs_index`` and ``finished_unix``
    /summary/index, seed, wall_time_s, fit_wall_time_s, n_forward_evals     [M]
    /summary/rel_l2_error, coverage_95, chi2_per_dof                        [M]  (when truths are known;
                                    NaN for an observation without a truth); attrs: their means
    attrs: kind = "ganflow.posterior_stack", n_obs, method, seed, obs_path, prior, ganflow_version,
           world_size (of the last run), group_width (digits in the group names)

``resume=True`` keeps the finished parts and solves only the others (with any number of processes);
``max_obs=K`` stops after K more observations (the parts stay; resume later). The parts directory records the
run's inputs in ``run.json`` and a resume with other inputs is refused.

Example:
    >>> stack_group_name(7, 100)
    'obs_0007'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import h5py
import numpy as np
from torch import nn

from . import __version__, distributed
from .config import Config
from .errors import GanflowError
from .io import atomic_h5, atomic_path, check_output_path, open_h5, read_obs_stack

__all__ = ["StackResult", "solve_stack", "stack_group_name", "parts_dir", "read_stack_summary"]

SUMMARY_METRICS = ("rel_l2_error", "coverage_95", "chi2_per_dof")


def stack_group_name(i: int, n_obs: int) -> str:
    """``obs_0007``: zero-padded to at least 4 digits (more when ``n_obs`` needs them), so names sort."""
    return f"obs_{i:0{max(4, len(str(n_obs - 1)))}d}"


def parts_dir(output: str | os.PathLike) -> str:
    return os.fspath(output) + ".parts"


@dataclass
class StackResult:
    """What `solve_stack` did on this rank: observations solved here, skipped as finished, and the merge."""

    output: str
    n_obs: int
    solved: list[int] = field(default_factory=list)  # by this rank, this run
    skipped: list[int] = field(default_factory=list)  # finished before this run
    remaining: list[int] = field(default_factory=list)  # not finished after this run (max_obs)
    merged: bool = False
    rank: int = 0
    world_size: int = 1
    wall_time_s: float = 0.0
    summary: dict[str, np.ndarray] = field(default_factory=dict)


def _file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(
    obs_path: str,
    prior: Any,
    operator: Any,
    problem: Any,
    method: str | None,
    cfg: Config,
    seed: int,
    n_obs: int,
) -> dict:
    """What decides the parts' contents; a resume must agree (device and progress excepted)."""

    def label(x):
        if x is None or isinstance(x, str):
            return x
        return type(x).__name__ if isinstance(x, nn.Module) else str(x)

    tables = {k: v for k, v in cfg.data.items()}
    solve_table = {k: v for k, v in dict(tables.get("solve", {})).items() if k != "device"}
    tables["solve"] = solve_table
    flow = {k: v for k, v in dict(tables.get("flow", {})).items() if k != "progress"}
    if flow:
        tables["flow"] = flow
    return {
        "obs_sha1": _file_sha1(obs_path),
        "n_obs": n_obs,
        "prior": label(prior),
        "operator": label(operator),
        "problem": label(problem),
        "method": method,
        "seed": int(seed),
        "config": json.loads(json.dumps(tables, default=str)),
    }


def _part_path(pdir: str, i: int, n_obs: int) -> str:
    return os.path.join(pdir, stack_group_name(i, n_obs) + ".h5")


def _finished(pdir: str, n_obs: int) -> list[int]:
    # Parts are renamed into place only when complete, so existence means finished.
    return [i for i in range(n_obs) if os.path.isfile(_part_path(pdir, i, n_obs))]


def solve_stack(
    obs_path: str | os.PathLike,
    prior: str | os.PathLike | nn.Module,
    output: str | os.PathLike,
    *,
    operator: Any = None,
    problem: Any = None,
    method: str | None = None,
    config: Config | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    max_obs: int | None = None,
    progress: bool = False,
    on_done: Callable[[int, Any], None] | None = None,
    amortized: Any = None,
    refine: bool = False,
) -> StackResult:
    """Solve each observation of a stacked ``obs.h5`` and write one HDF5 file with a group per observation.

    Args:
        obs_path: stacked ``obs.h5`` (attribute ``n_obs``).
        prior, operator, problem, method, config: as for `ganflow.solve` (``[solve] device`` picks the device;
            under torchrun with ``cuda`` each rank uses ``cuda:LOCAL_RANK``).
        output: the merged result file.
        seed: observation ``i`` is solved with ``seed + i``.
        resume: keep finished observations (``<output>.parts/``) and solve only the rest.
        force: overwrite an existing ``output`` and discard parts of an earlier run (not with ``resume``).
        max_obs: solve at most this many more observations (over all ranks), then stop without merging.
        progress: progress bars (rank 0 only).
        on_done: ``on_done(i, result)`` after each observation this rank finishes.
        amortized, refine: as for `ganflow.solve` (issue 19); a path is loaded once for all observations.

    Every rank calls this under torchrun; the returned `StackResult` describes this rank's share.
    """
    from .solve import SolveSettings  # solve sits beside this module; imported late like the CLI does

    t0 = time.perf_counter()
    cfg = config if isinstance(config, Config) else Config.from_file(config)
    output = os.fspath(output)
    obs_path = os.fspath(obs_path)
    if resume and force:
        raise GanflowError("give --resume or --force, not both")
    if max_obs is not None and max_obs < 1:
        raise GanflowError(f"--max-obs must be >= 1, got {max_obs}")
    observations = read_obs_stack(obs_path)
    n_obs = len(observations)
    device = cfg.section(SolveSettings, "solve").device
    pdir = parts_dir(output)
    manifest = _manifest(obs_path, prior, operator, problem, method, cfg, seed, n_obs)
    amortized = _with_amortized(manifest, amortized, refine)
    with distributed.session(device) as ctx:
        result = StackResult(output=output, n_obs=n_obs, rank=ctx.rank, world_size=ctx.world_size)
        if _already_finished(output, pdir, n_obs, manifest, resume, force):
            result.skipped = list(range(n_obs))
            result.summary = read_stack_summary(output)
            result.wall_time_s = time.perf_counter() - t0
            return result  # a finished run: nothing to do
        _open_parts(pdir, manifest, resume, ctx.is_main)
        result.skipped = _finished(pdir, n_obs)
        todo = [i for i in range(n_obs) if i not in set(result.skipped)]
        if max_obs is not None:
            todo = todo[:max_obs]
        for i in distributed.shard(todo, ctx.rank, ctx.world_size):
            res = _solve_observation(i, observations[i], pdir, n_obs, prior=prior, operator=operator,
                                     problem=problem, method=method, cfg=cfg, seed=seed,
                                     progress=progress and ctx.is_main, amortized=amortized, refine=refine)
            result.solved.append(i)
            if on_done is not None:
                on_done(i, res)
        distributed.barrier()  # every rank's parts are on disk
        _merge_if_complete(result, pdir, obs_path, prior, method, seed, ctx)
        distributed.barrier()  # the merged file exists before any rank returns
    result.wall_time_s = time.perf_counter() - t0
    return result


def _with_amortized(manifest: dict, amortized: Any, refine: bool) -> Any:
    """issue 19: one amortised posterior for every observation, loaded once and recorded in the manifest (so a
    resume with another one is refused); None passes through."""
    if amortized is None:
        return None
    from .posterior.amortized import AmortizedPosterior, load_amortized

    amortized = amortized if isinstance(amortized, AmortizedPosterior) else load_amortized(amortized)
    manifest["amortized"] = {"prior_sha1": amortized.meta["prior_sha1"], "step": int(amortized.meta["step"]),
                             "refine": bool(refine)}
    return amortized


def _already_finished(output: str, pdir: str, n_obs: int, manifest: dict, resume: bool, force: bool) -> bool:
    """Manifest and resume checks: True when a resume finds ``output`` already merged (nothing to do).

    They run on every rank (they read the same files); only rank 0 changes anything, after a barrier.
    """
    if resume:
        if os.path.exists(output) and not os.path.isdir(pdir):
            _check_complete(output, n_obs)
            return True
        if os.path.isdir(pdir):
            _check_manifest(pdir, manifest)
        else:
            check_output_path(output, False, "posterior")  # nothing to resume: a fresh start
    else:
        check_output_path(output, force, "posterior")
        if os.path.exists(pdir) and not force:
            raise GanflowError(
                f"{pdir} holds observations of an earlier run: --resume continues it, --force starts over"
            )
    return False


def _open_parts(pdir: str, manifest: dict, resume: bool, is_main: bool) -> None:
    """Rank 0 creates the parts directory (cleared unless resuming) and records the run's inputs in run.json."""
    distributed.barrier()  # every rank has checked before rank 0 creates or clears anything
    if is_main:
        if os.path.exists(pdir) and not resume:
            shutil.rmtree(pdir)
        os.makedirs(pdir, exist_ok=True)
        with atomic_path(os.path.join(pdir, "run.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1)
    distributed.barrier()


def _solve_observation(i: int, observation: Any, pdir: str, n_obs: int, *, prior: Any, operator: Any,
                       problem: Any, method: str | None, cfg: Config, seed: int, progress: bool,
                       amortized: Any = None, refine: bool = False) -> Any:
    """One observation: `ganflow.solve` with seed ``seed + i``, saved atomically as its part; the result."""
    from .solve import solve

    res = solve(
        observation,
        prior,
        operator=operator,
        problem=problem,
        method=method,
        config=cfg,
        seed=seed + i,
        progress=progress,
        amortized=amortized,
        refine=refine,
    )
    res.attrs["obs_index"] = int(i)
    res.attrs["finished_unix"] = float(time.time())
    res.save(_part_path(pdir, i, n_obs), force=True)  # atomic: a crash leaves no partial part
    return res


def _merge_if_complete(result: StackResult, pdir: str, obs_path: str, prior: Any, method: str | None, seed: int,
                       ctx: distributed.DistContext) -> None:
    """When every part exists, rank 0 merges them into ``result.output`` and removes the parts directory."""
    n_obs = result.n_obs
    done = _finished(pdir, n_obs)
    result.remaining = [i for i in range(n_obs) if i not in set(done)]
    if not result.remaining:
        if ctx.is_main:
            result.summary = _merge(pdir, result.output, n_obs, obs_path, prior, method, seed, ctx.world_size)
            shutil.rmtree(pdir)
        result.merged = True


def _check_manifest(pdir: str, manifest: dict) -> None:
    path = os.path.join(pdir, "run.json")
    if not os.path.isfile(path):
        raise GanflowError(f"{pdir} has no run.json: not the parts of a ganflow stacked solve")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GanflowError(f"{path} is unreadable ({e})") from None
    bad = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
    if bad:
        raise GanflowError(
            f"--resume: the finished observations in {pdir} were solved with other inputs "
            f"({', '.join(bad)} differ); use --force to start over"
        )


def _check_complete(output: str, n_obs: int) -> None:
    with open_h5(output, "posterior file") as f:
        if f.attrs.get("kind") != "ganflow.posterior_stack" or int(f.attrs.get("n_obs", -1)) != n_obs:
            raise GanflowError(
                f"--resume: {output} exists and is not a finished {n_obs}-observation result; "
                "use --force to overwrite it"
            )


def _merge(
    pdir: str, output: str, n_obs: int, obs_path: str, prior: Any, method: str | None, seed: int, world: int
) -> dict[str, np.ndarray]:
    """Copy every part into ``/obs_XXXX`` of ``output`` (atomically) and add ``/summary``."""
    rows: dict[str, list[float]] = {
        k: [] for k in ("wall_time_s", "fit_wall_time_s", "n_forward_evals", *SUMMARY_METRICS)
    }
    methods = set()
    with atomic_h5(output) as out:
        for i in range(n_obs):
            grp = out.create_group(stack_group_name(i, n_obs))
            with h5py.File(_part_path(pdir, i, n_obs), "r") as part:
                for name in part:
                    part.copy(part[name], grp, name=name)
                for key, value in part.attrs.items():
                    grp.attrs[key] = value
                for key in rows:
                    rows[key].append(float(part.attrs[key]) if key in part.attrs else float("nan"))
                methods.add(str(part.attrs.get("method", "")))
        summary = {"index": np.arange(n_obs), "seed": seed + np.arange(n_obs)}
        summary.update({k: np.asarray(v, np.float64) for k, v in rows.items()})
        if all(np.isnan(summary[k]).all() for k in SUMMARY_METRICS):
            for k in SUMMARY_METRICS:  # no truths: no error table
                del summary[k]
        sgrp = out.create_group("summary")
        for key, arr in summary.items():
            sgrp.create_dataset(key, data=arr)
            if key not in ("index", "seed") and np.isfinite(arr).any():
                sgrp.attrs[f"mean_{key}"] = float(np.nanmean(arr))
        out.attrs.update(
            {
                "kind": "ganflow.posterior_stack",
                "n_obs": int(n_obs),
                "method": ",".join(sorted(methods)) if methods else (method or ""),
                "seed": int(seed),
                "obs_path": os.path.abspath(obs_path),
                "prior": prior if isinstance(prior, str) else type(prior).__name__,
                "ganflow_version": __version__,
                "world_size": int(world),
                "group_width": len(stack_group_name(0, n_obs)) - 4,
            }
        )
    return summary


def read_stack_summary(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``/summary`` of a merged multi-observation result as a dict of ``[M]`` arrays."""
    with open_h5(path, "posterior file") as f:
        if "summary" not in f:
            raise GanflowError(f"{path} has no /summary (not a multi-observation result)")
        return {k: f["summary"][k][()] for k in f["summary"]}
