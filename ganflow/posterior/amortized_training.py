"""Training the amortised posterior ``q_phi(z | y)`` (`train_amortized`): its settings (the ``[amortized]`` table),
the simulated pairs it learns from, the forward-KL phase and the optional reverse-KL phase, evaluation, stopping,
and checkpoints that resume bit-exactly. The model is `ganflow.posterior.conditional_flow`; what the training
minimises and how the result is used is in `ganflow.posterior.amortized`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import GanflowError
from ..fingerprint import operator_fingerprint, prior_fingerprint, same_fingerprint
from ..progress import Progress
from .conditional_flow import ConditionalLatentFlow, base_log_prob
from .flow import _lr_factor

if TYPE_CHECKING:
    from .amortized import AmortizedPosterior

__all__ = ["AmortizedSettings", "AmortizedTrainResult", "train_amortized", "simulate_pairs", "build_model",
           "load_training_checkpoint", "AMORTIZED_KIND", "AMORTIZED_VERSION"]


AMORTIZED_KIND = "ganflow.amortized"
AMORTIZED_VERSION = 1

# Settings that may differ on resume: they change neither the computation nor the result (max_iter and
# reverse_iter only say where to stop).
_RESUME_FREE = {"progress", "checkpoint_every_s", "max_iter", "reverse_iter"}


@dataclass(frozen=True)
class AmortizedSettings:
    """Settings of the amortised posterior and its training (TOML table ``[amortized]``)."""

    n_layers: int = 4  # spline couplings (the non-Gaussian part; 0: a conditional Gaussian)
    hidden: int = 128  # hidden units of each coupling's conditioner
    n_blocks: int = 2  # residual blocks of each conditioner
    spline_bins: int = 8
    tail_bound: float = 4.0
    embed_dim: int = 64  # the context: the observation's embedding
    embed_hidden: int = 256
    batch_size: int = 256  # simulated pairs per step
    max_iter: int = 5000  # forward-KL steps at most
    lr: float = 1e-3
    lr_final: float = 1e-5  # cosine decay from lr over max_iter
    warmup: int = 100
    grad_clip: float = 10.0
    # 0: fresh pairs every step (cheap operators); N > 0: N pairs simulated once, mini-batches drawn from them
    # (an expensive operator: the PDE solves are paid once).
    n_pairs: int = 0
    n_val: int = 2048  # held-out pairs: the stopping rule's validation loss
    eval_every: int = 100
    patience: int = 10  # stop when the validation loss has not improved by `tol` for this many evaluations
    tol: float = 0.002  # nats per pair
    reverse_iter: int = 0  # reverse-KL refinement steps after the forward phase (needs A's gradient)
    reverse_obs: int = 16  # simulated observations per refinement step
    reverse_draws: int = 16  # q draws per observation
    reverse_lr: float = 1e-4
    sim_batch: int = 512  # simulate in chunks of this many
    max_failures: int = 20  # non-finite steps tolerated (each skipped)
    checkpoint_every_s: float = 60.0
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.n_layers >= 0 and self.hidden >= 1 and self.n_blocks >= 1, "amortized: n_layers >= 0, "
             "hidden >= 1 and n_blocks >= 1"),
            (self.spline_bins >= 2 and self.tail_bound > 0, "amortized: spline_bins >= 2, tail_bound > 0"),
            (self.embed_dim >= 1 and self.embed_hidden >= 1, "amortized: embed_dim and embed_hidden >= 1"),
            (self.batch_size >= 2 and self.n_val >= 2, "amortized: batch_size and n_val must be >= 2"),
            (self.max_iter >= 0 and self.reverse_iter >= 0, "amortized: max_iter and reverse_iter >= 0"),
            (self.lr > 0 and self.lr_final > 0 and self.reverse_lr > 0, "amortized: learning rates must be > 0"),
            (self.warmup >= 0 and self.grad_clip > 0, "amortized: warmup >= 0, grad_clip > 0"),
            (self.n_pairs == 0 or self.n_pairs >= self.batch_size, "amortized.n_pairs: 0 or >= batch_size"),
            (self.eval_every >= 1 and self.patience >= 1, "amortized: eval_every and patience >= 1"),
            (self.reverse_obs >= 1 and self.reverse_draws >= 2, "amortized: reverse_obs >= 1, "
             "reverse_draws >= 2"),
            (self.sim_batch >= 1 and self.max_failures >= 0, "amortized: sim_batch >= 1, max_failures >= 0"),
            (self.checkpoint_every_s >= 0, "amortized.checkpoint_every_s must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GanflowError(msg)


# --- simulation --------------------------------------------------------------------------------------------
def _substream(seed: int, *keys: int) -> int:
    # Independent, reproducible streams from one seed (validation set, pool, each step of each rank).
    h = hashlib.sha1(("|".join(str(int(x)) for x in (seed, *keys))).encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63 - 1)


@torch.no_grad()
def simulate_pairs(generator: nn.Module, operator: nn.Module, noise_sigma: float, n: int, g: torch.Generator,
                   chunk: int = 512, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """``n`` pairs ``z ~ N(0, I)``, ``y = A(G(z)) + sigma * eta`` from the CPU generator ``g`` (``G`` and ``A``
    run on ``device``): ``(z [n, k], y [n, *obs_shape])`` on ``device``."""
    zs, ys = [], []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        z = torch.randn(b, int(generator.latent_dim), generator=g).to(device)
        y = operator(generator(z)).float()
        zs.append(z)
        ys.append(y + noise_sigma * torch.randn(y.shape, generator=g).to(device))
    return torch.cat(zs), torch.cat(ys)


# --- training ----------------------------------------------------------------------------------------------
@dataclass
class _AmortizedRun:
    """One training run: what it was set up with, and the state each step changes and a checkpoint stores."""

    settings: AmortizedSettings
    generator: nn.Module
    operator: nn.Module
    noise_sigma: float
    seed: int
    ctx: distributed.DistContext
    meta: dict  # shapes, fingerprints and the record of where the prior and operator came from
    model: ConditionalLatentFlow
    opt: torch.optim.Optimizer
    val: tuple[Tensor, Tensor]
    pool: tuple[Tensor, Tensor] | None
    t0: float
    phase: str = "forward"  # forward -> reverse -> done
    step: int = 0  # forward-KL steps done
    reverse_step: int = 0
    best_val: float = math.inf
    best_step: int = 0
    best_state: dict = field(default_factory=dict)
    stopped: str = ""
    failures: int = 0
    losses: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    n_simulated: int = 0
    wall_before: float = 0.0

    def wall_time_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0


@dataclass
class AmortizedTrainResult:
    """What `train_amortized` returns (on every rank; only rank 0 wrote the checkpoint)."""

    path: str | None
    posterior: "AmortizedPosterior"
    steps: int  # forward-KL steps
    reverse_steps: int
    stopped: str
    val_loss: float  # best validation -E[log q(z|y)] (nats per pair)
    wall_time_s: float
    n_simulated: int
    rank: int = 0
    world_size: int = 1


def _state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# The regression start uses at most this many features of y (a seeded projection beyond): enough for every
# observation of the small problems, and a cheap, wider-than-needed start for a 65,536-pixel one.
REGRESSION_FEATURES = 128


def _regression_start(z: Tensor, y: Tensor, y_loc: Tensor, y_scale: Tensor,
                      seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(intercept [k], coef [k, m], L [k, k])``: the least-squares regression ``z ~ intercept + coef u`` of
    ``z`` ``[n, k]`` on the standardised, flattened ``y`` (``u`` ``[n, m]``; through a seeded projection to at
    most `REGRESSION_FEATURES` features, and at most ``n / 4 - 1`` of them), and the Cholesky factor of its
    residual covariance. For a linear-Gaussian problem this is the exact posterior; otherwise its covariance is
    wider (the average posterior covariance plus what a linear mean misses).

    Why (issue 38): started at the prior's scale (``L = I``), the conditional Gaussian's log-scales move at most
    ~lr per Adam step (~2.5 over 5,000 cosine-decayed steps at 1e-3), so where the posterior is 20-100x
    narrower than the prior the spline couplings carried the rest of the shrinking; a spline maps its interval
    onto itself, so a squeezed core leaves the interval's ends where they were, and the ~0.5 % of draws that
    land there fell tens of posterior sds out. Started at the prior's mean, the log-scales first grew to cover
    the mean's error and could not shrink back (3-8x too wide after 5,000 steps): hence the mean too."""
    z, u = z.double().cpu(), ((y.reshape(y.shape[0], -1).cpu() - y_loc.reshape(-1)) / y_scale.reshape(-1)).double()
    n, m = u.shape
    r = max(0, min(m, REGRESSION_FEATURES, n // 4 - 1))
    R = torch.eye(m, dtype=torch.float64)
    if r < m:
        g = torch.Generator().manual_seed(_substream(seed, 5))
        R = torch.randn(m, r, generator=g, dtype=torch.float64) / math.sqrt(m)
    X = torch.cat([torch.ones(n, 1, dtype=torch.float64), u @ R], 1)
    beta = torch.linalg.lstsq(X, z).solution  # [1 + r, k]
    resid = z - X @ beta
    cov = resid.T @ resid / max(n - r - 1, 1)
    L = torch.linalg.cholesky(cov + 1e-10 * torch.eye(z.shape[1], dtype=torch.float64) * cov.diagonal().mean())
    return beta[0].float(), (R @ beta[1:]).T.float(), L.float()


def build_model(meta: dict, s: AmortizedSettings, y_loc: Tensor, y_scale: Tensor, seed: int) -> ConditionalLatentFlow:
    # Layer initialisation and the LU layers' permutations draw from torch's global RNG: seed it (and restore
    # it) so the model depends only on `seed`, identically on every rank.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_substream(seed, 1))
        return ConditionalLatentFlow(meta["latent_dim"], tuple(meta["obs_shape"]), s, y_loc, y_scale)


def _set_up(generator: nn.Module, operator: nn.Module, noise_sigma: float, s: AmortizedSettings, seed: int,
            ctx: distributed.DistContext, record: dict) -> _AmortizedRun:
    """Validation pairs (their moments standardise ``y``), the optional pool of training pairs, the model."""
    t0 = time.perf_counter()
    dev = ctx.device
    meta = {"latent_dim": int(generator.latent_dim), "obs_shape": [int(d) for d in operator.obs_shape],
            "field_shape": [int(d) for d in generator.field_shape], "noise_sigma": float(noise_sigma),
            "prior_sha1": prior_fingerprint(generator), "operator_fingerprint": operator_fingerprint(operator),
            "record": dict(record)}
    val = simulate_pairs(generator, operator, noise_sigma, s.n_val, torch.Generator().manual_seed(
        _substream(seed, 0)), s.sim_batch, dev)
    y_loc, y_scale = val[1].mean(0).cpu(), val[1].std(0).clamp_min(1e-6 * noise_sigma).cpu()
    pool = None
    if s.n_pairs:  # each rank simulates its own share of the pool
        n_rank = max(s.batch_size, s.n_pairs // ctx.world_size)
        pool = simulate_pairs(generator, operator, noise_sigma, n_rank, torch.Generator().manual_seed(
            _substream(seed, 3, ctx.rank)), s.sim_batch, dev)
    model = build_model(meta, s, y_loc, y_scale, seed)
    model.start_at(*_regression_start(val[0], val[1], y_loc, y_scale, seed))
    model = model.to(dev)
    distributed.broadcast_module(model)  # a guard: replicas start identical (they do by seeding)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    run = _AmortizedRun(settings=s, generator=generator, operator=operator, noise_sigma=float(noise_sigma),
                        seed=int(seed), ctx=ctx, meta=meta, model=model, opt=opt, val=val, pool=pool, t0=t0)
    run.n_simulated = s.n_val + (pool[0].shape[0] * ctx.world_size if pool is not None else 0)
    run.best_state = _state(model)
    return run


def _batch(run: _AmortizedRun, n: int, key: int) -> tuple[Tensor, Tensor]:
    """This rank's pairs for step ``key``: drawn from the pool, else simulated afresh (a stream per step and
    rank, so a resumed run draws exactly what the uninterrupted one would)."""
    g = torch.Generator().manual_seed(_substream(run.seed, 2, key, run.ctx.rank))
    if run.pool is not None:
        idx = torch.randint(run.pool[0].shape[0], (n,), generator=g).to(run.pool[0].device)
        return run.pool[0][idx], run.pool[1][idx]
    run.n_simulated += n * run.ctx.world_size
    return simulate_pairs(run.generator, run.operator, run.noise_sigma, n, g, run.settings.sim_batch, run.ctx.device)


def _apply(run: _AmortizedRun, loss: Tensor, clip: float) -> bool:
    """Backward, gradient average over ranks, clip, step; False (nothing changed) when anything is not finite
    on any rank."""
    run.opt.zero_grad(set_to_none=True)
    ok = bool(torch.isfinite(loss))
    if ok:
        loss.backward()
        distributed.all_reduce_grads(run.model)
        ok = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)))
    ok = distributed.all_reduce_mean([0.0 if ok else 1.0], run.ctx.device)[0] == 0.0
    if ok:
        run.opt.step()
    else:
        run.opt.zero_grad(set_to_none=True)
        run.failures += 1
        if run.failures > run.settings.max_failures:
            raise GanflowError(f"train-posterior: {run.failures} non-finite steps; check the operator with "
                               "`ganflow check-operator`")
    return ok


