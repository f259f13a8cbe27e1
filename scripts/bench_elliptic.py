"""Forward + adjoint solves per second of the elliptic operator (batch of 64 at n = 32 and 64 by default).

One "forward + adjoint solve" is one sample's factorisation, forward solve and adjoint solve (a full VJP).
Solves run one after another (see FiniteVolumeSolver.solve for why no thread pool). Wall time is the best of
``--repeats``; CPU time (all threads of the process) is shown beside it because on a shared machine the wall
time mostly measures the other users: solves per CPU-second is the solver's own cost.
Usage: python scripts/bench_elliptic.py [--batch 64] [--sizes 32 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from ganflow.problems.elliptic import EllipticProblem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"{'n':>4s} {'batch':>5s} {'forward s':>10s} {'fwd+adj s':>10s} {'fwd+adj solves/s':>17s}"
        f" {'cpu s':>7s} {'solves/cpu-s':>13s}"
    )
    for n in args.sizes:
        problem = EllipticProblem(n=n)
        op = problem.make_operator()
        m = problem.sample_fields(args.batch, torch.Generator().manual_seed(args.seed)).double()
        w = torch.randn(
            args.batch,
            *op.obs_shape,
            generator=torch.Generator().manual_seed(args.seed + 1),
            dtype=torch.float64,
        )
        fwd, both, cpu = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                op(m)
            fwd.append(time.perf_counter() - t0)
            mg = m.clone().requires_grad_(True)
            t0, c0 = time.perf_counter(), time.process_time()
            torch.autograd.grad((w * op(mg)).sum(), mg)
            both.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        f, b, c = min(fwd), min(both), min(cpu)
        print(
            f"{n:4d} {args.batch:5d} {f:10.3f} {b:10.3f} {args.batch / b:17.1f}"
            f" {c:7.3f} {args.batch / c:13.1f}"
        )


if __name__ == "__main__":
    main()
