"""Make the stored NUTS reference of a GAN benchmark case (elliptic, phase retrieval): `ganflow.bench.stored`.

    python scripts/make_references.py --problem elliptic            # ~1 h on 2 cores, both cores
    python scripts/make_references.py --problem phase_retrieval

Writes ``problems/data/references/<problem>_seed<seed>.h5`` beside the bundled prior, which `ganflow bench`
reads instead of rerunning NUTS. Remake it whenever the bundled prior or the demo operator changes (bench refuses
a stale one). Exits 1 when the run did not converge (split R-hat >= 1.01 or bulk ESS < 1,000 in some mode): the
file is then written under ``<name>.unconverged.h5`` for inspection, never under the name bench reads.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", required=True, choices=("elliptic", "phase_retrieval"))
    ap.add_argument("--seed", type=int, default=0, help="the benchmark's seed (its observation)")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000, help="kept draws per chain")
    ap.add_argument("--max-tree-depth", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one core each)")
    ap.add_argument("-o", "--output", default=None, help="default: beside the bundled prior")
    a = ap.parse_args(argv)

    from ganflow.bench.cases import _make_case
    from ganflow.bench.stored import make_reference, reference_path, save_checked
    from ganflow.posterior import LatentTarget
    from ganflow.posterior.nuts import NutsSettings

    case = _make_case(a.problem, a.seed)
    if isinstance(case, str):
        print(case, file=sys.stderr)
        return 2
    target = LatentTarget(case.G, case.op, case.obs.y, case.obs.noise_sigma)
    settings = NutsSettings(num_chains=a.chains, warmup_steps=a.warmup, num_samples=a.samples,
                            max_tree_depth=a.max_tree_depth, init="laplace", jobs=a.jobs)
    t0 = time.perf_counter()
    # the benchmark's NUTS seed (`ganflow.bench.methods._run_nuts`): seed + 1
    ref = make_reference(target, a.problem, a.seed, settings, torch.Generator().manual_seed(a.seed + 1))
    path = a.output or reference_path(case.prior_path, a.problem, a.seed)
    ok, path = save_checked(ref, path)
    print(f"{'converged' if ok else 'NOT converged'}: R-hat max {ref.attrs['rhat_max']:.4f}, ESS min "
          f"{ref.attrs['ess_min']:.0f}, {ref.attrs['n_modes']} mode(s) with masses {ref.mode_mass.round(4).tolist()}, "
          f"{time.perf_counter() - t0:.0f} s; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
