"""``ganflow train-posterior``: train the amortised posterior ``q(z | y)`` for a prior, an operator and a noise level.

    result = ganflow.amortize.train_posterior(prior="prior.pt", problem="elliptic", noise_sigma=0.01,
                                              out="amortized.pt", seed=0)
    ganflow.solve("obs.h5", amortized="amortized.pt")          # then: any number of observations

The operator comes from a problem (``problem``, with ``[operator]`` / ``[problem]`` keyword tables) or an operator
spec, exactly as for `ganflow.solve`; the checkpoint records where the prior and the operator came from and
their fingerprints (`ganflow.posterior.amortized`). The model is in `ganflow.posterior.amortized`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from .config import Config
from .errors import GanflowError
from .posterior.amortized import AmortizedSettings, AmortizedTrainResult, train_amortized
from .solve import SOLVE_TABLES, load_prior, resolve_operator

__all__ = ["train_posterior"]


def _prior_label(prior: Any) -> str:
    if isinstance(prior, nn.Module):
        return type(prior).__name__
    prior = os.fspath(prior)
    return prior if ":" in prior and not os.path.exists(prior) else os.path.abspath(prior)


def train_posterior(prior: str | os.PathLike | nn.Module, noise_sigma: float, out: str | os.PathLike | None, *,
                    problem: Any = None, operator: Any = None, config: Config | None = None, seed: int = 0,
                    resume: bool = False, force: bool = False, steps: int | None = None, device: str = "cpu",
                    progress: bool = True) -> AmortizedTrainResult:
    """Train and write ``amortized.pt`` (`train_amortized`); settings from the config's ``[amortized]`` table,
    ``steps`` overriding ``max_iter``. Under ``torchrun`` every rank calls this (data-parallel)."""
    cfg = config if isinstance(config, Config) else Config.from_file(config, known=SOLVE_TABLES)
    table = dict(cfg.table("amortized"))
    if steps is not None:
        table["max_iter"] = steps
    if not progress:
        table["progress"] = False
    from .config import parse_settings

    settings = parse_settings(AmortizedSettings, table, "amortized")
    if problem is None and operator is None:
        raise GanflowError("train-posterior needs --problem or --operator")
    op, op_info = resolve_operator(None, operator, problem, cfg.table("operator") or None,
                                   cfg.table("problem") or None)
    generator = load_prior(prior)
    if tuple(generator.field_shape) != tuple(op.field_shape):
        raise GanflowError(f"prior field_shape {tuple(generator.field_shape)} does not match the operator's "
                           f"{tuple(op.field_shape)}")
    record = {"prior": _prior_label(prior), **{k: json.dumps(v, default=str) if isinstance(v, dict) else str(v)
                                               for k, v in op_info.items()}}
    return train_amortized(generator, op, float(noise_sigma), out, settings, seed=seed, resume=resume,
                           force=force, record=record, device=device)
