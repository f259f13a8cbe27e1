"""An amortised latent posterior ``q_phi(z | y)``: one conditional flow for every observation of a problem.

Trained once per (prior ``G``, operator ``A``, noise level ``sigma``) on simulated pairs

    z ~ N(0, I_k),   y = A(G(z)) + sigma * eta,   eta ~ N(0, I)

by minimising the forward KL averaged over the data, ``E_{p(y)} KL(p(z|y) || q_phi(z|y))``, i.e. maximising
``E_{p(z, y)}[log q_phi(z | y)]`` (neural posterior estimation; Papamakarios & Murray 2016, Greenberg et al.
2019). No gradient of ``A`` is needed. Optionally the forward phase is followed by reverse-KL refinement,
``E_{p(y)} E_q[log q_phi(z|y) - log p(y, z)]`` on simulated ``y`` (this one differentiates ``A(G(z))``).

The flow (normflows' conditional layers) is, in the sampling direction,

    eps ~ N(0, I_k) -> [rational-quadratic spline coupling, conditioner sees c] x n_layers
                    -> z = loc(c) + L(c) u  (L lower triangular),        c = embed(y)

where ``embed`` standardises the flattened observation (moments of a simulated pilot set) and maps it through
an MLP plus a linear skip, so that a posterior mean linear in ``y`` (a linear-Gaussian problem) is easy. The
Gaussian layer starts at the linear-regression posterior of the pilot pairs (`_regression_start`), the
couplings at the identity.

Checkpoints (``amortized.pt``) hold tensors and plain types only and load with ``weights_only=True``; they
record the prior's and the operator's fingerprints (`ganflow.fingerprint`, compared to rounding), ``noise_sigma``
and ``obs_shape``, which `AmortizedPosterior.check` compares with an observation before any use.

Example:
    >>> import torch
    >>> from ganflow.problems.linear_gaussian import LinearGaussianProblem
    >>> p = LinearGaussianProblem(n=4, latent_dim=2)
    >>> s = AmortizedSettings(n_layers=1, hidden=8, embed_hidden=8, embed_dim=4, max_iter=2, batch_size=8,
    ...                       n_val=8, eval_every=1, progress=False)
    >>> post = train_amortized(p.generator(), p.make_operator(), 0.1, None, s, seed=0).posterior
    >>> post.sample(torch.zeros(p.obs_shape), 5, torch.Generator().manual_seed(0))[0].shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import GanflowError
from ..fingerprint import operator_fingerprint, prior_fingerprint, same_fingerprint, short_fingerprint
from .amortized_training import (
    AMORTIZED_KIND,
    AmortizedSettings,
    AmortizedTrainResult,
    build_model,
    load_training_checkpoint,
    simulate_pairs,
    train_amortized,
)
from .base import LatentFit
from .conditional_flow import ConditionalLatentFlow, ConditionedFlow
from .flow import FlowSettings, fit_flow, flow_sampler
from .target import LatentTarget

# Training (amortized_training) and the network (conditional_flow) live in their own modules; what users import
# from here stays importable from here.
__all__ = ["AmortizedSettings", "ConditionalLatentFlow", "AmortizedPosterior", "AmortizedTrainResult",
           "train_amortized", "load_amortized", "simulate_pairs", "AMORTIZED_KIND"]

# Fine-tuning q(. | y) for one observation (`--refine`): its weights multiply a fixed context whose entries sum to
# 30-50 in absolute value, so a step of the default flow learning rate (3e-3) moved a q that already met the
# accuracy targets away from them (curved: 2 of 5 refined fits ended at 0.17 and 0.10 sd; linear_gaussian at
# 1.3-26 sd); capped at 3e-4, 3 of the 8 still ended outside (up to 0.35 sd); at 1e-4 all 8 end within them
# (at most 0.08 sd and 5 %), linear_gaussian's reaching them in 10-50 steps (`ganflow bench --amortized`).
REFINE_LR = 1e-4


def _refine_settings(settings: FlowSettings) -> FlowSettings:
    """The `FlowSettings` of a fit started from ``q(. | y)``: the learning rate capped at `REFINE_LR`."""
    return dataclasses.replace(settings, lr=min(settings.lr, REFINE_LR), lr_final=min(settings.lr_final, REFINE_LR))


# --- use ---------------------------------------------------------------------------------------------------
@dataclass
class AmortizedPosterior:
    """A trained ``q_phi(z | y)`` with what it was trained for (``meta``: the checkpoint's keys)."""

    model: ConditionalLatentFlow
    meta: dict
    path: str | None = None

    @property
    def latent_dim(self) -> int:
        return int(self.meta["latent_dim"])

    @property
    def record(self) -> dict:
        return dict(self.meta.get("record") or {})

    def check(self, generator: nn.Module, operator: nn.Module, noise_sigma: float, y: Tensor) -> None:
        """One-line `GanflowError` unless the observation, its noise level, the prior and the operator are the
        ones this posterior was trained for."""
        where = self.path or "the amortized posterior"
        trained = float(self.meta["noise_sigma"])
        if not math.isclose(float(noise_sigma), trained, rel_tol=1e-5):
            raise GanflowError(f"{where} was trained for noise_sigma {trained:.6g}; the observation has "
                               f"{float(noise_sigma):.6g} (train-posterior --noise-sigma {float(noise_sigma):.6g})")
        if list(y.shape) != list(self.meta["obs_shape"]):
            raise GanflowError(f"{where} was trained for observations of shape {tuple(self.meta['obs_shape'])}, "
                               f"got {tuple(y.shape)}")
        now = prior_fingerprint(generator)
        if not same_fingerprint(self.meta["prior_sha1"], now):
            raise GanflowError(f"{where} was trained with another prior (fingerprint "
                               f"{short_fingerprint(self.meta['prior_sha1'])}, this one {short_fingerprint(now)})")
        if not same_fingerprint(self.meta["operator_fingerprint"], operator_fingerprint(operator)):
            shown = operator.extra_repr() or type(operator).__name__
            raise GanflowError(f"{where} was trained with other operator settings ({shown} differs from the "
                               "trained one)")

    @torch.no_grad()
    def sample(self, y: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` draws ``z ~ q(. | y)`` and their ``log q``; ``y`` ``[*obs_shape]``."""
        return ConditionedFlow(self.model, y, share=True).sample(n, generator)

    def fit(self, y: Tensor) -> LatentFit:
        """The amortised posterior for one observation as a `LatentFit` (method ``amortized``)."""
        t0 = time.perf_counter()
        conditioned = ConditionedFlow(self.model, y, share=True).eval()
        return LatentFit(method="amortized", sampler=flow_sampler(conditioned), attrs=self._attrs(refined=False),
                         trace={"loss": np.zeros(0)}, settings=asdict(self.model.settings), n_forward_evals=0,
                         wall_time_s=time.perf_counter() - t0, model=_NoGradSampler(conditioned))

    def refine(self, target: LatentTarget, settings: FlowSettings, generator: torch.Generator,
               **fit_kwargs: Any) -> LatentFit:
        """`fit_flow` started from ``q(. | y)`` (the conditioned coupling/LU/affine layers are fine-tuned to the
        usual stopping rule); the result's method is ``amortized`` with ``refined`` = True."""
        start = ConditionedFlow(self.model, target.y)
        fit = fit_flow(target, _refine_settings(settings), generator, start=start, **fit_kwargs)
        fit.method = "amortized"
        fit.attrs.update(self._attrs(refined=True))
        fit.model = _NoGradSampler(fit.model)
        return fit

    def _attrs(self, refined: bool) -> dict:
        return {"amortized": os.path.abspath(self.path) if self.path else "", "amortized_refined": refined,
                "amortized_prior_sha1": self.meta["prior_sha1"],
                "amortized_train_steps": int(self.meta.get("step", 0)),
                "amortized_train_wall_s": float(self.meta.get("wall_time_s", 0.0))}


class _NoGradSampler:
    """``sample(n, generator) -> (z, log_q)`` without autograd (what the diagnostics draw from)."""

    def __init__(self, flow: nn.Module):
        self.flow = flow

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.flow.sample(n, generator)


def load_amortized(path: str | os.PathLike) -> AmortizedPosterior:
    """Load ``amortized.pt`` with ``weights_only=True``; the best (finished) model in eval mode."""
    path = os.fspath(path)
    ckpt = load_training_checkpoint(path)
    try:
        from ..config import parse_settings

        s = parse_settings(AmortizedSettings, ckpt["settings"], "amortized")
        shape = [int(d) for d in ckpt["obs_shape"]]
        zeros = torch.zeros(shape)
        model = build_model(ckpt, s, zeros, torch.ones(shape), int(ckpt["seed"]))
        model.load_state_dict(ckpt["model"] if ckpt["phase"] != "forward" else ckpt["best_model"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GanflowError(f"amortized checkpoint {path} is incomplete or does not fit its model "
                           f"({first[:160]})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "best_model", "opt")}
    return AmortizedPosterior(model, meta, path)
