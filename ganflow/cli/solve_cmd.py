"""``ganflow solve``: stage two, the posterior of the field given obs.h5 and a prior."""

import os

import click
import numpy as np

from ..config import Config
from ..errors import GanflowError
from ..io import check_output_path, is_obs_stack
from ..solve import CHECKPOINTED, METHODS, SOLVE_TABLES, SolveSettings, resolve_amortized, start_flow_path
from ..solve import solve as solve_posterior
from .common import config_option, force_option, kw_option, parse_kv, seed_option


@click.command("solve")
@click.option("--obs", "obs_path", required=True, type=click.Path(dir_okay=False), help="Observation file obs.h5.")
@click.option("--prior", default=None,
              help="Prior checkpoint (prior.pt) or generator spec (with --amortized: default the one it records).")
@click.option("--problem", default=None,
              help="Problem spec; default: the one recorded in obs.h5 when that is a registered problem (a recorded "
                   "module:attr or file.py:attr is run only when given here: the trust rule).")
@click.option("--operator", default=None, help="Operator spec (module:attr or file.py:attr).")
@click.option("--method", type=click.Choice(METHODS), default=None, help="Posterior method [default: flow].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output posterior.h5.")
@kw_option()
@config_option()
@seed_option()
@force_option()
@click.option("--quiet", is_flag=True, help="No progress bar.")
# --- issue 10: stacks of observations (ganflow.multi), --device ---
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: the flow fit (or SMC) checkpointed in <output>.ckpt; for a stacked "
                   "obs.h5, keep the observations already finished (<output>.parts/) and solve the rest.")
@click.option("--max-obs", type=int, default=None,
              help="Stacked obs.h5: stop after this many more observations (continue with --resume).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the generator and operator run [default: [solve] device, cpu].")
# --- end issue 10 ---
@click.option("--representation-error", "repr_error", type=click.Choice(["on", "off"]), default=None,
              help="Carry the prior's representation error (x = G(z) + r) into the likelihood and the field draws "
                   "when its checkpoint has the statistics [default: [solve] representation_error, on].")
@click.option("--recalibrate", "recalibrate", type=click.Choice(["auto", "on", "off"]), default=None,
              help="Scale the field intervals by the prior's conformal recalibration (ganflow calibrate "
                   "--recalibrate); auto: when it was learned for this problem and operator [default: [solve] "
                   "recalibrate, auto].")
# --- issue 19: the amortised posterior ---
@click.option("--amortized", "amortized", type=click.Path(dir_okay=False), default=None,
              help="Use the amortised posterior q(z|y) of this checkpoint (ganflow train-posterior) instead of a "
                   "fit; it must match the prior, operator and noise level.")
@click.option("--refine", is_flag=True,
              help="With --amortized: fine-tune q(.|y) on each observation by the flow fit ([flow] settings).")
