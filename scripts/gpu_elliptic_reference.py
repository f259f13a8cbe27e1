"""The elliptic benchmark's reference posterior by batched HMC on a GPU (`ganflow.bench.batched_hmc`).

Why: NUTS needs about 16 core-hours for a converged elliptic reference (rugged posterior, ~250 gradients a draw);
a GPU runs a thousand chains in lock-step, each gradient solving all their PDEs at once
(`problems.elliptic.BlockTridiagonalSolver`). Three steps, the middle one on the GPU:

    python scripts/gpu_elliptic_reference.py modes -o .gpu/elliptic_modes.pt          # CPU, ~2 min
    python scripts/gpu_elliptic_reference.py sample --modes .gpu/elliptic_modes.pt \\
        --device cuda --budget-s 420 -o $OUT                                           # GPU
    python scripts/gpu_elliptic_reference.py store --draws DIR                          # CPU: the .h5

``modes`` finds the posterior's modes as `ganflow.bench.stored.make_reference` does (the flow's screened
64-start MAP search, seed + 1). ``sample`` runs the chains of each mode from its Laplace approximation, in float64,
for a wall-clock budget, and writes the draws in chunks (``draws_<j>_<c>.npz``: ``z`` [C', S, k] float32,
``log_joint`` [C', S]), the chains' end states (``state_<j>.pt``: ``z``, frame, step) and a JSON summary.
``--start-from DIR`` starts new chains at an earlier run's draws; ``--resume DIR`` continues its chains exactly,
so a reference can grow over several calls. ``store`` joins a run and its continuations (``--draws`` repeated,
in order), keeps ``--keep-chains`` chains (spread over the run) and every ``--thin``-th draw, and writes the
reference that `ganflow bench` reads (``*.unconverged.h5`` unless split R-hat < 1.01 and bulk ESS >= 1,000 on
every coordinate; bench falls back to that long run while no converged one exists).

The elliptic reference bundled in session 10: ``sample --device cpu --float32 --chains 64 --budget-s 3300``
(session 9), then on an H200 ``sample --start-from`` it (450 s, 256 chains) and ``sample --resume`` that (285 s),
then ``store --draws RUN2 --draws RUN3 --keep-chains 256 --thin 6``: R-hat 1.23, ESS 613 (docs/benchmark.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

CHUNK_BYTES = 12 * 2**20  # each returned file stays under the device tool's 16 MiB


def _target(problem: str, seed: int, device: str | None = None, float32: bool = False):
    """The benchmark's target as `make_reference` builds it, or (``device``) in float64 on that device
    (``float32``: the generator and ``y`` as bench has them, faster on a CPU)."""
    from ganflow.bench.cases import _make_case
    from ganflow.posterior import LatentTarget

    case = _make_case(problem, seed)
    if isinstance(case, str):
        raise SystemExit(case)
    if device is None or float32:
        return LatentTarget(case.G.to(device or "cpu"), case.op.to(device or "cpu"),
                            case.obs.y.to(device or "cpu"), case.obs.noise_sigma)
    G = case.G.double().to(device)
    return LatentTarget(G, case.op.to(device), case.obs.y.double().to(device), case.obs.noise_sigma, check=False)


def cmd_modes(a) -> int:
    from ganflow.posterior.flow import FlowSettings
    from ganflow.posterior.modes import find_modes

    target = _target(a.problem, a.seed)
    modes, found = find_modes(target, FlowSettings(map_starts=64), torch.Generator().manual_seed(a.seed + 1),
                               target.n_forward_evals)
    torch.save({"loc": torch.stack([m.loc for m in modes]).double(),
                "scale_tril": torch.stack([m.scale_tril for m in modes]).double(),
                "log_joint": torch.tensor([float(m.log_joint) for m in modes])}, a.output)
    print(f"{len(modes)} mode(s), log p {[round(float(m.log_joint), 2) for m in modes]}; wrote {a.output}")
    return 0


def _subset(z: np.ndarray, lj: np.ndarray, chains: int, mb: float) -> tuple[np.ndarray, np.ndarray]:
    """``chains`` chains spread over the run, every t-th draw so that they fit in ``mb`` MiB (what comes back)."""
    keep = np.linspace(0, len(z) - 1, min(chains, len(z))).round().astype(int)
    per_draw = len(keep) * (z.shape[2] * 4 + 8)
    thin = max(1, int(np.ceil(per_draw * z.shape[1] / (mb * 2**20))))
    return z[keep, ::thin], lj[keep, ::thin]


def _save_chunks(out: str, j: int, z: np.ndarray, lj: np.ndarray) -> list[str]:
    per_chain = max(1, z[0].nbytes + lj[0].nbytes)
    step = max(1, CHUNK_BYTES // per_chain)
    names = []
    for c, start in enumerate(range(0, len(z), step)):
        name = os.path.join(out, f"draws_{j}_{c}.npz")
        np.savez(name, z=z[start:start + step], log_joint=lj[start:start + step])
        names.append(name)
    return names


def _starts(a, j: int, modes: dict, dtype: torch.dtype, gen: torch.Generator):
    """Mode ``j``'s chain starts ``[C, k]``, starting frame ``(loc, tril)``, initial step and warm-up windows.

    Three ways, by the options: from the mode's Laplace approximation (default: three windows that refit the frame);
    ``--start-from DIR``: at draws of an earlier run (the second half of each of its returned chains, pooled), in
    the frame of their moments, with its step and one step-only window (its chains had left the Laplace
    starts, 130-540 nats below the mode on the elliptic case, so a new run need not walk in again); ``--resume
    DIR``: that run's own chains continued exactly from its end states (``state_<j>.pt``), frame and step, no
    warm-up."""
    dev = a.device
    if a.resume:
        st = torch.load(os.path.join(a.resume, f"state_{j}.pt"), weights_only=True)
        frame = (st["loc"].to(dev, dtype), st["tril"].to(dev, dtype))
        return st["z"].to(dev, dtype), frame, float(st["step"]), a.windows if a.windows is not None else []
    if a.start_from:
        from ganflow.bench.batched_hmc import pooled_frame

        z, _, rec = _load_draws(a.start_from, j)
        pool = torch.from_numpy(z[:, z.shape[1] // 2:].reshape(-1, z.shape[2])).to(dev, dtype)
        pick = torch.randperm(len(pool), generator=gen)[:a.chains] if len(pool) >= a.chains else \
            torch.randint(len(pool), (a.chains,), generator=gen)
        return pool[pick.to(dev)], pooled_frame(pool), rec["step_size"], a.windows if a.windows is not None else [50]
    loc, tril = modes["loc"][j].to(dev, dtype), modes["scale_tril"][j].to(dev, dtype)
    z0 = loc + torch.randn(a.chains, loc.numel(), generator=gen, dtype=dtype).to(dev) @ tril.T
    return z0, (loc, tril), 0.1, a.windows if a.windows is not None else [300, 300, 200]


def cmd_sample(a) -> int:
    from ganflow.bench.batched_hmc import HmcSettings, run_batched_hmc

    t_start = time.perf_counter()
    modes = torch.load(a.modes, weights_only=True)
    target = _target(a.problem, a.seed, a.device, a.float32)
    dtype = torch.float32 if a.float32 else torch.float64
    prior_grads = 0
    if a.resume:  # a continued run draws new random numbers, fixed by where the chains stand
        with open(os.path.join(a.resume, "summary.json")) as f:
            earlier = json.load(f)
        a.chains, prior_grads = earlier["chains"], sum(r["n_gradients_total"] for r in earlier["modes"])
    gen = torch.Generator().manual_seed(a.seed + 11 + prior_grads)
    if a.chains == 0:
        a.chains = _choose_chains(target, modes["loc"][0].to(a.device, dtype))
    summary = {"chains": a.chains, "device": a.device, "float32": a.float32, "modes": [],
               "start": "resume" if a.resume else "draws" if a.start_from else "laplace",
               "continues": os.path.basename(os.path.normpath(a.resume)) if a.resume else None}
    K = len(modes["loc"])
    for j in range(K):
        z0, frame, step0, windows = _starts(a, j, modes, dtype, gen)
        remaining = a.budget_s - (time.perf_counter() - t_start)
        share = remaining / (K - j) - 5
        warm = a.warmup_share if a.warmup_share is not None else 0.4 if len(windows) == 3 else 0.05
        settings = HmcSettings(windows=tuple(windows), num_samples=a.max_samples, trajectory=a.trajectory,
                               init_step=step0, deadline_s=share,
                               window_s=tuple(warm * share / len(windows) for _ in windows))
        out = run_batched_hmc(target.log_joint_and_grad, z0, frame, settings, gen,
                              progress=lambda s, j=j: print(f"[mode {j}] {s}", flush=True))
        z, lj = out["draws"].numpy(), out["log_joint"].numpy()
        files = _save_chunks(a.output, j, *_subset(z, lj, a.return_chains, a.return_mb / K))
        total = out["n_gradients"] + (earlier["modes"][j]["n_gradients_total"] if a.resume else 0)
        torch.save({"z": out["last"].double(), "loc": out["frame"][0].double(), "tril": out["frame"][1].double(),
                    "step": out["step_size"]}, os.path.join(a.output, f"state_{j}.pt"))
        rec = {k: out[k] for k in ("step_size", "divergences", "warmup_divergences", "n_gradients", "wall_s")}
        rec.update(n_gradients_total=total, draws=int(z.shape[1]),
                   accept=float(out["accept"].mean()) if z.shape[1] else None,
                   leapfrog_last=int(out["n_leapfrog"][-1]), files=[os.path.basename(f) for f in files])
        rec.update(_convergence(z))
        summary["modes"].append(rec)
        print(f"[mode {j}] {json.dumps(rec)}", flush=True)
    with open(os.path.join(a.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


def _choose_chains(target, loc: torch.Tensor) -> int:
    """1,024 chains when a batched gradient for them costs under twice one for 256 (the device is not yet
    busy: more chains are nearly free), else 256 (longer chains for the same time)."""
    times = {}
    for c in (256, 1024):
        z = loc + 0.1 * torch.randn(c, loc.numel(), dtype=loc.dtype, device=loc.device)
        for rep in range(4):
            if rep == 1:
                torch.cuda.synchronize() if z.is_cuda else None
                t0 = time.perf_counter()
            target.log_joint_and_grad(z)
        torch.cuda.synchronize() if z.is_cuda else None
        times[c] = (time.perf_counter() - t0) / 3
    print(f"batched value-and-gradient: {json.dumps({c: round(t * 1e3, 2) for c, t in times.items()})} ms",
          flush=True)
    return 1024 if times[1024] < 2 * times[256] else 256


def _convergence(z: np.ndarray) -> dict:
    """Split R-hat and bulk ESS over all chains (``z`` ``[C, S, k]``), as the stored references compute them."""
    if z.shape[1] < 4:
        return {"rhat_max": None, "ess_min": None}
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    t = torch.from_numpy(z).double()
    return {"rhat_max": float(split_gelman_rubin(t, chain_dim=0, sample_dim=1).max()),
            "ess_min": float(effective_sample_size(t, chain_dim=0, sample_dim=1).min())}


def _load_draws(folder: str, j: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Mode ``j``'s returned draws ``[C', S, k]``, log joints and summary record of one `sample` folder."""
    with open(os.path.join(folder, "summary.json")) as f:
        rec = json.load(f)["modes"][j]
    parts = [np.load(os.path.join(folder, name)) for name in rec["files"]]
    return np.concatenate([p["z"] for p in parts]), np.concatenate([p["log_joint"] for p in parts]), rec


