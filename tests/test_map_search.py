"""Warm restarts of the MAP search (`FlowSettings.map_restarts`), on a rugged 1-D log density whose global maximum a
dense grid gives independently of the optimiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganflow.errors import GanflowError
from ganflow.posterior.flow import FlowSettings
from ganflow.posterior.langevin import LangevinSettings
from ganflow.posterior.modes import map_search


class _Rugged:
    """``log p(z) = -(z - 2)^2 / 2 - 0.02 sin^2(50 z)``: a Gaussian hill with shallow ripples 0.063 apart, each a
    local maximum where one cosine cycle of Adam can stop."""

    latent_dim = 1

    def log_joint(self, z):
        z = z[:, 0]
        return -0.5 * (z - 2.0) ** 2 - 0.02 * torch.sin(50.0 * z) ** 2


def _gaps(restarts: int) -> np.ndarray:
    """Grid maximum minus the search's log p, one single-start search per seed."""
    target = _Rugged()
    grid = torch.linspace(-5.0, 5.0, 2_000_001, dtype=torch.float64)[:, None]
    top = float(target.log_joint(grid).max())
    out = []
    for seed in range(10):
        s = FlowSettings(map_starts=1, map_restarts=restarts)
        z, _, _ = map_search(target, s, torch.Generator().manual_seed(seed))
        out.append(top - float(target.log_joint(z.double())[0]))
    return np.array(out)


def test_warm_restarts_climb_out_of_shallow_optima():
    before, after = _gaps(0), _gaps(8)
    print(f"gap to the grid maximum: {before.round(4)} -> {after.round(4)}")
    # Measured: mean gap 0.019 -> 0.002; 7 of 10 starts improve, none gets worse (without keeping the better
    # point, 2 got worse; without the restarts nothing changes and the second assertion fails).
    assert (after <= before + 1e-6).all()  # each start keeps the better of its old and new point
    assert after.mean() < 0.25 * before.mean()
    assert (after < before - 1e-3).sum() >= 3


@pytest.mark.parametrize("settings", [FlowSettings(map_restarts=-1), LangevinSettings(map_restarts=-1)])
def test_negative_map_restarts_is_a_one_line_error(settings):
    with pytest.raises(GanflowError, match="map_restarts"):
        settings.validate()