def solve(obs_path, prior, problem, operator, method, output, kw, config_path, seed, force, quiet, resume, max_obs,
          device, repr_error, recalibrate, amortized, refine):
    """Fit the latent posterior and write posterior statistics to posterior.h5.

    A stacked obs.h5 (ganflow simulate --n-obs M) is solved observation by observation into one file with a
    group per observation; under torchrun the observations are shared among the processes (docs/scaling.md).
    """
    cfg = Config.from_file(config_path, known=SOLVE_TABLES)
    if kw:
        cfg.data.setdefault("operator", {}).update(parse_kv(kw))
    # --- issue 10 ---
    if device is not None:
        cfg.data["solve"] = {**cfg.data.get("solve", {}), "device": device}
    if repr_error is not None:
        cfg.data["solve"] = {**cfg.data.get("solve", {}), "representation_error": repr_error}
    if recalibrate is not None:
        cfg.data["solve"] = {**cfg.data.get("solve", {}), "recalibrate": recalibrate}
    if amortized is not None or refine:  # issue 19: loaded once, also for a stack
        amortized, prior, method = resolve_amortized(amortized, refine, prior, method)
    if is_obs_stack(obs_path):
        return _solve_stack(obs_path, prior, problem, operator, method, output, cfg, seed, force, quiet, resume,
                            max_obs, amortized, refine)
    if max_obs is not None:
        raise GanflowError(f"--max-obs applies to stacked observation files; {obs_path} holds one")
    # --- end issue 10 ---
    check_output_path(output, force, "posterior")
    # issue 9: the flow fit (issue 33: and SMC) checkpoints beside the output; the other methods take no checkpoint
    flow = (method or cfg.section(SolveSettings, "solve").method) in CHECKPOINTED or refine
    checkpoint = _fit_checkpoint(output, resume, force) if flow else None
    result = solve_posterior(obs_path, prior, operator=operator, problem=problem, method=method, config=cfg,
                             seed=seed, progress=not quiet, checkpoint_path=checkpoint, resume=resume,
                             amortized=amortized, refine=refine)
    result.save(output, force=force)
    for path in (checkpoint, start_flow_path(checkpoint)) if checkpoint is not None else ():
        if os.path.exists(path):  # the result is safe: the fit state (and SMC's start flow) is not needed
            os.remove(path)
    a = result.attrs
    line = (f"{result.method}: {a['n_forward_evals']} forward evaluations, fit {a['fit_wall_time_s']:.1f} s, "
            f"total {a['wall_time_s']:.1f} s")
    m = result.metrics
    if m:
        line += ", " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())
    click.echo(line)
    if int(a.get("n_modes", 1)) > 1:  # issue 21: a mixture of flows, one per posterior mode
        click.echo(f"{a['n_modes']} posterior modes, weights " + ", ".join(f"{w:.3f}" for w in a["mode_weights"]))
    click.echo(f"wrote {output}")


# --- issue 10: stacks of observations ---
def _solve_stack(obs_path, prior, problem, operator, method, output, cfg, seed, force, quiet, resume, max_obs,
                 amortized=None, refine=False):
    from ..multi import solve_stack

    def report(i, res):
        m = ", ".join(f"{k} {v:.4g}" for k, v in res.metrics.items())
        click.echo(f"obs {i}: {res.attrs['wall_time_s']:.1f} s" + (f", {m}" if m else ""), err=True)

    r = solve_stack(obs_path, prior, output, operator=operator, problem=problem, method=method, config=cfg,
                    seed=seed, resume=resume, force=force, max_obs=max_obs, progress=not quiet, on_done=report,
                    amortized=amortized, refine=refine)
    if r.rank != 0:  # torchrun: rank 0 speaks for the run
        return
    if r.skipped:
        click.echo(f"skipped {len(r.skipped)} finished observation(s)")
    if r.merged:
        line = f"{r.n_obs} observations in {r.wall_time_s:.1f} s on {r.world_size} process(es)"
        for key in ("rel_l2_error", "coverage_95"):
            if key in r.summary:
                line += f", mean {key} {float(np.nanmean(r.summary[key])):.4g}"
        click.echo(line)
        click.echo(f"wrote {output}")
    else:
        click.echo(f"{r.n_obs - len(r.remaining)} of {r.n_obs} observations finished; "
                   f"continue with --resume (parts in {output}.parts)")
# --- end issue 10 ---


def _fit_checkpoint(output: str, resume: bool, force: bool) -> str:
    """issue 9: the flow fit's checkpoint beside the output; a stale one is continued (--resume) or, with
    --force, started over, never silently replaced."""
    checkpoint = os.fspath(output) + ".ckpt"
    if resume and not os.path.exists(checkpoint):
        raise GanflowError(f"--resume: no checkpoint of an interrupted fit at {checkpoint}")
    if not resume and os.path.exists(checkpoint) and not force:
        raise GanflowError(f"{checkpoint} holds an interrupted fit: continue it with --resume, or start over with "
                           "--force")
    return checkpoint
