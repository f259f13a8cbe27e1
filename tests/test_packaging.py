"""Packaging in the source tree: the built-in problems live in ``ganflow.problems`` (registered names, the
deprecated ``problems.`` spelling, no code that still imports a top-level ``problems``, which the repository's
working directory would hide), and the version has one definition. The installed wheel: tests/test_install.py."""

from __future__ import annotations

import os
import re
import tomllib
import warnings

import h5py
import pytest
import torch
from conftest import ROOT, run_cli

import ganflow.problems.linear_gaussian as linear_gaussian
from ganflow import __version__, load_problem, simulate
from ganflow.data import write_fields
from ganflow.io import write_obs
from ganflow.plugins import registered_problems, resolve_spec


@pytest.mark.parametrize("name", ["linear_gaussian", "elliptic", "phase_retrieval"])
def test_registered_names_resolve_into_ganflow_problems(name):
    assert registered_problems()[name].startswith(f"ganflow.problems.{name}:")
    assert type(load_problem(name)).__module__ == f"ganflow.problems.{name}"


def test_old_problems_spelling_maps_to_ganflow_problems_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"'problems\.linear_gaussian' is deprecated.*"
                                                r"'ganflow\.problems\.linear_gaussian'") as record:
        obj = resolve_spec("problems.linear_gaussian:generator")
    assert obj is linear_gaussian.generator  # the same module object, not a second copy of the classes
    assert record[0].filename == __file__  # the warning points at the caller's line, not into ganflow
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_spec("ganflow.problems.linear_gaussian:generator") is linear_gaussian.generator


def test_old_spelling_on_the_command_line_prints_one_warning_line(tmp_path):
    obs = tmp_path / "obs.h5"
    r = run_cli("simulate", "--problem", "linear_gaussian", "--prior", "problems.linear_gaussian:generator",
                "--noise-relative", "0.1", "--seed", "0", "-o", obs)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the spec module 'problems.linear_gaussian'"), lines
    assert "ganflow.problems.linear_gaussian" in lines[0]


def test_no_source_imports_a_top_level_problems_package():
    """Inside the repository `import problems` still works (the folder is on sys.path), so a leftover would only
    break an installed ganflow; this scan catches it here."""
    pattern = re.compile(r"^\s*(from\s+problems[\s.]|import\s+problems\b)|[\"']problems\.\w+:", re.M)
    leftovers = []
    for top in ("ganflow", "problems", "tests", "scripts", "configs"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith((".py", ".toml", ".sh")) and name != "test_packaging.py":
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        leftovers += [f"{os.path.relpath(path, ROOT)}: {m.group(0).strip()}"
                                      for m in pattern.finditer(f.read())]
    assert not leftovers, leftovers


def test_version_is_defined_once_and_reported_by_cli_and_files(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ganflow.__version__"}
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ganflow, version {__version__}", r.stdout
    obs = simulate("linear_gaussian", prior=linear_gaussian.generator(), noise_relative=0.1, seed=0)
    write_obs(tmp_path / "obs.h5", obs)
    write_fields(tmp_path / "fields.h5", torch.zeros(2, 4, 4), problem="linear_gaussian")
    for name in ("obs.h5", "fields.h5"):
        with h5py.File(tmp_path / name) as f:
            assert f.attrs["ganflow_version"] == __version__, name
