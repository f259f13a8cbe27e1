"""Bad-input catalogue: every command, every kind of bad input, one test each.

Each case must end with exactly one line on stderr naming what is wrong (and where), exit code 2, no
traceback, and every file in the working directory byte-identical to before (no new file, no half-written
output, an existing output untouched without --force). A pickle payload must never run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import textwrap

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import run_cli, run_cli_subprocess

# A user's plug-ins: 1-D fields of 16 values, a linear generator and operator, and broken variants.
USER_FILE = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    rng = np.random.default_rng(3)
    K, N, M = 4, 16, 8
    W = rng.normal(size=(N, K)) / 2
    H = rng.normal(size=(M, N)) / 4
    NUMBER = 3

    class Gen(nn.Module):
        latent_dim = K
        field_shape = (N,)
        def __init__(self):
            super().__init__()
            self.register_buffer("W", torch.tensor(W, dtype=torch.float32))
        def forward(self, z):
            return z @ self.W.T

    class Op(nn.Module):
        field_shape = (N,)
        obs_shape = (M,)
        def __init__(self):
            super().__init__()
            self.register_buffer("H", torch.tensor(H, dtype=torch.float32))
        def forward(self, x):
            return x @ self.H.T

    class WrongShapeOp(Op):  # declares an obs_shape that does not match obs.h5
        obs_shape = (M + 1,)

    class LyingOp(Op):  # declares (M,) but returns M + 1 values
        def forward(self, x):
            return torch.cat([x @ self.H.T, x[:, :1]], 1)

    class NanOp(Op):
        def forward(self, x):
            return x @ self.H.T * float("nan")

    class RaisingOp(Op):
        def forward(self, x):
            raise RuntimeError("the solver inside the user's operator did not converge")

    class Op2D(nn.Module):  # a field_shape no generator here has
        field_shape = (4, 4)
        obs_shape = (M,)
        def forward(self, x):
            return x.reshape(x.shape[0], -1)[:, :M]

    class Problem:
        name = "user_linear"
        field_shape = (N,)
        def __init__(self, op="ok"):
            self.op = op
        def make_operator(self, scale=1.0):
            return {"ok": Op, "nan": NanOp, "lying": LyingOp}[self.op]()
        def sample_fields(self, n, generator):
            return Gen()(torch.randn(n, K, generator=generator)) + 0.1 * torch.randn(n, N, generator=generator)

    class NanFieldsProblem(Problem):
        def sample_fields(self, n, generator):
            return torch.full((n, N), float("nan"))

    class WrongFieldsProblem(Problem):
        def sample_fields(self, n, generator):
            return torch.zeros(n, N + 1)

    problem = Problem()
    nan_problem = Problem(op="nan")
    ''')

TRAIN = textwrap.dedent('''
    [train]
    latent_dim = 4
    steps = 3
    batch_size = 16
    n_critic = 1
    mlp_hidden = 8
    mlp_depth = 1
    log_every = 1
    ''')

SOLVE = textwrap.dedent('''
    [solve]
    n_samples = 200
    n_quantile = 100
    n_field_samples = 4
    batch_size = 100
    [flow]
    n_layers = 2
    hidden = 8
    max_iter = 5
    min_iter = 0
    warmup = 1
    map_starts = 2
    map_iter = 5
    progress = false
    ''')

BAD_CONFIGS = {
    "bad_syntax.toml": "[flow\nlr = 1\n",
    "not_utf8.toml": b"[flow]\nkind = \"\xff\xfe\"\n",
    "unknown_table.toml": "[flwo]\nlr = 0.1\n",
    "not_a_table.toml": "flow = 3\n",
    "flow_unknown.toml": "[flow]\nmax_iters = 10\n",
    "flow_type.toml": "[flow]\nlr = \"fast\"\n",
    "flow_neg.toml": "[flow]\nlr = -1.0\n",
    "flow_nan.toml": "[flow]\nlr = nan\n",
    "flow_inf.toml": "[flow]\ngrad_clip = inf\n",
    "flow_kind.toml": "[flow]\nkind = \"glow\"\n",
    "flow_batch.toml": "[flow]\nbatch_size = 1\n",
    "flow_bool.toml": "[flow]\nmax_iter = true\n",
    "solve_method.toml": "[solve]\nmethod = \"mcmc\"\n",
    "solve_unknown.toml": "[solve]\nn_sample = 10\n",
    "solve_zero.toml": "[solve]\nn_samples = 0\n",
    "langevin_unknown.toml": "[langevin]\nstep = 0.1\n",
    "nuts_unknown.toml": "[nuts]\nwarmups = 10\n",
    "operator_unknown.toml": "[operator]\nbogus = 1\n",
    "problem_unknown.toml": "[problem]\nbogus = 1\n",
    "train_unknown.toml": "[train]\nstep = 10\n",
    "train_type.toml": "[train]\nlr_g = \"fast\"\n",
    "train_neg.toml": "[train]\nlr_g = -1e-4\n",
    "train_betas.toml": "[train]\nbetas = [0.5]\n",
    "train_val.toml": "[train]\nval_fraction = 1.5\n",
    "train_steps0.toml": "[train]\nsteps = 0\n",
    "simulate_unknown.toml": "[simulate]\nnois_sigma = 0.1\n",
    "simulate_neg.toml": "[simulate]\nnoise_sigma = -0.1\n",
    "simulate_type.toml": "[simulate]\nnoise_sigma = \"big\"\n",
    "calibrate_unknown.toml": "[calibrate]\nn_truth = 3\n",
}


def _h5(path, datasets=(), attrs=None):
    with h5py.File(path, "w") as f:
        for name, value in dict(datasets).items():
            f[name] = value
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


class _Payload:
    """Unpickling this runs ``touch <path>``; a safe loader must refuse before that."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A directory with good inputs (fields.h5, prior.pt, obs.h5, post.h5) and every broken variant."""
    d = tmp_path_factory.mktemp("bad")
    user = d / "user.py"
    user.write_text(USER_FILE)
    (d / "import_error.py").write_text("import no_such_module_for_ganflow\nx = 1\n")
    (d / "syntax_error.py").write_text("def f(:\n")
    (d / "train.toml").write_text(TRAIN)
    (d / "solve.toml").write_text(SOLVE)
    (d / "adir").mkdir()
    (d / "figs_existing").mkdir()
    (d / "figs_existing" / "fields.png").write_bytes(b"an earlier figure")
    for name, text in BAD_CONFIGS.items():
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())

    u = f"{user}:problem"
    r = run_cli("data", "--problem", u, "--n", "64", "-o", d / "fields.h5")
    assert r.returncode == 0, r.stderr
    r = run_cli("train-prior", "--data", d / "fields.h5", "-o", d / "prior.pt", "--config", d / "train.toml",
                "--no-progress", "--no-report")
    assert r.returncode == 0, r.stderr
    r = run_cli("simulate", "--problem", u, "--prior", f"{user}:Gen", "--noise-sigma", "0.1", "-o", d / "obs.h5")
    assert r.returncode == 0, r.stderr
    # obs.h5 records the user's file as its problem: solve runs it only when given again (trust rule)
    r = run_cli("solve", "--obs", d / "obs.h5", "--prior", d / "prior.pt", "--problem", u, "--config",
                d / "solve.toml", "--quiet", "-o", d / "post.h5")
    assert r.returncode == 0, r.stderr

    with h5py.File(d / "fields.h5") as f:
        fields = f["fields"][()]
    with h5py.File(d / "obs.h5") as f:
        y = f["y"][()]
        obs_attrs = dict(f.attrs)
    # Empty, garbage and truncated files of every kind.
    for name in ("empty.h5", "empty.pt"):
        (d / name).write_bytes(b"")
    (d / "garbage.h5").write_bytes(b"this is not an HDF5 file\n" * 40)
    (d / "garbage.pt").write_bytes(b"this is not a torch checkpoint\n" * 40)
    for src in ("fields.h5", "obs.h5", "post.h5", "prior.pt"):
        raw = (d / src).read_bytes()
        (d / f"trunc_{src}").write_bytes(raw[: len(raw) // 2])
    # fields.h5 variants.
    nan = fields.copy()
    nan[3, 5] = np.nan
    inf = fields.copy()
    inf[0, 0] = np.inf
    _h5(d / "fields_nan.h5", {"fields": nan})
    _h5(d / "fields_inf.h5", {"fields": inf})
    _h5(d / "fields_1d.h5", {"fields": fields[:, 0]})
    _h5(d / "fields_str.h5", {"fields": np.array([b"a", b"b"])})
    _h5(d / "fields_const.h5", {"fields": np.ones_like(fields)})
    _h5(d / "fields_none.h5", {"y": y})
    _h5(d / "fields_empty.h5", {"fields": np.zeros((0, 16), np.float32)})
    _h5(d / "fields_2d.h5", {"fields": np.random.default_rng(0).normal(size=(64, 4, 4)).astype(np.float32)})
    _h5(d / "fields_other.h5", {"fields": fields[::-1].copy()})
    _h5(d / "fields_badjson.h5", {"fields": fields}, {"generator_kwargs": "{not json"})
    # obs.h5 variants.
    base_attrs = {k: v for k, v in obs_attrs.items() if k != "noise_sigma"}
    for name, sigma in {"zero": 0.0, "neg": -0.1, "nan": np.nan, "inf": np.inf, "str": "small"}.items():
        _h5(d / f"obs_sigma_{name}.h5", {"y": y}, {**base_attrs, "noise_sigma": sigma})
    _h5(d / "obs_sigma_missing.h5", {"y": y}, base_attrs)
    y_nan, y_inf = y.copy(), y.copy()
    y_nan[2], y_inf[1] = np.nan, -np.inf
    _h5(d / "obs_nan.h5", {"y": y_nan}, obs_attrs)
    _h5(d / "obs_inf.h5", {"y": y_inf}, obs_attrs)
    _h5(d / "obs_noy.h5", {"x": y}, obs_attrs)
    _h5(d / "obs_shape.h5", {"y": np.zeros(9, np.float32)}, obs_attrs)
    _h5(d / "obs_emptyy.h5", {"y": np.zeros(0, np.float32)}, obs_attrs)
    _h5(d / "obs_stry.h5", {"y": np.array([b"a", b"b"])}, obs_attrs)
    _h5(d / "obs_group.h5", {"y/inner": y}, obs_attrs)
    _h5(d / "obs_badjson.h5", {"y": y}, {**obs_attrs, "operator_kwargs": "{oops"})
    _h5(d / "obs_noproblem.h5", {"y": y}, {"noise_sigma": 0.1})
    _h5(d / "obs_unknownproblem.h5", {"y": y}, {**obs_attrs, "problem": "no_such_problem_xyz"})
    _h5(d / "obs_xtrue_shape.h5", {"y": y, "x_true": np.zeros(5, np.float32)}, obs_attrs)
    # Truth files for simulate --truth.
    _h5(d / "truth_nan.h5", {"x_true": nan[3]})
    _h5(d / "truth_shape.h5", {"x_true": np.zeros(5, np.float32)})
    _h5(d / "truth_none.h5", {"q": np.zeros(5, np.float32)})
    # Checkpoint variants.
    good = torch.load(d / "prior.pt", weights_only=True)
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    torch.save({**good, "format_version": 99}, d / "v99.pt")
    torch.save({k: v for k, v in good.items() if k != "G_ema"}, d / "nokey.pt")
    torch.save({**good, "G_ema": {"0.weight": torch.zeros(2, 2)}}, d / "badweights.pt")
    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"kind": "ganflow.prior", "x": _Payload(d / "PWNED")}, f)
    torch.save({"kind": "ganflow.prior", "x": _Payload(d / "PWNED")}, d / "evil_zip.pt")
    # posterior.h5 variants.
    shutil.copyfile(d / "post.h5", d / "post_nomethod.h5")
    with h5py.File(d / "post_nomethod.h5", "a") as f:
        del f.attrs["method"]
    shutil.copyfile(d / "post.h5", d / "post_badjson.h5")
    with h5py.File(d / "post_badjson.h5", "a") as f:
        f.attrs["config"] = "{oops"
    shutil.copyfile(d / "post.h5", d / "post_noprior.h5")
    with h5py.File(d / "post_noprior.h5", "a") as f:
        f.attrs["prior"] = str(d / "missing_prior.pt")
    return d


