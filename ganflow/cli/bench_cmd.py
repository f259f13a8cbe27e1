"""``ganflow bench``: the benchmark suite (posterior accuracy and cost, operator throughput)."""

import click

from ..bench import BENCH_PROBLEMS, run_bench
from .common import config_option, seed_option


@click.command("bench")
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for results.json and results.md.",
)
@click.option(
    "--quick", is_flag=True, help="Tiny settings (short NUTS, few flow iterations, small n): minutes."
)
@click.option(
    "--problem",
    "problems",
    multiple=True,
    type=click.Choice(BENCH_PROBLEMS),
    help="Problem to benchmark (repeatable; default: all).",
)
@click.option("--no-throughput", is_flag=True, help="Skip the operator-throughput comparison.")
@click.option(
    "--merge",
    "merge",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="Instead of running: combine the results of earlier runs (repeatable) into -o.",
)
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice; "
              "with --jobs, cores / jobs per process).")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Run the problems in this many parallel processes (one per core is how the default run "
              "fits ~20 min on 2 cores), then the throughput part alone, and merge.")
@click.option("--amortized", "amortized", is_flag=True,
              help="Instead: the amortised-posterior records on linear_gaussian and curved (1,000 observations "
                   "each; --quick: 100 and 300 training steps), written to amortized.json (docs/amortized.md).")
@click.option("--reference-run", is_flag=True,
              help="Run NUTS as the reference on elliptic and phase_retrieval instead of reading the stored "
                   "converged references (problems/data/references/, made by scripts/make_references.py).")
@click.option("--quiet", is_flag=True, help="No progress report (the result lines stay).")
@seed_option()
@config_option()
def bench(output_dir, quick, problems, no_throughput, merge, threads, jobs, seed, config_path, amortized,
          reference_run, quiet):
    """Benchmark the posterior methods against exact / NUTS references and the operators against numpy/scipy.

    A config file may hold [flow], [langevin] and [nuts] tables, merged over every problem's settings.
    --merge combines runs made separately (one problem per process or machine) into one table.
    """
    import os

    import torch

    from ..bench import merge_results
    from ..config import Config
    from ..errors import GanflowError

    if merge:
        records = merge_results(list(merge), output_dir)
        missed = [r for r in records if r.get("method") == "target" and r.get("met") is False]
        click.echo(f"merged {len(merge)} run(s) into {output_dir} ({len(missed)} target(s) missed)")
        return

    if quiet:  # ganflow.progress reads it: every sampler here and in the --jobs processes stays silent
        os.environ["GANFLOW_PROGRESS"] = "off"
    if threads is not None:
        if threads < 1:
            raise GanflowError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if amortized:  # issue 19
        return _bench_amortized(output_dir, quick, seed)
    overrides = Config.from_file(config_path).data if config_path else {}
    if jobs != 1:
        from ..bench import run_bench_parallel

        records = run_bench_parallel(output_dir, problems=problems or None, jobs=jobs, quick=quick, seed=seed,
                                     throughput=not no_throughput, config_path=config_path, threads=threads,
                                     echo=click.echo, reference_run=reference_run)
        missed = [r for r in records if r.get("method") == "target" and r.get("met") is False]
        click.echo(f"wrote {output_dir}/results.json and results.md ({len(missed)} target(s) missed)")
        return
    records = run_bench(
        output_dir,
        problems=problems or None,
        quick=quick,
        seed=seed,
        throughput=not no_throughput,
        overrides=overrides,
        echo=click.echo,
        reference_run=reference_run,
    )
    missed = [r for r in records if r.get("method") == "target" and r.get("met") is False]
    click.echo(f"wrote {output_dir}/results.json and results.md ({len(missed)} target(s) missed)")


def _bench_amortized(output_dir: str, quick: bool, seed: int) -> None:
    import json
    import os

    from ..bench.amortized import bench_amortized
    from ..io import atomic_path

    rec = bench_amortized(n_obs=100 if quick else 1000, n_fits=1 if quick else 3, curved_fits=1 if quick else 5,
                          quick=quick, seed=seed, echo=click.echo)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "amortized.json")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    for r in (rec, rec["curved"]):
        click.echo(_amortized_line(r))
    click.echo(f"wrote {path}")


def _amortized_line(r: dict) -> str:
    """One problem's record in a line: accuracy, coverage, cost, break-even, refine steps, the targets missed and
    those it cannot judge (the refine ratio when the Laplace start is already exact)."""
    ratio = r["refine_step_ratio"]
    missed = [k for k, met in r["targets_met"].items() if met is False]
    unjudged = [k for k, met in r["targets_met"].items() if met is None]
    return (f"amortized {r['problem']}: mean error {r['latent_mean_err_sd']:.3f} sd, sd error "
            f"{r['latent_sd_rel_err']:.3f}, SBC coverage {r['sbc_coverage_95']:.3f}, "
            f"{r['amortized_s_per_obs'] * 1e3:.1f} ms/obs vs flow fit {r['laplace_fit_wall_s']:.1f} s, training "
            f"{r['train_wall_s']:.0f} s, break-even {r['break_even_n_obs']:.1f} observations; steps to the flow "
            f"targets from q(.|y) {r['amortized_steps_to_targets']} vs Laplace {r['laplace_steps_to_targets']} "
            f"(ratio {'n/a' if ratio is None else f'{ratio:.2f}'}); targets missed: {', '.join(missed) or 'none'}"
            + (f" (not judged: {', '.join(unjudged)})" if unjudged else ""))
