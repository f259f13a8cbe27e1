"""Fingerprints of a generator or an operator: what a checkpoint or a stored reference must agree with, to
rounding and not to the bit.

A checkpoint made on one machine is used on another (an amortised posterior trained on a GPU node and used on
a laptop; the benchmark's stored references, made here and read on a user's CPU). Buffers that an operator
computes when it is built (a random matrix, sensor coordinates, interpolation weights) can differ in their last
bits between CPUs, whose vector code paths round differently; a SHA-1 of their bytes would then call the same
operator another one. A fingerprint therefore has two parts:

- an exact part: SHA-1 of the header (class, settings, shapes), of every state entry's name, dtype and shape,
  and of the bytes of the integer and boolean entries (masks, indices: no rounding there);
- per floating-point entry a summary ``[||t||_2, s_1 . t, s_2 . t]`` (``s_j`` fixed pseudo-random signs).

Two fingerprints agree (`same_fingerprint`) when the exact parts are equal and each summary agrees within
``RTOL * ||t||_2``. Rounding differences between machines move the summaries by ~1e-7 ||t|| (float32); a
retrained prior, another operator seed or another setting moves them by orders of magnitude more than ``RTOL``.
A change confined to a few entries smaller than ``RTOL * ||t||`` is not seen; it cannot matter to a posterior.

The string also carries the bit-exact SHA-1 of the old format (a hash of every entry's bytes), so that
fingerprints written by earlier versions (a bare 40-digit SHA-1) are still matched on the machine that made
them.

Example:
    >>> import torch
    >>> a = torch.nn.Linear(3, 2)
    >>> fp = module_fingerprint(a, "Linear")
    >>> with torch.no_grad():
    ...     _ = a.weight.mul_(1 + 1e-7)  # rounding-level change: the same module
    >>> same_fingerprint(fp, module_fingerprint(a, "Linear"))
    True
    >>> with torch.no_grad():
    ...     _ = a.weight.mul_(1.01)  # another module
    >>> same_fingerprint(fp, module_fingerprint(a, "Linear"))
    False
"""

from __future__ import annotations

import hashlib

import numpy as np
from torch import nn

__all__ = ["prior_fingerprint", "operator_fingerprint", "module_fingerprint", "same_fingerprint",
           "short_fingerprint", "float_summary", "summaries_agree", "RTOL"]

RTOL = 1e-5  # float32 rounding is 6e-8 of a value; computed buffers (QR, solves) stay well inside 1e-6
_PREFIX = "gf2"


def float_summary(values: np.ndarray) -> list[float]:
    """``[||t||_2, s_1 . t, s_2 . t]`` in float64, with signs from a seeded PCG64 (the same bits everywhere): what
    a fingerprint and the data-parallel replica check compare, to rounding (`summaries_agree`)."""
    t = values.astype(np.float64).reshape(-1)
    signs = np.random.default_rng(t.size).integers(0, 2, size=(2, t.size)) * 2.0 - 1.0
    return [float(np.linalg.norm(t)), *(float(v) for v in signs @ t)]


def summaries_agree(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two stacks of `float_summary` rows ``[M, 3]`` are the same tensors to rounding: every entry within
    `RTOL` of the larger norm of its row."""
    a, b = np.asarray(a, np.float64).reshape(-1, 3), np.asarray(b, np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        return False
    scale = np.maximum(a[:, :1], b[:, :1])
    return bool(np.all(np.abs(a - b) <= RTOL * scale))


def module_fingerprint(module: nn.Module, header: str) -> str:
    """The fingerprint of ``module``'s state (parameters and persistent buffers) under ``header`` (its class,
    settings and shapes): ``"gf2:<exact sha1>:<legacy sha1>:<summaries>"``."""
    exact, legacy = hashlib.sha1(header.encode()), hashlib.sha1(header.encode())
    summaries = []
    for name, t in sorted(module.state_dict().items()):
        arr = t.detach().cpu().contiguous().numpy()
        legacy.update(name.encode())
        legacy.update(arr.tobytes())
        exact.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
        if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
            summaries += float_summary(arr.view(arr.real.dtype) if np.iscomplexobj(arr) else arr)
        else:
            exact.update(arr.tobytes())
    return ":".join([_PREFIX, exact.hexdigest(), legacy.hexdigest(), ",".join(repr(v) for v in summaries)])


def _parse(fp: str) -> tuple[str, str, np.ndarray] | None:
    parts = str(fp).split(":")
    if len(parts) != 4 or parts[0] != _PREFIX:
        return None
    values = np.array([float(v) for v in parts[3].split(",")] if parts[3] else [], dtype=np.float64)
    return parts[1], parts[2], values.reshape(-1, 3)


def same_fingerprint(stored: str, current: str) -> bool:
    """Whether ``stored`` (from a file) and ``current`` (computed now) name the same module to rounding.
    A legacy fingerprint (a bare SHA-1) matches only the bit-exact legacy hash inside ``current``."""
    now = _parse(current)
    then = _parse(stored)
    if now is None:
        return stored == current
    if then is None:  # written by an earlier version: bit-exact, as it was
        return stored == now[1]
    return then[0] == now[0] and summaries_agree(then[2], now[2])


def short_fingerprint(fp: str) -> str:
    """12 hex digits to show in a message (the exact part, or a legacy SHA-1's head)."""
    parsed = _parse(fp)
    return (parsed[0] if parsed else str(fp))[:12]


def prior_fingerprint(generator: nn.Module) -> str:
    """The fingerprint of a generator's weights and buffers, latent dimension and field shape (file-name free;
    files keep it under the historical key ``prior_sha1``)."""
    return module_fingerprint(generator, f"{int(generator.latent_dim)}|{tuple(generator.field_shape)}")


def operator_fingerprint(operator: nn.Module) -> str:
    """The fingerprint of an operator's class, ``extra_repr``, shapes and buffers/parameters: its settings as
    far as they show (a setting held only in a plain attribute and absent from ``extra_repr`` is not seen)."""
    return module_fingerprint(operator, f"{type(operator).__qualname__}|{operator.extra_repr()}|"
                                        f"{tuple(operator.field_shape)}|{tuple(operator.obs_shape)}")
