"""Property-based tests: arbitrary input to the config loader, the spec resolver and the HDF5 readers gives
either a valid object or a `GanflowError`, never another exception.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ganflow.config import ALL_TABLES, Config, load_toml, parse_settings
from ganflow.data import load_fields
from ganflow.errors import GanflowError
from ganflow.io import read_obs
from ganflow.plugins import resolve_spec
from ganflow.posterior.flow import FlowSettings
from ganflow.prior.trainer import TrainSettings
from ganflow.results import PosteriorResult
from ganflow.solve import SolveSettings
from tests.conftest import run_cli

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# TOML-like values: what a config file can hold, plus NaN/Inf and nesting.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
SETTINGS = [FlowSettings, SolveSettings, TrainSettings]


def _keys(cls):
    return st.one_of(st.sampled_from(sorted(cls.__dataclass_fields__)), st.text(max_size=10))


@FAST
@given(data=st.data(), cls=st.sampled_from(SETTINGS))
def test_parse_settings_gives_settings_or_ganflow_error(data, cls):
    table = data.draw(st.dictionaries(_keys(cls), values, max_size=4))
    try:
        obj = parse_settings(cls, table, "t")
    except GanflowError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(obj, cls)
    for key in table:
        assert hasattr(obj, key)


@FAST
@given(tables=st.dictionaries(st.one_of(st.sampled_from(ALL_TABLES), st.text(max_size=6)), values, max_size=4))
def test_config_tables_give_config_or_ganflow_error(tables):
    try:
        cfg = Config(tables, "x.toml")
        for name in ("flow", "solve", "train"):
            cfg.section({"flow": FlowSettings, "solve": SolveSettings, "train": TrainSettings}[name], name)
        cfg.table("operator")
    except GanflowError:
        pass


toml_like = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(["[flow]", "[solve]", "lr = 1", "lr = nan", "x = \"a\"", "[[a]]", "= 3", "a.b = 1",
                              "k = [1, \"a\"]", "k = {a = 1}", "\xff", "max_iter = 10", "[flow.sub]"]),
             max_size=8).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
)


@FAST
@given(content=toml_like)
def test_load_toml_gives_dict_or_ganflow_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.toml")
        with open(path, "wb") as f:
            f.write(content)
        try:
            data = load_toml(path)
        except GanflowError:
            return
        assert isinstance(data, dict)
        try:
            Config(data, path).section(FlowSettings, "flow")
        except GanflowError:
            pass


spec_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="abcxyz_.:/0123456789", max_size=20),
    st.builds(lambda m, a: f"{m}:{a}",
              st.sampled_from(["ganflow", "ganflow.config", "json", "ganflow.problems.linear_gaussian", "no_such_mod_q",
                               "ganflow..x", ".ganflow", "/nonexistent/dir/f.py", "f.py", "", "ganflow.cli:x"]),
              st.text(alphabet="abcdefghijklmnopqrstuvwxyzGLP_.0", max_size=15)),
)


@FAST
@given(spec=spec_text)
def test_resolve_spec_gives_object_or_ganflow_error(spec):
    try:
        resolve_spec(spec)
    except GanflowError as e:
        assert "\n" not in str(e)


# ---- HDF5 readers

arrays = st.one_of(
    hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.int16, np.uint8, np.bool_, np.complex64]),
               shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
               elements=None),
    st.just(np.array([b"a", b"bc"])),
    st.just(np.array("text", dtype=h5py.string_dtype())),
)
attr_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.text(max_size=10),
    st.just(b"\xff\xfe"), st.just(np.array([1.0, 2.0])), st.just("{\"a\": 1}"), st.just("[1, 2]"),
)


def _write_h5(path, datasets: dict, attrs: dict) -> None:
    with h5py.File(path, "w") as f:
        for name, arr in datasets.items():
            f.create_dataset(name, data=arr)
        for k, v in attrs.items():
            f.attrs[k] = v


h5_contents = st.tuples(
    st.dictionaries(st.sampled_from(["y", "fields", "x_true", "z_true", "g/y", "other"]), arrays, max_size=3),
    st.dictionaries(st.sampled_from(["noise_sigma", "problem", "operator_kwargs", "problem_kwargs",
                                     "generator_kwargs", "seed", "prior"]), attr_values, max_size=4),
)


@FAST
@given(content=h5_contents, raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_read_obs_and_load_fields_give_objects_or_ganflow_error(content, raw):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.h5")
        if raw is not None:
            with open(path, "wb") as f:
                f.write(raw)
        else:
            try:
                _write_h5(path, *content)
            except (TypeError, ValueError):
                return  # h5py cannot store this combination: nothing to read
        for reader in (read_obs, load_fields):
            try:
                reader(path)
            except GanflowError as e:
                assert "\n" not in str(e)


USER = textwrap.dedent('''
    import torch
    from torch import nn

    class Gen(nn.Module):
        latent_dim = 2
        field_shape = (3,)
        def forward(self, z):
            return torch.cat([z, z[:, :1]], 1)

    class Op(nn.Module):
        field_shape = (3,)
        obs_shape = (2,)
        def forward(self, x):
            return x[:, :2]

    class Problem:
        name = "p"
        field_shape = (3,)
        def make_operator(self):
            return Op()
        def sample_fields(self, n, generator):
            return Gen()(torch.randn(n, 2, generator=generator))

    problem = Problem()
    ''')


@pytest.fixture(scope="module")
def posterior_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("prop")
    (d / "user.py").write_text(USER)
    (d / "c.toml").write_text("[solve]\nn_samples = 50\nn_quantile = 20\nn_field_samples = 2\n"
                              "[flow]\nn_layers = 1\nhidden = 4\nmax_iter = 3\nmin_iter = 0\nwarmup = 1\n"
                              "map_iter = 2\nmap_starts = 1\nprogress = false\n[diagnostics]\nenabled = false\n")
    u = d / "user.py"
    r = run_cli("simulate", "--problem", f"{u}:problem", "--prior", f"{u}:Gen", "--noise-sigma", "0.1",
                "-o", d / "obs.h5")
    assert r.returncode == 0, r.stderr
    # the problem recorded in obs.h5 is the user's file: solve runs it only when it is given again (trust rule)
    r = run_cli("solve", "--obs", d / "obs.h5", "--prior", f"{u}:Gen", "--problem", f"{u}:problem", "--config",
                d / "c.toml", "--quiet", "-o", d / "post.h5")
    assert r.returncode == 0, r.stderr
    return str(d / "post.h5")


def test_valid_posterior_loads(posterior_file):
    assert PosteriorResult.load(posterior_file).method == "flow"


_POST_NAMES = ["latent/samples", "field/mean", "field/std", "field/q025", "field/q975", "field/samples", "obs/y",
               "obs/pred_mean", "trace/loss", "truth/x", "flow/state", "qoi", "diagnostics", "field"]
_POST_ATTRS = ["method", "config", "seed", "latent_dim", "noise_sigma", "n_forward_evals", "field_shape",
               "n_samples", "n_quantile", "wall_time_s"]
mutations = st.lists(st.one_of(
    st.tuples(st.just("del"), st.sampled_from(_POST_NAMES)),
    st.tuples(st.just("set"), st.sampled_from(_POST_NAMES), arrays),
    st.tuples(st.just("delattr"), st.sampled_from(_POST_ATTRS)),
    st.tuples(st.just("setattr"), st.sampled_from(_POST_ATTRS), attr_values),
), min_size=1, max_size=3)


# Known failures in ganflow/results.py (owned by the predict/diagnostics work; reported, not fixed here): a 0-d
# /latent/samples without an n_samples attribute gives IndexError; /flow/state stored as a dataset gives
# AttributeError (visititems). Not strict: the search may miss them in a short run.

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(changes=mutations)
def test_posterior_load_gives_result_or_ganflow_error(posterior_file, changes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.h5")
        shutil.copyfile(posterior_file, path)
        with h5py.File(path, "a") as f:
            for change in changes:
                kind, name = change[0], change[1]
                try:
                    if kind in ("del", "set") and name in f:
                        del f[name]
                    if kind == "set":
                        f.create_dataset(name, data=change[2])
                    elif kind == "delattr" and name in f.attrs:
                        del f.attrs[name]
                    elif kind == "setattr":
                        f.attrs[name] = change[2]
                except (TypeError, ValueError, KeyError, OSError):
                    pass  # h5py refused the change itself
        try:
            PosteriorResult.load(path)
        except GanflowError as e:
            assert "\n" not in str(e)
