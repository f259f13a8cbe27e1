"""Posteriors for ArviZ: `to_arviz` and ``ganflow export posterior.h5 --format arviz -o posterior.nc``.

Needs the optional extra ``pip install 'ganflow[arviz]'`` (ArviZ and h5netcdf; ArviZ 1.x, built on xarray's
DataTree, on Python >= 3.12; the 0.x line, built on ``InferenceData``, on Python 3.11: the same groups either way).
The groups, with dimensions ``chain`` and ``draw`` first:

- ``posterior``: ``z`` ``[chain, draw, latent]``. NUTS: its chains as they ran (``/latent/chains``);
  short-run Langevin: the end points of its independent chains as one chain; a flow (or a file without
  ``/latent/chains``): its independent draws (``/latent/samples``) as one chain.
- ``log_likelihood``: ``y`` ``[chain, draw, *obs]``, ``log N(y_i | A(G(z))_i, sigma^2)`` per observed value, so
  that ``arviz.loo`` (PSIS-LOO) runs. The plain Gaussian noise of ``noise_sigma``: a solve's representation
  error, when it was on, is not part of it (attribute ``log_likelihood``).
- ``posterior_predictive``: ``y`` ``[chain, draw, *obs]``, ``A(G(z)) + sigma eps`` (``eps`` seeded).
- ``observed_data``: ``y`` ``[*obs]``.
- ``sample_stats``: ``lp`` (``log p(y, z)`` up to a constant) for every method; NUTS adds ``diverging``,
  ``acceptance_rate`` (each draw's mean Metropolis acceptance probability over its tree) and ``step_size``.

``A(G(z))`` is recomputed: the generator and operator come from the arguments or, as in ``ganflow predict``,
from the file's ``prior``, ``problem`` and ``operator`` attributes under the trust rule. ``max_draws`` caps the
draws exported (evenly thinned within each chain), since the predictive groups hold ``draws x obs`` values.
The posterior group's attributes carry the file's scalar diagnostics (``rhat_max``, ``ess_min``, ``psis_khat``
...): ``rhat_max`` and ``ess_min`` are ArviZ's own default R-hat and bulk ESS (`ganflow.chain_stats`).

Example:
    >>> idata = to_arviz("posterior.h5")  # doctest: +SKIP
    >>> import arviz as az; az.loo(idata)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import GanflowError
from .io import atomic_path, check_output_path
from .results import DIAGNOSTIC_ATTRS, PosteriorResult

__all__ = ["to_arviz", "export_arviz", "require_arviz", "DEFAULT_MAX_DRAWS"]

DEFAULT_MAX_DRAWS = 4_000
EXTRA_HINT = "pip install 'ganflow[arviz]'"
# per-draw NUTS statistics in /trace -> their ArviZ names
_SAMPLE_STATS = {"diverging": "diverging", "accept_prob": "acceptance_rate", "step_size": "step_size"}


def require_arviz():
    """The ``arviz`` module, or a one-line `GanflowError` naming the extra that installs it."""
    try:
        with warnings.catch_warnings():  # ArviZ 0.x announces its refactor on import
            warnings.simplefilter("ignore", FutureWarning)
            import arviz
    except ImportError:
        raise GanflowError(f"ArviZ export needs the optional extra 'arviz': {EXTRA_HINT}") from None
    return arviz


def to_arviz(posterior: PosteriorResult | str | os.PathLike, *, prior: Any = None, problem: str | None = None,
             operator: Any = None, max_draws: int | None = DEFAULT_MAX_DRAWS, seed: int = 0,
             batch_size: int = 500):
    """An ArviZ data object (``InferenceData`` for ArviZ 0.x, ``DataTree`` for 1.x) of a posterior (a
    `PosteriorResult` or the path of posterior.h5); groups as in the module docstring.

    Args:
        prior, problem, operator: the generator and forward operator (module or spec), default the file's.
        max_draws: at most this many draws in all (None: every stored draw).
        seed: seeds the posterior-predictive noise.
    """
    az = require_arviz()
    result = posterior if isinstance(posterior, PosteriorResult) else PosteriorResult.load(posterior)
    if max_draws is not None and max_draws < 1:
        raise GanflowError(f"max_draws must be >= 1, got {max_draws}")
    z, keep = _latent_chains(result, max_draws)
    G, op = _forward_model(result, prior, problem, operator)
    pred = _predictions(G, op, z, batch_size)
    y, sigma = np.asarray(result.y, np.float64), float(result.noise_sigma)
    log_lik = -0.5 * ((y - pred) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
    noise = torch.randn(pred.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    stats = _sample_stats(result, keep, z.shape[:2])
    stats["lp"] = log_lik.reshape(*z.shape[:2], -1).sum(-1) - 0.5 * (z.astype(np.float64) ** 2).sum(-1)
    groups = {
        "posterior": _dataset({"z": z}, ["latent"], _posterior_attrs(result)),
        "log_likelihood": _dataset({"y": log_lik}, _obs_dims(y)),
        "posterior_predictive": _dataset({"y": pred + sigma * noise}, _obs_dims(y)),
        "observed_data": _dataset({"y": y}, _obs_dims(y), sample=False),
        "sample_stats": _dataset(stats, []),
    }
    if int(az.__version__.split(".")[0]) >= 1:
        import xarray as xr

        return xr.DataTree.from_dict(groups)
    return az.InferenceData(**groups)


def export_arviz(posterior: PosteriorResult | str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                 prior: Any = None, problem: str | None = None, operator: Any = None,
                 max_draws: int | None = DEFAULT_MAX_DRAWS, seed: int = 0):
    """Write `to_arviz` of ``posterior`` to the netCDF file ``out`` (atomically); returns the data object."""
    out = check_output_path(out, force, "export")
    idata = to_arviz(posterior, prior=prior, problem=problem, operator=operator, max_draws=max_draws, seed=seed)
    with atomic_path(out) as tmp:
        idata.to_netcdf(tmp, engine="h5netcdf")
    return idata


def _latent_chains(result: PosteriorResult, max_draws: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``z`` ``[C, S', k]`` (evenly thinned to ``max_draws`` in all) and the kept draw indices ``[S']``."""
    chains = result.latent_chains
    if chains is None:
        chains = np.asarray(result.latent_samples)[None]
    c, s = chains.shape[:2]
    n_keep = s if max_draws is None else max(1, min(s, max_draws // c))
    keep = np.unique(np.linspace(0, s - 1, n_keep).round().astype(int))
    # float64: ArviZ then folds the draws about their median in the same precision as `ganflow.chain_stats`
    return np.asarray(chains[:, keep], np.float64), keep


def _forward_model(result: PosteriorResult, prior: Any, problem: str | None, operator: Any
                   ) -> tuple[nn.Module, nn.Module]:
    """The generator (the caller's, the solving process's, or the recorded one) and the forward operator."""
    from .qoi import _generator_for, _operator_for, _specs_to_resolve

    G = result.generator if prior is None and result.generator is not None else _generator_for(result, prior)
    if isinstance(operator, nn.Module):
        return G.eval(), operator
    problem, operator = _specs_to_resolve(result, problem, operator)
    return G.eval(), _operator_for(result, problem, operator)


def _predictions(G: nn.Module, op: nn.Module, z: np.ndarray, batch_size: int) -> np.ndarray:
    """``A(G(z))`` ``[C, S, *obs]`` in float64."""
    tensors = list(G.parameters()) + list(G.buffers())
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())
    flat = torch.from_numpy(np.ascontiguousarray(z.reshape(-1, z.shape[-1]))).to(dtype)
    out = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], batch_size):
            out.append(op(G(flat[start:start + batch_size])).double().cpu().numpy())
    pred = np.concatenate(out, 0)
    return pred.reshape(*z.shape[:2], *pred.shape[1:])