def _chained_draws(folders: list[str], j: int) -> tuple[np.ndarray, np.ndarray]:
    """The draws of a run and its continuations (``--resume``, in order) joined along each chain."""
    runs = [_load_draws(d, j)[:2] for d in folders]
    if len({r[0].shape[0] for r in runs}) > 1:
        raise SystemExit("store: the --draws folders return different chains; give one run and its continuations")
    return np.concatenate([r[0] for r in runs], 1), np.concatenate([r[1] for r in runs], 1)


def cmd_store(a) -> int:
    from ganflow.bench.cases import _make_case
    from ganflow.bench.stored import reference_from_draws, reference_path, save_checked

    summaries = []
    for d in a.draws:
        with open(os.path.join(d, "summary.json")) as f:
            summaries.append(json.load(f))
    for d, s in zip(a.draws[1:], summaries[1:], strict=True):
        if s["start"] != "resume":
            raise SystemExit(f"store: {d} does not continue the run before it (sample --resume)")
    draws, log_joint = [], []
    for j in range(len(summaries[0]["modes"])):
        z, lj = _chained_draws(a.draws, j)
        keep = np.linspace(0, len(z) - 1, min(a.keep_chains, len(z))).round().astype(int)
        draws.append(z[keep, ::a.thin].astype(np.float64))
        log_joint.append(lj[keep, ::a.thin])
        print(f"mode {j}: all {len(z)} chains x {z.shape[1]} draws: {_convergence(z)}; kept {len(keep)} chains, "
              f"every {a.thin}. draw")
    case = _make_case(a.problem, a.seed)
    target = _target(a.problem, a.seed)
    summary = summaries[-1]
    command = ("python scripts/gpu_elliptic_reference.py modes/sample/store "
               f"(chains {summary['chains']} on {summary['device']}, {len(a.draws)} run(s), kept {a.keep_chains}, "
               f"thinned {a.thin})")
    runs = [{**rec, "wall_s": sum(s["modes"][j]["wall_s"] for s in summaries),  # the whole chains' cost
             "n_gradients": sum(s["modes"][j]["n_gradients"] for s in summaries),
             "divergences": sum(s["modes"][j]["divergences"] for s in summaries)}
            for j, rec in enumerate(summary["modes"])]
    ref = reference_from_draws(target, a.problem, a.seed, draws, log_joint, runs, command,
                               {"sampler": "batched HMC (ganflow.bench.batched_hmc)", **summary})
    path = a.output or reference_path(case.prior_path, a.problem, a.seed)
    ok, path = save_checked(ref, path)
    print(f"{'converged' if ok else 'NOT converged'}: R-hat max {ref.attrs['rhat_max']:.4f}, ESS min "
          f"{ref.attrs['ess_min']:.0f} (kept chains); wrote {path}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("modes", "sample", "store"):
        p = sub.add_parser(name)
        p.add_argument("--problem", default="elliptic", choices=("elliptic", "phase_retrieval"))
        p.add_argument("--seed", type=int, default=0, help="the benchmark's seed (its observation)")
        p.add_argument("-o", "--output", default=None)
    s = sub.choices["sample"]
    s.add_argument("--modes", required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--chains", type=int, default=0, help="0: 1,024 or 256 by a timing (`_choose_chains`)")
    s.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds for all modes")
    s.add_argument("--start-from", default=None, help="an earlier `sample` folder: start at its draws")
    s.add_argument("--resume", default=None, help="an earlier `sample` folder: continue its chains exactly")
    s.add_argument("--windows", type=int, nargs="*", default=None,
                   help="warm-up windows, draws each (default 300 300 200; 50 with --start-from; none with "
                        "--resume); the last only tunes the step")
    s.add_argument("--warmup-share", type=float, default=None,
                   help="share of the time for the warm-up (default 0.4 with three windows, else 0.05)")
    s.add_argument("--max-samples", type=int, default=2000)
    s.add_argument("--trajectory", type=float, default=1.5)
    s.add_argument("--float32", action="store_true", help="the generator in float32, as bench runs it (CPU)")
    s.add_argument("--return-chains", type=int, default=256, help="chains written out (all are diagnosed)")
    s.add_argument("--return-mb", type=float, default=44.0, help="MiB of draws written out, all modes")
    st = sub.choices["store"]
    st.add_argument("--draws", required=True, action="append",
                    help="the folder `sample` wrote; repeat for its continuations (`--resume`), in order")
    st.add_argument("--keep-chains", type=int, default=64)
    st.add_argument("--thin", type=int, default=1, help="keep every n-th draw (a small file; the chains mix slowly)")
    a = ap.parse_args(argv)
    if a.cmd in ("modes", "sample") and a.output is None:
        ap.error(f"{a.cmd} needs -o")
    if a.cmd == "sample":
        if a.resume and a.start_from:
            ap.error("give --resume or --start-from, not both")
        os.makedirs(a.output, exist_ok=True)
    return {"modes": cmd_modes, "sample": cmd_sample, "store": cmd_store}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
