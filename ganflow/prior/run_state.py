"""A training run's state: its seeded random streams, the checkpoint dict it saves (`make_checkpoint`, the keys
`ganflow.prior.checkpoint` documents) and the resume that loads one back into the run (`restore_resumed`).
Everything a bit-exact resume needs is here: networks, optimisers, every random stream, history and counters.
"""

from __future__ import annotations

import torch

from .. import __version__
from ..errors import GanflowError
from .checkpoint import FORMAT_VERSION
from .wgan_gp import optimizer_state_cpu

__all__ = ["substream", "make_checkpoint", "restore_resumed"]


def substream(seed: int, k: int) -> int:
    # Independent, reproducible streams from one user seed (split, init, noise, data order).
    return (int(seed) * 1_000_003 + 7919 * k) % (2**63 - 1)


def restore_resumed(run, ckpt: dict) -> None:
    """Load the checkpoint's networks, optimisers, random streams, history and counters into ``run``."""
    seed, start, device = run.seed, run.start, run.device
    try:
        run.G.load_state_dict(ckpt["G"])
        run.D.load_state_dict(ckpt["D"])
        run.G_ema.load_state_dict(ckpt["G_ema"])
        run.opt_g.load_state_dict(ckpt["opt_G"])
        run.opt_d.load_state_dict(ckpt["opt_D"])
        rng = ckpt["rng"]
        if run.ctx.rank > 0:
            # The checkpoint holds rank 0's streams only: other ranks continue with fresh streams tied to
            # the step (reproducible; bit-identical only for the world size and ranks that wrote it).
            run.noise.manual_seed(substream(seed, 3 + 100 * run.ctx.rank) + start)
            run.order.manual_seed(substream(seed, 4 + 100 * run.ctx.rank) + start)
        elif ckpt.get("device", "cpu") == device:
            run.noise.set_state(rng["noise"])
            run.order.set_state(rng["data"])
        else:
            # A CPU and a CUDA generator have different states: continue with a fresh stream tied to the
            # step (reproducible, but not bit-identical to an uninterrupted run on one device).
            run.noise.manual_seed(substream(seed, 3) + start)
            run.order.set_state(rng["data"])
        torch.set_rng_state(rng["torch_cpu"])
        if device == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
        h = ckpt.get("history", {})
        run.history = {k: [v.item() for v in h[k]] if k in h else [] for k in run.history}
        run.wall0 = float(ckpt.get("wall_time_s", 0.0))
        run.failures = int(ckpt.get("nonfinite_steps", 0))
        run.lr_scale = float(ckpt.get("lr_scale", 1.0))
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GanflowError(
            f"--resume: checkpoint {run.out} does not fit its recorded architecture or state ({first[:160]})"
        ) from None


def make_checkpoint(run, step: int, wall: float) -> dict:
    """The checkpoint dict at generator step ``step`` after ``wall`` seconds of training (tensors on CPU)."""
    rng = {"torch_cpu": torch.get_rng_state(), "noise": run.noise.get_state(), "data": run.order.get_state()}
    if run.device == "cuda":
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
    settings, arch, history = run.settings, run.arch, run.history
    return {
        "format_version": FORMAT_VERSION,
        "kind": "ganflow.prior",
        "ganflow_version": __version__,
        "arch": dict(arch),
        "latent_dim": int(arch["latent_dim"]),
        "field_shape": list(arch["field_shape"]),
        "normalization": {"kind": "range" if settings.output == "tanh" else "scalar",
                          "mean": run.mean.clone(), "std": run.std.clone()},
        "settings": settings.to_dict(),
        "data": run.provenance,
        "seed": int(run.seed),
        "device": run.device,
        "world_size": int(run.ctx.world_size),
        "step": int(step),
        "G": cpu(run.G.state_dict()),
        "D": cpu(run.D.state_dict()),
        "G_ema": cpu(run.G_ema.state_dict()),
        "opt_G": optimizer_state_cpu(run.opt_g),
        "opt_D": optimizer_state_cpu(run.opt_d),
        "rng": rng,
        "history": {
            "step": torch.tensor(history["step"], dtype=torch.int64),
            "wasserstein": torch.tensor(history["wasserstein"], dtype=torch.float64),
            "loss_g": torch.tensor(history["loss_g"], dtype=torch.float64),
        },
        "wall_time_s": float(wall),
        "nonfinite_steps": int(run.failures),
        "lr_scale": float(run.lr_scale),
    }
