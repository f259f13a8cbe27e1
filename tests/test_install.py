"""The package as a user gets it, away from the repository: build the wheel, install it into a fresh virtual
environment that cannot see the repository, and run the CLI from another directory.

No network and no second copy of torch: the wheel is built with this environment's setuptools
(``--no-build-isolation --no-index``) and installed without dependencies; the new environment reaches torch and
the other dependencies through a ``.pth`` file naming a directory of links to this environment's site-packages,
minus ganflow's own entries (the editable install's finder and metadata point back into the repository).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import h5py
import pytest
from conftest import ROOT

import ganflow

pytestmark = pytest.mark.slow

SOURCES = ("ganflow", "problems", "pyproject.toml", "README.md", "LICENSE")  # what the build reads
OWN_ENTRIES = ("ganflow", "__editable__", "problems")  # site-packages entries not linked into the fresh venv
BUILTINS = ("elliptic", "linear_gaussian", "phase_retrieval")

# A short flow solve: enough to exercise the whole chain, not to converge.
SMALL_SOLVE = textwrap.dedent("""
    [solve]
    n_samples = 200
    n_quantile = 100
    n_field_samples = 4
    [flow]
    max_iter = 10
    min_iter = 0
    warmup = 2
    batch_size = 8
    map_starts = 2
    map_iter = 10
    progress = false
    [diagnostics]
    enabled = false
""")

# What the installed interpreter sees, printed as JSON (run from a directory outside the repository).
PROBE = textwrap.dedent("""
    import importlib.metadata as md, importlib.util, json, os, sys
    import ganflow
    from ganflow.problems.phase_retrieval import PhaseRetrievalProblem
    print(json.dumps({
        "ganflow_file": os.path.realpath(ganflow.__file__),
        "version": ganflow.__version__,
        "dist_version": md.version("ganflow"),
        "dists": [str(d.locate_file("")) for d in md.distributions() if d.metadata["Name"] == "ganflow"],
        "top_level_problems": importlib.util.find_spec("problems") is not None,
        "sys_path": [os.path.realpath(p) for p in sys.path],
        "bundled_prior": PhaseRetrievalProblem(n=32).bundled_prior(),
    }))
""")


def _run(cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _build_wheel(tmp: Path) -> tuple[Path, str]:
    """The wheel, built from a copy of the sources (so no build/ or egg-info is left in the repository), and the
    build's verbose output."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = Path(ROOT, name)
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v",
              "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("ganflow-*.whl")
    return wheel, r.stdout + r.stderr


def _source_files(top: str, suffixes: tuple[str, ...]) -> set[str]:
    base = Path(ROOT, top)
    return {p.relative_to(base).as_posix() for p in base.rglob("*")
            if p.suffix in suffixes and "__pycache__" not in p.parts}


def _check_wheel(wheel: Path, build_log: str) -> None:
    """No warning from the build; every module, bundled prior and stored reference at its installed place; no
    top-level problems."""
    warned = [line for line in build_log.splitlines() if re.search(r"[Dd]eprecat|\w+Warning\b", line)]
    assert not warned, "\n".join(warned)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [n for n in names if n.split("/")[0] == "problems"]
    expected = {f"ganflow/{p}" for p in _source_files("ganflow", (".py",))}
    expected |= {f"ganflow/problems/{p}" for p in _source_files("problems", (".py", ".pt", ".h5"))}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"


def _fresh_venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A new virtual environment with the wheel installed; returns its bin/ and its site-packages."""
    root = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=tmp)
    python = root / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp)
    venv_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
                     .stdout.strip())
    links = tmp / "deps"
    links.mkdir()
    paths = sysconfig.get_paths()
    for directory in dict.fromkeys([paths["purelib"], paths["platlib"], *site.getsitepackages()]):
        for entry in os.scandir(directory) if os.path.isdir(directory) else ():
            if not entry.name.lower().startswith(OWN_ENTRIES) and not os.path.lexists(links / entry.name):
                os.symlink(entry.path, links / entry.name)
    (venv_site / "ganflow_test_deps.pth").write_text(f"{links}\n")
    return python.parent, venv_site


def _check_isolated(probe: dict, site: Path) -> None:
    """The installed ganflow is the only one in sight, and nothing of the repository is on sys.path."""
    site, root = os.path.realpath(site), os.path.realpath(ROOT)
    assert probe["ganflow_file"].startswith(site + os.sep), probe["ganflow_file"]
    assert [os.path.realpath(d) for d in probe["dists"]] == [site], probe["dists"]
    assert not [p for p in probe["sys_path"] if p == root or p.startswith(root + os.sep)], probe["sys_path"]
    assert not probe["top_level_problems"] and not list(Path(site).glob("problems*"))
    assert probe["version"] == probe["dist_version"] == ganflow.__version__
    assert probe["bundled_prior"] and probe["bundled_prior"].startswith(site + os.sep), probe["bundled_prior"]


def test_wheel_installs_and_runs_away_from_the_repository(tmp_path):
    wheel, build_log = _build_wheel(tmp_path)
    _check_wheel(wheel, build_log)
    bin_dir, site = _fresh_venv(tmp_path, wheel)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    probe = json.loads(_run([bin_dir / "python", "-c", PROBE], away, env).stdout)
    _check_isolated(probe, site)

    gf = bin_dir / "ganflow"
    assert _run([gf, "--version"], away, env).stdout.strip() == f"ganflow, version {ganflow.__version__}"
    listed = _run([gf, "problems"], away, env).stdout
    assert all(f"ganflow.problems.{name}:" in listed for name in BUILTINS), listed
    _run([gf, "check-operator", "elliptic"], away, env)
    (away / "small.toml").write_text(SMALL_SOLVE)
    prior = probe["bundled_prior"]
    _run([gf, "simulate", "--problem", "phase_retrieval", "--prior", prior, "--noise-relative", "0.05",
          "--seed", "1", "-o", "obs.h5"], away, env)
    _run([gf, "solve", "--obs", "obs.h5", "--prior", prior, "--config", "small.toml", "--quiet", "-o", "post.h5"],
         away, env)
    for name in ("obs.h5", "post.h5"):
        with h5py.File(away / name) as f:
            assert f.attrs["ganflow_version"] == ganflow.__version__, name
    with h5py.File(away / "post.h5") as f:
        assert f.attrs["method"] == "flow" and f["field/mean"].shape == (32, 32)
