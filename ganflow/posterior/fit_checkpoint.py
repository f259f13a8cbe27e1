"""Checkpoints of a flow fit (``<output>.ckpt``): what a fit saves every ``checkpoint_every_s``, what a resume must
agree with (the target's fingerprint, the settings that change the computation), and the restore that continues a
fit bit-exactly on the same machine.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from ..errors import GanflowError
from .target import LatentTarget

__all__ = ["FLOW_CHECKPOINT_KIND", "FLOW_CHECKPOINT_VERSION", "load_flow_checkpoint", "load_resume_checkpoint",
           "restore_fit", "save_fit_checkpoint", "snapshot", "target_fingerprint", "save_fitted_flow",
           "load_fitted_flow", "FITTED_FLOW_KIND"]

if TYPE_CHECKING:
    from .flow import FlowSettings, _FlowFit
    from .flows import LatentFlow


FLOW_CHECKPOINT_KIND = "ganflow.flow_fit"


FLOW_CHECKPOINT_VERSION = 1


# Settings that may differ on resume: they change neither the computation nor the result.
_RESUME_FREE = {"progress", "max_iter", "patience", "min_iter", "max_failures", "checkpoint_every_s"}


def target_fingerprint(target: LatentTarget) -> str:
    """What a checkpoint must have been fitted against: the data, sigma and the latent dimension."""
    h = hashlib.sha1(target.y.detach().cpu().float().numpy().tobytes())
    h.update(f"{target.noise_sigma!r}|{target.latent_dim}|{tuple(target.obs_shape)}".encode())
    return h.hexdigest()


def load_flow_checkpoint(path: str | os.PathLike) -> dict:
    """Load a flow-fit checkpoint with ``weights_only=True`` (a pickle payload is refused, never run)."""
    from ..checkpoint import load_of_kind

    return load_of_kind(path, "flow checkpoint", "ganflow flow-fit checkpoint", FLOW_CHECKPOINT_KIND,
                        FLOW_CHECKPOINT_VERSION)


def snapshot(flow: LatentFlow, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the flow's and the optimiser's state to roll back to."""
    # Plain tensor clones (cheaper than deepcopy of the whole dicts).
    model = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    opt_state = opt.state_dict()
    opt_copy = {
        "state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                  for i, st in opt_state["state"].items()},
        "param_groups": copy.deepcopy(opt_state["param_groups"]),
    }
    return model, opt_copy


def load_resume_checkpoint(target: LatentTarget, s: FlowSettings, checkpoint_path) -> dict:
    """The checkpoint to resume from, refused unless it was fitted with these settings to this target."""
    if checkpoint_path is None:
        raise GanflowError("resume needs a checkpoint path")
    if not os.path.exists(checkpoint_path):
        raise GanflowError(f"--resume: no flow checkpoint at {checkpoint_path}")
    ckpt = load_flow_checkpoint(checkpoint_path)
    try:
        saved = dict(ckpt["settings"])
        fingerprint = ckpt["target"]
    except (KeyError, TypeError, ValueError):
        raise GanflowError(f"flow checkpoint {checkpoint_path} lacks its settings or target") from None
    bad = sorted(key for key in set(saved) | set(asdict(s))
                 if key not in _RESUME_FREE and saved.get(key) != asdict(s).get(key))
    if bad:
        raise GanflowError(f"--resume: flow settings differ from the checkpoint's: {', '.join(bad)}")
    if fingerprint != target_fingerprint(target):
        raise GanflowError(f"--resume: {checkpoint_path} was fitted to other data, noise or prior")
    return ckpt