def _forward_step(run: _AmortizedRun) -> None:
    """One forward-KL step: ``-mean log q(z | y)`` on fresh (or pooled) simulated pairs."""
    s = run.settings
    for group in run.opt.param_groups:
        group["lr"] = s.lr * _lr_factor(run.step, s)
    z, y = _batch(run, s.batch_size, run.step)
    loss = -run.model(z, y).mean()
    if _apply(run, loss, s.grad_clip):
        run.losses.append(float(loss.detach()))
    run.step += 1


def _reverse_step(run: _AmortizedRun) -> None:
    """One reverse-KL step: ``E_y E_q[log q(z|y) - log p(y|z) - log p(z)]`` over simulated ``y``."""
    s, k = run.settings, run.meta["latent_dim"]
    _, y = _batch(run, s.reverse_obs, 10**9 + run.reverse_step)
    g = torch.Generator().manual_seed(_substream(run.seed, 4, run.reverse_step, run.ctx.rank))
    eps = torch.randn(s.reverse_obs * s.reverse_draws, k, generator=g).to(y.device)
    y_rep = y.repeat_interleave(s.reverse_draws, 0)
    z, log_q = run.model.transform(eps, run.model.context(y_rep))
    resid = (y_rep - run.operator(run.generator(z))).reshape(z.shape[0], -1)
    m = resid.shape[1]
    log_lik = (-0.5 * (resid * resid).sum(1) / run.noise_sigma**2
               - m * math.log(run.noise_sigma * math.sqrt(2 * math.pi)))
    loss = (log_q - log_lik - base_log_prob(z)).mean()
    if _apply(run, loss, s.grad_clip):
        run.losses.append(float(loss.detach()))
    run.reverse_step += 1


