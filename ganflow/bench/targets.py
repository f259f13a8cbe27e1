"""The targets of issue 8 judged on a run's records: one record per target and problem (measured, goal, met)."""

from __future__ import annotations

import math

from .plan import (
    BENCH_PROBLEMS,
    EXACT_PROBLEMS,
    NUTS_ESS_GOAL,
    TARGET_FLOW_OVERHEAD,
    TARGET_LANGEVIN_MEAN_ERR_SD,
    TARGET_LANGEVIN_SD_REL_ERR,
    TARGET_MEAN_ERR_SD,
    TARGET_SAMPLES_RATIO,
    TARGET_SD_REL_ERR,
    TARGET_TIME_RATIO,
)


def _targets(records: list[dict]) -> list[dict]:
    """One record per target and problem: measured value, the goal, met or not."""
    by = {(r.get("problem"), r.get("method")): r for r in records}
    out = []
    for problem in BENCH_PROBLEMS:
        flow, nuts = by.get((problem, "flow")), by.get((problem, "nuts"))
        if flow is None:
            continue
        out += _flow_targets(problem, flow, nuts)
        if problem in EXACT_PROBLEMS and (problem, "langevin") in by:
            out += _langevin_targets(problem, by[(problem, "langevin")], flow)
        if problem not in EXACT_PROBLEMS and (problem, "flow+langevin") in by:
            out += _refiner_targets(problem, by[(problem, "flow+langevin")], flow, nuts)
        if nuts is not None:
            out += _reference_targets(problem, nuts)
        ov = by.get((problem, "flow_overhead"))
        if ov is not None:
            out.append(_target(
                problem,
                "flow step / bare A(G(z)) value+grad (wall)",
                ov["overhead_ratio"],
                f"<= {TARGET_FLOW_OVERHEAD}",
                ov["overhead_ratio"] <= TARGET_FLOW_OVERHEAD,
            ))
    for r in records:
        if r.get("method") == "operator_throughput":
            out.append(_target(
                r["problem"], f"operator n={r['n']} speed-up over numpy/scipy", r["speedup"], ">= 1", r["speedup"] >= 1
            ))
    return out


def _target(problem: str, what: str, value, goal: str, met) -> dict:
    """A target record; ``met`` is None (not judged) where the measurement is missing or NaN."""
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return {
        "problem": problem,
        "method": "target",
        "target": what,
        "measured": value,
        "goal": goal,
        "met": None if met is None or (met is not False and missing) else bool(met),
    }


def _langevin_targets(problem: str, lang: dict, flow: dict) -> list[dict]:
    """Issue 18: preconditioned short-run Langevin alone against the exact reference, at fewer forward
    evaluations than the flow's fit."""
    mean, sd = lang["latent_mean_err_sd"], lang["latent_sd_rel_err_max"]
    ratio = lang["n_forward_evals"] / flow["n_forward_evals"] if flow.get("n_forward_evals") else None
    return [
        _target(problem, "langevin latent mean error [ref sd]", mean, f"<= {TARGET_LANGEVIN_MEAN_ERR_SD}",
                mean <= TARGET_LANGEVIN_MEAN_ERR_SD),
        _target(problem, "langevin latent sd rel. error (max)", sd, f"<= {TARGET_LANGEVIN_SD_REL_ERR}",
                sd <= TARGET_LANGEVIN_SD_REL_ERR),
        _target(problem, "langevin forward evals / flow fit forward evals", ratio, "< 1",
                None if ratio is None else ratio < 1),
    ]


def _refiner_targets(problem: str, refined: dict, flow: dict, nuts: dict | None) -> list[dict]:
    """Issue 18: the refiner (flow + Langevin) no worse than the flow it starts from, in the latent mean and sd.

    Against a converged reference: judged as measured. Against a long stored run that has not converged (issue
    18: "or, until they exist, against a long NUTS run in the same mode"; elliptic's is batched HMC started in
    that mode): the reference is itself off by some ``d``, which moves both errors by at most ``d`` (triangle
    inequality, coordinate by coordinate), so only a
    difference beyond ``2 d`` is judged: met where the refined error is below the flow's by more, missed where
    above by more, else not judged. ``d`` is the run's disagreement with itself (`StoredReference.time_split`:
    its halves in time, or an SMC reference's runs against each other), a lower bound of its error. Against
    anything else (the plan's short NUTS run): not judged."""
    converged = _reference_converged(nuts)
    split = (nuts or {}).get("reference_self_split") if not converged else None
    out = []
    for key, what, d_key in (("latent_mean_err_sd", "mean error [ref sd]", "mean_sd"),
                             ("latent_sd_rel_err_max", "sd rel. error (max)", "sd_rel")):
        value, flow_value = refined.get(key), flow[key]
        measured = value is not None and not math.isnan(value)
        if converged:
            ok, goal, tag = measured and value <= flow_value, f"<= {flow_value:.3f}", ""
        elif split is not None and measured:
            margin = 2 * split[d_key]
            ok = True if value <= flow_value - margin else False if value > flow_value + margin else None
            goal = f"<= {flow_value:.3f} (judged beyond +-{margin:.3f})"
            tag = _unconverged_tag(nuts, "long unconverged reference")
        else:
            ok, goal, tag = None, f"<= {flow_value:.3f}", ""
        out.append(_target(problem, f"refiner latent {what} vs the flow's{tag}", value, goal, ok))
    return out


