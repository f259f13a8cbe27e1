"""Reference posteriors of the benchmark cases by tempered SMC (issue 33; logic in `ganflow.bench.smc_runs`).

    # one seeded run, checkpointed at every stage in OUT.ckpt; after a crash or kill, the same line + --resume
    python scripts/smc_reference.py run --problem elliptic --run-seed 1 -o runs/smc/elliptic_r1.h5
    # independent runs against each other (and against the stored reference, when one exists)
    python scripts/smc_reference.py compare runs/smc/elliptic_r1.h5 runs/smc/elliptic_r2.h5 [--reference]
    # pool runs into the case's stored reference (beside the bundled prior; *.unconverged.h5 unless it converged)
    python scripts/smc_reference.py store runs/smc/elliptic_r*.h5 [-o PATH] [--thin K]

``--config FILE.toml`` takes an ``[smc]`` table (`ganflow.posterior.smc.SmcSettings`); ``--particles`` and
``--leapfrog`` override it. Run heavy runs under ``flock /tmp/ganflow-cpu.lock`` on the shared 2-core machine.

Measured (docs/posteriors.md, tempered SMC): phase retrieval, ``N = 1000`` MALA moves: 24-29 min, within
0.097 / 0.166 sd and 7.8 / 9.7 % of the converged NUTS reference (run seeds 1 / 2). Elliptic, the recipe below
(two seeds side by side, one core each; 32-step HMC decorrelates 2-3x faster per gradient than 4-step): after 40
final sweeps (~95 min a run) the runs' means are 0.153 sd apart, after 80 (~130 min) 0.138 sd, after 160
(~216 min) 0.105 sd, sds 6.3 %, log p(y) 180.61 / 180.58 (+- 0.15): not yet a reference (`store --thin 4` wrote
them as the bundled *.unconverged.h5, which bench reads until a converged one exists); after 240 (~303 min)
0.1004 sd judged on either run's sd, sds 5.3 %: on the bound, at the runs' Monte-Carlo error (ESS ~830 each);
after 320 (~386 min, session 16) 0.090 sd, sds 4.6 %, log p(y) 0.03 apart: converged, and `store --thin 8` wrote
the bundled elliptic_seed0.h5 (800 chains x 40 draws, 4 MB).
``max_moves`` may be raised on ``--resume``, and ``final_sweeps`` too: the checkpoint outlives a finished run,
so ``--resume`` with more sweeps extends its chains.

    printf '[smc]\nn_particles = 400\nleapfrog = 32\nstep_size = 0.05\nmax_moves = 6\n' > runs/smc/elliptic_l32_80.toml
    printf 'final_sweeps = 80\nsweep_moves = 2\n' >> runs/smc/elliptic_l32_80.toml
    for r in 3 4; do OMP_NUM_THREADS=1 nohup .venv/bin/python scripts/smc_reference.py run --problem elliptic \
        --run-seed $r --config runs/smc/elliptic_l32_80.toml -o runs/smc/elliptic_l32_r$r.h5 \
        > runs/smc/elliptic_l32_r$r.log 2>&1 & done   # later: raise final_sweeps in the toml, add --resume
    python scripts/smc_reference.py compare runs/smc/elliptic_l32_r3.h5 runs/smc/elliptic_l32_r4.h5 --reference
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch


def _settings(a):
    from ganflow.config import Config
    from ganflow.posterior.smc import SmcSettings

    s = Config.from_file(a.config, known=("smc",)).section(SmcSettings, "smc")
    over = {k: v for k, v in (("n_particles", a.particles), ("leapfrog", a.leapfrog)) if v is not None}
    s = dataclasses.replace(s, **over)
    s.validate()
    return s


def cmd_run(a) -> int:
    from ganflow.bench.smc_runs import run_case

    run = run_case(a.problem, a.seed, a.run_seed, _settings(a), a.output, resume=a.resume)
    print(f"{a.problem} run seed {a.run_seed}: log Z {run['log_evidence']:.3f} +- {run['log_evidence_se']:.3f}, "
          f"{run['n_stages']} stages, {run['n_forward_evals']} forward evaluations, {run['wall_s']:.0f} s; "
          f"wrote {a.output}")
    return 0


def cmd_compare(a) -> int:
    from ganflow.bench.smc_runs import agreement, case_target, load_run, pair_agreement
    from ganflow.bench.stored import load_reference, long_run_path, reference_path

    runs = [load_run(p) for p in a.runs]
    rows = {f"{a.runs[i]} vs {a.runs[j]}": pair_agreement(runs[i], runs[j])
            for i in range(len(runs)) for j in range(i + 1, len(runs))}
    if a.reference:
        from ganflow.bench.cases import _make_case

        problem, seed = runs[0]["problem"], int(runs[0]["seed"])
        path = reference_path(_make_case(problem, seed).prior_path, problem, seed)
        path = path if os.path.isfile(path) else long_run_path(path)
        ref = load_reference(path, case_target(problem, seed), problem, seed).pooled(100_000, 0)
        for p, r in zip(a.runs, runs, strict=True):
            rows[f"{p} vs {os.path.basename(path)}"] = agreement(r["draws"], ref)
        pooled = np.concatenate([r["draws"] for r in runs])
        rows[f"pooled runs vs {os.path.basename(path)}"] = agreement(pooled, ref)
    for name, row in rows.items():
        print(f"{name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}")
    return 0


def cmd_store(a) -> int:
    from ganflow.bench.smc_runs import store_runs

    converged, path = store_runs(a.runs, a.output, a.thin)
    print(f"wrote {path} ({'converged' if converged else 'not converged: the runs do not agree within the bounds'})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one seeded, resumable SMC run on a benchmark case")
    r.add_argument("--problem", required=True)
    r.add_argument("--seed", type=int, default=0, help="the benchmark observation [0]")
    r.add_argument("--run-seed", type=int, required=True, help="the run's own seed (independent runs differ)")
    r.add_argument("--config", default=None, help="TOML with an [smc] table")
    r.add_argument("--particles", type=int, default=None)
    r.add_argument("--leapfrog", type=int, default=None)
    r.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUTPUT.ckpt")
    r.add_argument("-o", "--output", required=True)
    c = sub.add_parser("compare", help="agreement of runs with each other (and the stored reference)")
    c.add_argument("runs", nargs="+")
    c.add_argument("--reference", action="store_true", help="also against the case's stored reference")
    s = sub.add_parser("store", help="pool runs into the case's stored reference")
    s.add_argument("runs", nargs="+")
    s.add_argument("-o", "--output", default=None)
    s.add_argument("--thin", type=int, default=1, help="store every THIN-th sweep of each chain [1]")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ganflow.errors import GanflowError

    try:
        return {"run": cmd_run, "compare": cmd_compare, "store": cmd_store}[a.cmd](a)
    except GanflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
