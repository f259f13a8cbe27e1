"""The methods measured on one case, one function each: NUTS (with the reference), the flow, short-run
Langevin (from the prior or from the flow), and the flow's overhead over a bare ``A(G(z))`` value-and-gradient."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time

import numpy as np
import torch

from ..errors import GanflowError
from .cases import _Case
from .metrics import _metrics, _samples_per_s, _timed
from .plan import EXACT_PROBLEMS, NUTS_ESS_GOAL, OVERHEAD_BATCH, TARGET_MEAN_ERR_SD, TARGET_SD_REL_ERR, BenchPlan
from .references import _exact_reference, _nuts_reference, _quadrature_reference, _Reference, _self_metrics


def _new_target(case: _Case):
    from ..posterior.target import LatentTarget

    return LatentTarget(case.G, case.op, case.obs.y, case.obs.noise_sigma)


def _nuts_record_extra(fit) -> dict:
    wall = float(fit.wall_time_s)
    ess = float(fit.attrs.get("ess_min", float("nan")))
    ess_per_s = ess / wall if wall > 0 else float("nan")
    return {
        "rhat_max": float(fit.attrs.get("rhat_max", float("nan"))),
        "ess_min": ess,
        "ess_per_s": ess_per_s,
        "time_to_ess_1000_s": NUTS_ESS_GOAL / ess_per_s if ess_per_s > 0 else None,
        "divergences": int(fit.attrs.get("divergences", 0)),
    }


def _stored_cost(attrs: dict) -> tuple[float | None, float | None]:
    """A stored reference's ESS/s and time to ESS 1,000: NUTS's cost, which the flow's cost targets are judged
    against. None for another sampler (the GPU's batched HMC): its GPU seconds are not a CPU NUTS run's, and
    comparing the flow with them would judge the hardware, so those targets are then not judged."""
    if attrs.get("sampler"):
        return None, None
    wall, ess = float(attrs["wall_s"]), float(attrs["ess_min"])
    return ess / wall, NUTS_ESS_GOAL * wall / ess


def _stored_nuts(case: _Case, path: str, plan: BenchPlan, seed: int, echo) -> tuple[dict, _Reference]:
    """The stored converged NUTS reference at ``path`` of a GAN case (`ganflow.bench.stored`): its record and the
    reference."""
    from .metrics import _field_moments
    from .stored import load_reference

    sref = load_reference(path, _new_target(case), case.name, seed)
    _adopt_observation(case, sref)
    pooled = sref.pooled(sum(d.shape[0] * d.shape[1] for d in sref.draws), seed + 4)
    half_a, half_b = sref.halves(seed + 5)
    fm, fsd = _field_moments(case.G, pooled)
    ref = _Reference(pooled.mean(0), pooled.std(0, ddof=1), fm, fsd, half_a, half_b, "stored")
    a = sref.attrs
    wall, ess = float(a["wall_s"]), float(a["ess_min"])
    ess_per_s, time_to_ess = _stored_cost(a)
    rec = {"problem": case.name, "method": "nuts", **_self_metrics(ref, len(pooled), plan, seed)}
    rec.update({
        "reference": "stored",
        "samples_per_s": None,  # a stored run has no sampler to time; its cost is ESS per second
        "reference_file": os.path.relpath(path),
        "reference_created": a.get("created"),
        "n_forward_evals": int(a["n_forward_evals"]),
        "fit_wall_s": wall,
        "rhat_max": float(a["rhat_max"]),
        "ess_min": ess,
        "ess_per_s": ess_per_s,
        "time_to_ess_1000_s": time_to_ess,
        "reference_sampler": a.get("sampler") or "NUTS",
        "divergences": int(a["divergences"]),
        "n_modes": int(a["n_modes"]),
        "mode_mass": [float(v) for v in sref.mode_mass],
        "settings": json.loads(a["nuts_settings"]),
        "reference_self_split": sref.time_split(),
        "reference_converged": sref.converged(),  # NUTS: R-hat and ESS; SMC: independent runs that agree
        "run_agreement": json.loads(a["run_agreement"]) if "run_agreement" in a else None,
    })
    if case.z_true is not None:
        rec["z_true_err_sd"] = float(np.max(np.abs(ref.mean - case.z_true) / ref.sd))
    echo(f"[{case.name}] stored {rec['reference_sampler']} reference {rec['reference_file']}: R-hat "
         f"{rec['rhat_max']:.4f}, ESS {ess:.0f}, {int(a['n_modes'])} mode(s), made in {wall:.0f} s"
         + ("" if time_to_ess else " (not NUTS: the cost targets against NUTS are not judged)"))
    return rec, ref


def _adopt_observation(case: _Case, sref) -> None:
    """The stored reference defines the observation: every method then solves for exactly the ``y`` and sigma it
    was made for, not for this machine's re-simulation of them (equal only to rounding, see `load_reference`)."""
    y = torch.as_tensor(sref.y, dtype=case.obs.y.dtype).reshape(case.obs.y.shape)
    case.obs = dataclasses.replace(case.obs, y=y, noise_sigma=float(sref.attrs["noise_sigma"]))


def _run_nuts(case: _Case, ns, plan: BenchPlan, seed: int, echo, reference_run: bool = True
              ) -> tuple[dict, _Reference]:
    """NUTS and the reference: on linear_gaussian and curved NUTS is measured against the exact answer;
    elsewhere it is the reference, read from the stored converged run where there is one unless
    ``reference_run``. Returns its record and the reference."""
    from ..posterior.nuts import run_nuts
    from .stored import long_run_path, reference_path

    name = case.name
    if not reference_run and name not in EXACT_PROBLEMS:
        path = reference_path(case.prior_path, name, seed)
        if os.path.isfile(path):
            return _stored_nuts(case, path, plan, seed, echo)  # refused (one line) when stale
        long_run = long_run_path(path)
        if os.path.isfile(long_run):  # a long run that did not converge beats the plan's short one
            echo(f"[{name}] no converged stored reference: the long unconverged run {os.path.relpath(long_run)}"
                 " is the reference (the flow's accuracy targets are not judged against it; the refiner's are, "
                 "beyond twice its own uncertainty)")
            return _stored_nuts(case, long_run, plan, seed, echo)
        echo(f"[{name}] no stored reference ({os.path.relpath(path)}): NUTS runs with the plan's settings and is "
             f"the reference, converged or not")
    echo(f"[{name}] nuts: {ns.num_chains} chains x ({ns.warmup_steps} warm-up + {ns.num_samples})")
    target = _new_target(case)
    nuts_fit, _, nuts_cpu = _timed(lambda: run_nuts(target, ns, torch.Generator().manual_seed(seed + 1)))
    nuts_z = nuts_fit.samples.double().numpy()
    if name == "linear_gaussian":
        ref = _exact_reference(case, plan, seed)
    elif name == "curved":
        ref = _quadrature_reference(case, plan, seed)
    else:
        ref = _nuts_reference(nuts_z, ns.num_chains, ns.num_samples, case.G)
    rec = {"problem": name, "method": "nuts"}
    if ref.kind == "exact":
        rec.update(_metrics(nuts_z, ref, case.G, plan, seed))
    else:
        rec.update(_self_metrics(ref, len(nuts_z), plan, seed))
    rec.update(
        {
            "n_forward_evals": int(nuts_fit.n_forward_evals),
            "fit_wall_s": float(nuts_fit.wall_time_s),
            "fit_cpu_s": nuts_cpu,
            "samples_per_s": _samples_per_s(nuts_fit, case.G, plan.n_timing, seed + 3),
            "reference": ref.kind,
            "settings": dataclasses.asdict(ns),
        }
    )
    rec.update(_nuts_record_extra(nuts_fit))
    if case.z_true is not None:
        rec["z_true_err_sd"] = float(np.max(np.abs(ref.mean - case.z_true) / ref.sd))
    echo(f"[{name}] nuts: {rec['fit_wall_s']:.1f} s, R-hat {rec['rhat_max']:.4f}, ESS {rec['ess_min']:.0f}")
    return rec, ref


def _run_flow(case: _Case, fs, ref: _Reference, plan: BenchPlan, seed: int, echo) -> tuple[dict, object, float]:
    """The flow fit, with its accuracy traced along the fit. Returns its record, the fit and its CPU seconds."""
    from ..posterior.flow import fit_flow

    name = case.name
    echo(f"[{name}] flow")
    target = _new_target(case)
    # Accuracy along the fit (the monitor's own time is excluded): the time to reach the accuracy targets is
    # what the cost target compares with NUTS, as the full fit also spends steps confirming convergence.
    trace: list[dict] = []
    clock = {"start": 0.0, "monitor": 0.0}

    def monitor(step, flow):
        t_in = time.perf_counter()
        zm = flow.sample(plan.n_draws, torch.Generator().manual_seed(seed + 9))[0].double().numpy()
        trace.append({
            "step": int(step),
            "elapsed_s": t_in - clock["start"] - clock["monitor"],
            "latent_mean_err_sd": float(np.max(np.abs(zm.mean(0) - ref.mean) / ref.sd)),
            "latent_sd_rel_err_max": float(np.max(np.abs(zm.std(0, ddof=1) / ref.sd - 1))),
        })
        clock["monitor"] += time.perf_counter() - t_in

    def run_flow():
        clock["start"] = time.perf_counter()
        return fit_flow(target, fs, torch.Generator().manual_seed(seed + 4), monitor=monitor,
                        monitor_every=plan.monitor_every)

    flow_fit, _, flow_cpu = _timed(run_flow)
    reached = [t for t in trace if t["latent_mean_err_sd"] <= TARGET_MEAN_ERR_SD
               and t["latent_sd_rel_err_max"] <= TARGET_SD_REL_ERR]
    z = flow_fit.draw(plan.n_draws, torch.Generator().manual_seed(seed + 5)).double().numpy()
    rec = {"problem": name, "method": "flow"}
    rec.update(_metrics(z, ref, case.G, plan, seed))
    rec.update(
        {
            "n_forward_evals": int(flow_fit.n_forward_evals),
            "fit_wall_s": float(flow_fit.wall_time_s) - clock["monitor"],
            "fit_cpu_s": flow_cpu,
            "samples_per_s": _samples_per_s(flow_fit, case.G, plan.n_timing, seed + 6),
            "iterations": int(flow_fit.attrs.get("iterations", 0)),
            "stopped": flow_fit.attrs.get("stopped"),
            "time_to_target_s": reached[0]["elapsed_s"] if reached else None,
            "steps_to_target": reached[0]["step"] if reached else None,
            "accuracy_trace": trace,
            "settings": dataclasses.asdict(fs),
        }
    )
    echo(
        f"[{name}] flow: {rec['fit_wall_s']:.1f} s, mean err {rec['latent_mean_err_sd']:.3f} sd, "
        f"sd err max {rec['latent_sd_rel_err_max']:.3f}"
    )
    return rec, flow_fit, flow_cpu


def _run_langevin(case: _Case, method: str, ls, init_fit, flow_cpu: float, ref: _Reference, plan: BenchPlan,
                  seed: int, echo) -> dict:
    """Short-run Langevin: ``method`` ``"langevin"`` (the settings' init, by default the Laplace frame),
    ``"langevin-prior"`` (the seed's method: identity frame, prior start) or ``"flow+langevin"`` (from the flow
    fit ``init_fit``, in the frame of its draws' moments; the refinement's cost then includes the flow's,
    ``flow_cpu`` CPU s)."""
    from ..posterior.langevin import LangevinSettings, moment_frame, run_langevin

    name = case.name
    echo(f"[{name}] {method}")
    target = _new_target(case)
    init = frame = log_q = None
    lset = ls
    if method == "langevin-prior":  # the seed's method: unadjusted, identity frame, default search range
        default = LangevinSettings()  # and at least 10 steps (the Laplace-frame rows may run fewer)
        lset = dataclasses.replace(ls, init="prior", mala=False, leapfrog=1, search_min=default.search_min,
                                   search_max=default.search_max, n_steps=max(ls.n_steps, 10))
    if init_fit is not None:
        lset = dataclasses.replace(ls, init="flow")
        frame = moment_frame(init_fit.sampler, torch.Generator().manual_seed(seed + 11))
        init, log_q = init_fit.sampler, init_fit.model.log_prob
    try:
        fit, _, cpu = _timed(functools.partial(
            run_langevin, target, lset, torch.Generator().manual_seed(seed + 7), init=init, frame=frame,
            init_log_prob=log_q))
    except GanflowError as e:
        # A method that fails on a problem (e.g. unadjusted chains leaving the operator's valid range) is a
        # result to report, not a reason to abandon the rest of the benchmark.
        echo(f"[{name}] {method}: failed: {e}")
        return _failed_record(name, method, target, e)
    rec = {"problem": name, "method": method}
    rec.update(_metrics(fit.samples.double().numpy(), ref, case.G, plan, seed))
    evals, wall = int(fit.n_forward_evals), float(fit.wall_time_s)
    if init_fit is not None:  # the refinement's cost includes the flow it starts from
        evals += int(init_fit.n_forward_evals)
        wall += float(init_fit.wall_time_s)
        cpu += flow_cpu
    rec.update(
        {
            "n_forward_evals": evals,
            "fit_wall_s": wall,
            "fit_cpu_s": cpu,
            "samples_per_s": _samples_per_s(fit, case.G, plan.n_timing, seed + 8),
            "step_size": float(fit.attrs.get("step_size", float("nan"))),
            "psis_khat": fit.attrs.get("psis_khat"),
            "start_khat": fit.attrs.get("start_khat"),
            "backed_off_chains": int(fit.attrs.get("backed_off_chains", 0)),
            "langevin_forward_evals": int(fit.n_forward_evals),
            "settings": dataclasses.asdict(lset),
        }
    )
    echo(f"[{name}] {method}: {rec['fit_wall_s']:.1f} s, mean err {rec['latent_mean_err_sd']:.3f} sd")
    return rec


def _failed_record(name: str, method: str, target, error: GanflowError) -> dict:
    rec = {"problem": name, "method": method}
    rec.update({k: float("nan") for k in ("latent_mean_err_sd", "latent_sd_rel_err_median",
                                           "latent_sd_rel_err_max", "field_mean_rel_err",
                                           "field_std_rel_err", "distance", "fit_wall_s", "samples_per_s")})
    rec.update({"n_forward_evals": int(target.n_forward_evals), "error": str(error)})
    return rec


def _flow_overhead(case: _Case, fs, plan: BenchPlan, seed: int) -> dict:
    """Seconds per flow step, from the difference of two fits of different lengths (same code path as a real
    fit, Laplace start skipped, no early stop), over the bare ``log_joint_and_grad`` of a batch."""
    from ..posterior.flow import fit_flow

    n1, n2 = plan.overhead_steps
    # at the batch the target is set for (issue 17: 16 draws), whatever the problem's fit uses
    fs = dataclasses.replace(fs, batch_size=OVERHEAD_BATCH, iw_group=math.gcd(fs.iw_group, OVERHEAD_BATCH))
    target = _new_target(case)
    walls, cpus = [], []
    for n in (n1, n2):
        s = dataclasses.replace(
            fs, init="identity", max_iter=n, min_iter=n, warmup=0, patience=10**9, progress=False
        )
        _, w, c = _timed(functools.partial(fit_flow, target, s, torch.Generator().manual_seed(seed + 9)))
        walls.append(w)
        cpus.append(c)
    step_wall = max(walls[1] - walls[0], 1e-12) / (n2 - n1)
    step_cpu = max(cpus[1] - cpus[0], 1e-12) / (n2 - n1)
    gen = torch.Generator().manual_seed(seed + 10)
    bare_w, bare_c = [], []
    target.log_joint_and_grad(torch.randn(fs.batch_size, target.latent_dim, generator=gen))  # warm-up
    for _ in range(max(3, n2 - n1)):
        z = torch.randn(fs.batch_size, target.latent_dim, generator=gen)
        _, w, c = _timed(functools.partial(target.log_joint_and_grad, z))
        bare_w.append(w)
        bare_c.append(c)
    bw, bc = statistics.median(bare_w), statistics.median(bare_c)
    return {
        "problem": case.name,
        "method": "flow_overhead",
        "batch_size": fs.batch_size,
        "flow_step_s": step_wall,
        "bare_value_and_grad_s": bw,
        "overhead_ratio": step_wall / bw,
        "flow_step_cpu_s": step_cpu,
        "bare_value_and_grad_cpu_s": bc,
        "overhead_ratio_cpu": step_cpu / bc,
        "flow_kind": fs.kind,
        "estimator": fs.estimator,
        "n_layers": fs.n_layers,
        "hidden": fs.hidden,
    }
