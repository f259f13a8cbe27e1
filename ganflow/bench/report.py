"""The report: the header record, ``results.json`` / ``results.md``, and the merge of separate runs."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform

import numpy as np
import torch

from ..errors import GanflowError
from .plan import BenchPlan
from .targets import _targets

__all__ = ["merge_results", "write_markdown"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        import subprocess

        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=10,
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - the commit is informative only
        return ""


def _header(plan: BenchPlan, seed: int, problems) -> dict:
    """The first record: machine, versions, load average at the start, settings (the end is filled in later)."""
    from .. import __version__

    return {
        "record": "header",
        "method": "header",
        "problem": "",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ganflow_version": __version__,
        "git_commit": _git_commit(),
        "load_average_start": list(os.getloadavg()),
        "quick": plan.quick,
        "seed": seed,
        "problems": list(problems),
    }


def merge_results(parts: list[str], outdir: str) -> list[dict]:
    """Combine the ``results.json`` of several runs (e.g. one problem per process or machine) into one
    ``outdir/results.json`` / ``results.md``: the first header (load averages and notes of all parts), the
    records of every part, and the targets recomputed over all of them."""
    records: list[dict] = []
    header: dict | None = None
    notes: list[str] = []
    for part in parts:
        for r in _read_results(part):
            if r.get("method") == "header":
                header = _merge_header(header, r)
                notes += [n for n in r.get("notes", []) if n not in notes]
            elif r.get("method") != "target":
                records.append(r)
    if header is None:
        raise GanflowError("bench --merge: no header record in the given parts")
    header["notes"] = notes
    header["load_average_end"] = max(
        (p["load_average_end"] for p in header["parts"] if p.get("load_average_end")),
        default=None,
        key=lambda v: v[0],
    )
    out = [header] + records
    out += _targets(out)
    os.makedirs(outdir, exist_ok=True)
    _write(outdir, out, notes)
    return out


def _read_results(part: str) -> list[dict]:
    path = os.path.join(part, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise GanflowError(f"bench --merge: cannot read {path}: {e}") from None


def _merge_header(header: dict | None, r: dict) -> dict:
    """The merged header: the first part's, with every part's timing and load in ``parts`` and all problems."""
    if header is None:
        header = dict(r, parts=[])
        header["problems"] = []
    keys = ("date", "load_average_start", "load_average_end", "total_wall_s", "problems")
    header["parts"].append({k: r.get(k) for k in keys})
    header["problems"] += [p for p in r.get("problems", []) if p not in header["problems"]]
    return header


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _write(outdir: str, records: list[dict], notes: list[str]) -> None:
    """``outdir/results.json`` and ``results.md``, each replaced atomically."""
    for name, text in (
        ("results.json", json.dumps(_jsonable(records), indent=1)),
        ("results.md", write_markdown(records, notes)),
    ):
        path = os.path.join(outdir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)


def _f(x, fmt="{:.3g}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def write_markdown(records: list[dict], notes: list[str] = ()) -> str:
    """results.md (docs/benchmark.md): accuracy and cost per method, flow overhead, operator throughput, targets."""
    lines = _intro_lines(next((r for r in records if r.get("method") == "header"), {}))
    lines += _method_table(records)
    lines += _overhead_table([r for r in records if r.get("method") == "flow_overhead"])
    lines += _throughput_table([r for r in records if r.get("method") == "operator_throughput"])
    lines += _target_table([r for r in records if r.get("method") == "target"])
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def _intro_lines(h: dict) -> list[str]:
    """The machine and load the numbers were measured under, and what the errors are against."""
    return [
        f"Measured {h.get('date', '?')} on {h.get('cpu_model', '?')} ({h.get('cores', '?')} cores, torch "
        f"{h.get('torch_version', '?')}, {h.get('torch_threads', '?')} threads"
        f"{', --quick' if h.get('quick') else ''}); load average at start "
        f"{', '.join(_f(v, '{:.1f}') for v in h.get('load_average_start', []))}"
        + (
            f", at end {', '.join(_f(v, '{:.1f}') for v in h['load_average_end'])}"
            if h.get("load_average_end")
            else ""
        )
        + ". Wall times on a shared machine include the other users; CPU times are in results.json.",
        "",
        "Errors are against the reference (exact posterior for linear_gaussian, NUTS otherwise); the "
        "distance is the sliced 2-Wasserstein distance in reference-whitened latent space "
        "(reference-vs-reference baseline in brackets).",
        "",
    ]


def _method_table(records: list[dict]) -> list[str]:
    lines = [
        "| problem | method | mean err [sd] | sd rel. err (median / max) | field mean rel. err "
        "| field std rel. err "
        "| distance (baseline) | forward evals | fit wall [s] | field samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("method") not in ("nuts", "flow", "langevin", "langevin-prior", "flow+langevin"):
            continue
        extra = ""
        if r["method"] == "nuts":
            stored = "stored, " if r.get("reference") == "stored" else ""
            if r.get("reference_sampler", "NUTS") != "NUTS":  # another sampler's run is the reference
                stored = f"stored {r['reference_sampler'].split(' (')[0]}, "
            extra = f" ({stored}R-hat {_f(r.get('rhat_max'), '{:.3f}')}, ESS {_f(r.get('ess_min'), '{:.0f}')})"
        elif r["method"] == "flow" and "time_to_target_s" in r:
            t_acc = r["time_to_target_s"]
            extra = (f" (accuracy targets at {t_acc:.1f} s, step {r['steps_to_target']})" if t_acc is not None
                     else " (accuracy targets not reached)")
        elif "langevin" in r["method"] and r.get("step_size") is not None:
            extra = f" (s {_f(r.get('step_size'), '{:.3g}')}, PSIS k-hat {_f(r.get('psis_khat'), '{:.2f}')})"
        lines.append(
            f"| {r['problem']} | {r['method']}{extra} | {_f(r['latent_mean_err_sd'])} | "
            f"{_f(r['latent_sd_rel_err_median'])} / {_f(r['latent_sd_rel_err_max'])} | "
            f"{_f(r['field_mean_rel_err'])} | {_f(r['field_std_rel_err'])} | {_f(r['distance'])} "
            f"({_f(r.get('distance_ref_baseline'))}) | {r['n_forward_evals']} | "
            f"{_f(r['fit_wall_s'], '{:.1f}')} | "
            f"{_f(r['samples_per_s'], '{:.0f}')} |"
        )
    return lines


def _overhead_table(ov: list[dict]) -> list[str]:
    if not ov:
        return []
    lines = [
        "",
        "| problem | batch | flow step [ms] | bare A(G(z)) value+grad [ms] | ratio (wall) | ratio (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in ov:
        lines.append(
            f"| {r['problem']} | {r['batch_size']} | {_f(1e3 * r['flow_step_s'], '{:.2f}')} | "
            f"{_f(1e3 * r['bare_value_and_grad_s'], '{:.2f}')} | {_f(r['overhead_ratio'], '{:.2f}')} | "
            f"{_f(r['overhead_ratio_cpu'], '{:.2f}')} |"
        )
    return lines


def _throughput_table(tp: list[dict]) -> list[str]:
    if not tp:
        return []
    lines = [
        "",
        "| operator | n | batch | ganflow per s | numpy/scipy per s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in tp:
        base = r.get("scipy_solves_per_s", r.get("numpy_solves_per_s"))
        lines.append(
            f"| {r['problem']} ({r['unit']}) | {r['n']} | {r['batch']} | "
            f"{_f(r['ganflow_solves_per_s'], '{:.1f}')} | {_f(base, '{:.1f}')} | "
            f"{_f(r['speedup'], '{:.2f}')} |"
        )
    return lines


def _target_table(tg: list[dict]) -> list[str]:
    if not tg:
        return []
    lines = ["", "| problem | target | measured | goal | met |", "|---|---|---|---|---|"]
    for r in tg:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| {r['problem']} | {r['target']} | {_f(r['measured'])} | {r['goal']} | {met} |")
    return lines