def _unconverged_tag(nuts: dict, what: str) -> str:
    """How a target names an unconverged reference: an SMC one by its runs' disagreement, others by R-hat."""
    if nuts.get("reference_sampler") == "smc":
        return " (SMC reference: its independent runs disagree)"
    return f" ({what}, R-hat {nuts['rhat_max']:.2f})"


def _reference_converged(nuts: dict | None) -> bool:
    """Whether the reference converged: a stored one says so itself (`StoredReference.converged`: R-hat and ESS
    for NUTS, independent runs that agree for SMC); a NUTS run of the bench's own by its R-hat."""
    if nuts is None:
        return False
    if nuts.get("reference_converged") is not None:
        return bool(nuts["reference_converged"])
    return nuts.get("rhat_max", math.inf) < 1.01


def _reference_targets(problem: str, nuts: dict) -> list[dict]:
    """The reference's own convergence: R-hat and (stored) bulk ESS for NUTS; for a tempered-SMC reference the
    agreement of its independent runs (R-hat over short particle chains reads high by construction)."""
    if nuts.get("reference_sampler") == "smc":
        rows = list((nuts.get("run_agreement") or {}).values())
        worst = max((r["mean_sd"] for r in rows), default=math.nan)
        return [_target(problem, "SMC reference: independent runs agree (largest mean difference [sd]; sds 10 %, "
                        "log p(y) 0.5)", worst, "< 0.1", _reference_converged(nuts))]
    out = [_target(problem, "NUTS reference R-hat", nuts["rhat_max"], "< 1.01", nuts["rhat_max"] < 1.01)]
    if nuts.get("reference") == "stored":
        out.append(_target(problem, "NUTS reference bulk ESS", nuts["ess_min"], f">= {NUTS_ESS_GOAL:g}",
                           nuts["ess_min"] >= NUTS_ESS_GOAL))
    return out


def _flow_targets(problem: str, flow: dict, nuts: dict | None) -> list[dict]:
    """The flow's accuracy against the reference, then its cost against NUTS (where NUTS ran)."""
    # Against a NUTS reference whose chains disagree (R-hat >= 1.01) an accuracy number measures the
    # reference as much as the flow: it is reported, but neither met nor missed.
    unconverged = (nuts is not None and nuts.get("reference") in ("nuts", "stored")
                   and not _reference_converged(nuts))
    sampler = "NUTS" if nuts is None or nuts.get("reference_sampler", "NUTS") == "NUTS" else "long-run"
    tag = _unconverged_tag(nuts, f"{sampler} reference not converged") if unconverged else ""

    def judged(ok):
        return None if unconverged else ok

    out = [
        _target(problem, "flow latent mean error [ref sd]" + tag, flow["latent_mean_err_sd"],
                f"<= {TARGET_MEAN_ERR_SD}", judged(flow["latent_mean_err_sd"] <= TARGET_MEAN_ERR_SD)),
        _target(problem, "flow latent sd rel. error (max)" + tag, flow["latent_sd_rel_err_max"],
                f"<= {TARGET_SD_REL_ERR}", judged(flow["latent_sd_rel_err_max"] <= TARGET_SD_REL_ERR)),
    ]
    if nuts is None or not nuts.get("time_to_ess_1000_s"):
        return out
    t_nuts = nuts["time_to_ess_1000_s"]
    ratio = flow["fit_wall_s"] / t_nuts
    out.append(_target(problem, "flow fit time (to convergence) / NUTS time to ESS 1000" + tag, ratio,
                       f"<= {TARGET_TIME_RATIO}", judged(ratio <= TARGET_TIME_RATIO)))
    t_acc = flow.get("time_to_target_s")
    ratio = t_acc / t_nuts if t_acc is not None else None
    out.append(_target(
        problem,
        "flow time to the accuracy targets / NUTS time to ESS 1000"
        + (tag or ("" if t_acc is not None else " (accuracy not reached)")),
        ratio,
        f"<= {TARGET_TIME_RATIO}",
        judged(False if ratio is None else ratio <= TARGET_TIME_RATIO),
    ))
    ratio = flow["samples_per_s"] / nuts["ess_per_s"]
    out.append(_target(problem, "flow field samples/s / NUTS ESS/s" + tag, ratio, f">= {TARGET_SAMPLES_RATIO:g}",
                       judged(ratio >= TARGET_SAMPLES_RATIO)))
    return out
