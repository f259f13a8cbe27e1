"""Example fields: ``fields.h5`` written from a problem's prior sampler, and read back for training.

File schema (docs/files.md): ``/fields`` ``[N, *field_shape]`` float32, chunked along N; attributes ``problem``
(normalised spec), ``seed`` and ``generator_kwargs`` (JSON of the problem factory's keyword arguments).

Determinism: chunk ``i`` (``chunk_size`` fields) is drawn with its own ``torch.Generator`` seeded from
``(seed, i)`` through ``numpy.random.SeedSequence``, so the file depends only on the problem, ``n``, ``seed``
and ``chunk_size`` and never on the global RNG.

Example:
    >>> import tempfile, os, torch
    >>> d = tempfile.mkdtemp()
    >>> p = write_fields(os.path.join(d, "f.h5"), torch.zeros(3, 4), problem="none")
    >>> load_fields(p).fields.shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import h5py
import numpy as np
import torch
from torch import Tensor

from .errors import GanflowError
from .io import atomic_h5, check_output_path, open_h5, read_json_attr
from .plugins import load_problem, normalize_spec

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "chunk_generator",
    "sample_problem_fields",
    "make_fields",
    "write_fields",
    "FieldData",
    "load_fields",
]

DEFAULT_CHUNK_SIZE = 256


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The CPU ``torch.Generator`` for chunk ``chunk`` of a run with ``seed`` (one stream per chunk)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(chunk)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_problem_fields(
    problem, n: int, seed: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[Tensor]:
    """Yield ``[b, *field_shape]`` float32 chunks (``b <= chunk_size``, ``n`` in all) from ``problem``."""
    if n < 1:
        raise GanflowError(f"--n must be >= 1, got {n}")
    if chunk_size < 1:
        raise GanflowError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = tuple(int(s) for s in problem.field_shape)
    for i, start in enumerate(range(0, n, chunk_size)):
        b = min(chunk_size, n - start)
        with torch.no_grad():
            x = problem.sample_fields(b, chunk_generator(seed, i))
        x = torch.as_tensor(x).detach().to("cpu", torch.float32)
        if tuple(x.shape) != (b, *shape):
            raise GanflowError(
                f"problem {getattr(problem, 'name', '?')}.sample_fields({b}) returned shape "
                f"{tuple(x.shape)}, "
                f"expected {(b, *shape)}"
            )
        if not torch.isfinite(x).all():
            raise GanflowError(
                f"problem {getattr(problem, 'name', '?')}.sample_fields returned non-finite values"
            )
        yield x


def write_fields(
    path: str | os.PathLike,
    fields: Tensor | Iterable[Tensor],
    *,
    problem: str = "",
    seed: int | None = None,
    generator_kwargs: dict | None = None,
    n: int | None = None,
    field_shape: tuple[int, ...] | None = None,
    force: bool = False,
) -> str:
    """Write ``fields.h5`` atomically from a tensor ``[N, *field_shape]`` or an iterable of chunks.

    With an iterable, ``n`` and ``field_shape`` must be given so the dataset can be created up front.
    Returns the path.
    """
    path = check_output_path(path, force, "fields")
    if isinstance(fields, Tensor):
        n, field_shape, chunks = fields.shape[0], tuple(fields.shape[1:]), [fields]
    else:
        if n is None or field_shape is None:
            raise GanflowError("write_fields: an iterable of chunks needs n and field_shape")
        chunks = fields
    field_shape = tuple(int(s) for s in field_shape)
    if n < 1:
        raise GanflowError("write_fields: no fields to write")
    per_field = int(np.prod(field_shape))
    # ~1 MiB HDF5 chunks along N: a training batch reads a few chunks, and whole-file reads stay fast.
    rows = max(1, min(n, (1 << 18) // max(per_field, 1)))
    with atomic_h5(path) as f:
        ds = f.create_dataset(
            "fields", shape=(n, *field_shape), dtype=np.float32, chunks=(rows, *field_shape)
        )
        pos = 0
        for x in chunks:
            x = torch.as_tensor(x).detach().cpu().float().numpy()
            if pos + x.shape[0] > n or tuple(x.shape[1:]) != field_shape:
                raise GanflowError(
                    f"write_fields: chunk of shape {x.shape} does not fit [{n}, {field_shape}]"
                )
            ds[pos : pos + x.shape[0]] = x
            pos += x.shape[0]
        if pos != n:
            raise GanflowError(f"write_fields: got {pos} fields, expected {n}")
        f.attrs["problem"] = problem or ""
        f.attrs["seed"] = -1 if seed is None else int(seed)
        f.attrs["generator_kwargs"] = json.dumps(generator_kwargs or {})
    return path


def make_fields(
    problem: str,
    n: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    problem_kwargs: dict | None = None,
    force: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> str:
    """``ganflow data``: draw ``n`` fields from the spec ``problem`` and write ``out`` (``fields.h5``)."""
    check_output_path(out, force, "fields")
    if n < 1:  # before the problem is built, so the message names the option
        raise GanflowError(f"--n must be >= 1, got {n}")
    problem_kwargs = dict(problem_kwargs or {})
    try:
        json.dumps(problem_kwargs)
    except TypeError as e:
        raise GanflowError(f"problem options must be plain values: {e}") from None
    obj = load_problem(problem, **problem_kwargs)
    shape = tuple(int(s) for s in obj.field_shape)
    return write_fields(
        out,
        sample_problem_fields(obj, n, seed, chunk_size),
        problem=normalize_spec(problem),
        seed=seed,
        generator_kwargs=problem_kwargs,
        n=n,
        field_shape=shape,
        force=force,
    )


@dataclass
class FieldData:
    """The contents of a ``fields.h5`` file: ``fields`` ``[N, *field_shape]`` float32 and its provenance."""

    fields: Tensor
    path: str
    problem: str = ""
    seed: int = -1
    generator_kwargs: dict = field(default_factory=dict)
    sha1: str = ""

    @property
    def field_shape(self) -> tuple[int, ...]:
        return tuple(self.fields.shape[1:])

    def provenance(self) -> dict:
        """Plain-typed description stored in checkpoints (file name, problem, seed, N, shape, content hash).

        ``path`` is the file name only: a checkpoint travels between machines, and the SHA-1 of the fields
        identifies the data wherever it lies."""
        return {
            "path": os.path.basename(self.path),
            "problem": self.problem,
            "seed": int(self.seed),
            "generator_kwargs": json.dumps(self.generator_kwargs),
            "n": int(self.fields.shape[0]),
            "field_shape": list(self.field_shape),
            "sha1": self.sha1,
        }


def _check_field_array(arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` as float32 ``[N, *field_shape]``: real numbers, at least one field, every value finite."""
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise GanflowError(f"{where} must be real numbers (dtype {arr.dtype})")
    if arr.ndim < 2:
        raise GanflowError(f"{where} must be [N, *field_shape], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.size == 0:
        raise GanflowError(f"{where} is empty (shape {arr.shape})")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise GanflowError(f"{where} has {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return arr


def _read_array(path: str) -> np.ndarray:
    """The ``[N, *field_shape]`` array of a ``.npy`` file, or of a ``.npz`` with one array (or one named ``fields``).

    ``allow_pickle=False``: an object array (a pickle) is refused, never unpickled.
    """
    if not os.path.isfile(path):
        raise GanflowError(f"fields file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            return np.asarray(data)
        with data:
            names = list(data.files)
            if "fields" in names:
                return np.asarray(data["fields"])
            if len(names) != 1:
                raise GanflowError(f"{path}: a .npz needs one array or one named 'fields', found {names}")
            return np.asarray(data[names[0]])
    except GanflowError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GanflowError(f"{path}: not a readable numpy array file ({first[:160]})") from None


def _load_array_fields(path: str) -> FieldData:
    arr = _check_field_array(_read_array(path), path)
    return FieldData(fields=torch.from_numpy(arr), path=path, sha1=hashlib.sha1(arr.tobytes()).hexdigest())


def load_fields(path: str | os.PathLike) -> FieldData:
    """Read and validate example fields: ``fields.h5`` (``/fields``), or a ``.npy`` / ``.npz`` array ``[N, ...]``.

    Either way the values must be real, finite, and at least one field.
    """
    path = os.fspath(path)
    if path.endswith((".npy", ".npz")):
        return _load_array_fields(path)
    with open_h5(path, "fields file") as f:
        if "fields" not in f or not isinstance(f["fields"], h5py.Dataset):
            raise GanflowError(f"{path}: missing dataset /fields")
        try:
            arr = np.asarray(f["fields"][()])
        except (OSError, TypeError, ValueError) as e:
            raise GanflowError(f"{path}: cannot read /fields ({e})") from None
        arr = _check_field_array(arr, f"{path}: /fields")
        problem = f.attrs.get("problem", "")
        problem = problem.decode() if isinstance(problem, bytes) else str(problem)
        try:
            seed = int(f.attrs.get("seed", -1))
        except (TypeError, ValueError):
            seed = -1
        kwargs = read_json_attr(f, "generator_kwargs", {}, path)
    return FieldData(
        fields=torch.from_numpy(arr),
        path=path,
        problem=problem,
        seed=seed,
        generator_kwargs=kwargs if isinstance(kwargs, dict) else {},
        sha1=hashlib.sha1(arr.tobytes()).hexdigest(),
    )
