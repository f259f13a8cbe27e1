"""Shared fixtures: a linear-Gaussian observation with a known exact posterior, and a CLI runner helper."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

# Tests share two cores; one intra-op thread per test process keeps timings predictable.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli_subprocess(*args, cwd=None, timeout=600):
    """Run `python -m ganflow ARGS` in a real subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "ganflow", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cwd=None, timeout=None):
    """Run the ganflow CLI in this process (click's CliRunner; no interpreter start-up per call).

    Same observable contract as a subprocess: exit code, stdout, stderr. An unexpected exception (a bug)
    is re-raised so the test shows its traceback.
    """
    from click.testing import CliRunner

    from ganflow.cli import cli

    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        r = runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)


@pytest.fixture
def cli():
    return run_cli


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a generator whose gradients are never finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradGenerator(torch.nn.Module):
    """Wraps a generator so that its values are right but every gradient is NaN (sampler error paths)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.latent_dim, self.field_shape = inner, inner.latent_dim, inner.field_shape

    def forward(self, z):
        return self.inner(_NaNGradient.apply(z))
