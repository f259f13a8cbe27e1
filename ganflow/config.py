"""TOML configs loaded into typed settings.

A config file is a set of TOML tables. Tables with a settings class (``[flow]``, ``[solve]``, ...) are parsed
into frozen dataclasses: an unknown key or a value of the wrong type is an error that names the table and the
key. Free-form tables (``[operator]``, ``[problem]``, ``[generator]``) hold keyword arguments passed to a
plug-in factory, which rejects unknown ones itself.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class S:
    ...     lr: float = 1e-3
    >>> parse_settings(S, {"lr": 2}, "flow")
    S(lr=2.0)
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from typing import Any, TypeVar

from .errors import GanflowError

__all__ = ["load_toml", "parse_settings", "Config", "FREE_TABLES", "ALL_TABLES"]

T = TypeVar("T")

# Tables whose keys are keyword arguments of a plug-in factory.
FREE_TABLES = ("operator", "problem", "generator")
# Every table any command understands: one config file can serve the whole chain (data -> train-prior ->
# simulate -> solve), and a misspelt table name is an error wherever the file is used.
ALL_TABLES = FREE_TABLES + ("train", "data", "simulate", "solve", "flow", "langevin", "nuts", "predict",
                            "calibrate", "bench", "diagnostics", "amortized", "smc")


def load_toml(path: str | os.PathLike) -> dict:
    """Read a TOML file; a missing or malformed file is a `GanflowError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GanflowError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise GanflowError(f"config {path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GanflowError(f"config {path}: cannot read: {e}") from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except GanflowError as e:
                errors.append(str(e))
        raise GanflowError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise GanflowError(f"{where}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise GanflowError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_t = args[0] if args else Any
        items = [_coerce(v, item_t, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise GanflowError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise GanflowError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise GanflowError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GanflowError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise GanflowError(f"{where}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise GanflowError(f"{where}: expected a string, got {value!r}")
        return value
    raise GanflowError(f"{where}: unsupported setting type {tp}")


def parse_settings(cls: type[T], table: dict | None, section: str) -> T:
    """Build the dataclass ``cls`` from a TOML table; unknown keys and wrong types name the key."""
    table = dict(table or {})
    if not isinstance(table, dict):
        raise GanflowError(f"[{section}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        key = unknown[0] if unknown[0].isidentifier() else repr(unknown[0])  # keep the message on one line
        raise GanflowError(f"unknown key '{section}.{key}' in config (known: {', '.join(sorted(names))})")
    values = {k: _coerce(v, hints[k], f"config key '{section}.{k}'") for k, v in table.items()}
    try:
        obj = cls(**values)
    except GanflowError:
        raise
    except (TypeError, ValueError) as e:
        raise GanflowError(f"[{section}]: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


class Config:
    """A parsed config file: typed sections on demand, free tables as dicts.

    ``known`` lists every table name the calling command understands; any other table is an error.
    """

    def __init__(self, data: dict | None = None, path: str | None = None, known: tuple[str, ...] = ALL_TABLES):
        self.data = dict(data or {})
        self.path = path
        if known:
            for key, value in self.data.items():
                if key not in known:
                    raise GanflowError(
                        f"unknown table '[{key}]' in config {path or ''} (known: {', '.join(sorted(known))})".replace(
                            "  ", " "
                        )
                    )
                if not isinstance(value, dict):
                    raise GanflowError(f"config key '{key}' must be a table [{key}]")

    @classmethod
    def from_file(cls, path: str | None, known: tuple[str, ...] = ALL_TABLES) -> "Config":
        if path is None:
            return cls({}, None, known)
        return cls(load_toml(path), os.fspath(path), known)

    def section(self, cls: type[T], name: str) -> T:
        return parse_settings(cls, self.data.get(name), name)

    def table(self, name: str) -> dict:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise GanflowError(f"config key '{name}' must be a table [{name}]")
        return dict(value)
