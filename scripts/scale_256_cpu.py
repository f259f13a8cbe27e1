"""Paper scale on a CPU: the whole 256x256 phase-retrieval chain starts and runs a few iterations (issue 4).

Runs, with ``configs/phase_retrieval_256.toml`` (256x256 = 65,536 unknowns, k = 128, 512x512 FFT, m = 65,537):

1. ``ganflow data``        a few phantoms;
2. ``ganflow train-prior`` ``--steps`` generator steps (each with 5 critic steps, batch 64) from scratch;
3. ``ganflow simulate``    a truth from that (barely trained) prior, noise sigma 0.01;
4. ``ganflow solve``       a flow fit with a tiny budget (a few MAP and flow iterations, batch 4);
5. in-process timing of one MAP iteration and of flow training steps at the solve's batch size.

Each CLI step runs under ``/usr/bin/time -v`` (wall time and peak memory). Writes ``OUT/scale_256_cpu.json``
and prints the table of docs/scaling.md. Nothing here is a benchmark target; it shows what a CPU can and cannot do
at this scale (the numbers say: use a GPU, ``scripts/gpu_check.sh``).

    python scripts/scale_256_cpu.py -o runs/scale_256_cpu [--steps 2] [--flow-steps 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "phase_retrieval_256.toml")


def timed_cli(name: str, args: list[str], out: str) -> dict:
    """Run ``python -m ganflow ARGS`` under /usr/bin/time -v; wall seconds and peak RSS (GB)."""
    log = os.path.join(out, f"{name}.log")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "ganflow", *args]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    text = open(log).read()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    rec = {"step": name, "rc": rc, "wall_s": wall, "peak_rss_gb": int(m.group(1)) / 2**20 if m else None}
    print(f"{name:<14} rc={rc} {wall:8.1f} s  peak {rec['peak_rss_gb'] or float('nan'):.2f} GB", flush=True)
    if rc != 0:
        print(text[-2000:], file=sys.stderr)
        raise SystemExit(f"{name} failed (see {log})")
    return rec


def per_iteration(out: str, flow_steps: int, batch: int) -> dict:
    """Seconds per MAP iteration (one start) and per flow training step (``batch`` draws) at 256x256."""
    import torch

    from ganflow import load_prior, load_problem
    from ganflow.io import read_obs
    from ganflow.posterior.flow import FlowSettings, fit_flow
    from ganflow.posterior.target import LatentTarget

    G = load_prior(os.path.join(out, "prior.pt"))
    obs = read_obs(os.path.join(out, "obs.h5"))
    op = load_problem("phase_retrieval", **obs.problem_kwargs).make_operator(**obs.operator_kwargs)
    target = LatentTarget(G, op, obs.y, obs.noise_sigma)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch.optim's one-off dynamo import, not a step cost
    stamps: list[tuple[int, float]] = []
    s = FlowSettings(batch_size=batch, map_starts=1, map_iter=2, max_iter=flow_steps, min_iter=flow_steps,
                     warmup=1, progress=False)
    t0 = time.perf_counter()
    fit = fit_flow(target, s, torch.Generator().manual_seed(0),
                   monitor=lambda step, flow: stamps.append((step, time.perf_counter())), monitor_every=1)
    steps = [b - a for (_, a), (_, b) in zip(stamps, stamps[1:], strict=False)]
    before_flow = stamps[0][1] - t0  # MAP (2 iterations of 1 start) + the 2k-point Hessian + flow set-up
    return {
        "flow_batch": batch,
        "flow_step_s": sorted(steps)[len(steps) // 2] if steps else None,
        "flow_steps_s": steps,
        "laplace_s": before_flow,
        "latent_dim": target.latent_dim,
        "obs_size": int(obs.y.numel()),
        "n_forward_evals": fit.n_forward_evals,
        "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=os.path.join(ROOT, "runs", "scale_256_cpu"))
    ap.add_argument("--steps", type=int, default=2, help="generator steps of train-prior")
    ap.add_argument("--flow-steps", type=int, default=4)
    ap.add_argument("--flow-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true",
                    help="keep the fields, prior and observation of an earlier run in OUT; time the solve only")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    solve_cfg = os.path.join(a.out, "solve_tiny.toml")
    with open(solve_cfg, "w") as fh:
        fh.write(f"[solve]\nn_samples = 16\nn_quantile = 16\nn_field_samples = 4\nbatch_size = 8\n"
                 f"[flow]\nmax_iter = {a.flow_steps}\nmin_iter = {a.flow_steps}\nbatch_size = {a.flow_batch}\n"
                 f"map_starts = 1\nmap_iter = 2\nwarmup = 1\nprogress = false\n[diagnostics]\nenabled = false\n")
    p = lambda name: os.path.join(a.out, name)  # noqa: E731
    report_path = p("scale_256_cpu.json")
    if a.reuse:
        with open(report_path) as fh:
            earlier = json.load(fh)
        recs = [r for r in earlier["cli"] if r["step"] != "solve"]
        a.steps = earlier["train_steps"]
    else:
        recs = _prepare(a, p)
    recs.append(timed_cli("solve", ["solve", "--obs", p("obs.h5"), "--prior", p("prior.pt"), "--config", solve_cfg,
                                    "--seed", "0", "-o", p("posterior.h5"), "--force", "--quiet"], a.out))
    it = per_iteration(a.out, a.flow_steps, a.flow_batch)
    print(f"per iteration: flow step (batch {it['flow_batch']}) {it['flow_step_s']:.2f} s, "
          f"Laplace start (2 MAP iterations + {2 * it['latent_dim']}-point Hessian) {it['laplace_s']:.1f} s, "
          f"peak {it['process_peak_rss_gb']:.2f} GB")
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.threads} threads",
        "config": os.path.relpath(CONFIG, ROOT),
        "train_steps": a.steps,
        "train_s_per_generator_step": recs[1]["wall_s"] / a.steps,  # includes start-up and the checkpoint
        "cli": recs,
        "per_iteration": it,
    }
    with open(report_path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {report_path}")


def _prepare(a, p) -> list[dict]:
    """Fields, a briefly trained prior and one observation."""
    return [
        timed_cli("data", ["data", "--problem", "phase_retrieval", "--config", CONFIG, "--n", "64", "--seed", "0",
                           "-o", p("fields.h5"), "--force"], a.out),
        timed_cli("train-prior", ["train-prior", "--data", p("fields.h5"), "--config", CONFIG, "--steps",
                                  str(a.steps), "--seed", "0", "-o", p("prior.pt"), "--force", "--no-progress",
                                  "--no-report"], a.out),
        timed_cli("simulate", ["simulate", "--problem", "phase_retrieval", "--config", CONFIG, "--prior",
                               p("prior.pt"), "--noise-sigma", "0.01", "--seed", "1", "-o", p("obs.h5"),
                               "--force"], a.out),
    ]


if __name__ == "__main__":
    main()
