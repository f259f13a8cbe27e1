"""A user's own data to posteriors, timed end to end with the default recipe (issue 35 item 5; issue 34 item 3).

What a new user does, through the CLI only: example fields in a ``.npy`` file (here 16x16 images of random
ellipses and rectangles, a family no default was tuned on), ``ganflow train-prior`` with the default ``[train]``
recipe, then for a few held-out images (drawn with a seed never used for the training set) ``ganflow simulate
--truth`` (phase retrieval, 2 % noise) and the default ``ganflow solve``. Prints the time of each step and each
solve's relative L2 error, 95 % coverage, chi2/dof and PSIS k-hat (before any recalibration: a user's own data
has none unless they hold truths back).

    python scripts/own_data.py -o runs/own_data                 # ~15 min on the 2-core CPU (run alone)
    python scripts/own_data.py -o runs/own_data --train-config T.toml --steps 3000 --n-truths 5

Everything random takes ``--seed`` (the training set), ``--seed + 1`` (the held-out images) and the CLI's
own ``--seed`` arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

N_PIX = 16


def shapes(n: int, seed: int, size: int = N_PIX) -> np.ndarray:
    """``[n, size, size]`` float32 images: 1-3 random ellipses or rectangles of contrast 0.4-1 on zero, summed
    and clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0)
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(0.2, 0.8, 2)
            ax, ay = rng.uniform(0.08, 0.3, 2)
            c = rng.uniform(0.4, 1.0)
            if rng.random() < 0.5:
                inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
            else:
                inside = (np.abs(xx - cx) <= ax) & (np.abs(yy - cy) <= ay)
            out[i] += c * inside
    return np.clip(out, 0.0, 1.0)


def _cli(*args, log) -> float:
    """Run ``ganflow ARGS`` (stderr to ``log``); the wall seconds. A failure stops the script with its stderr."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ganflow", *map(str, args)], capture_output=True, text=True)
    log.write(r.stderr)
    if r.returncode != 0:
        sys.exit(f"ganflow {args[0]} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, help="a new directory for every file")
    ap.add_argument("--n-fields", type=int, default=2000)
    ap.add_argument("--n-truths", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="generator steps (default: the recipe's)")
    ap.add_argument("--train-config", default=None, help="a TOML [train] table (default: the built-in recipe)")
    ap.add_argument("--noise-relative", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import h5py

    os.makedirs(a.out, exist_ok=False)
    path = lambda name: os.path.join(a.out, name)  # noqa: E731
    np.save(path("fields.npy"), shapes(a.n_fields, a.seed))
    held_out = shapes(a.n_truths, a.seed + 1)
    cfg = path("problem.toml")
    with open(cfg, "w") as f:
        f.write(f"[problem]\nn = {N_PIX}\n")
        if a.train_config:
            f.write(open(a.train_config).read())
    times, rows = {}, []
    with open(path("log.txt"), "w") as log:
        train = ["train-prior", "--data", path("fields.npy"), "-o", path("prior.pt"), "--config", cfg]
        times["train-prior"] = _cli(*train, *(["--steps", a.steps] if a.steps else []), log=log)
        for i, x in enumerate(held_out):
            truth, obs, post = path(f"truth_{i}.h5"), path(f"obs_{i}.h5"), path(f"post_{i}.h5")
            with h5py.File(truth, "w") as f:
                f["x_true"] = x
            _cli("simulate", "--problem", "phase_retrieval", "--truth", truth, "--noise-relative",
                 a.noise_relative, "-o", obs, "--config", cfg, "--seed", 100 + i, log=log)
            t = _cli("solve", "--obs", obs, "--prior", path("prior.pt"), "-o", post, "--config", cfg,
                     "--seed", i, log=log)
            with h5py.File(post) as f:
                at = dict(f.attrs)
            rows.append({"truth": i, "solve_s": round(t, 1),
                         **{k: round(float(at[k]), 3) for k in ("rel_l2_error", "coverage_95", "chi2_per_dof",
                                                                 "psis_khat") if k in at}})
    total = times["train-prior"] + sum(r["solve_s"] for r in rows)
    print(json.dumps({"train_prior_s": round(times["train-prior"], 1), "total_s": round(total, 1),
                      "solves": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