def restore_fit(fit: _FlowFit, ckpt: dict, checkpoint_path) -> None:
    """Resume: put the interrupted fit's flow, optimiser, snapshot, RNG state, step and traces back."""
    try:
        fit.flow.load_state_dict(ckpt["flow"])
        fit.opt.load_state_dict(ckpt["opt"])
        fit.good = (ckpt["good_flow"], ckpt["good_opt"])
        fit.generator.set_state(ckpt["rng"])
        fit.step, fit.failures, fit.lr_scale = int(ckpt["step"]), int(ckpt["failures"]), float(ckpt["lr_scale"])
        fit.smooth = None if ckpt["smooth"] is None else float(ckpt["smooth"])
        fit.best_smooth, fit.best_step = float(ckpt["best_smooth"]), int(ckpt["best_step"])
        fit.losses = ckpt["losses"].tolist()
        fit.elbo_smooth = ckpt["elbo_smooth"].tolist()
        fit.lrs = ckpt["lrs"].tolist()
        fit.evals_before, fit.wall_before = int(ckpt["n_forward_evals"]), float(ckpt["wall_time_s"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GanflowError(f"flow checkpoint {checkpoint_path} does not fit this flow ({first[:160]})") from None


def save_fit_checkpoint(fit: _FlowFit, checkpoint_path, mixture: dict | None = None) -> None:
    """Write the whole fit state atomically (tensors and plain types: ``weights_only``-loadable); for a
    mixture, ``mixture`` holds its modes and finished components and ``fit`` is the component in progress."""
    from ..checkpoint import save_checkpoint

    cpu = lambda sd: copy.deepcopy({k_: v for k_, v in sd.items()})  # noqa: E731
    save_checkpoint(checkpoint_path, {
        "kind": FLOW_CHECKPOINT_KIND,
        "format_version": FLOW_CHECKPOINT_VERSION,
        "settings": asdict(fit.settings),
        "target": target_fingerprint(fit.target),
        "latent_dim": fit.target.latent_dim,
        "init_loc": None if fit.loc is None else fit.loc.detach().cpu().clone(),
        "init_scale_tril": None if fit.scale_tril is None else fit.scale_tril.detach().cpu().clone(),
        "attrs": {k_: v for k_, v in fit.attrs.items() if isinstance(v, (int, float, str, bool))
                  or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))},
        "flow": cpu(fit.flow.state_dict()),
        "opt": cpu(fit.opt.state_dict()),
        "good_flow": fit.good[0],
        "good_opt": fit.good[1],
        "rng": fit.generator.get_state(),
        "step": fit.step,
        "failures": fit.failures,
        "lr_scale": fit.lr_scale,
        "smooth": fit.smooth,
        "best_smooth": fit.best_smooth,
        "best_step": fit.best_step,
        "losses": torch.tensor(fit.losses, dtype=torch.float64),
        "elbo_smooth": torch.tensor(fit.elbo_smooth, dtype=torch.float64),
        "lrs": torch.tensor(fit.lrs, dtype=torch.float64),
        "n_forward_evals": fit.n_forward_evals(),
        "wall_time_s": fit.wall_time_s(),
        **({"mixture": mixture} if mixture is not None else {}),
    })


FITTED_FLOW_KIND = "ganflow.fitted_flow"


def save_fitted_flow(fit, target: LatentTarget, path) -> None:
    """A finished flow fit (`LatentFit` of ``fit_flow``) that a sampler started from (SMC's ``start = "flow"``),
    so that a resumed run reuses it instead of refitting: refitting costs the fit again, and on another machine
    gives another flow, which the SMC checkpoint (its particles' ``log q``) would refuse."""
    from ..checkpoint import save_checkpoint

    save_checkpoint(path, {
        "kind": FITTED_FLOW_KIND, "format_version": 1, "target": target_fingerprint(target),
        "latent_dim": target.latent_dim, "settings": dict(fit.settings), "state": dict(fit.state),
        "n_forward_evals": int(fit.n_forward_evals), "wall_time_s": float(fit.wall_time_s),
        "attrs": {k: v for k, v in fit.attrs.items() if isinstance(v, (int, float, str, bool))},
    })


def load_fitted_flow(target: LatentTarget, path):
    """The `LatentFit` saved by `save_fitted_flow` (weights only), refused if it was fitted to other data."""
    from ..checkpoint import load_of_kind
    from .base import LatentFit
    from .flow import flow_from_state, flow_sampler

    ckpt = load_of_kind(path, "start flow", "ganflow fitted-flow file", FITTED_FLOW_KIND, 1)
    if ckpt.get("target") != target_fingerprint(target):
        raise GanflowError(f"--resume: {path} was fitted to other data, noise or prior")
    try:
        model = flow_from_state(int(ckpt["latent_dim"]), ckpt["settings"], ckpt["state"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GanflowError(f"start flow {path} does not fit this flow ({first[:160]})") from None
    return LatentFit(method="flow", sampler=flow_sampler(model), attrs=dict(ckpt["attrs"]), state=ckpt["state"],
                     settings=ckpt["settings"], n_forward_evals=int(ckpt["n_forward_evals"]),
                     wall_time_s=float(ckpt["wall_time_s"]), model=model)
