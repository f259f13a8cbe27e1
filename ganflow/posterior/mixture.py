"""A mixture of latent flows, one per posterior mode, and its mixture weights.

A multimodal latent posterior (phase retrieval's twin images, any operator that loses a sign) is represented by

    q(z) = sum_k w_k q_k(z),

one flow ``q_k`` fitted by reverse KL from the Laplace approximation at each distinct mode that the multi-start
MAP search finds (`ganflow.posterior.flow.laplace_modes`). Reverse KL is mode-seeking, so one flow started at a
mode stays there; the weights cannot come from the component fits and are set afterwards by importance
sampling (`fit_mixture_weights`): the posterior mass each component is responsible for. The density
``log q(z) = logsumexp_k(log w_k + log q_k(z))`` is exact, so PSIS k-hat and the importance weights of the
diagnostics apply to the mixture as to a single flow.

Example:
    >>> import torch
    >>> from ganflow.posterior.flow import FlowSettings, LatentFlow
    >>> s = FlowSettings(n_layers=2, hidden=8)
    >>> q = MixtureFlow([LatentFlow(2, s, torch.tensor([-2.0, 0.0])), LatentFlow(2, s, torch.tensor([2.0, 0.0]))],
    ...                 torch.tensor([0.7, 0.3]).log())
    >>> z, log_q = q.sample(5, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(q.log_prob(z), log_q, atol=1e-5))
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MixtureFlow", "fit_mixture_weights"]


class MixtureFlow(nn.Module):
    """``q(z) = sum_k w_k q_k(z)`` over component flows (each with ``transform`` and ``log_prob``).

    ``sample(n, generator)`` -> ``(z [n, k], log_q [n])`` (component indices, then base draws, from
    ``generator``); ``log_prob(z)`` -> ``[n]`` (also ``forward``). ``log_weights`` ``[K]`` is a buffer, so the
    state dict holds the whole mixture.
    """

    def __init__(self, components: list[nn.Module], log_weights: Tensor):
        super().__init__()
        if len(components) != log_weights.shape[0]:
            raise ValueError(f"{len(components)} components but {log_weights.shape[0]} weights")
        self.components = nn.ModuleList(components)
        self.latent_dim = int(components[0].latent_dim)
        self.register_buffer("log_weights", torch.log_softmax(log_weights.detach().double(), 0).float())

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        device = self.log_weights.device
        which = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator).to(device)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=device)
        z = torch.empty_like(eps)
        for j, flow in enumerate(self.components):
            rows = which == j
            if bool(rows.any()):
                z[rows] = flow.transform(eps[rows])[0].to(z.dtype)
        return z, self.log_prob(z)

    def component_log_probs(self, z: Tensor) -> Tensor:
        """``[K, n]``: each component's ``log q_k(z)``."""
        return torch.stack([flow.log_prob(z) for flow in self.components])

    def log_prob(self, z: Tensor) -> Tensor:
        lw = self.log_weights.to(z.dtype)
        return torch.logsumexp(lw[:, None] + self.component_log_probs(z), 0)

    forward = log_prob


def _draws(target, components, n: int, generator: torch.Generator, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` draws of each component: ``z [K n, k]``, ``log p(y, z) [K n]`` and ``log q_j(z) [K, K n]``."""
    with torch.no_grad():
        z = torch.cat([flow.sample(n, generator)[0] for flow in components])
        log_p = torch.cat([target.log_joint(c) for c in z.split(batch)]).double()
        log_q = torch.stack([flow.log_prob(z).double() for flow in components])
    return z, torch.nan_to_num(log_p, nan=-math.inf), log_q


def fit_mixture_weights(target, components: list[nn.Module], generator: torch.Generator, n: int = 1024,
                        batch: int = 256, n_iter: int = 500) -> tuple[Tensor, dict]:
    """The weights ``w_k`` of ``q = sum_k w_k q_k`` that match the posterior mass each component covers.

    ``n`` draws of each component are importance draws from the balanced mixture ``q_bal = (1/K) sum_j q_j``
    (multiple importance sampling with the balance heuristic, Veach & Guibas 1995): weights
    ``omega = p(y, z) / q_bal(z)``. The mixture weights are the fixed point of EM on ``KL(p || q)``,

        w_k <- sum_i omega_i r_k(z_i) / sum_i omega_i,   r_k(z) = w_k q_k(z) / sum_j w_j q_j(z),

    the share of the posterior that component ``k`` is responsible for. For well-separated components it is
    the importance-sampling evidence of each component, ``w_k ~ Z_k = E_{q_k}[p(y, z) / q_k(z)]``, which is
    unbiased where ``exp(ELBO_k)`` is low by ``exp(-KL_k)``; overlapping components share their mass instead of
    counting it twice.

    Returns ``(log_weights [K], attrs)``: ``mode_weights_se`` (delta-method standard errors of the weights),
    ``log_evidence`` (``log mean omega``), ``elbo`` (the mixture's ``E_q[log p(y, z) - log q(z)]``) and
    ``mode_elbos`` (each component's own ELBO).
    """
    K = len(components)
    _, log_p, log_q = _draws(target, components, n, generator, batch)
    log_omega = log_p - (torch.logsumexp(log_q, 0) - math.log(K))
    log_w = torch.full((K,), -math.log(K), dtype=torch.float64)
    for _ in range(n_iter):
        log_r = torch.log_softmax(log_w[:, None] + log_q, 0)
        new = torch.logsumexp(log_omega + log_r, 1) - torch.logsumexp(log_omega, 0)
        done = bool(torch.allclose(new.exp(), log_w.exp(), atol=1e-10))
        log_w = new
        if done:
            break
    return log_w, _weight_attrs(log_w, log_p, log_q, log_omega, n)


def _weight_attrs(log_w: Tensor, log_p: Tensor, log_q: Tensor, log_omega: Tensor, n: int) -> dict:
    """Standard errors of the weights (ratio estimator, delta method), the evidence and the ELBOs."""
    K = log_w.shape[0]
    omega = torch.exp(log_omega - log_omega.max())
    r = torch.softmax(log_w[:, None] + log_q, 0)
    w = log_w.exp()
    se = torch.sqrt(((omega * (r - w[:, None])) ** 2).sum(1)) / omega.sum()
    log_mix = torch.logsumexp(log_w[:, None] + log_q, 0)
    per_comp = (log_p - log_mix).reshape(K, n)
    own = (log_p.reshape(K, n) - torch.stack([log_q[j, j * n:(j + 1) * n] for j in range(K)]))
    finite = lambda x: torch.where(torch.isfinite(x), x, torch.nan)  # noqa: E731
    return {
        "mode_weights_se": [float(v) for v in se],
        "log_evidence": float(torch.logsumexp(log_omega, 0) - math.log(log_omega.numel())),
        "elbo": float((w * finite(per_comp).nanmean(1)).sum()),
        "mode_elbos": [float(v) for v in finite(own).nanmean(1)],
    }
