"""Plug-in contracts: forward operators, generators, problems, and the Gaussian noise model.

A **forward operator** is a ``torch.nn.Module`` with tuple attributes ``field_shape`` and ``obs_shape`` whose
``forward`` maps ``[B, *field_shape] -> [B, *obs_shape]``, noise-free and differentiable by autograd.
A **generator** is a ``torch.nn.Module`` with ``latent_dim`` (int) and ``field_shape`` mapping
``[B, latent_dim] -> [B, *field_shape]``. A **problem** has ``name``, ``field_shape``,
``make_operator(**kwargs)``, ``sample_fields(n, generator)`` and optionally ``qois()``.

The protocols below are structural (``typing.Protocol``): any object with these members fits; nothing needs
to inherit from ganflow.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import GanflowError

__all__ = [
    "ForwardOperator",
    "Generator",
    "Problem",
    "GaussianNoise",
    "check_operator",
    "check_generator",
    "check_problem",
    "check_compatible",
    "check_observation",
    "call_plugin",
]


@runtime_checkable
class ForwardOperator(Protocol):
    field_shape: tuple[int, ...]
    obs_shape: tuple[int, ...]

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Generator(Protocol):
    latent_dim: int
    field_shape: tuple[int, ...]

    def __call__(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class Problem(Protocol):
    name: str
    field_shape: tuple[int, ...]

    def make_operator(self, **kwargs) -> ForwardOperator: ...

    def sample_fields(self, n: int, generator: torch.Generator) -> Tensor: ...


class GaussianNoise(nn.Module):
    """Additive white Gaussian noise, ``y = A(x) + eta``, ``eta ~ N(0, sigma^2 I)``.

    ``log_likelihood(pred, y) = -||y - pred||^2 / (2 sigma^2) - (m/2) log(2 pi sigma^2)`` per batch entry,
    with ``m`` the number of observed values.

    Args:
        sigma: the absolute noise standard deviation, finite and > 0.

    Example:
        >>> noise = GaussianNoise(0.1)
        >>> float(noise.log_likelihood(torch.zeros(1, 3), torch.zeros(3)))  # doctest: +ELLIPSIS
        4.1...
    """

    def __init__(self, sigma: float):
        super().__init__()
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma <= 0:
            raise GanflowError(f"noise_sigma must be finite and > 0, got {sigma}")
        self.sigma = sigma

    def log_likelihood(self, pred: Tensor, y: Tensor) -> Tensor:
        """``pred`` ``[B, *obs_shape]``, ``y`` ``[*obs_shape]`` -> ``[B]``."""
        r = (pred - y).reshape(pred.shape[0], -1)
        m = r.shape[1]
        return -0.5 * (r * r).sum(1) / self.sigma**2 - 0.5 * m * math.log(2 * math.pi * self.sigma**2)

    def sample(self, pred: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A noisy copy of ``pred``, with noise drawn from ``generator``."""
        eta = torch.randn(pred.shape, generator=generator, dtype=pred.dtype, device=pred.device)
        return pred + self.sigma * eta


def _shape_attr(obj, name: str, what: str) -> tuple[int, ...]:
    if not hasattr(obj, name):
        raise GanflowError(f"{what} {type(obj).__name__} has no attribute '{name}'")
    try:
        shape = tuple(int(s) for s in getattr(obj, name))
    except (TypeError, ValueError):
        raise GanflowError(f"{what} {type(obj).__name__}.{name} is not a tuple of ints") from None
    if not shape or any(s <= 0 for s in shape):
        raise GanflowError(f"{what} {type(obj).__name__}.{name} = {shape} must be non-empty and positive")
    return shape


def check_operator(op) -> nn.Module:
    """Check that ``op`` satisfies the forward-operator contract (structurally)."""
    if not isinstance(op, nn.Module):
        raise GanflowError(f"forward operator must be a torch.nn.Module, got {type(op).__name__}")
    _shape_attr(op, "field_shape", "forward operator")
    _shape_attr(op, "obs_shape", "forward operator")
    return op


