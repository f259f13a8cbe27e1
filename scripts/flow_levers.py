"""Measure one flow setting at a time on the benchmark's GAN observations (issue 34).

    OMP_NUM_THREADS=2 flock /tmp/ganflow-cpu.lock .venv/bin/python scripts/flow_levers.py \
        "" "iw_group=16" "temper_fraction=0.3,temper_beta0=0.05" [--json levers.jsonl]

Each positional argument is one set of ``[flow]`` overrides (``key=value`` pairs separated by commas; ``""`` is
the benchmark plan's own settings for the problem, `ganflow.bench.plan`) fitted in turn on the case ``ganflow
bench --problem P`` solves (``--problem``: phase_retrieval, the default, or elliptic; `_make_case`, seed 0, the
observation adopted from the stored converged reference: NUTS for phase retrieval, tempered SMC for elliptic).
Per setting it prints the worst latent mean error (in reference sd), the worst and median relative sd error
(2,000 draws, the bench's seeds: the same numbers as bench's flow row), the PSIS k-hat of 2,000 fresh draws with
their ELBO and importance estimate of ``log p(y)`` (to hold against the reference's own evidence: an ELBO above it
says the reference missed mass), the fit's forward evaluations and its wall time.

``--smc "key=value,..."`` also corrects each fitted flow by tempered SMC started from it (``[smc] start = "flow"``
with these overrides, `ganflow.posterior.smc`) and prints a second row for it: the same errors of its draws, the
evaluations and wall time of flow and SMC together, and its ``log p(y)``.

The MAP search is the same for every setting with the same search keys, so it is run once and its result
(modes, the generator's state after it, its evaluations and wall time) reused: the fit is then draw for draw
the one a fresh process would make, and its evaluations and wall time include the search's.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import ganflow.posterior.flow as flow_mod
from ganflow.bench.cases import _make_case
from ganflow.bench.methods import _new_target, _stored_nuts
from ganflow.bench.metrics import _metrics
from ganflow.bench.plan import bench_plan
from ganflow.bench.stored import reference_path
from ganflow.config import parse_settings
from ganflow.diagnostics import draw_flow, psis
from ganflow.posterior.flow import FlowSettings, fit_flow

# What the MAP search depends on (chunked Hessians: the chunk is max(batch_size, 32))
_SEARCH_KEYS = ("init", "map_starts", "map_iter", "map_restarts", "max_modes", "mode_min_mass", "mode_barrier",
                "weight_draws")


def parse_overrides(text: str) -> dict:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values as Python literals where they parse, else strings)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


class _SearchCache:
    """`modes.find_modes` (as `fit_flow` calls it) run once per set of search settings; later fits get its result,
    the generator state it left and its evaluations (the wall time is added by the caller)."""

    def __init__(self):
        self.saved: dict = {}
        self.last_wall = 0.0
        self.original = flow_mod.find_modes

    def __call__(self, target, s, g, evals0):
        key = tuple(getattr(s, k) for k in _SEARCH_KEYS) + (max(s.batch_size, 32),)
        if key in self.saved:
            modes, attrs, state, evals, wall = self.saved[key]
            g.set_state(state)
            target.n_forward_evals += evals
            self.last_wall = wall
            return modes, dict(attrs)
        t0, e0 = time.perf_counter(), target.n_forward_evals
        modes, attrs = self.original(target, s, g, evals0)
        self.saved[key] = (modes, dict(attrs), g.get_state(), target.n_forward_evals - e0, time.perf_counter() - t0)
        self.last_wall = 0.0  # measured inside the fit's own clock
        return modes, attrs


def measure(case, ref, plan, overrides: dict, seed: int, cache: _SearchCache, trace_every: int) -> dict:
    """One fit with ``overrides`` over the plan's settings; its errors against ``ref``, k-hat and cost."""
    table = dict(plan.flow[case.name], progress=False, **overrides)
    fs = parse_settings(FlowSettings, table, "flow")
    target = _new_target(case)
    trace = []

    def monitor(step, flow):
        zm = flow.sample(plan.n_draws, torch.Generator().manual_seed(seed + 9))[0].double().numpy()
        trace.append((int(step), round(float(np.max(np.abs(zm.mean(0) - ref.mean) / ref.sd)), 3),
                      round(float(np.max(np.abs(zm.std(0, ddof=1) / ref.sd - 1))), 3)))

    t0 = time.perf_counter()
    fit = fit_flow(target, fs, torch.Generator().manual_seed(seed + 4), monitor=monitor if trace_every else None,
                   monitor_every=max(trace_every, 1))
    wall = time.perf_counter() - t0 + cache.last_wall
    evals = int(fit.n_forward_evals)
    z = fit.draw(plan.n_draws, torch.Generator().manual_seed(seed + 5)).double().numpy()
    rec = {"overrides": overrides, **_metrics(z, ref, case.G, plan, seed)}
    zq, log_q = draw_flow(fit.model, plan.n_draws, torch.Generator().manual_seed(seed + 12))
    with torch.no_grad():
        log_p = torch.cat([target.log_joint(b) for b in zq.split(500)])
    log_w = (log_p.double() - log_q.double()).numpy()
    rec.update({
        "psis_khat": psis(log_w).khat,
        # E_q[log p(y, z) - log q(z)] <= log p(y): a flow whose ELBO exceeds the reference's evidence (SMC's
        # log p(y)) says the reference missed mass; the importance estimate log mean w is one too (k-hat permitting)
        "elbo": float(log_w.mean()),
        "log_evidence_is": float(np.logaddexp.reduce(log_w) - np.log(len(log_w))),
        "n_forward_evals": evals,
        "wall_s": wall,
        "iterations": int(fit.attrs.get("iterations", 0)),
        "stopped": fit.attrs.get("stopped"),
        "n_modes": int(fit.attrs.get("n_modes", 1)),
        "trace": trace,
        "settings": dataclasses.asdict(fs),
        "fit": fit,
    })
    return rec