@torch.no_grad()
def _evaluate(run: _AmortizedRun) -> None:
    """Validation loss ``-mean log q(z | y)`` on the held-out pairs; the best weights are kept."""
    z, y = run.val
    loss = -float(torch.cat([run.model(zc, yc) for zc, yc in zip(z.split(1024), y.split(1024), strict=True)]).mean())
    run.val_steps.append(run.step)
    run.val_losses.append(loss)
    if loss < run.best_val - run.settings.tol:
        run.best_step = run.step
    if loss < run.best_val:
        run.best_val, run.best_state = loss, _state(run.model)


def _forward_converged(run: _AmortizedRun) -> bool:
    """The stopping rule: no gain of ``tol`` in the validation loss for ``patience`` evaluations."""
    s = run.settings
    return run.step >= s.warmup and run.step - run.best_step >= s.patience * s.eval_every


def _end_forward(run: _AmortizedRun, stopped: str) -> None:
    """The forward phase ends: back to its best weights; a fresh optimiser for the reverse phase."""
    run.stopped = stopped
    run.model.load_state_dict(run.best_state)
    run.phase = "reverse"
    run.opt = torch.optim.Adam(run.model.parameters(), lr=run.settings.reverse_lr)


def _checkpoint(run: _AmortizedRun) -> dict:
    """The whole training state (tensors and plain types: ``weights_only``-loadable); also the deliverable."""
    return {
        "kind": AMORTIZED_KIND,
        "format_version": AMORTIZED_VERSION,
        "settings": asdict(run.settings),
        **{k: v for k, v in run.meta.items()},
        "seed": run.seed,
        "model": _state(run.model),
        "best_model": run.best_state,
        "opt": copy.deepcopy(run.opt.state_dict()),
        "phase": run.phase,
        "step": run.step,
        "reverse_step": run.reverse_step,
        "best_val": run.best_val,
        "best_step": run.best_step,
        "stopped": run.stopped,
        "failures": run.failures,
        "losses": torch.tensor(run.losses, dtype=torch.float64),
        "val_steps": torch.tensor(run.val_steps, dtype=torch.int64),
        "val_losses": torch.tensor(run.val_losses, dtype=torch.float64),
        "n_simulated": run.n_simulated,
        "wall_time_s": run.wall_time_s(),
        "world_size": run.ctx.world_size,
    }