# (id, argv template, substring expected in the one error line). `{d}` is the case directory, `{u}` user.py.
SOLVE_OK = ["--config", "{d}/solve.toml", "--quiet", "-o", "{d}/out.h5"]
SOLVE_BASE = ["solve", "--obs", "{d}/obs.h5", "--prior", "{d}/prior.pt", "--operator", "{u}:Op"]


def _solve(*, obs="{d}/obs.h5", prior="{d}/prior.pt", op=("--operator", "{u}:Op"), cfg="{d}/solve.toml",
           out="{d}/out.h5", extra=()):
    return ["solve", "--obs", obs, "--prior", prior, *op, "--config", cfg, "--quiet", "-o", out, *extra]


def _train(data="{d}/fields.h5", out="{d}/new.pt", cfg="{d}/train.toml", extra=()):
    return ["train-prior", "--data", data, "-o", out, "--config", cfg, "--no-progress", "--no-report", *extra]


def _sim(*, problem="{u}:problem", src=("--prior", "{u}:Gen"), noise=("--noise-sigma", "0.1"),
         out="{d}/sim.h5", extra=()):
    return ["simulate", "--problem", problem, *src, *noise, "-o", out, *extra]


CASES = [
    # ---- data
    ("data-unknown-problem", ["data", "--problem", "no_such_problem", "--n", "4", "-o", "{d}/f.h5"], "unknown name"),
    ("data-spec-missing-file", ["data", "--problem", "{d}/nofile.py:problem", "--n", "4", "-o", "{d}/f.h5"],
     "not found"),
    ("data-spec-missing-attr", ["data", "--problem", "{u}:nope", "--n", "4", "-o", "{d}/f.h5"], "nope"),
    ("data-spec-missing-module", ["data", "--problem", "no_such_pkg_xyz.mod:problem", "--n", "4", "-o", "{d}/f.h5"],
     "no_such_pkg_xyz"),
    ("data-spec-malformed", ["data", "--problem", "{u}:", "--n", "4", "-o", "{d}/f.h5"], "spec"),
    ("data-spec-import-error", ["data", "--problem", "{d}/import_error.py:x", "--n", "4", "-o", "{d}/f.h5"],
     "no_such_module_for_ganflow"),
    ("data-spec-syntax-error", ["data", "--problem", "{d}/syntax_error.py:x", "--n", "4", "-o", "{d}/f.h5"],
     "syntax_error.py"),
    ("data-spec-wrong-kind-operator", ["data", "--problem", "{u}:Op", "--n", "4", "-o", "{d}/f.h5"], "no attribute"),
    ("data-spec-wrong-kind-number", ["data", "--problem", "{u}:NUMBER", "--n", "4", "-o", "{d}/f.h5"], "int"),
    ("data-n-zero", ["data", "--problem", "{u}:problem", "--n", "0", "-o", "{d}/f.h5"], "--n"),
    ("data-n-negative", ["data", "--problem", "{u}:problem", "--n", "-5", "-o", "{d}/f.h5"], "--n"),
    ("data-n-not-int", ["data", "--problem", "{u}:problem", "--n", "many", "-o", "{d}/f.h5"], "--n"),
    ("data-nan-fields", ["data", "--problem", "{u}:NanFieldsProblem", "--n", "4", "-o", "{d}/f.h5"], "non-finite"),
    ("data-wrong-shape-fields", ["data", "--problem", "{u}:WrongFieldsProblem", "--n", "4", "-o", "{d}/f.h5"],
     "shape"),
    ("data-kw-unknown", ["data", "--problem", "{u}:Problem", "--kw", "bogus=1", "--n", "4", "-o", "{d}/f.h5"],
     "bogus"),
    ("data-kw-malformed", ["data", "--problem", "{u}:Problem", "--kw", "bogus", "--n", "4", "-o", "{d}/f.h5"],
     "KEY=VALUE"),
    ("data-config-missing", ["data", "--problem", "{u}:problem", "--n", "4", "-o", "{d}/f.h5", "--config",
                             "{d}/missing.toml"], "not found"),
    ("data-config-syntax", ["data", "--problem", "{u}:problem", "--n", "4", "-o", "{d}/f.h5", "--config",
                            "{d}/bad_syntax.toml"], "invalid TOML"),
    ("data-config-not-utf8", ["data", "--problem", "{u}:problem", "--n", "4", "-o", "{d}/f.h5", "--config",
                              "{d}/not_utf8.toml"], "not_utf8.toml"),
    ("data-config-unknown-table", ["data", "--problem", "{u}:problem", "--n", "4", "-o", "{d}/f.h5", "--config",
                                   "{d}/unknown_table.toml"], "flwo"),
    ("data-config-problem-unknown", ["data", "--problem", "{u}:Problem", "--n", "4", "-o", "{d}/f.h5", "--config",
                                     "{d}/problem_unknown.toml"], "bogus"),
    ("data-out-exists", ["data", "--problem", "{u}:problem", "--n", "4", "-o", "{d}/fields.h5"], "exists"),
    ("data-out-missing-dir", ["data", "--problem", "{u}:problem", "--n", "4", "-o", "{d}/nodir/f.h5"],
     "does not exist"),
    ("data-out-is-dir", ["data", "--problem", "{u}:problem", "--n", "4", "-o", "{d}/adir"], "directory"),
    ("data-missing-option", ["data", "--n", "4", "-o", "{d}/f.h5"], "--problem"),
    # ---- train-prior
    ("train-data-missing", _train(data="{d}/missing.h5"), "not found"),
    ("train-data-empty", _train(data="{d}/empty.h5"), "empty"),
    ("train-data-garbage", _train(data="{d}/garbage.h5"), "HDF5"),
    ("train-data-truncated", _train(data="{d}/trunc_fields.h5"), "trunc_fields.h5"),
    ("train-data-is-dir", _train(data="{d}/adir"), "adir"),
    ("train-data-nan", _train(data="{d}/fields_nan.h5"), "non-finite"),
    ("train-data-inf", _train(data="{d}/fields_inf.h5"), "non-finite"),
    ("train-data-1d", _train(data="{d}/fields_1d.h5"), "shape"),
    ("train-data-strings", _train(data="{d}/fields_str.h5"), "real numbers"),
    ("train-data-constant", _train(data="{d}/fields_const.h5"), "do not vary"),
    ("train-data-no-dataset", _train(data="{d}/fields_none.h5"), "/fields"),
    ("train-data-empty-dataset", _train(data="{d}/fields_empty.h5"), "empty"),
    ("train-data-bad-json-attr", _train(data="{d}/fields_badjson.h5"), "generator_kwargs"),
    ("train-out-exists", _train(out="{d}/prior.pt"), "exists"),
    ("train-out-missing-dir", _train(out="{d}/nodir/p.pt"), "does not exist"),
    ("train-out-is-dir", _train(out="{d}/adir"), "directory"),
    ("train-config-unknown-key", _train(cfg="{d}/train_unknown.toml"), "train.step"),
    ("train-config-type", _train(cfg="{d}/train_type.toml"), "train.lr_g"),
    ("train-config-negative-lr", _train(cfg="{d}/train_neg.toml"), "lr_g"),
    ("train-config-betas", _train(cfg="{d}/train_betas.toml"), "betas"),
    ("train-config-val-fraction", _train(cfg="{d}/train_val.toml"), "val_fraction"),
    ("train-config-steps0", _train(cfg="{d}/train_steps0.toml"), "steps"),
    ("train-steps-negative", _train(extra=("--steps", "-2")), "steps"),
    ("train-device-bogus", _train(extra=("--device", "tpu")), "--device"),
    ("train-resume-missing", _train(out="{d}/missing.pt", extra=("--resume",)), "no checkpoint"),
    ("train-resume-garbage", _train(out="{d}/garbage.pt", extra=("--resume",)), "garbage.pt"),
    ("train-resume-empty", _train(out="{d}/empty.pt", extra=("--resume",)), "empty"),
    ("train-resume-truncated", _train(out="{d}/trunc_prior.pt", extra=("--resume",)), "corrupt"),
    ("train-resume-foreign", _train(out="{d}/foreign.pt", extra=("--resume",)), "not a ganflow prior"),
    ("train-resume-version", _train(out="{d}/v99.pt", extra=("--resume",)), "format_version"),
    ("train-resume-pickle", _train(out="{d}/evil.pt", extra=("--resume",)), "refused"),
    ("train-resume-pickle-zip", _train(out="{d}/evil_zip.pt", extra=("--resume",)), "evil_zip.pt"),
    ("train-resume-other-data", _train(data="{d}/fields_other.h5", out="{d}/prior.pt", extra=("--resume",)),
     "not the data"),
    ("train-resume-done", _train(out="{d}/prior.pt", extra=("--resume",)), "already at step"),
    ("train-resume-settings-differ", _train(out="{d}/prior.pt", cfg="{d}/train_neg.toml", extra=("--resume",)),
     "lr_g"),
    # ---- prior-report
    ("report-ckpt-missing", ["prior-report", "{d}/missing.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"],
     "not found"),
    ("report-ckpt-empty", ["prior-report", "{d}/empty.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"], "empty"),
    ("report-ckpt-garbage", ["prior-report", "{d}/garbage.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"],
     "garbage.pt"),
    ("report-ckpt-truncated", ["prior-report", "{d}/trunc_prior.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"],
     "corrupt"),
    ("report-ckpt-foreign", ["prior-report", "{d}/foreign.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"],
     "not a ganflow prior"),
    ("report-ckpt-nokey", ["prior-report", "{d}/nokey.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"], "G_ema"),
    ("report-ckpt-badweights", ["prior-report", "{d}/badweights.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"],
     "architecture"),
    ("report-ckpt-pickle", ["prior-report", "{d}/evil.pt", "--data", "{d}/fields.h5", "-o", "{d}/rep"], "refused"),
    ("report-data-missing", ["prior-report", "{d}/prior.pt", "--data", "{d}/missing.h5", "-o", "{d}/rep"],
     "not found"),
    ("report-data-nan", ["prior-report", "{d}/prior.pt", "--data", "{d}/fields_nan.h5", "-o", "{d}/rep"],
     "non-finite"),
    ("report-data-wrong-shape", ["prior-report", "{d}/prior.pt", "--data", "{d}/fields_2d.h5", "-o", "{d}/rep"],
     "field_shape"),
    ("report-data-truncated", ["prior-report", "{d}/prior.pt", "--data", "{d}/trunc_fields.h5", "-o", "{d}/rep"],
     "trunc_fields.h5"),
    ("report-out-missing-dir", ["prior-report", "{d}/prior.pt", "--data", "{d}/fields.h5", "-o", "{d}/nodir/rep"],
     "does not exist"),
    ("report-out-exists", ["prior-report", "{d}/prior.pt", "--data", "{d}/fields.h5", "-o", "{d}/fields"],
     "exists"),
    # ---- simulate
    ("sim-unknown-problem", _sim(problem="no_such_problem"), "unknown name"),
    ("sim-problem-wrong-kind", _sim(problem="{u}:Gen"), "no attribute"),
    ("sim-prior-missing", _sim(src=("--prior", "{d}/missing.pt")), "not found"),
    ("sim-prior-garbage", _sim(src=("--prior", "{d}/garbage.pt")), "garbage.pt"),
    ("sim-prior-truncated", _sim(src=("--prior", "{d}/trunc_prior.pt")), "corrupt"),
    ("sim-prior-pickle", _sim(src=("--prior", "{d}/evil.pt")), "refused"),
    ("sim-prior-spec-unresolved", _sim(src=("--prior", "{u}:NoGen")), "NoGen"),
    ("sim-prior-wrong-kind", _sim(src=("--prior", "{u}:Op")), "latent_dim"),
    ("sim-prior-shape-mismatch", _sim(problem="{u}:problem",
                                      src=("--prior", "ganflow.problems.linear_gaussian:generator")), "field_shape"),
    ("sim-prior-and-truth", _sim(src=("--prior", "{u}:Gen", "--truth", "{d}/truth_shape.h5")), "exactly one"),
    ("sim-no-source", _sim(src=()), "exactly one"),
    ("sim-sigma-zero", _sim(noise=("--noise-sigma", "0")), "noise"),
    ("sim-sigma-negative", _sim(noise=("--noise-sigma", "-1")), "noise"),
    ("sim-sigma-nan", _sim(noise=("--noise-sigma", "nan")), "noise"),
    ("sim-sigma-inf", _sim(noise=("--noise-sigma", "inf")), "noise"),
    ("sim-relative-zero", _sim(noise=("--noise-relative", "0")), "noise"),
    ("sim-no-noise", _sim(noise=()), "noise"),
    ("sim-truth-missing", _sim(src=("--truth", "{d}/missing.h5")), "not found"),
    ("sim-truth-nan", _sim(src=("--truth", "{d}/truth_nan.h5")), "non-finite"),
    ("sim-truth-shape", _sim(src=("--truth", "{d}/truth_shape.h5")), "shape"),
    ("sim-truth-no-dataset", _sim(src=("--truth", "{d}/truth_none.h5")), "x_true"),
    ("sim-truth-garbage", _sim(src=("--truth", "{d}/garbage.h5")), "HDF5"),
    ("sim-operator-nan", _sim(problem="{u}:nan_problem"), "non-finite"),
    ("sim-kw-unknown", _sim(extra=("--kw", "bogus=1")), "bogus"),
    ("sim-config-operator-unknown", _sim(extra=("--config", "{d}/operator_unknown.toml")), "bogus"),
    ("sim-config-simulate-unknown", _sim(noise=(), extra=("--config", "{d}/simulate_unknown.toml")), "nois_sigma"),
    ("sim-config-simulate-negative", _sim(noise=(), extra=("--config", "{d}/simulate_neg.toml")), "noise"),
    ("sim-config-simulate-type", _sim(noise=(), extra=("--config", "{d}/simulate_type.toml")), "noise_sigma"),
    ("sim-out-exists", _sim(out="{d}/obs.h5"), "exists"),
    ("sim-out-missing-dir", _sim(out="{d}/nodir/o.h5"), "does not exist"),
    # ---- solve: observation file
    ("solve-obs-missing", _solve(obs="{d}/missing.h5"), "not found"),
    ("solve-obs-empty", _solve(obs="{d}/empty.h5"), "empty"),
    ("solve-obs-garbage", _solve(obs="{d}/garbage.h5"), "HDF5"),
    ("solve-obs-truncated", _solve(obs="{d}/trunc_obs.h5"), "trunc_obs.h5"),
    ("solve-obs-nan", _solve(obs="{d}/obs_nan.h5"), "non-finite"),
    ("solve-obs-inf", _solve(obs="{d}/obs_inf.h5"), "non-finite"),
    ("solve-obs-no-y", _solve(obs="{d}/obs_noy.h5"), "/y"),
    ("solve-obs-empty-y", _solve(obs="{d}/obs_emptyy.h5"), "/y"),
    ("solve-obs-string-y", _solve(obs="{d}/obs_stry.h5"), "/y"),
    ("solve-obs-group-y", _solve(obs="{d}/obs_group.h5"), "/y"),
    ("solve-obs-wrong-shape", _solve(obs="{d}/obs_shape.h5"), "obs_shape"),
    ("solve-obs-sigma-zero", _solve(obs="{d}/obs_sigma_zero.h5"), "noise_sigma"),
    ("solve-obs-sigma-negative", _solve(obs="{d}/obs_sigma_neg.h5"), "noise_sigma"),
    ("solve-obs-sigma-nan", _solve(obs="{d}/obs_sigma_nan.h5"), "noise_sigma"),
    ("solve-obs-sigma-inf", _solve(obs="{d}/obs_sigma_inf.h5"), "noise_sigma"),
    ("solve-obs-sigma-string", _solve(obs="{d}/obs_sigma_str.h5"), "noise_sigma"),
    ("solve-obs-sigma-missing", _solve(obs="{d}/obs_sigma_missing.h5"), "noise_sigma"),
    ("solve-obs-bad-json", _solve(obs="{d}/obs_badjson.h5", op=()), "operator_kwargs"),
    ("solve-obs-no-problem", _solve(obs="{d}/obs_noproblem.h5", op=()), "--problem"),
    ("solve-obs-unknown-problem", _solve(obs="{d}/obs_unknownproblem.h5", op=()), "no_such_problem_xyz"),
    ("solve-obs-recorded-file-problem", _solve(op=()), "trust rule"),
    ("solve-obs-xtrue-shape", _solve(obs="{d}/obs_xtrue_shape.h5"), "x_true"),
    # ---- solve: prior
    ("solve-prior-missing", _solve(prior="{d}/missing.pt"), "not found"),
    ("solve-prior-empty", _solve(prior="{d}/empty.pt"), "empty"),
    ("solve-prior-garbage", _solve(prior="{d}/garbage.pt"), "garbage.pt"),
    ("solve-prior-truncated", _solve(prior="{d}/trunc_prior.pt"), "corrupt"),
    ("solve-prior-foreign", _solve(prior="{d}/foreign.pt"), "not a ganflow prior"),
    ("solve-prior-version", _solve(prior="{d}/v99.pt"), "format_version"),
    ("solve-prior-pickle", _solve(prior="{d}/evil.pt"), "refused"),
    ("solve-prior-pickle-zip", _solve(prior="{d}/evil_zip.pt"), "evil_zip.pt"),
    ("solve-prior-spec-no-attr", _solve(prior="{u}:NoGen"), "NoGen"),
    ("solve-prior-spec-no-module", _solve(prior="no_such_pkg_xyz:G"), "no_such_pkg_xyz"),
    ("solve-prior-spec-wrong-kind", _solve(prior="{u}:Op"), "latent_dim"),
    ("solve-prior-spec-number", _solve(prior="{u}:NUMBER"), "int"),
    ("solve-prior-shape-mismatch", _solve(prior="ganflow.problems.linear_gaussian:generator"), "field_shape"),
    # ---- solve: operator
    ("solve-op-declared-shape", _solve(op=("--operator", "{u}:WrongShapeOp")), "obs_shape"),
    ("solve-op-returns-wrong-shape", _solve(op=("--operator", "{u}:LyingOp")), "shape"),
    ("solve-op-returns-nan", _solve(op=("--operator", "{u}:NanOp")), "non-finite"),
    ("solve-op-raises", _solve(op=("--operator", "{u}:RaisingOp")), "did not converge"),
    ("solve-op-field-shape", _solve(op=("--operator", "{u}:Op2D")), "field_shape"),
    ("solve-op-wrong-kind", _solve(op=("--operator", "{u}:Gen")), "obs_shape"),
    ("solve-op-number", _solve(op=("--operator", "{u}:NUMBER")), "int"),
    ("solve-op-unresolved", _solve(op=("--operator", "{u}:NoOp")), "NoOp"),
    ("solve-op-kw-unknown", _solve(extra=("--kw", "bogus=1")), "bogus"),
    ("solve-problem-nan-op", _solve(op=("--problem", "{u}:nan_problem")), "non-finite"),
    ("solve-problem-unknown", _solve(op=("--problem", "no_such_problem")), "unknown name"),
    # ---- solve: config
    ("solve-config-missing", _solve(cfg="{d}/missing.toml"), "not found"),
    ("solve-config-syntax", _solve(cfg="{d}/bad_syntax.toml"), "invalid TOML"),
    ("solve-config-unknown-table", _solve(cfg="{d}/unknown_table.toml"), "flwo"),
    ("solve-config-not-a-table", _solve(cfg="{d}/not_a_table.toml"), "flow"),
    ("solve-config-unknown-key", _solve(cfg="{d}/flow_unknown.toml"), "flow.max_iters"),
    ("solve-config-type", _solve(cfg="{d}/flow_type.toml"), "flow.lr"),
    ("solve-config-negative", _solve(cfg="{d}/flow_neg.toml"), "flow.lr"),
    ("solve-config-nan", _solve(cfg="{d}/flow_nan.toml"), "flow.lr"),
    ("solve-config-inf", _solve(cfg="{d}/flow_inf.toml"), "flow.grad_clip"),
    ("solve-config-kind", _solve(cfg="{d}/flow_kind.toml"), "flow.kind"),
    ("solve-config-batch", _solve(cfg="{d}/flow_batch.toml"), "flow.batch_size"),
    ("solve-config-bool", _solve(cfg="{d}/flow_bool.toml"), "flow.max_iter"),
    ("solve-config-method", _solve(cfg="{d}/solve_method.toml"), "solve.method"),
    ("solve-config-solve-unknown", _solve(cfg="{d}/solve_unknown.toml"), "solve.n_sample"),
    ("solve-config-solve-zero", _solve(cfg="{d}/solve_zero.toml"), "n_samples"),
    ("solve-config-langevin-unknown", _solve(cfg="{d}/langevin_unknown.toml", extra=("--method", "langevin")),
     "langevin.step"),
    ("solve-config-nuts-unknown", _solve(cfg="{d}/nuts_unknown.toml", extra=("--method", "nuts")), "nuts.warmups"),
    ("solve-config-operator-unknown", _solve(cfg="{d}/operator_unknown.toml"), "bogus"),
    ("solve-method-bogus", _solve(extra=("--method", "mcmc")), "--method"),
    # ---- solve: output
    ("solve-out-exists", _solve(out="{d}/post.h5"), "exists"),
    ("solve-out-missing-dir", _solve(out="{d}/nodir/p.h5"), "does not exist"),
    ("solve-out-is-dir", _solve(out="{d}/adir"), "directory"),
    # ---- plot
    ("plot-missing", ["plot", "{d}/missing.h5", "-o", "{d}/figs"], "not found"),
    ("plot-empty", ["plot", "{d}/empty.h5", "-o", "{d}/figs"], "empty"),
    ("plot-garbage", ["plot", "{d}/garbage.h5", "-o", "{d}/figs"], "HDF5"),
    ("plot-truncated", ["plot", "{d}/trunc_post.h5", "-o", "{d}/figs"], "trunc_post.h5"),
    ("plot-not-posterior", ["plot", "{d}/fields.h5", "-o", "{d}/figs"], "not a ganflow posterior"),
    ("plot-missing-attr", ["plot", "{d}/post_nomethod.h5", "-o", "{d}/figs"], "method"),
    ("plot-bad-json", ["plot", "{d}/post_badjson.h5", "-o", "{d}/figs"], "config"),
    ("plot-figures-exist", ["plot", "{d}/post.h5", "-o", "{d}/figs_existing"], "--force"),
    ("plot-out-missing-parent", ["plot", "{d}/post.h5", "-o", "{d}/nodir/figs"], "does not exist"),
    ("plot-out-is-file", ["plot", "{d}/post.h5", "-o", "{d}/obs.h5"], "obs.h5"),
    # ---- check-operator
    ("check-unknown", ["check-operator", "no_such_problem"], "unknown name"),
    ("check-unresolved", ["check-operator", "{u}:NoOp"], "NoOp"),
    ("check-wrong-kind", ["check-operator", "{u}:Gen"], "obs_shape"),
    ("check-number", ["check-operator", "{u}:NUMBER"], "int"),
    ("check-lying-shape", ["check-operator", "{u}:LyingOp"], "shape"),
    ("check-nan", ["check-operator", "{u}:NanOp"], "non-finite"),
    ("check-raises", ["check-operator", "{u}:RaisingOp"], "did not converge"),
    ("check-kw-unknown", ["check-operator", "{u}:Problem", "--kw", "bogus=1"], "bogus"),
    ("check-batch-zero", ["check-operator", "{u}:Op", "--batch", "0"], "--batch"),
    ("check-import-error", ["check-operator", "{d}/import_error.py:x"], "no_such_module_for_ganflow"),
]

