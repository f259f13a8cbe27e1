"""One step of the flow fit's objective: the reverse KL ``E_q[log q - log p(y, z)]`` with the sticking-the-landing
(STL) or standard gradient, or an importance-weighted group bound with DReG gradients (Rényi's with ``iw_alpha``),
optionally tempered, ``log p(z) + beta log p(y | z)`` with ``beta`` rising to 1 (`temper_beta`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

__all__ = ["fit_step", "dreg_surrogate", "temper_beta", "temper_end", "StopGradientTwin"]

if TYPE_CHECKING:
    from .flow import _FlowFit
    from .flows import LatentFlow


class StopGradientTwin:
    """``log q`` with the flow's parameters held fixed (the STL estimator): a frozen copy synced in place."""

    def __init__(self, flow: LatentFlow):
        # A plain parameter copy each step; torch.func.functional_call's per-call re-parametrisation cost ~1/3
        # of a step.
        self.frozen = copy.deepcopy(flow).requires_grad_(False)
        self.frozen_tensors = list(self.frozen.parameters()) + list(self.frozen.buffers())
        self.live_tensors = list(flow.parameters()) + list(flow.buffers())

    def __call__(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            torch._foreach_copy_(self.frozen_tensors, self.live_tensors)  # one call, not one per tensor
        return self.frozen(z)


def dreg_surrogate(log_w: Tensor, group: int, alpha: float = 0.0) -> Tensor:
    """The doubly reparameterised surrogate of the importance-weighted bound (Tucker et al., ICLR 2019): over
    groups of ``group`` draws, ``-sum_k stop(w~_k^2) log w_k`` with ``w~`` the normalised weights and ``log q``
    taken with the parameters held fixed. Its gradient is that of the IW bound, which covers the posterior's mass
    better than the ELBO (the reverse-KL fit is too narrow); its value is not the bound, so the recorded loss
    is the plain negative ELBO.

    With ``alpha`` in (0, 1) the bound is Renyi's (Li & Turner 2016), ``1/(1-a) log mean_k w_k^(1-a)``; with
    ``w~`` now normalised ``w^(1-a)``, moving the score term onto the path (as DReG does) gives the coefficient
    ``a w~_k + (1-a) w~_k^2`` in place of ``w~_k^2``: ``alpha = 0`` is the IW bound above, ``alpha -> 1`` the
    sticking-the-landing ELBO gradient (``1/K`` each)."""
    lw = log_w.reshape(-1, group)
    w = torch.softmax((1 - alpha) * lw.detach(), dim=1)
    surrogate = -((alpha * w + (1 - alpha) * w * w) * lw).sum(1).mean()
    elbo = log_w.mean()
    return surrogate - surrogate.detach() - elbo.detach()


def fit_step(fit: _FlowFit, twin: StopGradientTwin, lr: float) -> Tensor | None:
    """One optimisation step on a fresh batch; the loss, or None when the loss or a gradient is not finite."""
    s = fit.settings
    for group in fit.opt.param_groups:
        group["lr"] = lr
    eps = torch.randn(s.batch_size, fit.target.latent_dim, generator=fit.generator)
    z, log_q = fit.flow.transform(eps)
    if s.estimator in ("stl", "dreg"):
        log_q = twin(z)
    beta = temper_beta(fit)
    if beta < 1:  # the tempered target; the recorded loss stays the untempered negative ELBO
        log_lik, log_prior = fit.target.log_likelihood(z), fit.target.log_prior(z)
        log_p, log_p_fit = log_lik + log_prior, beta * log_lik + log_prior
    else:
        log_p = log_p_fit = fit.target.log_joint(z)
    if s.estimator == "dreg" and not fit.component:
        loss = dreg_surrogate(log_p_fit - log_q, s.iw_group, s.iw_alpha)
    else:
        loss = (log_q - log_p_fit).mean()
    if beta < 1:
        loss = loss - loss.detach() + (log_q - log_p).mean().detach()
    fit.opt.zero_grad(set_to_none=True)
    ok = bool(torch.isfinite(loss))
    if ok:
        loss.backward()
        # One reduction instead of a check per tensor: the total norm is finite iff every gradient is.
        grad_norm = torch.nn.utils.clip_grad_norm_(fit.params, s.grad_clip, foreach=True)
        ok = bool(torch.isfinite(grad_norm))
    if ok:  # finite gradients clipped to grad_clip: Adam's step is finite too (no check of the parameters)
        fit.opt.step()
    return loss.detach() if ok else None


def temper_end(fit: _FlowFit) -> int:
    """The step from which the fit's target is the posterior itself (0 without tempering, or for a component)."""
    return 0 if fit.component else int(round(fit.settings.temper_fraction * fit.settings.max_iter))


def temper_beta(fit: _FlowFit) -> float:
    """The likelihood's power at this step: ``beta0^(1 - step / end)`` before the tempering's end, then 1."""
    end = temper_end(fit)
    return 1.0 if fit.step >= end else fit.settings.temper_beta0 ** (1 - fit.step / end)
