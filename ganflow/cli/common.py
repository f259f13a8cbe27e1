"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import random

import click
import numpy as np
import torch

from ..errors import GanflowError

__all__ = ["seed_option", "config_option", "force_option", "device_option", "set_seed", "parse_kv", "kw_option"]


def seed_option(default: int = 0):
    return click.option("--seed", type=int, default=default, show_default=True, help="Random seed.")


def config_option():
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="TOML config file."
    )


def force_option():
    return click.option("--force", is_flag=True, help="Overwrite an existing output file.")


def device_option():
    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)


def kw_option(target: str = "the operator"):
    return click.option("--kw", "kw", multiple=True, metavar="KEY=VALUE",
                        help=f"Keyword argument for {target} (repeatable); values parsed as JSON when possible.")


def set_seed(seed: int) -> torch.Generator:
    """Seed the global RNGs (for third-party code that uses them) and return a CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def parse_kv(items) -> dict:
    """``["n=32", "bc=\\"darcy\\"", "bc=darcy"]`` -> dict; values are JSON when they parse, else strings."""
    import json

    out = {}
    for item in items or ():
        if "=" not in item:
            raise GanflowError(f"--kw expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise GanflowError(f"--kw key '{key}' is not a valid name")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
