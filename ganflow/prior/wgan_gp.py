"""The pieces of one WGAN-GP step that do not depend on the run: the gradient penalty, the EMA update, the finite
check, and the in-memory snapshot a non-finite step rolls back to (`ganflow.prior.trainer` runs the loop).

Gulrajani et al., "Improved training of Wasserstein GANs", 2017: the penalty
``lambda E_uhat[(||grad D(uhat)||_2 - 1)^2]`` on ``uhat = eps u + (1 - eps) g(z)``, ``eps ~ U[0, 1]`` per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["gradient_penalty", "ema_update", "all_finite", "snapshot", "restore_snapshot", "optimizer_state_cpu"]


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, noise: torch.Generator) -> Tensor:
    """``E[(||grad_u D(uhat)||_2 - 1)^2]`` on random per-sample interpolates of ``real``, ``fake``."""
    eps = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), generator=noise, device=real.device)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
        pe.lerp_(p, 1.0 - decay)


def all_finite(tensors) -> Tensor:
    """A 0-d bool tensor: every value of every tensor is finite (no device sync)."""
    return torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all()


def snapshot(G: nn.Module, D: nn.Module, G_ema: nn.Module, opt_g, opt_d) -> dict:
    """An in-memory copy of the training state a non-finite step rolls back to."""
    clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
    return {"G": clone(G.state_dict()), "D": clone(D.state_dict()), "G_ema": clone(G_ema.state_dict()),
            "opt_G": clone_optimizer_state(opt_g), "opt_D": clone_optimizer_state(opt_d)}


def clone_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    # Tensor clones, not deepcopy: taken every step, so it has to be cheap.
    sd = opt.state_dict()
    return {"state": {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in st.items()}
                      for k, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def restore_snapshot(snap: dict, G: nn.Module, D: nn.Module, G_ema: nn.Module, opt_g, opt_d) -> None:
    G.load_state_dict(snap["G"])
    D.load_state_dict(snap["D"])
    G_ema.load_state_dict(snap["G_ema"])
    # The optimiser adopts the given tensors and updates them in place: hand it copies, so the snapshot stays
    # valid for another rollback.
    for opt, key in ((opt_g, "opt_G"), (opt_d, "opt_D")):
        st = snap[key]
        opt.load_state_dict({"state": {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                                       for k, s in st["state"].items()},
                             "param_groups": [dict(g) for g in st["param_groups"]]})


def optimizer_state_cpu(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    return {
        "state": {
            k: {n: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for n, v in s.items()}
            for k, s in sd["state"].items()
        },
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }
