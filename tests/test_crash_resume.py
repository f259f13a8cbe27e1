"""Crash safety: SIGKILL at a checkpoint, then --resume, ends bit-identical to an uninterrupted run (CPU);
non-finite training steps are rolled back; flow checkpoints load weights-only.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from ganflow.data import write_fields
from ganflow.errors import GanflowError
from ganflow.prior import TrainSettings, train_prior
from ganflow.prior import trainer as trainer_mod
from ganflow.prior.checkpoint import load_checkpoint
from tests.conftest import ROOT, run_cli

D = 16


def _fields(n: int = 400, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, D)
    x = np.sin(2 * np.pi * t) + rng.standard_normal((n, 3)) @ np.stack([np.cos(k * np.pi * t) for k in (1, 2, 3)])
    return torch.tensor(x, dtype=torch.float32)


def _popen(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "ganflow", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, path, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (a checkpoint was renamed into place)."""
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"finished before a checkpoint appeared: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


TRAIN_TOML = textwrap.dedent('''
    [train]
    latent_dim = 4
    steps = 200
    batch_size = 16
    n_critic = 2
    mlp_hidden = 16
    mlp_depth = 1
    log_every = 10
    checkpoint_every_s = 0.05
    ''')


def test_train_prior_sigkill_then_resume_is_bit_identical(tmp_path):
    fields = write_fields(tmp_path / "f.h5", _fields(), problem="test", seed=0)
    cfg = tmp_path / "train.toml"
    cfg.write_text(TRAIN_TOML)
    out = tmp_path / "killed.pt"
    proc = _popen("train-prior", "--data", fields, "-o", out, "--config", cfg, "--seed", "3", "--no-progress",
                  "--no-report")
    _kill_when(proc, out)
    step_at_kill = int(load_checkpoint(out)["step"])
    assert 0 < step_at_kill < 200
    r = run_cli("train-prior", "--data", fields, "-o", out, "--resume", "--no-progress", "--no-report")
    assert r.returncode == 0, r.stderr

    settings = trainer_mod.load_train_settings(str(cfg))
    train_prior(fields, tmp_path / "full.pt", settings, seed=3, report=False)
    a, b = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(out)
    assert a["step"] == b["step"] == 200
    for net in ("G", "D", "G_ema"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key, step_at_kill)
    for key in ("step", "wasserstein", "loss_g"):
        assert torch.equal(a["history"][key], b["history"][key])


