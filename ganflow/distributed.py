"""Data-parallel helpers for ``torchrun``: process-group set-up, rank/world, gradient all-reduce, sharding.

``torchrun --nproc_per_node N -m ganflow <command> ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment. `session` reads them
and, when ``WORLD_SIZE > 1``, opens a process group (gloo on CPU, nccl on CUDA, one GPU per local rank).
Without those variables, or with ``WORLD_SIZE = 1``, nothing is initialised and every helper here is a no-op,
so a single process runs exactly the code path it always ran.

Gradients are averaged with one explicit all-reduce after ``backward()`` (`all_reduce_grads`) rather than by
wrapping the networks in ``DistributedDataParallel``: the WGAN-GP critic loss contains a double backward
(``create_graph=True``), which DDP's gradient hooks do not support reliably, and the explicit reduction makes
the synchronisation point visible.

Example:
    >>> with session("cpu") as ctx:
    ...     (ctx.rank, ctx.world_size, ctx.is_main)
    (0, 1, True)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import GanflowError

__all__ = [
    "DistContext",
    "session",
    "env_world_size",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_grads",
    "all_reduce_mean",
    "broadcast_module",
    "check_in_sync",
    "replica_summary",
    "shard",
    "shard_tensor",
    "check_device",
]

# Seconds a collective may wait for the slowest rank (a rank solving its last observation, a rank-0-only
# report). torchrun stops every worker when one fails, so a long timeout does not hide a crash.
_DEFAULT_TIMEOUT_S = 7200.0


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise GanflowError(f"environment variable {name}={raw!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def check_device(device: str) -> None:
    """``cpu`` or ``cuda``; ``cuda`` must be available (a clear error instead of a fallback)."""
    if device not in ("cpu", "cuda"):
        raise GanflowError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise GanflowError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[DistContext]:
    """Join the torchrun process group for the duration of a command (no-op for a single process).

    Uses gloo for ``device="cpu"`` and nccl for ``"cuda"`` (each rank then owns ``cuda:LOCAL_RANK`` and makes
    it
    the current device, so a plain ``"cuda"`` elsewhere means this rank's GPU). A group that is already open
    (a caller set it up) is reused and left open. The collective timeout is ``GANFLOW_DIST_TIMEOUT_S``
    seconds (default 7200).
    """
    check_device(device)
    world = env_world_size()
    rank_, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world == 1:
        yield DistContext(0, 1, 0, torch.device(device))
        return
    if not 0 <= rank_ < world:
        raise GanflowError(f"RANK={rank_} is outside WORLD_SIZE={world}")
    dev = torch.device(device)
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise GanflowError(
                f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    owned = not dist.is_initialized()
    if owned:
        timeout = float(os.environ.get("GANFLOW_DIST_TIMEOUT_S", _DEFAULT_TIMEOUT_S))
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout),
            **({"device_id": dev} if device == "cuda" else {}),
        )
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), local, dev)
    finally:
        if owned:
            dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_grads(module: nn.Module) -> None:
    """Average the ``.grad`` of ``module``'s parameters over all ranks (one flat all-reduce; no-op alone).

    Call after ``backward()`` and before ``optimizer.step()``. A parameter without a gradient contributes
    zeros
    (and gets them back averaged), so every rank steps the same parameters.
    """
    if not _active():
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_mean(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """The mean over ranks of a few scalars (logging); the values unchanged for a single process."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (a guard: replicas start identical)."""
    if not _active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def replica_summary(module: nn.Module) -> Tensor:
    """``[||w||, s_1 . w, s_2 . w]`` of a module's parameters (float64; `ganflow.fingerprint`'s summary): two
    replicas that differ by more than rounding differ here by about ``||w_a - w_b||``."""
    from .fingerprint import float_summary

    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in module.parameters()])
    return torch.tensor(float_summary(flat.numpy()), dtype=torch.float64)


@torch.no_grad()
def check_in_sync(modules: dict[str, nn.Module], device: torch.device | str = "cpu") -> None:
    """Raise `GanflowError` when the ranks' weights differ beyond rounding (data-parallel replicas must stay
    identical); replicas that differ only by rounding (ranks on different CPU models) take rank 0's weights.

    Compares per module a summary of all parameters (`replica_summary`) with a MIN and a MAX all-reduce.
    """
    if not _active():
        return
    t = torch.stack([replica_summary(m) for m in modules.values()]).to(device)
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if torch.equal(lo, hi):
        return
    # MIN and MAX across ranks agree to rounding (`ganflow.fingerprint.summaries_agree`): ranks on different CPU
    # models round differently in the last bit; a missed or rank-dependent update moves ~1e-3 of ||w|| or more
    from .fingerprint import summaries_agree

    bad = [name for i, name in enumerate(modules) if not summaries_agree(lo[i].cpu().numpy(), hi[i].cpu().numpy())]
    if bad:
        raise GanflowError(f"data-parallel replicas diverged ({', '.join(bad)} differ across ranks)")
    for m in modules.values():
        broadcast_module(m)


def shard(items: Sequence, rank_: int | None = None, world: int | None = None) -> list:
    """Round-robin share of ``items`` for ``rank_`` of ``world`` (defaults: this process): items
    ``rank_, rank_ + world, ...``. Shards are disjoint and cover ``items``."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    return list(items)[r::w]


def shard_tensor(t: Tensor, rank_: int, world: int) -> Tensor:
    """Rows ``rank_, rank_ + world, ...`` of ``t`` (the rank's disjoint data shard)."""
    return t[rank_::world]
