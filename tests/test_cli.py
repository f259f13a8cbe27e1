"""End-to-end CLI: user plug-ins by file spec, the posterior.h5 schema, plot, bad input, determinism."""

from __future__ import annotations

import os
import textwrap

import h5py
import numpy as np
import pytest

from ganflow.results import REQUIRED_ATTRS, REQUIRED_DATASETS
from tests.conftest import run_cli, run_cli_subprocess

# A user's own linear generator and operator, in a file the CLI imports through spec strings.
USER_FILE = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    rng = np.random.default_rng(7)
    K, N, M = 6, 10, 8
    W = rng.normal(size=(N * N, K)) / 4
    B = rng.normal(size=N * N) / 10
    H = rng.normal(size=(M, N * N)) / 10

    class Gen(nn.Module):
        latent_dim = K
        field_shape = (N, N)
        def __init__(self):
            super().__init__()
            self.register_buffer("W", torch.tensor(W, dtype=torch.float32))
            self.register_buffer("b", torch.tensor(B, dtype=torch.float32))
        def forward(self, z):
            return (z @ self.W.T + self.b).reshape(-1, N, N)

    class Op(nn.Module):
        field_shape = (N, N)
        obs_shape = (M,)
        def __init__(self):
            super().__init__()
            self.register_buffer("H", torch.tensor(H, dtype=torch.float32))
        def forward(self, x):
            return x.reshape(x.shape[0], -1) @ self.H.T

    class WrongShapeOp(Op):
        obs_shape = (M + 1,)

    class Problem:
        name = "user_linear"
        field_shape = (N, N)
        def make_operator(self):
            return Op()
        def sample_fields(self, n, generator):
            return Gen()(torch.randn(n, K, generator=generator))

    problem = Problem()
    ''')

FAST = textwrap.dedent('''
    [solve]
    n_samples = 4000
    n_quantile = 2000
    [flow]
    max_iter = 800
    progress = false
    ''')

# Schema and determinism do not need a converged fit.
TINY = textwrap.dedent('''
    [solve]
    n_samples = 4000
    n_quantile = 2000
    [flow]
    max_iter = 60
    min_iter = 60
    map_iter = 50
    progress = false
    ''')


@pytest.fixture
def user(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_FILE)
    cfg = tmp_path / "fast.toml"
    cfg.write_text(FAST)
    ns: dict = {}
    exec(USER_FILE, ns)
    return path, cfg, ns


def _simulate(tmp_path, user_path, out="obs.h5", sigma="0.05", seed="1"):
    obs = tmp_path / out
    r = run_cli("simulate", "--problem", f"{user_path}:problem", "--prior", f"{user_path}:Gen",
                "--noise-sigma", sigma, "--seed", seed, "-o", obs)
    assert r.returncode == 0, r.stderr
    return obs


def _exact(ns, y, sigma):
    H = ns["H"] @ ns["W"]
    prec = np.eye(ns["K"]) + H.T @ H / sigma**2
    cov = np.linalg.inv(prec)
    mean = cov @ H.T @ (y - ns["H"] @ ns["B"]) / sigma**2
    return mean, cov


def test_user_file_specs_through_cli_match_exact_posterior(tmp_path, user):
    path, cfg, ns = user
    obs = _simulate(tmp_path, path)
    post = tmp_path / "posterior.h5"
    r = run_cli("solve", "--obs", obs, "--prior", f"{path}:Gen", "--operator", f"{path}:Op", "--config", cfg,
                "--seed", "0", "--quiet", "-o", post)
    assert r.returncode == 0, r.stderr
    with h5py.File(obs) as f:
        y, sigma = f["y"][()].astype(np.float64), float(f.attrs["noise_sigma"])
    mean, cov = _exact(ns, y, sigma)
    sd = np.sqrt(np.diag(cov))
    assert sd.max() < 0.5  # clearly narrower than the N(0, 1) prior
    with h5py.File(post) as f:
        z = f["latent/samples"][()].astype(np.float64)
        field_mean, field_std = f["field/mean"][()], f["field/std"][()]
    assert np.max(np.abs(z.mean(0) - mean) / sd) < 0.1
    assert np.max(np.abs(z.std(0) / sd - 1)) < 0.1
    W = ns["W"]
    exact_field_mean = (W @ mean + ns["B"]).reshape(field_mean.shape)
    exact_field_sd = np.sqrt(np.einsum("ij,jk,ik->i", W, cov, W)).reshape(field_mean.shape)
    assert np.max(np.abs(field_mean - exact_field_mean) / exact_field_sd) < 0.1
    assert np.max(np.abs(field_std / exact_field_sd - 1)) < 0.1


def test_schema_plot_and_determinism(tmp_path, user):
    path, _, _ = user
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    obs = _simulate(tmp_path, path)
    outs = []
    for name in ("a.h5", "b.h5"):
        out = tmp_path / name
        r = run_cli("solve", "--obs", obs, "--prior", f"{path}:Gen", "--problem", f"{path}:problem",
                    "--config", cfg, "--seed", "3", "--quiet", "-o", out)
        assert r.returncode == 0, r.stderr
        outs.append(out)
    with h5py.File(outs[0]) as fa, h5py.File(outs[1]) as fb:
        for d in REQUIRED_DATASETS + ("truth/x", "truth/z"):
            assert d in fa, d
        for a in REQUIRED_ATTRS + ("rel_l2_error", "coverage_95", "chi2_per_dof"):
            assert a in fa.attrs, a
        assert fa["latent/samples"].shape == (4000, 6)
        assert fa["field/samples"].shape[1:] == (10, 10)
        assert fa["obs/pred_mean"].shape == (8,)
        assert fa.attrs["method"] == "flow" and fa.attrs["latent_dim"] == 6
        assert fa.attrs["n_forward_evals"] > 0 and fa.attrs["wall_time_s"] > 0
        # same seed -> same numbers
        for d in ("latent/samples", "field/mean", "field/std", "field/q025", "trace/loss"):
            np.testing.assert_array_equal(fa[d][()], fb[d][()])
    figs = tmp_path / "figs"
    r = run_cli("plot", outs[0], "-o", figs)
    assert r.returncode == 0, r.stderr
    for name in ("fields.png", "samples.png", "trace.png", "obs.png"):
        assert (figs / name).stat().st_size > 1000


def _assert_clean_error(r, *, outputs=(), contains=None):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    if contains:
        assert contains in lines[0], lines[0]
    for out in outputs:
        assert not os.path.exists(out), out


def test_bad_inputs_exit_2_with_one_line(tmp_path, user):
    path, cfg, _ = user
    obs = _simulate(tmp_path, path)
    out = tmp_path / "post.h5"
    base = ["solve", "--obs", obs, "--prior", f"{path}:Gen", "--operator", f"{path}:Op", "--quiet", "-o", out]

    # operator obs_shape does not match /y
    r = run_cli(*base[:5], "--operator", f"{path}:WrongShapeOp", "--quiet", "-o", out)
    _assert_clean_error(r, outputs=[out], contains="obs_shape")
    # generator field_shape does not match the operator's
    r = run_cli("solve", "--obs", obs, "--prior", "ganflow.problems.linear_gaussian:generator", "--operator",
                f"{path}:Op", "-o", out)
    _assert_clean_error(r, outputs=[out], contains="field_shape")
    # non-finite /y
    bad = tmp_path / "nan.h5"
    with h5py.File(obs) as f, h5py.File(bad, "w") as g:
        y = f["y"][()]
        y[0] = np.nan
        g["y"] = y
        g.attrs["noise_sigma"] = 0.1
    r = run_cli(*["solve", "--obs", bad] + base[3:])
    _assert_clean_error(r, outputs=[out], contains="non-finite")
    # sigma <= 0
    zero = tmp_path / "zero.h5"
    with h5py.File(obs) as f, h5py.File(zero, "w") as g:
        g["y"] = f["y"][()]
        g.attrs["noise_sigma"] = 0.0
    r = run_cli(*["solve", "--obs", zero] + base[3:])
    _assert_clean_error(r, outputs=[out], contains="noise_sigma")
    r = run_cli("simulate", "--problem", f"{path}:problem", "--prior", f"{path}:Gen", "--noise-sigma", "-1",
                "-o", tmp_path / "neg.h5")
    _assert_clean_error(r, outputs=[tmp_path / "neg.h5"])
    # unknown config key, and a wrong type
    badcfg = tmp_path / "bad.toml"
    badcfg.write_text("[flow]\nmax_iters = 10\n")
    r = run_cli(*base, "--config", badcfg)
    _assert_clean_error(r, outputs=[out], contains="flow.max_iters")
    badcfg.write_text("[flow]\nlr = \"fast\"\n")
    r = run_cli(*base, "--config", badcfg)
    _assert_clean_error(r, outputs=[out], contains="flow.lr")
    # spec that does not resolve
    r = run_cli(*base[:3], "--prior", f"{path}:Nope", *base[5:])
    _assert_clean_error(r, outputs=[out], contains="Nope")
    r = run_cli(*base[:3], "--prior", "no_such_module_xyz:G", *base[5:])
    _assert_clean_error(r, outputs=[out])
    # missing files (one case through a real subprocess: the console sees one line, no traceback)
    r = run_cli_subprocess(*["solve", "--obs", tmp_path / "missing.h5"] + base[3:])
    _assert_clean_error(r, outputs=[out], contains="not found")
    r = run_cli(*base, "--config", tmp_path / "missing.toml")
    _assert_clean_error(r, outputs=[out], contains="not found")
    # corrupt observation file
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an hdf5 file at all")
    r = run_cli(*["solve", "--obs", corrupt] + base[3:])
    _assert_clean_error(r, outputs=[out])
    # existing output is not overwritten without --force
    out.write_bytes(b"keep me")
    r = run_cli(*base)
    _assert_clean_error(r, contains="exists")
    assert out.read_bytes() == b"keep me"
    # output in a missing directory
    r = run_cli(*base[:-1], tmp_path / "nodir" / "p.h5")
    _assert_clean_error(r, contains="does not exist")
