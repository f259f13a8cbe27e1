"""A benchmark case: a built-in problem, its prior and a seeded observation of a truth drawn from the prior.

ganflow knows no physics: the built-in problems are loaded here inside the functions (via
`ganflow.load_problem`), never at module import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class _Case:
    name: str
    G: Any
    op: Any
    obs: Any
    prior_path: str
    note: str = ""
    z_true: np.ndarray | None = None


def _find_prior(name: str, problem) -> tuple[str | None, str]:
    """The bundled demo prior; for elliptic also the checkpoint of the running training (see the note)."""
    hook = getattr(problem, "bundled_prior", None)
    path = hook() if hook else None
    if path:
        return path, ""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    n = getattr(problem, "n", 32)
    interim = os.path.join(root, "runs", "demo_priors", f"{name}_{n}.pt")
    if os.path.isfile(interim):
        return (
            interim,
            f"prior: {os.path.relpath(interim, root)} (a checkpoint of the running training, "
            f"not yet the bundled prior)",
        )
    return None, f"{name}: no bundled prior (problems/data/{name}_{n}.pt) - skipped"


def _curved_case() -> _Case:
    """The exact curved problem (`ganflow.bench.exact`): fixed truth and noise draw, quadrature reference."""
    from types import SimpleNamespace

    from .exact import curved_problem

    p = curved_problem()
    obs = SimpleNamespace(y=p.y, noise_sigma=p.noise_sigma, z_true=torch.tensor(p.z_true))
    return _Case("curved", p.generator, p.operator, obs, "ganflow.bench.exact:CurvedGenerator(1.0)",
                 z_true=p.z_true)


def _make_case(name: str, seed: int) -> _Case | str:
    """The problem, its prior and a seeded observation of a truth drawn from the prior; or a skip note."""
    if name == "curved":
        return _curved_case()
    from ..demo import DEMOS
    from ..plugins import load_problem
    from ..simulate import simulate
    from ..solve import load_prior

    spec = DEMOS[name]
    prob = load_problem(spec.problem, **spec.problem_kwargs)
    note = ""
    if spec.prior is not None:
        prior_ref = spec.prior
    else:
        prior_ref, note = _find_prior(name, prob)
        if prior_ref is None:
            return note
    G = load_prior(prior_ref)
    for p in G.parameters():
        p.requires_grad_(False)
    # The truth is G(z_true), z_true ~ N(0, I) from the seed: the latent truth is known.
    obs = simulate(
        spec.problem,
        prior=G,
        operator_kwargs=spec.operator_kwargs,
        problem_kwargs=spec.problem_kwargs,
        noise_relative=spec.noise_relative,
        seed=seed,
        prior_label=str(prior_ref),
    )
    op = prob.make_operator(**spec.operator_kwargs)
    return _Case(
        name, G, op, obs, str(prior_ref), note, obs.z_true.numpy() if obs.z_true is not None else None
    )
