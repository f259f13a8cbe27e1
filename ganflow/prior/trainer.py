"""Stage one: a WGAN-GP prior trained on example fields, resumable bit-exactly.

Objective (Gulrajani et al., "Improved training of Wasserstein GANs", 2017), on normalised fields
``u = (x - mu) / s`` (``mu`` and ``s`` the scalar mean and std of all training-split values):

    critic:     min_D  E_z[D(g(z))] - E_u[D(u)] + lambda E_uhat[(||grad D(uhat)||_2 - 1)^2],
                uhat = eps u + (1 - eps) g(z),  eps ~ U[0, 1] per sample
    generator:  min_g  -E_z[D(g(z))],   z ~ N(0, I_k)

with ``n_critic`` critic steps per generator step, Adam(lr, betas=(0, 0.9)). The critic's Wasserstein estimate
``E[D(u)] - E[D(g(z))]`` is shown on the progress bar. The prior is the exponential moving average (EMA) of
the generator weights, ``theta_ema <- d theta_ema + (1 - d) theta`` with
``d = min(ema_decay, (1 + t) / (10 + t))`` at generator step ``t`` (the warm-up keeps short runs from being
dominated by the initial weights).

Normalisation choice: one scalar mean and one scalar std per dataset. They put the values on the unit scale
the initialisation and learning rates expect, while every spatial structure (the mean map, where the field
varies more or less) stays for the generator to learn; per-pixel statistics would divide by near-zero stds at
pinned boundaries and would hand the generator a mean map it never had to learn.

Randomness: two private ``torch.Generator`` objects, ``noise`` (latents, penalty mixing weights; on the
training device) and ``data`` (batch indices, CPU), plus split/initialisation streams derived from the seed.
All their states are stored in the checkpoint, so an interrupted run resumed with ``resume=True`` ends with
exactly the same weights as an uninterrupted one (on CPU).

Data parallel (``torchrun --nproc_per_node N -m ganflow train-prior ...``, see docs/scaling.md):
``batch_size`` is the global batch; each of the N ranks draws ``batch_size / N`` fields per step from its own
disjoint shard of the training split (rows ``rank, rank + N, ...``) with its own noise and batch-order streams
(rank 0's are the single-process streams), computes the losses and the gradient penalty on its local
samples, and the gradients are averaged by one all-reduce after each ``backward()``
(`ganflow.distributed.all_reduce_grads`; explicit rather than DDP because of the penalty's double backward).
Every rank then takes the same Adam step, so the weights and the EMA stay identical (checked at the end).
Only rank 0 writes checkpoints, the report and the progress bar; the checkpoint holds rank 0's RNG states.
Resuming with another number of processes is allowed and reproducible, but not bit-identical to an
uninterrupted run. One process runs exactly the code it ran before data parallelism existed.

Example:
    >>> s = TrainSettings(steps=2, batch_size=8)
    >>> s.validate() is None
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import distributed
from ..data import FieldData, load_fields
from ..errors import GanflowError
from ..io import check_output_path
from .checkpoint import generator_from_checkpoint, load_checkpoint, save_checkpoint
from .nets import PriorGenerator, build_critic, build_generator_net, default_arch, set_clamp
from .run_state import make_checkpoint, restore_resumed, substream
from .settings import (
    RESUME_OVERRIDES,
    TrainSettings,
    anneal_factor,
    clamp_level,
    in_annealing,
    load_train_settings,
    settings_mismatch,
)
from .wgan_gp import all_finite, ema_update, gradient_penalty, restore_snapshot, snapshot

__all__ = ["TrainSettings", "TrainResult", "train_prior", "load_train_settings", "split_indices"]

ANNOUNCE_S = 10.0  # seconds of training after which the expected total time is printed (the rate has settled)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random split of ``range(n)`` into (train, val) index tensors; ``val`` gets ``round(f n)``."""
    n_val = int(round(val_fraction * n))
    if n - n_val < 1:
        raise GanflowError(f"no training fields left after holding out {n_val} of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(substream(seed, 1)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@dataclass
class TrainResult:
    """What `train_prior` returns: the checkpoint path, the EMA generator, and training statistics."""

    path: str
    generator: PriorGenerator
    step: int
    steps_run: int
    wall_time_s: float
    steps_per_s: float
    wasserstein: float
    report: dict | None = None
    history: dict = field(default_factory=dict)
    rank: int = 0  # this process's rank under torchrun (only rank 0 wrote anything)
    world_size: int = 1


def train_prior(
    data: str | os.PathLike | FieldData,
    out: str | os.PathLike,
    settings: TrainSettings | None = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    steps: int | None = None,
    progress: bool = False,
    report: bool = True,
) -> TrainResult:
    """Train a WGAN-GP prior on ``data`` (a ``fields.h5`` path) and write the checkpoint ``out``.

    Args:
        data: ``fields.h5`` path (or a loaded `FieldData`), ``/fields`` ``[N, *field_shape]``.
        out: checkpoint path (``prior.pt``); the report goes to ``<stem>_report.h5`` / ``.png`` beside it.
        settings: `TrainSettings` (defaults if None). With ``resume`` the checkpoint's settings are used and
            any given ``settings`` must agree with them except ``steps`` and ``checkpoint_every_s``.
        seed: training seed (ignored on resume: the checkpoint's seed and RNG states continue).
        device: ``"cpu"`` or ``"cuda"``.
        resume: continue from the checkpoint at ``out`` up to ``steps`` generator steps.
        force: overwrite an existing ``out`` when not resuming.
        steps: overrides ``settings.steps``.
        progress: report progress on stderr (`ganflow.progress`: a bar on a terminal, else plain lines; the
            Wasserstein estimate as its figure).
        report: write the prior-quality report at the end.

    Returns:
        `TrainResult` with the EMA generator (eval mode, physical units).

    Under ``torchrun`` (``WORLD_SIZE > 1``) every rank calls this; see the module docstring.
    """
    with distributed.session(device) as ctx:
        return _train_prior(data, out, settings, seed=seed, device=device, resume=resume, force=force,
                            steps=steps, progress=progress, report=report, ctx=ctx)


@dataclass
class _Run:
    """One training run: what it was set up with, and the state each step changes and a checkpoint stores."""

    out: str
    settings: TrainSettings
    seed: int
    device: str
    ctx: distributed.DistContext
    fd: FieldData
    arch: dict
    start: int  # the generator step the run starts from (the checkpoint's on resume)
    val_idx: Tensor
    mean: Tensor
    std: Tensor
    u_train: Tensor  # this rank's normalised training fields, on the training device
    provenance: dict
    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    noise: torch.Generator
    order: torch.Generator
    history: dict = field(default_factory=lambda: {"step": [], "wasserstein": [], "loss_g": []})
    wall0: float = 0.0  # training seconds before this process started (on resume)
    failures: int = 0  # non-finite steps undone so far
    lr_scale: float = 1.0  # the learning-rate factor they left


def _train_prior(data, out, settings, *, seed, device, resume, force, steps, progress, report,
                 ctx: distributed.DistContext) -> TrainResult:
    out = os.fspath(out)
    _check_outputs_and_device(out, device, resume=resume, force=force, report=report)
    fd = data if isinstance(data, FieldData) else load_fields(data)
    ckpt = load_checkpoint(out, map_location="cpu") if resume else None
    settings, seed = _resolve_settings(settings, steps, seed, fd, ckpt)
    run = _set_up(out, fd, settings, seed, device, ctx, ckpt)
    if ckpt is not None:
        restore_resumed(run, ckpt)
    step, w_est, elapsed = _train_loop(run, progress)
    return _write_out(run, step, w_est, elapsed, report)


def _check_outputs_and_device(out: str, device: str, *, resume: bool, force: bool, report: bool) -> None:
    """Fail before any work: a missing checkpoint to resume, outputs not to be replaced, an unusable device."""
    if resume:
        if not os.path.exists(out):
            raise GanflowError(f"--resume: no checkpoint at {out}")
    else:
        check_output_path(out, force, "prior checkpoint")
        if report:  # the report beside the checkpoint is output too: not replaced without force
            for suffix in (".h5", ".png"):
                check_output_path(report_prefix(out) + suffix, force, "prior report")
    if device not in ("cpu", "cuda"):
        raise GanflowError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise GanflowError("--device cuda: no CUDA device is available")


def _resolve_settings(settings: TrainSettings | None, steps: int | None, seed: int, fd: FieldData,
                      ckpt: dict | None) -> tuple[TrainSettings, int]:
    """The run's settings and seed: the given ones, or on resume the checkpoint's (checked against the given
    settings and the data); ``steps`` overrides."""
    if ckpt is not None:
        saved = ckpt["settings"]
        if settings is not None:
            bad = settings_mismatch(settings.to_dict(), saved)
            if bad:
                raise GanflowError(f"--resume: settings differ from the checkpoint's: {', '.join(bad)}")
        given = settings.to_dict() if settings else {}
        settings = TrainSettings.from_dict({**saved, **{k: given[k] for k in RESUME_OVERRIDES if k in given}})
        seed = int(ckpt["seed"])
        if ckpt["data"].get("sha1") != fd.sha1:
            raise GanflowError(f"--resume: {fd.path} is not the data the checkpoint was trained on")
    settings = settings or TrainSettings()
    if steps is not None:
        settings = dataclasses.replace(settings, steps=int(steps))
    settings.validate()
    return settings, seed


def _set_up(out: str, fd: FieldData, settings: TrainSettings, seed: int, device: str,
            ctx: distributed.DistContext, ckpt: dict | None) -> _Run:
    """The architecture, the split and normalised training fields, fresh networks, optimisers and streams."""
    arch = (
        default_arch(
            fd.field_shape,
            settings.latent_dim,
            settings.base_channels,
            settings.mlp_hidden,
            settings.mlp_depth,
            settings.output,
            settings.critic_mbstd,
        )
        if ckpt is None
        else set_clamp(dict(ckpt["arch"]), None)  # the clip follows the settings and the step (_sync_clamp)
    )
    if ckpt is not None and list(fd.field_shape) != list(arch["field_shape"]):
        raise GanflowError(
            f"--resume: data field_shape {fd.field_shape} != checkpoint's {arch['field_shape']}"
        )
    start = int(ckpt["step"]) if ckpt else 0
    if ckpt is not None and settings.steps <= start:
        raise GanflowError(f"--resume: checkpoint is already at step {start}; ask for more --steps")
    train_idx, val_idx, mean, std, u_train = _training_fields(fd, settings, seed, ckpt, ctx)
    net_arch = arch if settings.clamp == "off" else set_clamp(dict(arch), clamp_level(settings))
    G, D, G_ema, opt_g, opt_d = _build_networks(net_arch, settings, seed, ctx.device)
    # Rank r > 0 gets its own streams; rank 0 (and a single process) keeps the original ones.
    noise = torch.Generator(device=ctx.device).manual_seed(substream(seed, 3 + 100 * ctx.rank))
    order = torch.Generator().manual_seed(substream(seed, 4 + 100 * ctx.rank))
    provenance = fd.provenance()
    provenance.update(n_train=int(train_idx.numel()), n_val=int(val_idx.numel()))
    return _Run(out=out, settings=settings, seed=seed, device=device, ctx=ctx, fd=fd, arch=arch, start=start,
                val_idx=val_idx, mean=mean, std=std, u_train=u_train, provenance=provenance,
                G=G, D=D, G_ema=G_ema, opt_g=opt_g, opt_d=opt_d, noise=noise, order=order)


def _training_fields(fd: FieldData, settings: TrainSettings, seed: int, ckpt: dict | None,
                     ctx: distributed.DistContext) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(train_idx, val_idx, mean, std, u_train)``: the seeded split, the normalisation (the checkpoint's on
    resume) and this rank's shard of the normalised training fields on the training device."""
    rank, world = ctx.rank, ctx.world_size
    train_idx, val_idx = split_indices(fd.fields.shape[0], settings.val_fraction, seed)
    x_train = fd.fields[train_idx]
    if ckpt is None:
        mean, std = _normalization(x_train, settings.output, settings.tanh_margin)
        if not torch.isfinite(std) or std <= 1e-12 * (1 + mean.abs().max()):
            raise GanflowError(
                f"{fd.path}: the training fields do not vary (std {float(std):.3g}); nothing to learn"
            )
    else:
        mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    if settings.batch_size % world:
        raise GanflowError(
            f"train.batch_size {settings.batch_size} must be divisible by the number of processes ({world}): "
            "it is the global batch, split evenly across ranks"
        )
    # Each rank trains on its own disjoint shard of the training split (all of it for one process).
    x_shard = x_train if world == 1 else distributed.shard_tensor(x_train, rank, world)
    if x_shard.shape[0] < 1:
        raise GanflowError(f"{x_train.shape[0]} training fields cannot be shared by {world} processes")
    return train_idx, val_idx, mean, std, ((x_shard - mean) / std).to(ctx.device)


def _build_networks(arch: dict, settings: TrainSettings, seed: int, dev) -> tuple:
    """``(G, D, G_ema, opt_g, opt_d)``: seeded initial networks on ``dev`` (the EMA a frozen copy of ``G``)
    and their Adam optimisers."""
    # Initialised from a seeded stream under fork_rng so the global RNG is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(substream(seed, 2))
        G, D = build_generator_net(arch), build_critic(arch)
        G_ema = build_generator_net(arch)
    G_ema.load_state_dict(G.state_dict())
    G, D, G_ema = G.to(dev), D.to(dev), G_ema.to(dev)
    for net in (G, D, G_ema):
        distributed.broadcast_module(net)  # a guard: replicas start identical (they do by seeding)
    for p in G_ema.parameters():
        p.requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=settings.lr_g, betas=tuple(settings.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=settings.lr_d, betas=tuple(settings.betas))
    return G, D, G_ema, opt_g, opt_d


def _train_loop(run: _Run, progress: bool) -> tuple[int, float, float]:
    """Generator steps from ``run.start`` to ``settings.steps``, with periodic checkpoints (rank 0); returns
    ``(step, last logged Wasserstein estimate, seconds)``."""
    from ..progress import Progress

    settings, ctx = run.settings, run.ctx
    # after ANNOUNCE_S, one line with the steps/s here and the expected time of the whole training
    bar = Progress(settings.steps, "train-prior", enabled=progress and ctx.is_main, initial=run.start, unit="step",
                   announce_after_s=ANNOUNCE_S)
    t_start = time.perf_counter()
    t_last_save = t_start
    w_est = float("nan")
    step = run.start
    run.G.train()
    run.D.train()
    good = snapshot(run.G, run.D, run.G_ema, run.opt_g, run.opt_d)
    try:
        while step < settings.steps:
            step += 1
            _set_learning_rates(run, step)
            _sync_clamp(run, step)
            ok, d_real, d_fake, loss_g = _train_step(run)
            if not ok:
                step -= 1
                _roll_back(run, good, step, t_start)
                continue
            ema_update(run.G_ema, run.G, min(settings.ema_decay, (1.0 + step) / (10.0 + step)))
            if step % settings.log_every == 0 or step == settings.steps:
                w_est = _log_step(run, step, d_real, d_fake, loss_g)
                bar.set_postfix(W=f"{w_est:.3f}")
            bar.update(1)
            good = snapshot(run.G, run.D, run.G_ema, run.opt_g, run.opt_d)
            now = time.perf_counter()
            if ctx.is_main and now - t_last_save >= settings.checkpoint_every_s and step < settings.steps:
                save_checkpoint(run.out, make_checkpoint(run, step, run.wall0 + now - t_start))
                t_last_save = now
    finally:
        bar.close()
    return step, w_est, time.perf_counter() - t_start


def _sync_clamp(run: _Run, step: int) -> None:
    """Set the read-out clip of ``G`` and its EMA for generator step ``step`` (``clamp = "anneal"``: from the
    first annealed step) and record it in the architecture the checkpoints store."""
    mode = run.settings.clamp
    if mode == "off":
        return
    on = mode == "on" or in_annealing(run.settings, step)
    level = clamp_level(run.settings) if on else 1.0  # Hardtanh(-1, 1) after a tanh changes nothing
    for net in (run.G, run.G_ema):
        net[-1].min_val, net[-1].max_val = -level, level
    set_clamp(run.arch, level if on else None)


def _set_learning_rates(run: _Run, step: int) -> None:
    factor = run.lr_scale * anneal_factor(run.settings, step)
    for opt, lr in ((run.opt_g, run.settings.lr_g), (run.opt_d, run.settings.lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr * factor


def _train_step(run: _Run) -> tuple[bool, Tensor, Tensor, Tensor]:
    """``n_critic`` critic steps, then one generator step; returns ``(every loss and weight finite, E[D(u)],
    E[D(g(z))] of the last critic step, the generator loss)``, the verdict agreed by all ranks."""
    settings, dev, G, D = run.settings, run.ctx.device, run.G, run.D
    n_train, B = run.u_train.shape[0], settings.batch_size // run.ctx.world_size  # B: this rank's share
    # Finiteness of every loss of this generator step, checked once at its end (one device sync).
    finite = torch.ones((), dtype=torch.bool, device=dev)
    for _ in range(settings.n_critic):
        idx = torch.randint(n_train, (B,), generator=run.order)
        real = run.u_train[idx.to(dev)]
        z = torch.randn(B, run.arch["latent_dim"], generator=run.noise, device=dev)
        with torch.no_grad():
            fake = G(z)
        d_real, d_fake = D(real).mean(), D(fake).mean()
        loss_d = d_fake - d_real
        if settings.gp_weight > 0:
            loss_d = loss_d + settings.gp_weight * gradient_penalty(D, real, fake, run.noise)
        run.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        distributed.all_reduce_grads(D)
        run.opt_d.step()
        finite &= torch.isfinite(loss_d.detach())
    z = torch.randn(B, run.arch["latent_dim"], generator=run.noise, device=dev)
    loss_g = -D(G(z)).mean()
    run.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    distributed.all_reduce_grads(G)
    run.opt_g.step()
    finite &= torch.isfinite(loss_g.detach())
    # A non-finite gradient shows up in the weights Adam just wrote.
    finite &= all_finite(list(G.parameters()) + list(D.parameters()))
    ok = bool(finite)
    if run.ctx.world_size > 1:  # every rank takes the same decision
        ok = distributed.all_reduce_mean([0.0 if ok else 1.0], dev)[0] == 0.0
    return ok, d_real, d_fake, loss_g


def _roll_back(run: _Run, good: dict, step: int, t_start: float) -> None:
    """Undo a non-finite step: networks, EMA and optimisers back to ``good`` (the state at ``step``), learning
    rates halved. Past ``max_failures`` the run stops with that state saved."""
    # The random streams go on, so the retry sees other batches.
    settings = run.settings
    run.failures += 1
    run.lr_scale *= 0.5
    restore_snapshot(good, run.G, run.D, run.G_ema, run.opt_g, run.opt_d)  # the next step's rates carry lr_scale
    if run.failures > settings.max_failures:
        if run.ctx.is_main:
            save_checkpoint(run.out, make_checkpoint(run, step, run.wall0 + time.perf_counter() - t_start))
        raise GanflowError(
            f"training diverged: {run.failures} non-finite steps (loss or gradient), each undone with "
            f"halved learning rates; the last good state (step {step}) is saved in {run.out}; check the "
            "data and try smaller lr_g/lr_d"
        )


def _log_step(run: _Run, step: int, d_real: Tensor, d_fake: Tensor, loss_g: Tensor) -> float:
    """Record the Wasserstein estimate and the generator loss (rank means) in the history; return the
    estimate. A non-finite one stops the run."""
    w_est, loss_g_val = float((d_real - d_fake).detach()), float(loss_g.detach())
    if run.ctx.world_size > 1:
        # Rank means, so every rank logs (and stops on divergence) alike.
        w_est, loss_g_val = distributed.all_reduce_mean([w_est, loss_g_val], run.ctx.device)
    if not (math.isfinite(w_est) and math.isfinite(loss_g_val)):
        raise GanflowError(
            f"training diverged at step {step} (non-finite loss); try smaller lr_g/lr_d"
        )
    run.history["step"].append(step)
    run.history["wasserstein"].append(w_est)
    run.history["loss_g"].append(loss_g_val)
    return w_est


def _write_out(run: _Run, step: int, w_est: float, elapsed: float, report: bool) -> TrainResult:
    """Check the replicas agree, save the final checkpoint, the report and the representation error (rank 0);
    return the `TrainResult` with the EMA generator."""
    ctx, settings, fd = run.ctx, run.settings, run.fd
    distributed.check_in_sync({"G": run.G, "D": run.D, "G_ema": run.G_ema}, ctx.device)
    if ctx.is_main:
        save_checkpoint(run.out, make_checkpoint(run, step, run.wall0 + elapsed))

    generator = generator_from_checkpoint(
        {
            "arch": run.arch,
            "G_ema": {k: v.cpu() for k, v in run.G_ema.state_dict().items()},
            "normalization": {"mean": run.mean, "std": run.std},
        }
    )
    result = TrainResult(
        path=run.out,
        generator=generator,
        step=step,
        steps_run=step - run.start,
        wall_time_s=elapsed,
        steps_per_s=(step - run.start) / max(elapsed, 1e-9),
        wasserstein=w_est,
        history=run.history,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    if report and ctx.is_main:
        from .report import prior_report

        result.report = prior_report(
            generator,
            fd.fields[run.val_idx] if run.val_idx.numel() >= 4 else fd.fields,
            prefix=report_prefix(run.out),
            seed=run.seed,
        )
    if ctx.is_main and settings.representation_fields > 0:
        add_representation_error(run.out, generator, fd.fields[run.val_idx][: settings.representation_fields],
                                 run.seed, device=ctx.device)
    distributed.barrier()  # the other ranks return once the checkpoint and report exist
    return result


def add_representation_error(checkpoint_path: str, generator, fields: Tensor, seed: int,
                             device: str | torch.device = "cpu") -> dict | None:
    """Estimate the representation error on held-out ``fields`` (the projections run on ``device``: on a CPU, a
    64x64 prior's 200 fields took minutes) and store it in the checkpoint (atomically); returns the statistics,
    or None when there are too few fields."""
    from .residuals import MIN_FIELDS, estimate_representation_error

    if fields.shape[0] < MIN_FIELDS:
        return None
    stats = estimate_representation_error(generator, fields, seed=seed, device=device)
    ckpt = load_checkpoint(checkpoint_path)
    ckpt["representation_error"] = stats
    save_checkpoint(checkpoint_path, ckpt)
    generator.representation_error = stats
    return stats


def _normalization(x_train: Tensor, output: str, margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """Scalar ``(mu, s)``: the mean and std of the values, or for a tanh read-out the range's centre and
    half-width (widened by ``margin``)."""
    x = x_train.double()
    if output == "tanh":
        lo, hi = x.min(), x.max()
        return ((hi + lo) / 2).float(), ((1 + margin) * (hi - lo) / 2).float()
    return x.mean().float(), (x.std().float() if x.numel() > 1 else torch.tensor(0.0))


def report_prefix(checkpoint_path: str | os.PathLike) -> str:
    """``dir/prior.pt`` -> ``dir/prior_report`` (the report files get ``.h5`` and ``.png``)."""
    root, _ = os.path.splitext(os.fspath(checkpoint_path))
    return root + "_report"


