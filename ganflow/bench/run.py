"""Running the benchmark: every problem's methods in turn, then the operator throughput, then the report; in
one process (`run_bench`) or with the problems in parallel processes (`run_bench_parallel`)."""

from __future__ import annotations

import os
import sys
import time

import torch

from ..errors import GanflowError
from .cases import _Case, _make_case
from .methods import _flow_overhead, _run_flow, _run_langevin, _run_nuts
from .plan import BENCH_PROBLEMS, BenchPlan, bench_plan
from .report import _header, _write, merge_results
from .targets import _targets
from .throughput import _throughput

__all__ = ["run_bench", "run_bench_parallel"]

_OVERRIDE_TABLES = ("flow", "langevin", "nuts")


def run_bench(
    outdir: str,
    problems=None,
    quick: bool = False,
    seed: int = 0,
    throughput: bool = True,
    overrides: dict | None = None,
    echo=print,
    reference_run: bool = False,
) -> list[dict]:
    """Run the benchmark; write ``outdir/results.json`` and ``outdir/results.md``; return the records.

    ``overrides``: tables ``flow`` / ``langevin`` / ``nuts`` merged over every problem's settings.
    ``reference_run``: run NUTS on the GAN problems as the reference instead of reading the stored converged
    reference (`ganflow.bench.stored`); ``--quick`` always runs its short NUTS.
    """
    problems = list(BENCH_PROBLEMS if problems is None else problems)  # [] = the throughput part only
    overrides = overrides or {}
    _check_request(problems, overrides)
    plan = bench_plan(quick)
    os.makedirs(outdir, exist_ok=True)
    t0 = time.perf_counter()
    header = _header(plan, seed, problems)
    records: list[dict] = [header]
    notes = []
    # The first torch.optim optimiser of a process imports torch._dynamo (~3 s here): a one-off import cost,
    # not a cost of any fit, so it is paid before the first timed method.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    for name in problems:
        case = _make_case(name, seed)
        if isinstance(case, str):
            echo(f"[{name}] {case}")
            notes.append(case)
            continue
        if case.note:
            notes.append(f"{name}: {case.note}")
        records.extend(_bench_problem(case, plan, seed, overrides, echo, reference_run or quick))
        _write(outdir, records, notes)  # partial results survive an interrupted run
    if throughput:
        records.extend(_throughput(plan, seed, echo))
    records.extend(_targets(records))
    header["load_average_end"] = list(os.getloadavg())
    header["total_wall_s"] = time.perf_counter() - t0
    header["notes"] = notes
    _write(outdir, records, notes)
    return records


def _check_request(problems: list[str], overrides: dict) -> None:
    unknown = [p for p in problems if p not in BENCH_PROBLEMS]
    if unknown:
        raise GanflowError(
            f"bench: unknown problem(s) {', '.join(unknown)} (choose from {', '.join(BENCH_PROBLEMS)})"
        )
    bad = sorted(set(overrides) - set(_OVERRIDE_TABLES))
    if bad:
        raise GanflowError(f"bench: unknown config table(s) {', '.join(bad)} (known: flow, langevin, nuts)")


def _method_settings(name: str, plan: BenchPlan, overrides: dict):
    """FlowSettings, LangevinSettings, NutsSettings and the refiner's LangevinSettings of problem ``name``: the
    plan's, with ``overrides`` over them (a ``[langevin]`` override applies to the refiner too)."""
    from ..config import parse_settings
    from ..posterior.flow import FlowSettings
    from ..posterior.langevin import LangevinSettings
    from ..posterior.nuts import NutsSettings

    tables = (
        (FlowSettings, dict(plan.flow[name], progress=False, **overrides.get("flow", {}))),
        (LangevinSettings, dict(plan.langevin[name], **overrides.get("langevin", {}))),
        (NutsSettings, dict(plan.nuts[name], **overrides.get("nuts", {}))),
        (LangevinSettings, {**plan.langevin[name], **plan.refiner.get(name, {}), **overrides.get("langevin", {})}),
    )
    return tuple(parse_settings(cls, dict(table), cls.__name__) for cls, table in tables)


