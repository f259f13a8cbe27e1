"""Stage one: WGAN-GP priors ``x = G(z)``, ``z ~ N(0, I_k)``, learned from example fields.

- `train_prior` trains one and writes a checkpoint (``prior.pt``) and a quality report beside it;
- `load_prior` turns a checkpoint or a generator spec string into a generator module
  (``[B, latent_dim] -> [B, *field_shape]``, physical units, eval mode).
"""

from __future__ import annotations

import os

from ..errors import GanflowError
from ..plugins import load_generator_spec
from .checkpoint import generator_from_checkpoint, load_checkpoint
from .nets import PriorGenerator
from .report import compute_report, prior_report
from .trainer import TrainResult, TrainSettings, train_prior

__all__ = [
    "load_prior",
    "train_prior",
    "TrainSettings",
    "TrainResult",
    "PriorGenerator",
    "prior_report",
    "compute_report",
    "report_from_checkpoint",
]


def load_prior(path_or_spec: str | os.PathLike, device: str = "cpu"):
    """The prior generator: the EMA generator of a ``.pt`` checkpoint, or a user's generator spec string.

    A ``.pt`` path is loaded with ``weights_only=True`` and the network is rebuilt from the architecture
    recorded in the checkpoint. Anything else is passed to `ganflow.plugins.load_generator_spec`.
    """
    s = os.fspath(path_or_spec)
    if s.endswith(".pt"):
        gen = generator_from_checkpoint(load_checkpoint(s))
    else:
        gen = load_generator_spec(s)
    return gen.to(device)


def report_from_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    prefix: str | os.PathLike | None = None,
    seed: int | None = None,
) -> dict:
    """Recompute the quality report of ``checkpoint`` against ``data`` (``fields.h5``).

    If ``data`` is the file the prior was trained on (same content hash) the same held-out split is used;
    otherwise every field in ``data`` counts as held out. A checkpoint without representation-error
    statistics (trained before they existed) gets them from these held-out fields, written into it.
    Returns the metrics dict.
    """
    from ..data import load_fields
    from .trainer import report_prefix, split_indices

    ckpt = load_checkpoint(checkpoint)
    gen = generator_from_checkpoint(ckpt)
    fd = load_fields(data)
    if list(fd.field_shape) != list(ckpt["field_shape"]):
        raise GanflowError(
            f"{fd.path}: field_shape {fd.field_shape} does not match the prior's {tuple(ckpt['field_shape'])}"
        )
    real = fd.fields
    if ckpt["data"].get("sha1") == fd.sha1:
        _, val_idx = split_indices(real.shape[0], float(ckpt["settings"]["val_fraction"]), int(ckpt["seed"]))
        if val_idx.numel() >= 4:
            real = real[val_idx]
    seed = int(ckpt["seed"]) if seed is None else seed
    metrics = prior_report(gen, real, prefix or report_prefix(checkpoint), seed=seed)
    if gen.representation_error is None:
        from .trainer import add_representation_error

        n_fields = int(ckpt["settings"].get("representation_fields", 200)) or 200
        add_representation_error(os.fspath(checkpoint), gen, real[:n_fields], seed)
    return metrics
