"""Every message points at the fix: docs references exist, a stack without its marker says so, plot takes
--force, and checkpoints carry no machine's absolute paths."""

from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest
import torch

from ganflow import GanflowError, load_problem
from ganflow.operators import check_compatible
from ganflow.plugins import registered_problems
from tests.conftest import ROOT, run_cli

# The built-in generator, under whichever module name this layout gives it (problems.* or ganflow.problems.*).
PRIOR = registered_problems()["linear_gaussian"].split(":")[0] + ":generator"

DOC_REFERENCE = re.compile(r"docs/[A-Za-z0-9_.-]+\.md")


def _doc_references() -> dict[str, set[str]]:
    """``docs/<name>.md`` -> the files under ganflow/, problems/, configs/ and scripts/ that cite it."""
    found: dict[str, set[str]] = {}
    for top in ("ganflow", "problems", "configs", "scripts"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if not name.endswith((".py", ".toml", ".sh", ".md", ".txt")):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    for ref in DOC_REFERENCE.findall(f.read()):
                        found.setdefault(ref, set()).add(os.path.relpath(path, ROOT))
    return found


def test_every_docs_reference_names_an_existing_file():
    refs = _doc_references()
    assert refs, "the scan found no docs/ reference at all: the pattern or the roots are wrong"
    missing = {ref: sorted(where) for ref, where in refs.items() if not os.path.isfile(os.path.join(ROOT, ref))}
    assert not missing, f"help texts, docstrings or configs cite docs that do not exist: {missing}"


def test_stacked_y_without_n_obs_names_the_attribute():
    G = load_problem("linear_gaussian").generator()
    op = load_problem("linear_gaussian").make_operator()
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
    r = run_cli("solve", "--obs", tmp_path / "obs.h5", "--prior", PRIOR,
                "-o", tmp_path / "post.h5")
    assert r.returncode == 2 and "n_obs = 4" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_plot_needs_force_to_replace_figures(tmp_path):
    d = tmp_path
    (d / "c.toml").write_text("[solve]\nn_samples = 50\nn_quantile = 20\nn_field_samples = 2\n[flow]\n"
                              "n_layers = 1\nhidden = 4\nmax_iter = 3\nmin_iter = 0\nwarmup = 1\nmap_iter = 2\n"
                              "map_starts = 1\nprogress = false\n[diagnostics]\nenabled = false\n")
    prior = PRIOR
    assert run_cli("simulate", "--problem", "linear_gaussian", "--prior", prior, "--noise-sigma", "0.1",
                   "-o", d / "obs.h5").returncode == 0
    assert run_cli("solve", "--obs", d / "obs.h5", "--prior", prior, "--config", d / "c.toml", "--quiet",
                   "-o", d / "post.h5").returncode == 0
    assert run_cli("plot", d / "post.h5", "-o", d / "figs").returncode == 0
    before = (d / "figs" / "fields.png").stat().st_mtime_ns
    r = run_cli("plot", d / "post.h5", "-o", d / "figs")
    assert r.returncode == 2 and "--force" in r.stderr and "fields.png" in r.stderr, r.stderr
    assert (d / "figs" / "fields.png").stat().st_mtime_ns == before
    r = run_cli("plot", d / "post.h5", "-o", d / "figs", "--force")
    assert r.returncode == 0, r.stderr


def test_checkpoint_provenance_has_no_absolute_path(tmp_path):
    from ganflow.data import write_fields
    from ganflow.prior import TrainSettings, train_prior
    from ganflow.prior.checkpoint import load_checkpoint

    fields = write_fields(tmp_path / "gp.h5", torch.randn(64, 16), problem="gp-test", seed=0)
    s = TrainSettings(latent_dim=4, steps=2, batch_size=16, n_critic=1, mlp_hidden=8, mlp_depth=1)
    train_prior(fields, tmp_path / "p.pt", s, seed=0, report=False)
    raw = torch.load(tmp_path / "p.pt", weights_only=True)  # what is on disk, not what the reader shows
    assert raw["data"]["path"] == "gp.h5" and len(raw["data"]["sha1"]) == 40
    assert str(tmp_path) not in repr({k: v for k, v in raw.items() if k in ("data", "settings", "arch")})
    assert load_checkpoint(tmp_path / "p.pt")["data"]["path"] == "gp.h5"


@pytest.mark.parametrize("name", ["elliptic_32.pt", "phase_retrieval_32.pt"])
def test_bundled_checkpoints_show_no_machine_path(name):
    from ganflow.prior.checkpoint import load_checkpoint

    path = os.path.join(ROOT, "problems", "data", name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} is not bundled in this checkout")
    data = load_checkpoint(path)["data"]
    assert not os.path.isabs(data["path"]) and os.sep not in data["path"], data["path"]
