"""Synthetic measurements: a truth (drawn from the prior, or given) pushed through the operator, plus noise.

    y = A(x_true) + eta,   eta ~ N(0, sigma^2 I),
    sigma = noise_sigma (absolute)  or  noise_relative * max |A(x_true)|.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import GanflowError
from .io import Observation, open_h5
from .operators import GaussianNoise, check_compatible, check_operator
from .plugins import load_operator, normalize_spec

__all__ = ["simulate", "simulate_stack", "read_truth", "SimulateSettings"]


@dataclass(frozen=True)
class SimulateSettings:
    """The ``[simulate]`` table: the noise level when no command-line option gives it."""

    noise_sigma: float | None = None
    noise_relative: float | None = None


def read_truth(path: str | os.PathLike) -> torch.Tensor:
    """A truth field from an HDF5 file: ``/x_true``, ``/x`` or the first entry of ``/fields``."""
    path = os.fspath(path)
    with open_h5(path, "truth file") as f:
        for name in ("x_true", "x", "fields"):
            if name in f:
                arr = np.asarray(f[name][()] if name != "fields" else f[name][0])
                if not np.issubdtype(arr.dtype, np.number):
                    raise GanflowError(f"{path}: /{name} is not numeric")
                if not np.isfinite(arr).all():
                    raise GanflowError(f"{path}: /{name} has non-finite values")
                return torch.from_numpy(arr.astype(np.float32))
    raise GanflowError(f"{path}: no /x_true, /x or /fields dataset")


def simulate(
    problem: str,
    *,
    prior=None,
    truth: torch.Tensor | None = None,
    operator_kwargs: dict | None = None,
    problem_kwargs: dict | None = None,
    noise_sigma: float | None = None,
    noise_relative: float | None = None,
    seed: int = 0,
    prior_label: str | None = None,
    device: str = "cpu",
) -> Observation:
    """Make a synthetic observation. Exactly one of ``prior`` (a generator; the truth is ``G(z)``,
    ``z ~ N(0, I)``) and ``truth`` (a field); exactly one of ``noise_sigma`` and ``noise_relative``.
    ``device`` runs the prior and the operator there; the draws come from a CPU generator either way, so the
    observation does not depend on the device beyond floating-point rounding."""
    if (prior is None) == (truth is None):
        raise GanflowError("give exactly one of --prior and --truth")
    if (noise_sigma is None) == (noise_relative is None):
        raise GanflowError("give exactly one of --noise-sigma and --noise-relative")
    level = noise_sigma if noise_sigma is not None else noise_relative
    if not math.isfinite(level) or level <= 0:
        raise GanflowError(f"noise level must be finite and > 0, got {level}")
    gen = torch.Generator().manual_seed(seed)
    op = check_operator(load_operator(problem=problem, problem_kwargs=problem_kwargs, **(operator_kwargs or {})))
    if device != "cpu":  # --- issue 10: --device
        from .distributed import check_device

        check_device(device)
        op = op.to(device)
        prior = prior.to(device) if prior is not None else None
    # --- end issue 10 ---
    z_true = None
    with torch.no_grad():
        if prior is not None:
            check_compatible(prior, op, None)
            z_true = torch.randn(1, prior.latent_dim, generator=gen)
            x_true = prior(z_true.to(device))[0].float()
            z_true = z_true[0]
        else:
            x_true = truth.float()
            if tuple(x_true.shape) != tuple(op.field_shape):
                raise GanflowError(f"truth shape {tuple(x_true.shape)} does not match operator field_shape "
                                   f"{tuple(op.field_shape)}")
        clean = op(x_true[None].to(device))[0].cpu()
        x_true = x_true.cpu()
        if not torch.isfinite(clean).all():
            raise GanflowError("the operator returned non-finite values for the truth")
        sigma = noise_sigma if noise_sigma is not None else noise_relative * float(clean.abs().max())
        if sigma <= 0:
            raise GanflowError("noise_relative gives sigma = 0 because A(x_true) is zero; use --noise-sigma")
        y = GaussianNoise(sigma).sample(clean[None], gen)[0]
    return Observation(
        y=y, noise_sigma=float(sigma), problem=normalize_spec(problem), operator_kwargs=dict(operator_kwargs or {}),
        problem_kwargs=dict(problem_kwargs or {}), x_true=x_true, z_true=z_true, prior=prior_label,
    )


# --- issue 10: stacks (ganflow simulate --n-obs M) ---
def simulate_stack(problem: str, n_obs: int, *, seed: int = 0, **kwargs) -> list[Observation]:
    """``n_obs`` observations; observation ``i`` is exactly what `simulate` writes with seed ``seed + i``
    (same truth source, noise settings and operator; ``kwargs`` are `simulate`'s)."""
    if n_obs < 1:
        raise GanflowError(f"--n-obs must be >= 1, got {n_obs}")
    # With --truth every observation sees the same field under independent noise.
    return [simulate(problem, seed=seed + i, **kwargs) for i in range(n_obs)]
# --- end issue 10 ---
