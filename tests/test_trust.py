"""The trust rule: a spec read back from a file never makes ganflow import code.

A payload file whose top-level code creates a marker file is named, in every form a spec can take, by the
attributes of the files each command reads (obs.h5, a stacked obs.h5 and its run.json, posterior.h5, fields.h5
and a checkpoint's provenance). The marker must never appear; where the spec would be resolved the command
fails with one line, exit 2, naming the option that trusts it explicitly.
"""

from __future__ import annotations

import json
import shutil
import sys

import h5py
import pytest

from ganflow.errors import GanflowError
from ganflow.plugins import UntrustedSpecError, check_spec_from_file, registered_problems
from tests.conftest import run_cli

# Built into ganflow, so trusted wherever it is recorded; named under whichever module name this layout gives
# the built-ins (problems.* or ganflow.problems.*).
LINEAR_GAUSSIAN = registered_problems()["linear_gaussian"].split(":")[0]
PRIOR = f"{LINEAR_GAUSSIAN}:generator"
TINY_SOLVE = (
    "[solve]\nn_samples = 50\nn_quantile = 20\nn_field_samples = 2\n"
    "[flow]\nn_layers = 1\nhidden = 4\nmax_iter = 3\nmin_iter = 0\nwarmup = 1\nmap_iter = 2\nmap_starts = 1\n"
    "progress = false\n[diagnostics]\nenabled = false\n"
)
PAYLOAD_MODULE = "ganflow_trust_payload"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A legitimate obs.h5 (single and stacked) and posterior.h5 of linear_gaussian, and the payload file."""
    d = tmp_path_factory.mktemp("trust")
    marker = d / "PAYLOAD_RAN"
    payload = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the payload ran')\n"
               "problem = Op = Gen = generator = None\n")
    (d / f"{PAYLOAD_MODULE}.py").write_text(payload)
    (d / "solve.toml").write_text(TINY_SOLVE)
    sim = ["simulate", "--problem", "linear_gaussian", "--prior", PRIOR, "--noise-relative", "0.1"]
    assert run_cli(*sim, "-o", d / "obs.h5").returncode == 0
    assert run_cli(*sim, "--n-obs", "2", "-o", d / "stack.h5").returncode == 0
    r = run_cli("solve", "--obs", d / "obs.h5", "--prior", PRIOR, "--config", d / "solve.toml", "--quiet",
                "-o", d / "post.h5")
    assert r.returncode == 0, r.stderr
    return d


def _specs(d):
    """The payload named as an absolute file spec, a relative one (run from its directory) and a module."""
    return {"file": f"{d / PAYLOAD_MODULE}.py:problem", "relative": f"{PAYLOAD_MODULE}.py:problem",
            "module": f"{PAYLOAD_MODULE}:problem"}


def _forget_payload(env):
    """Drop the marker and any imported copy of the payload, so each test sees only its own commands."""
    (env / "PAYLOAD_RAN").unlink(missing_ok=True)
    path = str(env / f"{PAYLOAD_MODULE}.py")
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == path:
            del sys.modules[name]


@pytest.fixture(params=["file", "relative", "module"])
def spec(request, env, monkeypatch):
    _forget_payload(env)
    monkeypatch.syspath_prepend(str(env))  # the module form would import from here
    yield _specs(env)[request.param]
    ran = (env / "PAYLOAD_RAN").exists()
    _forget_payload(env)
    assert not ran, "the payload ran"


def _tampered(src, dst, **attrs):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
    return dst


def _refused(r, flag):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "trust rule" in lines[0] and flag in lines[0], lines[0]


def test_check_spec_from_file_accepts_only_registered_and_builtin(monkeypatch, tmp_path):
    import importlib
    import types

    builtin = importlib.import_module(LINEAR_GAUSSIAN)
    short = LINEAR_GAUSSIAN.removeprefix("ganflow.")  # problems.linear_gaussian
    shutil.copyfile(builtin.__file__, tmp_path / "linear_gaussian.py")  # the same code, outside ganflow
    ok = ["elliptic", "linear_gaussian", registered_problems()["elliptic"], PRIOR, "prior.pt",
          f"{short}:LinearGaussianProblem", f"ganflow.{short}:LinearGaussianProblem", f"{builtin.__file__}:generator"]
    for spec in ok:  # both module names of the built-ins are accepted, whichever this layout imports
        assert check_spec_from_file(spec, "f.h5: attribute 'problem'", "--problem") == spec
    # a public name defined in a module of ganflow.problems is trusted
    fake = types.ModuleType("ganflow.problems.fake_builtin")
    exec("class FakeProblem:\n    pass\n", fake.__dict__)
    fake.FakeProblem.__module__ = fake.__name__
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert check_spec_from_file("ganflow.problems.fake_builtin:FakeProblem", "f", "--problem")
    bad = ["evil.py:problem", "/abs/evil.py:problem", "evil:problem", "os:system", "ganflow.plugins:load_problem",
           f"{short}:np", f"{short}:GanflowError", f"{short}:_cosine_basis", f"{short}:LinearGaussianProblem.generator",
           f"{short}_missing:X", f"{tmp_path / 'linear_gaussian.py'}:generator", f"{builtin.__file__}:np"]
    for spec in bad:
        with pytest.raises(UntrustedSpecError, match="--problem") as e:
            check_spec_from_file(spec, "obs.h5: attribute 'problem'", "--problem")
        assert isinstance(e.value, GanflowError) and "\n" not in str(e.value)


def test_solve_refuses_a_problem_recorded_in_obs(env, spec, tmp_path):
    obs = _tampered(env / "obs.h5", tmp_path / "obs_evil.h5", problem=spec)
    out = tmp_path / "post.h5"
    r = run_cli("solve", "--obs", obs, "--prior", PRIOR, "--config", env / "solve.toml", "--quiet", "-o", out,
                cwd=env)
    _refused(r, "--problem")
    assert not out.exists()
    # Given explicitly, a trusted problem replaces the recorded one.
    r = run_cli("solve", "--obs", obs, "--prior", PRIOR, "--problem", "linear_gaussian", "--config",
                env / "solve.toml", "--quiet", "-o", out, cwd=env)
    assert r.returncode == 0, r.stderr


def test_solve_from_python_refuses_a_recorded_problem(env, spec, tmp_path):
    from ganflow import solve

    obs = _tampered(env / "obs.h5", tmp_path / "obs_evil.h5", problem=spec)
    with pytest.raises(UntrustedSpecError, match="--problem"):
        solve(str(obs), PRIOR, config=str(env / "solve.toml"), progress=False)


def test_stacked_solve_and_its_resume_refuse_a_recorded_problem(env, spec, tmp_path):
    stack = _tampered(env / "stack.h5", tmp_path / "stack_evil.h5", problem=spec)
    out = tmp_path / "post.h5"
    base = ["solve", "--obs", stack, "--prior", PRIOR, "--config", env / "solve.toml", "--quiet", "-o", out]
    _refused(run_cli(*base, "--max-obs", "1", cwd=env), "--problem")
    _refused(run_cli(*base, "--resume", cwd=env), "--problem")
    assert not out.exists()


def test_stack_resume_never_resolves_run_json(env, spec, tmp_path):
    out = tmp_path / "post.h5"
    base = ["solve", "--obs", env / "stack.h5", "--prior", PRIOR, "--config", env / "solve.toml", "--quiet",
            "-o", out]
    r = run_cli(*base, "--max-obs", "1")
    assert r.returncode == 0, r.stderr
    run_json = tmp_path / "post.h5.parts" / "run.json"
    record = json.loads(run_json.read_text())
    record.update(problem=spec, operator=spec, prior=spec)
    run_json.write_text(json.dumps(record))
    r = run_cli(*base, "--resume", cwd=env)
    assert r.returncode == 2 and "differ" in r.stderr, r.stderr


@pytest.mark.parametrize("attr, flag", [("problem", "--problem"), ("operator", "--operator"), ("prior", "--prior")])
def test_predict_refuses_specs_recorded_in_the_posterior(env, spec, tmp_path, attr, flag):
    post = _tampered(env / "post.h5", tmp_path / "post.h5", **{attr: spec})
    before = post.read_bytes()
    _refused(run_cli("predict", post, "--n", "100", cwd=env), flag)
    assert post.read_bytes() == before


def test_plot_resolves_nothing(env, spec, tmp_path):
    post = _tampered(env / "post.h5", tmp_path / "post.h5", problem=spec, operator=spec, prior=spec)
    r = run_cli("plot", post, "-o", tmp_path / "figs", cwd=env)
    assert r.returncode == 0, r.stderr


def test_train_prior_resume_and_calibrate_resolve_no_recorded_spec(env, tmp_path):
    """fields.h5's `problem` goes into the checkpoint's provenance as a record: training, resuming and
    calibrating with that checkpoint never resolve it."""
    _forget_payload(env)
    spec = _specs(env)["file"]
    fields, ckpt = tmp_path / "fields.h5", tmp_path / "prior.pt"
    r = run_cli("data", "--problem", "linear_gaussian", "--n", "32", "-o", tmp_path / "clean.h5")
    assert r.returncode == 0, r.stderr
    _tampered(tmp_path / "clean.h5", fields, problem=spec)
    (tmp_path / "train.toml").write_text("[train]\nlatent_dim = 4\nbatch_size = 8\nn_critic = 1\nbase_channels = 2\n")
    train = ["train-prior", "--data", fields, "-o", ckpt, "--config", tmp_path / "train.toml", "--no-progress",
             "--no-report"]
    assert run_cli(*train, "--steps", "2").returncode == 0
    r = run_cli(*train, "--steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    from ganflow.prior.checkpoint import load_checkpoint

    assert load_checkpoint(ckpt)["data"]["problem"] == spec  # recorded, not resolved
    (tmp_path / "cal.toml").write_text(TINY_SOLVE + "[calibrate]\nn_truths = 2\nn_rank_draws = 10\nn_bins = 2\n")
    r = run_cli("calibrate", "--problem", "linear_gaussian", "--prior", ckpt, "--config", tmp_path / "cal.toml",
                "--quiet", "-o", tmp_path / "cal", cwd=env)
    assert r.returncode == 0, r.stderr
    assert not (env / "PAYLOAD_RAN").exists(), "the payload ran"
