"""Prior checkpoints (``prior.pt``): plain tensors and Python types only, loaded with ``weights_only=True``.

Keys (``FORMAT_VERSION`` 1):

=================  ==========================================================================================
``format_version`` int, 1
``kind``           ``"ganflow.prior"``
``ganflow_version`` str
``arch``           dict: the architecture (`ganflow.prior.nets.default_arch`), rebuilt without code defaults
``latent_dim``     int;  ``field_shape``: list of int
``normalization``  dict: ``mean`` and ``std`` scalar tensors, ``kind`` = ``"scalar"``
``settings``       dict: the `TrainSettings` used (``betas`` a list)
``data``           dict: ``path`` (the file name, no directory), ``problem``, ``seed``, ``generator_kwargs``
                   (JSON), ``n``, ``n_train``, ``n_val``, ``field_shape``, ``sha1`` (of the float32 field bytes);
                   ``problem`` is a record, never resolved
``seed``           int: the training seed;   ``device``: str;   ``step``: generator steps done
``G``, ``D``, ``G_ema``  state dicts of the generator net, critic and EMA generator net (normalised units)
``opt_G``, ``opt_D``     Adam state dicts
``rng``            dict: ``torch_cpu`` (uint8 tensor, global CPU state), ``noise`` (the latent/penalty
                   generator's state), ``data`` (the batch-order generator's state), ``cuda`` (list, if used)
``history``        dict: ``step`` int64 tensor, ``wasserstein`` and ``loss_g`` float tensors (logged steps)
``wall_time_s``    float: training time so far
``representation_error``  optional dict (`ganflow.prior.residuals`): ``mean``, ``basis``, ``diag`` tensors
                   and plain numbers; written at the end of training or by ``ganflow prior-report``
``recalibration``  optional dict (`ganflow.recalibration`): the conformal interval scale learned on held-out
                   truths, with the problem and operator settings it holds for; written by
                   ``ganflow calibrate --recalibrate``
=================  ==========================================================================================
"""

from __future__ import annotations

import os

from ..checkpoint import load_of_kind, load_weights_only, save_checkpoint
from ..errors import GanflowError
from .nets import PriorGenerator, build_generator_net, check_arch

__all__ = [
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "save_checkpoint",  # re-exported from ganflow.checkpoint (both stages write checkpoints)
    "load_checkpoint",
    "load_weights_only",
    "load_of_kind",
    "generator_from_checkpoint",
    "data_provenance",
]

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "kind",
    "arch",
    "latent_dim",
    "field_shape",
    "normalization",
    "settings",
    "data",
    "seed",
    "step",
    "G",
    "D",
    "G_ema",
    "opt_G",
    "opt_D",
    "rng",
)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate a prior checkpoint with ``weights_only=True`` (a pickle payload is refused, not run).

    A missing, empty, corrupt or truncated file, another format version or a missing key is a one-line
    `GanflowError`.
    """
    path = os.fspath(path)
    ckpt = load_weights_only(path, "prior checkpoint", map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "ganflow.prior":
        raise GanflowError(f"{path} is not a ganflow prior checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise GanflowError(
            f"prior checkpoint {path} has format_version {version!r}; this ganflow reads {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise GanflowError(f"prior checkpoint {path} lacks key(s): {', '.join(missing)}")
    check_arch(ckpt["arch"])
    ckpt["data"] = data_provenance(ckpt)
    return ckpt


def data_provenance(ckpt: dict) -> dict:
    """The checkpoint's data provenance with ``path`` reduced to the file name.

    Older checkpoints (the bundled ones among them) record the absolute path on the machine that trained them;
    it means nothing elsewhere (the SHA-1 identifies the data), so it is neither shown nor written again."""
    data = dict(ckpt["data"]) if isinstance(ckpt.get("data"), dict) else {}
    if isinstance(data.get("path"), str):
        data["path"] = os.path.basename(data["path"])
    return data


def generator_from_checkpoint(ckpt: dict, which: str = "G_ema") -> PriorGenerator:
    """Rebuild the generator (EMA weights by default) from a loaded checkpoint (eval mode, physical units)."""
    arch = ckpt["arch"]
    net = build_generator_net(arch)
    try:
        net.load_state_dict(ckpt[which])
        norm = ckpt["normalization"]
        gen = PriorGenerator(net, arch, norm["mean"], norm["std"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise GanflowError(
            f"prior checkpoint weights do not fit its recorded architecture ({first[:160]})"
        ) from None
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    gen.representation_error = _representation_error(ckpt)
    gen.recalibration = _recalibration(ckpt)
    return gen


def _recalibration(ckpt: dict) -> dict | None:
    """The checkpoint's conformal recalibration (`ganflow.recalibration`), checked; None when it has none."""
    rec = ckpt.get("recalibration")
    if rec is None:
        return None
    from ..recalibration import check_recalibration

    return check_recalibration(rec)


def _representation_error(ckpt: dict) -> dict | None:
    """The checkpoint's residual statistics, checked against its field shape (None when it has none)."""
    stats = ckpt.get("representation_error")
    if stats is None:
        return None
    shape = tuple(int(s) for s in ckpt["field_shape"])
    try:
        ok = (tuple(stats["mean"].shape) == shape and tuple(stats["diag"].shape) == shape
              and tuple(stats["basis"].shape[1:]) == shape)
    except (KeyError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise GanflowError("prior checkpoint: its representation_error statistics do not fit its field shape")
    return stats
