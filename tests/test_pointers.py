"""Every message points at the fix: docs references exist, a stack without its marker says so, plot takes
--force, and checkpoints carry no machine's absolute paths."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from ganflow import GanflowError
from ganflow.operators import check_compatible
from problems.linear_gaussian import LinearGaussianProblem
from tests.conftest import run_cli


def test_stacked_y_without_n_obs_names_the_attribute():
    G = LinearGaussianProblem().generator()
    op = LinearGaussianProblem().make_operator()
    y = torch.zeros(4, *op.obs_shape)
    with pytest.raises(GanflowError, match=r"n_obs = 4") as e:
        check_compatible(G, op, y)
    assert "\n" not in str(e.value)
    with pytest.raises(GanflowError) as e:  # a shape that is no stack gets no stack hint
        check_compatible(G, op, torch.zeros(3))
    assert "n_obs" not in str(e.value)


def test_solve_cli_hints_n_obs_for_an_unmarked_stack(tmp_path):
    y = np.zeros((4, 64), np.float32)
    with h5py.File(tmp_path / "obs.h5", "w") as f:
        f["y"] = y
        f.attrs["noise_sigma"] = 0.1
        f.attrs["problem"] = "linear_gaussian"
    r = run_cli("solve", "--obs", tmp_path / "obs.h5", "--prior", "problems.linear_gaussian:generator",
                "-o", tmp_path / "post.h5")
    assert r.returncode == 2 and "n_obs = 4" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