PREDICT_CASES = [
    ("predict-missing", ["predict", "{d}/missing.h5"], "not found"),
    ("predict-empty", ["predict", "{d}/empty.h5"], "empty"),
    ("predict-garbage", ["predict", "{d}/garbage.h5"], "HDF5"),
    ("predict-truncated", ["predict", "{d}/trunc_post.h5"], "trunc_post.h5"),
    ("predict-not-posterior", ["predict", "{d}/fields.h5"], "not a ganflow posterior"),
    ("predict-qoi-unknown", ["predict", "{d}/post.h5", "--problem", "{u}:problem", "--qoi", "no_such_qoi"],
     "no_such_qoi"),
    ("predict-qoi-unresolved", ["predict", "{d}/post.h5", "--problem", "{u}:problem", "--qoi", "{u}:nope"], "nope"),
    ("predict-recorded-file-problem", ["predict", "{d}/post.h5"], "trust rule"),
    ("predict-n-zero", ["predict", "{d}/post.h5", "--n", "0"], "--n"),
    ("predict-prior-garbage", ["predict", "{d}/post.h5", "--prior", "{d}/garbage.pt"], "garbage.pt"),
    ("predict-prior-pickle", ["predict", "{d}/post.h5", "--prior", "{d}/evil.pt"], "refused"),
    ("predict-recorded-prior-missing", ["predict", "{d}/post_noprior.h5"], "not found"),
    ("calibrate-unknown-problem", ["calibrate", "--problem", "no_such_problem", "--prior", "{u}:Gen", "-o",
                                   "{d}/cal"], "unknown name"),
    ("calibrate-prior-missing", ["calibrate", "--problem", "{u}:problem", "--prior", "{d}/missing.pt", "-o",
                                 "{d}/cal"], "not found"),
    ("calibrate-sigma-negative", ["calibrate", "--problem", "{u}:problem", "--prior", "{u}:Gen",
                                  "--noise-sigma", "-1", "-o", "{d}/cal"], "noise"),
    ("calibrate-out-is-file", ["calibrate", "--problem", "{u}:problem", "--prior", "{u}:Gen", "-o",
                               "{d}/obs.h5"], "obs.h5"),
    ("calibrate-out-missing-parent", ["calibrate", "--problem", "{u}:problem", "--prior", "{u}:Gen", "-o",
                                      "{d}/nodir/cal"], "does not exist"),
    ("calibrate-config-unknown", ["calibrate", "--problem", "{u}:problem", "--prior", "{u}:Gen", "-o", "{d}/cal",
                                  "--config", "{d}/calibrate_unknown.toml"], "calibrate.n_truth"),
]