USER = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    rng = np.random.default_rng(7)
    K, N, M = 5, 12, 9
    W = rng.normal(size=(N, K)) / 3
    H = rng.normal(size=(M, N)) / 3

    class Gen(nn.Module):
        latent_dim = K
        field_shape = (N,)
        def __init__(self):
            super().__init__()
            self.register_buffer("W", torch.tensor(W, dtype=torch.float32))
        def forward(self, z):
            return torch.tanh(z @ self.W.T)

    class Op(nn.Module):
        field_shape = (N,)
        obs_shape = (M,)
        def __init__(self):
            super().__init__()
            self.register_buffer("H", torch.tensor(H, dtype=torch.float32))
        def forward(self, x):
            return x @ self.H.T

    class Problem:
        name = "user_tanh"
        field_shape = (N,)
        def make_operator(self):
            return Op()
        def sample_fields(self, n, generator):
            return Gen()(torch.randn(n, K, generator=generator))

    problem = Problem()
    ''')

SOLVE_TOML = textwrap.dedent('''
    [solve]
    n_samples = 500
    n_quantile = 200
    n_field_samples = 8
    [flow]
    n_layers = 2
    hidden = 16
    max_iter = 200
    min_iter = 200
    map_iter = 30
    map_starts = 2
    batch_size = 32
    checkpoint_every_s = 0.05
    progress = false
    [diagnostics]
    enabled = false
    ''')


@pytest.fixture
def solve_case(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(USER)
    cfg = tmp_path / "solve.toml"
    cfg.write_text(SOLVE_TOML)
    obs = tmp_path / "obs.h5"
    r = run_cli("simulate", "--problem", f"{user}:problem", "--prior", f"{user}:Gen", "--noise-sigma", "0.05",
                "-o", obs)
    assert r.returncode == 0, r.stderr
    args = ["solve", "--obs", obs, "--prior", f"{user}:Gen", "--operator", f"{user}:Op", "--config", cfg,
            "--seed", "4", "--quiet"]
    return tmp_path, args


def test_flow_solve_sigkill_then_resume_is_bit_identical(solve_case):
    tmp_path, args = solve_case
    out = tmp_path / "killed.h5"
    ckpt = tmp_path / "killed.h5.ckpt"
    proc = _popen(*args, "-o", out)
    _kill_when(proc, ckpt)
    assert not out.exists()
    # A fresh run would silently throw the interrupted fit away: it must be asked for.
    r = run_cli(*args, "-o", out)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli(*args, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert not ckpt.exists(), "the checkpoint is deleted once the result is saved"

    full = tmp_path / "full.h5"
    r = run_cli(*args, "-o", full)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "full.h5.ckpt").exists()
    with h5py.File(full) as fa, h5py.File(out) as fb:
        assert fa.attrs["iterations"] == fb.attrs["iterations"] == 200
        for name in ("latent/samples", "field/mean", "field/std", "field/q025", "obs/pred_mean", "trace/loss"):
            np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)
        state_a, state_b = {}, {}
        fa["flow/state"].visititems(lambda n, o: state_a.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else 0)
        fb["flow/state"].visititems(lambda n, o: state_b.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else 0)
        assert state_a.keys() == state_b.keys() and state_a
        for key in state_a:
            np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("fmt", ["pickle", "torch_zip"])
def test_flow_checkpoint_with_pickle_payload_is_refused(solve_case, fmt):
    tmp_path, args = solve_case
    out = tmp_path / "p.h5"
    ckpt = tmp_path / "p.h5.ckpt"
    marker = tmp_path / "PWNED"
    evil = {"kind": "ganflow.flow_fit", "format_version": 1, "x": _Payload(marker)}
    if fmt == "pickle":
        with open(ckpt, "wb") as f:
            pickle.dump(evil, f)
    else:
        torch.save(evil, ckpt)
    before = ckpt.read_bytes()
    r = run_cli(*args, "-o", out, "--resume")
    assert r.returncode == 2, r.stderr
    assert "refused" in r.stderr or "weights-only" in r.stderr or "GLOBAL" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not marker.exists(), "the payload ran"
    assert ckpt.read_bytes() == before and not out.exists()


def test_flow_checkpoint_of_other_data_is_refused(solve_case, tmp_path):
    from ganflow.posterior.flow import FlowSettings, fit_flow
    from ganflow.posterior.target import LatentTarget

    ns: dict = {}
    exec(USER, ns)
    G, A = ns["Gen"](), ns["Op"]()
    s = FlowSettings(n_layers=2, hidden=8, max_iter=20, min_iter=0, map_iter=5, map_starts=2, progress=False,
                     checkpoint_every_s=0.0)
    ckpt = tmp_path / "c.ckpt"
    fit_flow(LatentTarget(G, A, torch.zeros(9), 0.1), s, torch.Generator().manual_seed(0), checkpoint_path=ckpt)
    with pytest.raises(GanflowError, match="other data"):
        fit_flow(LatentTarget(G, A, torch.ones(9), 0.1), s, torch.Generator().manual_seed(0),
                 checkpoint_path=ckpt, resume=True)
    with pytest.raises(GanflowError, match="hidden"):
        fit_flow(LatentTarget(G, A, torch.zeros(9), 0.1), FlowSettings(**{**s.__dict__, "hidden": 9}),
                 torch.Generator().manual_seed(0), checkpoint_path=ckpt, resume=True)


# ---- non-finite GAN training: rollback, halved learning rates, bounded failures


class _NanCritic(nn.Module):
    """Wraps the real critic; its output is NaN on the given calls (counted from 1)."""

    def __init__(self, inner: nn.Module, bad):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.bad(self.calls) else out


def _patch_critic(monkeypatch, bad):
    real = trainer_mod.build_critic
    monkeypatch.setattr(trainer_mod, "build_critic", lambda arch: _NanCritic(real(arch), bad))


TINY = TrainSettings(latent_dim=4, steps=12, batch_size=16, n_critic=2, mlp_hidden=16, mlp_depth=1, log_every=1,
                     max_failures=3)


def test_nonfinite_steps_are_rolled_back_and_lr_halved(tmp_path, monkeypatch):
    fields = write_fields(tmp_path / "f.h5", _fields(200), problem="test")
    _patch_critic(monkeypatch, lambda c: c in (20, 41))  # two poisoned generator steps
    res = train_prior(fields, tmp_path / "p.pt", TINY, seed=0, report=False)
    ckpt = load_checkpoint(tmp_path / "p.pt")
    assert res.step == ckpt["step"] == 12
    assert ckpt["nonfinite_steps"] == 2 and ckpt["lr_scale"] == 0.25
    assert ckpt["opt_G"]["param_groups"][0]["lr"] == pytest.approx(TINY.lr_g / 4)
    assert ckpt["opt_D"]["param_groups"][0]["lr"] == pytest.approx(TINY.lr_d / 4)
    for net in ("G", "D", "G_ema"):
        assert all(torch.isfinite(v).all() for v in ckpt[net].values())
    assert np.isfinite(ckpt["history"]["wasserstein"].numpy()).all()


def test_persistent_nonfinite_training_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    fields = write_fields(tmp_path / "f.h5", _fields(200), problem="test")
    _patch_critic(monkeypatch, lambda c: c > 25)  # everything after generator step ~4 is NaN
    with pytest.raises(GanflowError, match="diverged.*last good state"):
        train_prior(fields, tmp_path / "p.pt", TINY, seed=0, report=False)
    ckpt = load_checkpoint(tmp_path / "p.pt")
    assert 0 < ckpt["step"] < 12 and ckpt["nonfinite_steps"] == TINY.max_failures + 1
    for net in ("G", "D", "G_ema"):
        assert all(torch.isfinite(v).all() for v in ckpt[net].values())
