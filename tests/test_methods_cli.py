"""Every method's posterior.h5 is read by `ganflow plot` and `ganflow predict` like the flow's (issue 6)."""

from __future__ import annotations

import h5py
import pytest

from ganflow.results import REQUIRED_ATTRS, REQUIRED_DATASETS
from tests.conftest import run_cli

SMALL = """
[solve]
n_samples = 400
n_quantile = 400
[diagnostics]
n_draws = 200
[langevin]
n_samples = 400
search_chains = 64
[nuts]
num_chains = 2
warmup_steps = 100
num_samples = 200
[smc]
n_particles = 200
"""


@pytest.mark.parametrize("method", ["langevin", "nuts", "smc"])
def test_method_output_is_read_by_plot_and_predict(tmp_path, method):
    obs = tmp_path / "obs.h5"
    r = run_cli("simulate", "--problem", "linear_gaussian", "--prior", "ganflow.problems.linear_gaussian:generator",
                "--kw", "stride=4", "--noise-relative", "0.2", "--seed", "1", "-o", obs)
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    post = tmp_path / "post.h5"
    r = run_cli("solve", "--obs", obs, "--prior", "ganflow.problems.linear_gaussian:generator", "--method", method,
                "--config", cfg, "--quiet", "-o", post)
    assert r.returncode == 0, r.stderr
    with h5py.File(post) as f:
        assert f.attrs["method"] == method
        for d in REQUIRED_DATASETS:
            assert d in f, d
        for a in REQUIRED_ATTRS:
            assert a in f.attrs, a
        assert f["latent/samples"].shape[1] == 16
    r = run_cli("plot", post, "-o", tmp_path / "figs")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "figs" / "fields.png").stat().st_size > 1000
    r = run_cli("predict", post, "--qoi", "total")
    assert r.returncode == 0, r.stderr
    with h5py.File(post) as f:
        assert "qoi/total/mean" in f
