"""Forward + adjoint solves per second of the elliptic operator (batch of 64 at n = 32 and 64 by default).

One "forward + adjoint solve" is one sample's factorisation, forward solve and adjoint solve (a full VJP).
Usage: python scripts/bench_elliptic.py [--batch 64] [--sizes 32 64] [--threads 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from problems.elliptic import EllipticProblem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread-pool sizes to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'n':>4s} {'threads':>7s} {'batch':>5s} {'forward s':>10s} {'fwd+adj s':>10s} {'fwd+adj solves/s':>17s}")
    for n in args.sizes:
        problem = EllipticProblem(n=n)
        op = problem.make_operator()
        m = problem.sample_fields(args.batch, torch.Generator().manual_seed(args.seed)).double()
        w = torch.randn(args.batch, *op.obs_shape, generator=torch.Generator().manual_seed(args.seed + 1),
                        dtype=torch.float64)
        for threads in args.threads:
            torch.set_num_threads(threads)  # the solver's thread pool follows torch's thread count
            fwd, both = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with torch.no_grad():
                    op(m)
                fwd.append(time.perf_counter() - t0)
                mg = m.clone().requires_grad_(True)
                t0 = time.perf_counter()
                torch.autograd.grad((w * op(mg)).sum(), mg)
                both.append(time.perf_counter() - t0)
            f, b = min(fwd), min(both)
            print(f"{n:4d} {threads:7d} {args.batch:5d} {f:10.3f} {b:10.3f} {args.batch / b:17.1f}")


if __name__ == "__main__":
    main()
