"""Files: atomic writes, output-path checks, and readers/writers for ``fields.h5`` and ``obs.h5``.

Every output is written to a temporary name in the destination directory and renamed into place, so a crash
never leaves a half-written file under the final name. HDF5 attributes holding structures are JSON strings,
parsed with ``json.loads`` and never evaluated.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import h5py
import numpy as np
import torch

from . import __version__
from .errors import GanflowError

__all__ = [
    "atomic_path",
    "atomic_h5",
    "check_output_path",
    "check_readable_file",
    "open_h5",
    "read_json_attr",
    "Observation",
    "read_obs",
    "write_obs",
    "is_obs_stack",
    "read_obs_stack",
    "write_obs_stack",
]


def check_output_path(path: str | os.PathLike, force: bool = False, what: str = "output") -> str:
    """An output path must be in an existing directory; an existing file needs ``force``."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise GanflowError(f"{what} directory does not exist: {parent}")
    if os.path.isdir(path):
        raise GanflowError(f"{what} path is a directory: {path}")
    if os.path.exists(path) and not force:
        raise GanflowError(f"{what} file exists: {path} (use --force to overwrite)")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """An ``h5py.File`` open for writing under a temporary name, renamed into place on success; every file
    records the ``ganflow_version`` that wrote it."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["ganflow_version"] = __version__
            yield f


def check_readable_file(path: str | os.PathLike, what: str) -> str:
    """``path`` as a string when it names a non-empty file; a one-line `GanflowError` naming ``what`` when it is
    missing, a directory or empty."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GanflowError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise GanflowError(f"{what} is a directory: {path}")
    if os.path.getsize(path) == 0:
        raise GanflowError(f"{what} is empty: {path}")
    return path


def open_h5(path: str | os.PathLike, what: str = "file") -> h5py.File:
    """Open an HDF5 file for reading with a clear error for missing, empty or corrupt files."""
    path = check_readable_file(path, what)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise GanflowError(f"{what} {path} is not a readable HDF5 file ({str(e).splitlines()[0]})") from None


def read_json_attr(f: h5py.File | h5py.Group, name: str, default=None, where: str = ""):
    if name not in f.attrs:
        return default
    raw = f.attrs[name]
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        return json.loads(str(raw))
    except json.JSONDecodeError:
        raise GanflowError(f"{where}: attribute '{name}' is not valid JSON") from None


def _read_dataset(f: h5py.File, name: str, path: str) -> np.ndarray:
    if name not in f:
        raise GanflowError(f"{path}: missing dataset /{name}")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise GanflowError(f"{path}: /{name} is not a dataset")
    try:
        arr = ds[()]
    except (OSError, TypeError, ValueError) as e:
        raise GanflowError(f"{path}: cannot read /{name} ({e})") from None
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.number):
        raise GanflowError(f"{path}: /{name} is not numeric (dtype {arr.dtype})")
    return arr


@dataclass
class Observation:
    """The contents of an ``obs.h5`` file.

    ``path`` is the file it was read from (None for one made in memory): the ``problem`` recorded in a file is
    resolved only under the trust rule (`ganflow.plugins.check_spec_from_file`); ``prior`` is a label, never
    loaded.
    """

    y: torch.Tensor
    noise_sigma: float
    problem: str | None = None
    operator_kwargs: dict | None = None
    problem_kwargs: dict | None = None
    x_true: torch.Tensor | None = None
    z_true: torch.Tensor | None = None
    prior: str | None = None
    path: str | None = None


def read_obs(path: str | os.PathLike) -> Observation:
    """Read and validate ``obs.h5`` (``/y`` finite, ``noise_sigma`` finite and > 0)."""
    path = os.fspath(path)
    with open_h5(path, "observation file") as f:
        if "n_obs" in f.attrs:  # --- issue 10: a stack is read with read_obs_stack
            raise GanflowError(f"{path} holds a stack of {int(f.attrs['n_obs'])} observations; "
                               "use read_obs_stack (ganflow solve handles both)")
        y = _read_dataset(f, "y", path)
        if "noise_sigma" not in f.attrs:
            raise GanflowError(f"{path}: missing attribute noise_sigma")
        try:
            sigma = float(f.attrs["noise_sigma"])
        except (TypeError, ValueError):
            raise GanflowError(f"{path}: attribute noise_sigma is not a number") from None
        if not np.isfinite(sigma) or sigma <= 0:
            raise GanflowError(f"{path}: noise_sigma must be finite and > 0, got {sigma}")
        if y.size == 0:
            raise GanflowError(f"{path}: /y is empty")
        if not np.isfinite(y).all():
            raise GanflowError(f"{path}: /y has {int((~np.isfinite(y)).sum())} non-finite value(s)")
        problem = f.attrs.get("problem")
        problem = problem.decode() if isinstance(problem, bytes) else (str(problem) if problem is not None else None)
        prior = f.attrs.get("prior")
        prior = str(prior) if prior is not None else None
        x_true = torch.from_numpy(_read_dataset(f, "x_true", path)).float() if "x_true" in f else None
        z_true = torch.from_numpy(_read_dataset(f, "z_true", path)).float() if "z_true" in f else None
        return Observation(
            y=torch.from_numpy(np.ascontiguousarray(y)).float(),
            noise_sigma=sigma,
            problem=problem or None,
            operator_kwargs=read_json_attr(f, "operator_kwargs", {}, path),
            problem_kwargs=read_json_attr(f, "problem_kwargs", {}, path),
            x_true=x_true,
            z_true=z_true,
            prior=prior,
            path=path,
        )