def measure_smc(case, ref, plan, fit_rec: dict, fit, overrides: dict, seed: int, smc_seed: int) -> dict:
    """SMC from the fitted flow ``fit`` (``start = "flow"``, ``overrides`` over the defaults); its draws' errors
    against ``ref`` and its cost with the flow's."""
    from ganflow.posterior.smc import SmcSettings, run_smc

    s = parse_settings(SmcSettings, {"progress": False, **overrides, "start": "flow"}, "smc")
    target = _new_target(case)
    t0 = time.perf_counter()
    out = run_smc(target, s, torch.Generator().manual_seed(smc_seed), init=fit.sampler,
                  init_log_prob=fit.model.log_prob)
    wall = time.perf_counter() - t0
    z = out.samples.double().numpy()
    return {"overrides": overrides, **_metrics(z, ref, case.G, plan, seed),
            "n_forward_evals": fit_rec["n_forward_evals"] + int(out.n_forward_evals),
            "wall_s": fit_rec["wall_s"] + wall, "log_evidence": out.attrs["log_evidence"],
            "log_evidence_se": out.attrs["log_evidence_se"], "n_stages": out.attrs["n_stages"],
            "sweep_correlation": out.attrs.get("sweep_correlation"), "settings": dataclasses.asdict(s)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sets", nargs="*", default=[""], help='[flow] overrides, "key=value,key=value" ("" = the plan)')
    ap.add_argument("--problem", choices=("phase_retrieval", "elliptic"), default="phase_retrieval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace-every", type=int, default=0, help="accuracy every N steps (0: none)")
    ap.add_argument("--json", help="append one JSON record per setting to this file")
    ap.add_argument("--smc", default=None, help='also SMC from each flow, [smc] overrides "key=value,..."')
    ap.add_argument("--smc-seed", type=int, default=13, help="the SMC run's own seed [13]")
    args = ap.parse_args(argv)
    plan = bench_plan()
    case = _make_case(args.problem, args.seed)
    if isinstance(case, str):
        print(case, file=sys.stderr)
        return 1
    _, ref = _stored_nuts(case, reference_path(case.prior_path, args.problem, args.seed), plan, args.seed,
                          lambda m: print(m, file=sys.stderr))
    cache = _SearchCache()
    flow_mod.find_modes = cache
    print("overrides | mean err [sd] | sd err max / median | k-hat | ELBO / IS log p(y) | evals | wall [s] | "
          "iterations")
    for text in args.sets or [""]:
        overrides = parse_overrides(text)
        rec = measure(case, ref, plan, overrides, args.seed, cache, args.trace_every)
        fit = rec.pop("fit")
        rec["torch_threads"], rec["omp_num_threads"] = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        rec["load_average"] = os.getloadavg()
        print(f"{text or '(plan)'} | {rec['latent_mean_err_sd']:.3f} | {rec['latent_sd_rel_err_max']:.3f} / "
              f"{rec['latent_sd_rel_err_median']:.3f} | {rec['psis_khat']:.2f} | {rec['elbo']:.2f} / "
              f"{rec['log_evidence_is']:.2f} | {rec['n_forward_evals']} | "
              f"{rec['wall_s']:.1f} | {rec['iterations']} ({rec['stopped']})", flush=True)
        if rec["trace"]:
            print("  trace (step, mean err, sd err):", rec["trace"], flush=True)
        records = [rec]
        if args.smc is not None:
            sm = measure_smc(case, ref, plan, rec, fit, parse_overrides(args.smc), args.seed, args.smc_seed)
            print(f"  + smc {args.smc} | {sm['latent_mean_err_sd']:.3f} | {sm['latent_sd_rel_err_max']:.3f} / "
                  f"{sm['latent_sd_rel_err_median']:.3f} | log p(y) {sm['log_evidence']:.2f} +- "
                  f"{sm['log_evidence_se']:.2f} | {sm['n_forward_evals']} | {sm['wall_s']:.1f} | "
                  f"{sm['n_stages']} stages", flush=True)
            records.append({"smc_from_flow": True, **sm})
        if args.json:
            with open(args.json, "a") as f:
                for r in records:
                    f.write(json.dumps(r, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