def check_generator(gen) -> nn.Module:
    """Check that ``gen`` satisfies the generator contract (structurally)."""
    if not isinstance(gen, nn.Module):
        raise GanflowError(f"generator must be a torch.nn.Module, got {type(gen).__name__}")
    if not isinstance(getattr(gen, "latent_dim", None), int) or gen.latent_dim <= 0:
        raise GanflowError(f"generator {type(gen).__name__} needs a positive int attribute 'latent_dim'")
    _shape_attr(gen, "field_shape", "generator")
    return gen


def check_problem(problem):
    """Check that ``problem`` satisfies the problem contract (structurally)."""
    for name in ("name", "field_shape", "make_operator", "sample_fields"):
        if not hasattr(problem, name):
            raise GanflowError(f"problem {type(problem).__name__} has no attribute '{name}'")
    _shape_attr(problem, "field_shape", "problem")
    return problem


def check_observation(y: Tensor, noise_sigma: float) -> None:
    """``y`` must be finite and ``noise_sigma`` finite and positive."""
    if not torch.isfinite(y).all():
        n_bad = int((~torch.isfinite(y)).sum())
        raise GanflowError(f"observation /y has {n_bad} non-finite value(s)")
    GaussianNoise(noise_sigma)  # validates sigma


def call_plugin(fn, x: Tensor, what: str):
    """``fn(x)`` for a user's plug-in at a check point: an exception there is the user's error, one line."""
    try:
        return fn(x)
    except GanflowError:
        raise
    except Exception as e:  # user code: report what failed and where (--debug shows the traceback)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise GanflowError(f"{what} {type(fn).__name__} raised {type(e).__name__}: {first}") from e


def _stack_hint(y_shape: tuple, obs_shape: tuple) -> str:
    """A /y of shape [M, *obs_shape] is M observations that lack the marker that makes them a stack."""
    if len(y_shape) == len(obs_shape) + 1 and y_shape[1:] == obs_shape:
        return (f"; if /y holds {y_shape[0]} observations, set the obs.h5 attribute n_obs = {y_shape[0]} to solve "
                "them as a stack (docs/files.md)")
    return ""


def check_compatible(generator, operator, y: Tensor | None = None, probe: bool = True) -> None:
    """The checks made before any solve, each with its own message.

    - the generator's ``field_shape`` equals the operator's;
    - the operator's ``obs_shape`` equals the shape of ``y``;
    - ``y`` is finite;
    - with ``probe``, one evaluation ``A(G(0))`` has the declared shapes and is finite, so that a user's
      operator that returns the wrong shape or NaN is caught before a long run.
    """
    check_generator(generator)
    check_operator(operator)
    gshape, fshape = tuple(generator.field_shape), tuple(operator.field_shape)
    if gshape != fshape:
        raise GanflowError(f"generator field_shape {gshape} does not match operator field_shape {fshape}")
    if y is not None:
        oshape = tuple(operator.obs_shape)
        if tuple(y.shape) != oshape:
            raise GanflowError(f"operator obs_shape {oshape} does not match /y shape {tuple(y.shape)}"
                               + _stack_hint(tuple(y.shape), oshape))
        if not torch.isfinite(y).all():
            raise GanflowError(f"observation /y has {int((~torch.isfinite(y)).sum())} non-finite value(s)")
    if probe:
        param = next(iter(list(generator.parameters()) + list(generator.buffers())), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            x = call_plugin(generator, torch.zeros(1, generator.latent_dim, device=device),
                            "generator (at z = 0)")
            if not isinstance(x, Tensor) or tuple(x.shape) != (1, *gshape):
                got = tuple(x.shape)[1:] if isinstance(x, Tensor) else type(x).__name__
                raise GanflowError(f"generator returned shape {got}, declared {gshape}")
            pred = call_plugin(operator, x, "operator (at the generator's field for z = 0)")
        if not isinstance(pred, Tensor):
            raise GanflowError(f"operator returned a {type(pred).__name__}, not a tensor")
        if tuple(pred.shape) != (1, *tuple(operator.obs_shape)):
            raise GanflowError(
                f"operator returned shape {tuple(pred.shape)[1:]}, declared obs_shape {tuple(operator.obs_shape)}"
            )
        if not torch.isfinite(pred).all():
            raise GanflowError("operator returned non-finite values for the generator's field at z = 0")


QoI = Callable[[Tensor], Tensor]
