"""``ganflow data`` and ``fields.h5``: schema, determinism, provenance and bad input."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ganflow.cli import cli
from ganflow.data import load_fields, make_fields, write_fields
from ganflow.errors import GanflowError

BAD_PROBLEM = """
import torch

class Shapeless:
    name = "shapeless"
    field_shape = (4,)
    def make_operator(self):
        return None
    def sample_fields(self, n, generator):
        return torch.zeros(n, 5)

class Nan(Shapeless):
    def sample_fields(self, n, generator):
        x = torch.randn(n, 4, generator=generator)
        x[0, 0] = float("nan")
        return x
"""


def _invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _one_line_exit2(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr


def test_cli_writes_schema_and_is_deterministic(tmp_path):
    paths = [tmp_path / f"{name}.h5" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (5, 5, 6), strict=True):
        r = _invoke(
            [
                "data",
                "--problem",
                "linear_gaussian",
                "--n",
                "600",
                "-o",
                str(path),
                "--seed",
                str(seed),
                "--kw",
                "n=12",
                "--kw",
                "latent_dim=6",
            ]
        )
        assert r.exit_code == 0, r.output
    with h5py.File(paths[0]) as f:
        ds = f["fields"]
        assert ds.shape == (600, 12, 12) and ds.dtype == np.float32 and ds.chunks is not None
        assert f.attrs["problem"] == "linear_gaussian" and int(f.attrs["seed"]) == 5
        assert json.loads(f.attrs["generator_kwargs"]) == {"n": 12, "latent_dim": 6}
    a, b, c = (load_fields(p).fields for p in paths)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Chunks are independent streams: no chunk repeats the first one.
    assert not torch.equal(a[:256][:88], a[256:344]) and not torch.equal(a[:88], a[512:])


def test_fields_follow_the_problem_prior(tmp_path):
    """linear_gaussian fields are x = W z + b with z ~ N(0, I): check that from W, b alone (least squares)."""
    from ganflow.problems.linear_gaussian import LinearGaussianProblem

    path = make_fields(
        "linear_gaussian", 3000, tmp_path / "f.h5", seed=0, problem_kwargs={"n": 8, "latent_dim": 5}
    )
    x = load_fields(path).fields.double().reshape(3000, -1).numpy()
    G = LinearGaussianProblem(n=8, latent_dim=5).generator()
    W, bias = G.W.double().numpy(), G.b.double().numpy()
    z, *_ = np.linalg.lstsq(W, (x - bias).T, rcond=None)
    assert np.abs(W @ z + bias[:, None] - x.T).max() < 1e-4  # in the generator's range
    assert np.abs(z.mean(1)).max() < 0.1 and np.abs(np.cov(z) - np.eye(5)).max() < 0.1  # z ~ N(0, I)


def test_config_problem_table_and_file_spec_is_normalised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myprob.py").write_text(
        "import torch\nclass P:\n    name='p'\n    def __init__(self, d=3):\n        self.field_shape=(d,)\n"
        "    def make_operator(self):\n        return None\n"
        "    def sample_fields(self, n, generator):\n"
        "        return torch.randn(n, *self.field_shape, generator=generator)\n"
    )
    (tmp_path / "c.toml").write_text("[problem]\nd = 7\n\n[train]\nsteps = 3\n")
    r = _invoke(["data", "--problem", "myprob.py:P", "--n", "10", "-o", "f.h5", "--config", "c.toml"])
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["fields"].shape == (10, 7)
        assert f.attrs["problem"] == f"{tmp_path / 'myprob.py'}:P"
        assert json.loads(f.attrs["generator_kwargs"]) == {"d": 7}


def test_cli_bad_input_exit_2_nothing_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.py").write_text(BAD_PROBLEM)
    out = tmp_path / "f.h5"
    cases = [
        ["--problem", "no_such_problem", "--n", "4"],
        ["--problem", "linear_gaussian", "--n", "0"],
        ["--problem", "linear_gaussian", "--n", "4", "--kw", "bogus=1"],
        ["--problem", "linear_gaussian", "--n", "4", "--kw", "novalue"],
        ["--problem", "bad.py:Shapeless", "--n", "4"],
        ["--problem", "bad.py:Nan", "--n", "4"],
    ]
    for args in cases:
        r = _invoke(["data", *args, "-o", str(out)])
        _one_line_exit2(r)
        assert not out.exists(), args
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")], args

    out.write_bytes(b"precious")
    r = _invoke(["data", "--problem", "linear_gaussian", "--n", "4", "-o", str(out)])
    _one_line_exit2(r)
    assert out.read_bytes() == b"precious"
    r = _invoke(["data", "--problem", "linear_gaussian", "--n", "4", "-o", str(out), "--force"])
    assert r.exit_code == 0 and load_fields(out).fields.shape == (4, 16, 16)
    r = _invoke(["data", "--problem", "linear_gaussian", "--n", "4", "-o", str(tmp_path / "nodir" / "f.h5")])
    _one_line_exit2(r)


def test_load_fields_rejects_bad_files(tmp_path):
    def raw(name, **datasets):
        with h5py.File(tmp_path / name, "w") as f:
            for k, v in datasets.items():
                f.create_dataset(k, data=v)
        return tmp_path / name

    nan = np.zeros((3, 4), np.float32)
    nan[1, 1] = np.inf
    (tmp_path / "junk.h5").write_bytes(b"junk")
    cases = {
        tmp_path / "missing.h5": "not found",
        tmp_path / "junk.h5": "not a readable HDF5",
        raw("nofields.h5", other=np.zeros(3)): "missing dataset /fields",
        raw("empty.h5", fields=np.zeros((0, 4), np.float32)): "empty",
        raw("nan.h5", fields=nan): "non-finite",
        raw("flat.h5", fields=np.zeros(4, np.float32)): r"\[N, \*field_shape\]",
    }
    for path, words in cases.items():
        with pytest.raises(GanflowError, match=words):
            load_fields(path)
    fd = load_fields(write_fields(tmp_path / "ok.h5", torch.ones(2, 3), problem="x", seed=1))
    assert fd.field_shape == (3,) and fd.problem == "x" and fd.seed == 1 and len(fd.sha1) == 40


# --- train-prior --data takes .npy / .npz arrays (the usual way people hold example fields) ---------------
def test_npy_and_npz_load_like_fields_h5(tmp_path):
    x = np.random.default_rng(0).random((12, 16, 16)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    np.savez(tmp_path / "f.npz", fields=x, other=x[:1])
    np.savez(tmp_path / "one.npz", x.astype(np.float64))
    for name in ("f.npy", "f.npz", "one.npz"):
        fd = load_fields(tmp_path / name)
        assert fd.fields.dtype == torch.float32 and np.array_equal(fd.fields.numpy(), x), name
        # the same content hash as fields.h5 of the same values: provenance does not depend on the container
        assert fd.sha1 == load_fields(write_fields(tmp_path / f"{name}.h5", torch.from_numpy(x))).sha1


def test_train_prior_from_npy(tmp_path):
    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    r = _invoke(["train-prior", "--data", str(tmp_path / "f.npy"), "-o", str(tmp_path / "p.pt"), "--steps", "2",
                 "--no-progress", "--no-report"])
    assert r.exit_code == 0, r.output
    assert os.path.isfile(tmp_path / "p.pt")


@pytest.mark.parametrize("case, message", [
    ("nan", "non-finite"), ("shape", "power of two in 16..256"), ("object", "not a readable numpy array"),
    ("two", "one array or one named 'fields'"), ("garbage", "not a readable numpy array"),
    ("complex", "real numbers"), ("one_d", "[N, *field_shape]"), ("missing", "not found"),
])
def test_bad_npy_is_one_line_exit_2(tmp_path, case, message):
    rng = np.random.default_rng(2)
    path = tmp_path / ("f.npz" if case == "two" else "f.npy")
    if case == "nan":
        a = rng.random((20, 16, 16)); a[3, 2, 2] = np.nan; np.save(path, a)  # noqa: E702
    elif case == "shape":
        np.save(path, rng.random((20, 20, 20)))
    elif case == "object":
        np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    elif case == "two":
        np.savez(path, a=rng.random((4, 16)), b=rng.random((4, 16)))
    elif case == "garbage":
        path.write_bytes(b"not numpy")
    elif case == "complex":
        np.save(path, rng.random((20, 16)) + 1j)
    elif case == "one_d":
        np.save(path, rng.random(20))
    out = tmp_path / "p.pt"
    r = CliRunner().invoke(cli, ["train-prior", "--data", str(path), "-o", str(out), "--steps", "1"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not out.exists()  # nothing half-written