def write_obs(path: str | os.PathLike, obs: Observation) -> None:
    """Write ``obs.h5`` atomically (schema: docs/files.md)."""
    with atomic_h5(path) as f:
        f.create_dataset("y", data=obs.y.detach().cpu().numpy().astype(np.float32))
        f.attrs["noise_sigma"] = float(obs.noise_sigma)
        f.attrs["problem"] = obs.problem or ""
        f.attrs["operator_kwargs"] = json.dumps(obs.operator_kwargs or {})
        f.attrs["problem_kwargs"] = json.dumps(obs.problem_kwargs or {})
        if obs.prior:
            f.attrs["prior"] = obs.prior
        if obs.x_true is not None:
            f.create_dataset("x_true", data=obs.x_true.detach().cpu().numpy().astype(np.float32))
        if obs.z_true is not None:
            f.create_dataset("z_true", data=obs.z_true.detach().cpu().numpy().astype(np.float32))


# --- issue 10: stacks of observations (ganflow simulate --n-obs M; ganflow solve solves each) ---------------
# A stack is marked by the attribute ``n_obs`` = M (an explicit marker: /y's rank alone cannot tell a stack of
# 1-D observations from one 2-D observation without building the operator). Datasets carry a leading axis M:
# /y [M, *obs_shape], optional /x_true [M, *field_shape], /z_true [M, k]; ``noise_sigma`` is one number for
# all or an array attribute of M numbers; the other attributes are those of a single obs.h5.


def is_obs_stack(path: str | os.PathLike) -> bool:
    """Whether ``obs.h5`` holds a stack of observations (attribute ``n_obs``)."""
    with open_h5(path, "observation file") as f:
        return "n_obs" in f.attrs


def read_obs_stack(path: str | os.PathLike) -> list[Observation]:
    """The M observations of a stacked ``obs.h5`` (each validated like `read_obs`; ``path`` set to the stack)."""
    path = os.fspath(path)
    with open_h5(path, "observation file") as f:
        if "n_obs" not in f.attrs:
            raise GanflowError(f"{path} is a single observation (no attribute n_obs); use read_obs")
        m = int(f.attrs["n_obs"])
        y = _read_dataset(f, "y", path)
        if m < 1 or y.ndim < 2 or y.shape[0] != m:
            raise GanflowError(f"{path}: /y has shape {y.shape}, expected [n_obs={m}, *obs_shape]")
        if "noise_sigma" not in f.attrs:
            raise GanflowError(f"{path}: missing attribute noise_sigma")
        try:
            sig = np.asarray(f.attrs["noise_sigma"], np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise GanflowError(f"{path}: attribute noise_sigma is not a number") from None
        if sig.size == 1:
            sig = np.repeat(sig, m)
        if sig.size != m or not np.isfinite(sig).all() or (sig <= 0).any():
            raise GanflowError(f"{path}: noise_sigma must be one or {m} finite numbers > 0")
        if not np.isfinite(y).all():
            raise GanflowError(f"{path}: /y has {int((~np.isfinite(y)).sum())} non-finite value(s)")
        truths = {}
        for name in ("x_true", "z_true"):
            if name in f:
                arr = _read_dataset(f, name, path)
                if arr.shape[0] != m:
                    raise GanflowError(f"{path}: /{name} has {arr.shape[0]} entries, /y has {m}")
                truths[name] = torch.from_numpy(np.ascontiguousarray(arr)).float()

        def text(key):
            v = f.attrs.get(key)
            return (v.decode() if isinstance(v, bytes) else str(v)) if v is not None else None

        common = dict(problem=text("problem") or None, operator_kwargs=read_json_attr(f, "operator_kwargs", {}, path),
                      problem_kwargs=read_json_attr(f, "problem_kwargs", {}, path), prior=text("prior"), path=path)
        yt = torch.from_numpy(np.ascontiguousarray(y)).float()
        return [Observation(y=yt[i], noise_sigma=float(sig[i]),
                            x_true=truths["x_true"][i] if "x_true" in truths else None,
                            z_true=truths["z_true"][i] if "z_true" in truths else None, **common)
                for i in range(m)]


def write_obs_stack(path: str | os.PathLike, observations: list[Observation]) -> None:
    """Write a stacked ``obs.h5`` atomically; the observations share problem, operator and prior attributes."""
    if not observations:
        raise GanflowError("no observations to write")
    first = observations[0]
    if any((o.problem, o.operator_kwargs, o.problem_kwargs, o.prior) !=
           (first.problem, first.operator_kwargs, first.problem_kwargs, first.prior) for o in observations):
        raise GanflowError("a stack's observations must share problem, operator_kwargs, problem_kwargs and prior")

    def stack(ts):
        return np.stack([t.detach().cpu().numpy().astype(np.float32) for t in ts])

    with atomic_h5(path) as f:
        f.attrs["n_obs"] = len(observations)
        f.create_dataset("y", data=stack([o.y for o in observations]))
        sigmas = np.asarray([o.noise_sigma for o in observations], np.float64)
        f.attrs["noise_sigma"] = float(sigmas[0]) if np.all(sigmas == sigmas[0]) else sigmas
        f.attrs["problem"] = first.problem or ""
        f.attrs["operator_kwargs"] = json.dumps(first.operator_kwargs or {})
        f.attrs["problem_kwargs"] = json.dumps(first.problem_kwargs or {})
        if first.prior:
            f.attrs["prior"] = first.prior
        for name in ("x_true", "z_true"):
            values = [getattr(o, name) for o in observations]
            if all(v is not None for v in values):
                f.create_dataset(name, data=stack(values))
# --- end issue 10 ---