_HAVE_PREDICT = os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "ganflow", "cli",
                                            "predict_cmd.py"))
ALL_CASES = CASES + (PREDICT_CASES if _HAVE_PREDICT else [])
# A few cases also go through a real interpreter: what a user's console shows.
SUBPROCESS = {"solve-obs-garbage", "train-resume-pickle", "solve-op-raises", "plot-truncated"}


def snapshot(d) -> dict:
    """Every file and directory under ``d`` -> its sha256 (directories -> "dir")."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d)] = "dir"
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_clean_error(r, contains: str) -> None:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    assert contains.lower() in lines[0].lower(), lines[0]


# Known failures in files owned by other work in progress (reported, not fixed here); strict, so a fix shows.
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_bad_input_is_one_clean_line(env, case, request):
    name, argv, contains = case
    if name in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[name], strict=True))
    user = env / "user.py"
    args = [a.format(d=env, u=user) for a in argv]
    before = snapshot(env)
    r = (run_cli_subprocess if name in SUBPROCESS else run_cli)(*args, cwd=env)
    assert_clean_error(r, contains)
    assert not os.path.exists(env / "PWNED"), "a pickle payload ran"
    assert snapshot(env) == before, "files changed"


def test_force_overwrites_only_with_force(env, tmp_path):
    """The counterpart of the *-out-exists cases: with --force the same command replaces the file."""
    out = tmp_path / "f.h5"
    out.write_bytes(b"old")
    r = run_cli("data", "--problem", f"{env / 'user.py'}:problem", "--n", "4", "-o", out)
    assert r.returncode == 2 and out.read_bytes() == b"old"
    r = run_cli("data", "--problem", f"{env / 'user.py'}:problem", "--n", "4", "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        assert f["fields"].shape == (4, 16)


def test_debug_shows_the_traceback(env):
    r = run_cli_subprocess("--debug", "solve", "--obs", env / "garbage.h5", "--prior", env / "prior.pt",
                           "--operator", f"{env / 'user.py'}:Op", "-o", env / "out.h5", cwd=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "GanflowError" in r.stderr