def _bench_problem(case: _Case, plan: BenchPlan, seed: int, overrides: dict, echo,
                   reference_run: bool = True) -> list[dict]:
    """Every method on one case: NUTS (and the reference), the flow, Langevin from the prior and from the
    flow, the flow overhead; one record each, labelled with the prior used."""
    fs, ls, ns, rs = _method_settings(case.name, plan, overrides)
    nuts_rec, ref = _run_nuts(case, ns, plan, seed, echo, reference_run)
    flow_rec, flow_fit, flow_cpu = _run_flow(case, fs, ref, plan, seed, echo)
    records = [nuts_rec, flow_rec]
    for method, init_fit, settings in (("langevin", None, ls), ("langevin-prior", None, ls),
                                       ("flow+langevin", flow_fit, rs)):
        records.append(_run_langevin(case, method, settings, init_fit, flow_cpu, ref, plan, seed, echo))
    # one training step against a bare A(G(z)) value-and-gradient on the same batch
    records.append(_flow_overhead(case, fs, plan, seed))
    for r in records:
        if case.note:
            r["note"] = case.note
        r["prior"] = case.prior_path
    return records


def run_bench_parallel(outdir: str, problems=None, jobs: int = 2, quick: bool = False, seed: int = 0,
                       throughput: bool = True, config_path: str | None = None, threads: int | None = None,
                       echo=print, reference_run: bool = False) -> list[dict]:
    """`run_bench` with the problems in up to ``jobs`` concurrent processes (``ganflow bench --problem P``, each
    with ``threads`` torch threads, default ``cores // jobs``), then the operator throughput in this process
    (alone on the machine, as its timings need), then `merge_results` of the parts into ``outdir``.

    The methods within a problem are sequential (NUTS is), so one problem per core is how the default run fits
    its time budget on a small machine. Parts and their logs are in ``outdir/parts/``.
    """
    problems = list(BENCH_PROBLEMS if problems is None else problems)
    if jobs < 1:
        raise GanflowError(f"--jobs must be >= 1, got {jobs}")
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    parts_dir = os.path.join(outdir, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    pending, running, parts = list(problems), [], []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            running.append(_start_part(name, parts_dir, quick, seed, config_path, threads, reference_run))
            echo(f"[{name}] started ({threads} thread(s); log {running[-1][2].name})")
        time.sleep(0.5)
        for item in list(running):
            name, part, log, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                _stop_parts(running)
                raise GanflowError(f"bench: the {name} part failed (exit {proc.returncode}); see {log.name}")
            parts.append(part)
            echo(f"[{name}] done")
    if throughput:
        part = os.path.join(parts_dir, "throughput")
        run_bench(part, problems=[], quick=quick, seed=seed, throughput=True, echo=echo)
        parts.append(part)
    return merge_results(parts, outdir)


def _start_part(name: str, parts_dir: str, quick: bool, seed: int, config_path, threads: int,
                reference_run: bool = False):
    """``ganflow bench --problem name`` in a child process, its output in ``parts_dir/name.log``:
    ``(name, part directory, log file, process)``."""
    import subprocess

    part = os.path.join(parts_dir, name)
    cmd = [sys.executable, "-m", "ganflow", "bench", "--problem", name, "--no-throughput", "--threads",
           str(threads), "--seed", str(seed), "-o", part] + (["--quick"] if quick else []) + (
        ["--config", str(config_path)] if config_path else []) + (["--reference-run"] if reference_run else [])
    log = open(os.path.join(parts_dir, f"{name}.log"), "w")  # noqa: SIM115 - closed when it ends
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return name, part, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop_parts(running: list) -> None:
    """Terminate the parts still running (another part failed)."""
    for _, _, log, proc in running:
        proc.terminate()
        proc.wait()
        log.close()
