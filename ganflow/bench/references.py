"""The reference posterior a method is measured against: exact (linear_gaussian) or a NUTS run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .metrics import _field_moments, sliced_wasserstein

if TYPE_CHECKING:
    from .cases import _Case
    from .plan import BenchPlan


@dataclass
class _Reference:
    mean: np.ndarray  # [k]
    sd: np.ndarray  # [k]
    field_mean: np.ndarray
    field_std: np.ndarray
    half_a: np.ndarray  # reference draws, two independent halves (standardised distance and its baseline)
    half_b: np.ndarray
    kind: str


def _exact_reference(case: _Case, plan: BenchPlan, seed: int) -> _Reference:
    """The closed-form Gaussian posterior of linear_gaussian, with two halves of seeded exact draws."""
    from ..problems.linear_gaussian import exact_posterior

    ex = exact_posterior(case.G, case.op, case.obs.y, case.obs.noise_sigma)
    rng = np.random.default_rng(seed + 2)
    L = np.linalg.cholesky(ex.latent_cov)
    halves = [
        ex.latent_mean + rng.standard_normal((plan.n_ref_exact, len(ex.latent_mean))) @ L.T for _ in range(2)
    ]
    return _Reference(ex.latent_mean, ex.latent_std, ex.field_mean, ex.field_std, halves[0], halves[1], "exact")


def _quadrature_reference(case: _Case, plan: BenchPlan, seed: int) -> _Reference:
    """The curved problem's posterior by quadrature (`ganflow.bench.exact`): moments, field moments and two
    halves of exact draws from the grid."""
    from .exact import curved_problem, quadrature_draws, quadrature_moments

    p = curved_problem()
    m = quadrature_moments(p)
    rng = np.random.default_rng(seed + 2)
    halves = [quadrature_draws(p, plan.n_ref_exact, rng) for _ in range(2)]
    fm, fsd = _field_moments(case.G, quadrature_draws(p, 20 * plan.n_ref_exact, rng))
    return _Reference(m["mean"], m["sd"], fm, fsd, halves[0], halves[1], "exact")


def _nuts_reference(nuts_z: np.ndarray, num_chains: int, num_samples: int, G) -> _Reference:
    """The NUTS draws ``[num_chains * num_samples, k]`` as the reference; halves split between chains."""
    C = num_chains
    grouped = nuts_z.reshape(C, num_samples, -1)
    if C >= 2:  # independent chains on either side of the split
        half_a, half_b = (
            grouped[: C // 2].reshape(-1, nuts_z.shape[1]),
            grouped[C // 2 :].reshape(-1, nuts_z.shape[1]),
        )
    else:
        half_a, half_b = nuts_z[: len(nuts_z) // 2], nuts_z[len(nuts_z) // 2 :]
    fm, fsd = _field_moments(G, nuts_z)
    return _Reference(nuts_z.mean(0), nuts_z.std(0, ddof=1), fm, fsd, half_a, half_b, "nuts")


def _self_metrics(ref: _Reference, n_draws: int, plan: BenchPlan, seed: int) -> dict:
    """The metrics of the NUTS run that is the reference: errors zero by definition, the distance the baseline's."""
    distance = sliced_wasserstein(
        (ref.half_b - ref.mean) / ref.sd, (ref.half_a - ref.mean) / ref.sd, plan.n_projections, seed
    )
    return {
        "latent_mean_err_sd": 0.0,
        "latent_sd_rel_err_median": 0.0,
        "latent_sd_rel_err_max": 0.0,
        "field_mean_rel_err": 0.0,
        "field_std_rel_err": 0.0,
        "distance": distance,
        "n_draws": int(n_draws),
        "distance_ref_baseline": distance,
    }