def _sample_stats(result: PosteriorResult, keep: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The per-draw statistics a sampler stored in ``/trace`` (chain after chain), thinned like the draws."""
    out = {}
    c, s_all = (result.latent_chains.shape[:2] if result.latent_chains is not None else (0, 0))
    for key, name in _SAMPLE_STATS.items():
        arr = result.trace.get(key)
        if arr is not None and c and np.size(arr) == c * s_all:
            values = np.asarray(arr).reshape(c, s_all)[:, keep]
            out[name] = values.astype(bool) if name == "diverging" else values.astype(np.float64)
    return out


def _obs_dims(y: np.ndarray) -> list[str]:
    return [f"obs_dim_{i}" for i in range(y.ndim)]


def _posterior_attrs(result: PosteriorResult) -> dict:
    from . import __version__

    attrs = {"method": result.method, "ganflow_version": __version__, "noise_sigma": float(result.noise_sigma),
             "log_likelihood": "independent Gaussian noise of sd noise_sigma (no representation error)"}
    if result.path:
        attrs["source"] = os.path.basename(result.path)
    for key in DIAGNOSTIC_ATTRS + ("num_chains", "num_samples", "divergences", "step_size", "accept_rate"):
        value = result.attrs.get(key)
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            attrs[key] = float(value)
    return attrs


def _dataset(variables: dict[str, np.ndarray], dims: list[str], attrs: dict | None = None, sample: bool = True):
    """An xarray Dataset of ``variables``, each ``[chain, draw, *dims]`` (``sample=False``: ``[*dims]``)."""
    import xarray as xr

    lead = ["chain", "draw"] if sample else []
    data = {}
    for name, arr in variables.items():
        names = lead + dims[: arr.ndim - len(lead)]
        data[name] = (names, arr)
    coords = {}
    if sample and variables:
        first = next(iter(variables.values()))
        coords = {"chain": np.arange(first.shape[0]), "draw": np.arange(first.shape[1])}
    return xr.Dataset(data, coords=coords, attrs=attrs or {})
