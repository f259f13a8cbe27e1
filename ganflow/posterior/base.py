"""What every posterior method returns: a `LatentFit`.

A method (flow, Langevin, NUTS) runs against a `LatentTarget` and returns a `LatentFit`:

- ``sampler(n, generator) -> [n, k]`` draws fresh latent samples (a flow can draw any number; sample-based
  methods return their stored draws, cycling or subsampling them), or ``samples`` holds fixed draws;
- ``trace``: named 1-D arrays written under ``/trace`` in ``posterior.h5`` (``loss`` is the per-iteration
  objective that every method provides);
- ``attrs``: extra scalar attributes for ``posterior.h5`` (e.g. ``step_size``, ``rhat_max``, ``ess_min``);
- ``state``: named tensors to store so that the posterior can be re-sampled later (the flow's weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["LatentFit"]


@dataclass
class LatentFit:
    method: str
    samples: Tensor | None = None  # [N, k] stored draws (MCMC-style methods)
    sampler: Callable[[int, torch.Generator], Tensor] | None = None  # fresh draws (flow)
    trace: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    n_forward_evals: int = 0
    wall_time_s: float = 0.0
    model: Any = None  # the fitted object itself (the flow), for in-process reuse such as `--init flow`

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``[n, k]`` latent draws: fresh from ``sampler``, else the stored ``samples`` (without replacement
        while enough are stored, with replacement beyond)."""
        if self.sampler is not None:
            return self.sampler(n, generator)
        if self.samples is None:
            raise RuntimeError("LatentFit has neither samples nor a sampler")
        N = self.samples.shape[0]
        if n <= N:
            idx = torch.randperm(N, generator=generator)[:n]
        else:
            idx = torch.randint(N, (n,), generator=generator)
        return self.samples[idx]

    def chains(self) -> np.ndarray | None:
        """``[C, S, k]``: the stored draws chain by chain, in the order drawn: by ``trace["chain"]`` (NUTS); the
        end points of short-run Langevin's independent chains as one chain ``[1, N, k]``; else None (a flow
        draws afresh; other samplers' draws are not chains)."""
        if self.samples is None:
            return None
        z = self.samples.detach().cpu().numpy()
        if "chain" in self.trace:
            chain = np.asarray(self.trace["chain"])
            ids = np.unique(chain)
            counts = {int((chain == c).sum()) for c in ids}
            if len(counts) != 1 or len(chain) != len(z):
                return None
            return np.stack([z[chain == c] for c in ids])
        return z[None] if self.method == "langevin" else None