def _save(run: _AmortizedRun, out: str | None) -> None:
    if out is not None and run.ctx.is_main:
        from ..checkpoint import save_checkpoint

        save_checkpoint(out, _checkpoint(run))


def _check_resume(ckpt: dict, run: _AmortizedRun, out: str) -> None:
    """A resume continues only the same training: settings (stopping points aside), prior, operator, noise."""
    saved, now = dict(ckpt["settings"]), asdict(run.settings)
    bad = sorted(k for k in set(saved) | set(now) if k not in _RESUME_FREE and saved.get(k) != now.get(k))
    bad += [k for k in ("noise_sigma", "obs_shape", "latent_dim") if ckpt.get(k) != run.meta[k]]
    bad += [k for k in ("prior_sha1", "operator_fingerprint") if not same_fingerprint(ckpt.get(k), run.meta[k])]
    if int(ckpt.get("seed", -1)) != run.seed:
        bad.append("seed")
    if bad:
        raise GanflowError(f"--resume: {out} was trained with other {', '.join(bad)}")


def _restore(run: _AmortizedRun, ckpt: dict, out: str) -> None:
    """Resume: model, optimiser (of its phase), counters, traces and the best weights back in place."""
    _check_resume(ckpt, run, out)
    try:
        run.model.load_state_dict(ckpt["model"])
        run.phase = str(ckpt["phase"])
        if run.phase != "forward":
            run.opt = torch.optim.Adam(run.model.parameters(), lr=run.settings.reverse_lr)
        run.opt.load_state_dict(ckpt["opt"])
        run.step, run.reverse_step = int(ckpt["step"]), int(ckpt["reverse_step"])
        run.best_val, run.best_step = float(ckpt["best_val"]), int(ckpt["best_step"])
        run.best_state, run.stopped = ckpt["best_model"], str(ckpt["stopped"])
        run.failures, run.n_simulated = int(ckpt["failures"]), int(ckpt["n_simulated"])
        run.losses, run.val_losses = ckpt["losses"].tolist(), ckpt["val_losses"].tolist()
        run.val_steps = ckpt["val_steps"].tolist()
        run.wall_before = float(ckpt["wall_time_s"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GanflowError(f"amortized checkpoint {out} does not fit this model ({first[:160]})") from None
    if run.phase == "done" and run.reverse_step < run.settings.reverse_iter:
        run.phase = "reverse"  # more refinement asked for


def _train_loop(run: _AmortizedRun, out: str | None) -> None:
    """Forward-KL steps to the stopping rule or ``max_iter``, then ``reverse_iter`` reverse-KL steps, with
    checkpoints on the clock (rank 0)."""
    s = run.settings
    bar = Progress(s.max_iter + s.reverse_iter, "train-posterior", enabled=s.progress and run.ctx.is_main,
                   initial=min(run.step, s.max_iter) + run.reverse_step)
    t_save = time.perf_counter()
    while run.phase != "done":
        if run.phase == "forward":
            if run.step >= s.max_iter or _forward_converged(run):
                _evaluate(run)
                _end_forward(run, "max_iter" if run.step >= s.max_iter else "converged")
                continue
            _forward_step(run)
            if run.step % s.eval_every == 0:
                _evaluate(run)
                bar.set_postfix(val=f"{run.best_val:.3f}")
        elif run.reverse_step >= s.reverse_iter:
            run.phase = "done"
            continue
        else:
            _reverse_step(run)
        bar.update(1)
        if out is not None and time.perf_counter() - t_save >= s.checkpoint_every_s:
            _save(run, out)
            t_save = time.perf_counter()
    bar.close()


def train_amortized(generator: nn.Module, operator: nn.Module, noise_sigma: float, out: str | os.PathLike | None,
                    settings: AmortizedSettings | None = None, *, seed: int = 0, resume: bool = False,
                    force: bool = False, record: dict | None = None, device: str = "cpu") -> AmortizedTrainResult:
    """Train ``q_phi(z | y)`` for ``generator``, ``operator`` and ``noise_sigma``; write the checkpoint ``out``.

    Each forward step simulates ``batch_size`` fresh pairs (or draws them from ``n_pairs`` simulated once) from
    a generator seeded by ``(seed, step, rank)``; so a resumed run (``resume=True``: from ``out``) is
    bit-identical on CPU to an uninterrupted one with the same number of processes. ``record`` (plain types:
    the prior and operator specs) is stored for ``solve --amortized``. Under ``torchrun`` every rank calls this
    with its own pairs and the gradients are averaged (`ganflow.distributed`); rank 0 writes ``out``.
    """
    s = settings or AmortizedSettings()
    s.validate()
    out = None if out is None else os.fspath(out)
    if not noise_sigma > 0:
        raise GanflowError(f"--noise-sigma must be > 0, got {noise_sigma}")
    with distributed.session(device) as ctx:
        ckpt = _load_for_resume(out, resume, force)
        run = _set_up(generator.to(ctx.device).eval(), operator.to(ctx.device), noise_sigma, s, seed, ctx,
                      record or {})
        if ckpt is not None:
            _restore(run, ckpt, out)
        _train_loop(run, out)
        _save(run, out)
        distributed.barrier()  # the checkpoint exists before any rank returns
    from .amortized import AmortizedPosterior  # the use side imports this module

    post = AmortizedPosterior(run.model.eval(), _checkpoint(run), out)
    return AmortizedTrainResult(path=out, posterior=post, steps=run.step, reverse_steps=run.reverse_step,
                                stopped=run.stopped, val_loss=run.best_val, wall_time_s=run.wall_time_s(),
                                n_simulated=run.n_simulated, rank=ctx.rank, world_size=ctx.world_size)


def _load_for_resume(out: str | None, resume: bool, force: bool) -> dict | None:
    """The checkpoint to continue (``resume``), after the output checks: nothing is overwritten unasked."""
    from ..io import check_output_path

    if resume and force:
        raise GanflowError("give --resume or --force, not both")
    if out is None:
        if resume:
            raise GanflowError("resume needs the checkpoint path")
        return None
    if not resume:
        check_output_path(out, force, "amortized checkpoint")
        return None
    if not os.path.exists(out):
        raise GanflowError(f"--resume: no amortized checkpoint at {out}")
    return load_training_checkpoint(out)


def load_training_checkpoint(path: str) -> dict:
    from ..checkpoint import load_of_kind

    return load_of_kind(path, "amortized checkpoint", "ganflow amortized-posterior checkpoint (train-posterior)",
                        AMORTIZED_KIND, AMORTIZED_VERSION)
