"""The per-truth records of a calibration run and their checkpoint, so ``ganflow calibrate --resume`` continues
after a crash or ``kill -9`` where it stopped.

A calibration of the default solve over 50 elliptic truths takes ~100 minutes of a 2-core CPU (123 s a truth); each
truth's contribution (coverage indicators, SBC ranks, its summary row, and its field intervals when a recalibration
is learnt) is small and final once its solve is done. The checkpoint holds those records and an identity of the run
(problem, prior, truths, settings, seed, solve config): truth ``t`` is simulated and solved with seeds that depend
only on ``t``, so a resumed run gives on one machine the numbers an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from .checkpoint import load_of_kind, save_checkpoint
from .errors import GanflowError

__all__ = ["run_identity", "load_records", "save_records", "CHECKPOINT_NAME"]

KIND, VERSION = "calibration", 1
CHECKPOINT_NAME = "calibration.ckpt"


def run_identity(**parts) -> str:
    """What a checkpoint must match to be continued: ``parts`` as canonical JSON (non-JSON values by ``str``)."""
    return json.dumps(parts, sort_keys=True, default=str)


def _to_torch(obj):
    """numpy arrays inside dicts, lists and tuples as tensors (what a weights-only checkpoint holds)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def _to_numpy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def save_records(path: str, identity: str, records: list[dict], wall_s: float) -> None:
    """Write the records of the truths done so far (atomically; the directory is made on the first write, so a
    call that fails before its first truth leaves nothing behind)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(path, {"kind": KIND, "format_version": VERSION, "identity": identity, "wall_s": float(wall_s),
                           "records": _to_torch(records)})


def load_records(path: str | None, identity: str, resume: bool) -> tuple[list[dict], float]:
    """``(records, wall seconds spent)`` to continue from: none without ``path``. A checkpoint left by an
    interrupted run is continued with ``resume`` and refused without it (a fresh start would throw its truths
    away), and refused when it was made for another run; ``resume`` without a checkpoint is an error."""
    if path is None:
        return [], 0.0
    if not os.path.exists(path):
        if resume:
            raise GanflowError(f"--resume: no checkpoint of an interrupted calibration at {path}")
        return [], 0.0
    ckpt = load_of_kind(path, "calibration checkpoint", "calibration checkpoint", KIND, VERSION)
    done = len(ckpt["records"])
    if not resume:
        raise GanflowError(f"{path} holds an interrupted calibration ({done} truths done): continue it with "
                           "--resume, or delete it to start over")
    if ckpt["identity"] != identity:
        raise GanflowError(f"--resume: {path} was made by another calibration (problem, prior, truths, settings, "
                           "seed or solve config differ); delete it to start over")
    return _to_numpy(ckpt["records"]), float(ckpt["wall_s"])
