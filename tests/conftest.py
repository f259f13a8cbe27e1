"""Shared fixtures: a linear-Gaussian observation with a known exact posterior, and a CLI runner helper."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# Tests share two cores; one intra-op thread per test process keeps timings predictable.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None, timeout=600):
    """Run `python -m ganflow ARGS` in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "ganflow", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
