"""Weights-only torch checkpoints, the file format both stages write (prior, flow fit, amortised posterior, SMC):
tensors and plain Python types only, written atomically, read with ``weights_only=True`` so that a pickle payload
is refused before it runs, and recognised by their ``kind`` and ``format_version`` keys.

What a prior checkpoint holds is in `ganflow.prior.checkpoint`; the posterior's checkpoints document their own
keys beside the code that writes them.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile

import torch

from . import __version__
from .errors import GanflowError
from .io import atomic_path, check_readable_file

__all__ = ["save_checkpoint", "load_weights_only", "load_of_kind"]


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    """Write ``ckpt`` atomically (temporary file renamed into place), with the ``ganflow_version`` that wrote it
    unless ``ckpt`` names one."""
    with atomic_path(path) as tmp:
        torch.save({"ganflow_version": __version__, **ckpt}, tmp)


def load_weights_only(path: str | os.PathLike, what: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one-line `GanflowError` s for every way a file can be bad.

    A missing, empty, corrupt or truncated file is an error; so is a pickle payload (or any object beyond
    tensors and plain types), which ``weights_only`` refuses before it runs.
    """
    path = check_readable_file(path, what)
    try:
        with warnings.catch_warnings():
            # torch warns about foreign pickle protocols before refusing them; the refusal is our message.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only stops at the first opcode or global it does not allow: a pickle payload, a foreign
        # object or garbage. Nothing was executed.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "unsupported" in ln.lower()), lines[-1] if lines else "")
        raise GanflowError(
            f"{what} {path} is not a weights-only torch checkpoint (refused, not executed: {detail[:120]})"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        KeyError,
        AttributeError,
        TypeError,
        IndexError,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GanflowError(f"{what} {path} is corrupt or truncated ({first[:160]})") from None


def load_of_kind(path, what: str, describe: str, kind: str, version: int) -> dict:
    """A weights-only checkpoint dict whose ``kind`` and ``format_version`` are ``kind`` and ``version`` (one-line
    errors otherwise: "PATH is not a DESCRIBE", or the version found)."""
    ckpt = load_weights_only(path, what)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise GanflowError(f"{path} is not a {describe}")
    if ckpt.get("format_version") != version:
        raise GanflowError(f"{what} {path} has format_version {ckpt.get('format_version')!r}; "
                           f"this ganflow reads {version}")
    return ckpt
