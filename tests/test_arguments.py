"""No public loader drops an argument: an unknown keyword, or one the call would leave unused, is an error.

The sweep covers ganflow's public loaders (`load_problem`, `load_operator`, `load_prior`, `simulate`, `solve`):
Python refuses keywords a signature lacks, the factories' own options are checked against their signatures,
and a combination where one argument would make another unused is refused instead of ignored.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import ganflow
from ganflow import GanflowError, load_operator, load_prior, load_problem, simulate, solve
from ganflow.plugins import registered_problems

# The built-in module, under whichever name this layout gives it (problems.* or ganflow.problems.*).
LINEAR_GAUSSIAN = registered_problems()["linear_gaussian"].split(":")[0]
PRIOR, OPERATOR = f"{LINEAR_GAUSSIAN}:generator", f"{LINEAR_GAUSSIAN}:operator"


def LinearGaussianProblem(**kwargs):  # noqa: N802 - reads like the class it builds
    return load_problem("linear_gaussian", **kwargs)
TINY = {"solve": {"n_samples": 20, "n_quantile": 10, "n_field_samples": 1},
        "flow": {"n_layers": 1, "hidden": 4, "max_iter": 2, "min_iter": 0, "warmup": 1, "map_iter": 1,
                 "map_starts": 1, "progress": False},
        "diagnostics": {"enabled": False}}
LOADERS = {"load_problem": load_problem, "load_operator": load_operator, "load_prior": load_prior,
           "simulate": simulate, "solve": solve}


@pytest.fixture(scope="module")
def obs():
    return simulate("linear_gaussian", prior=LinearGaussianProblem().generator(), noise_sigma=0.1, seed=0)


def test_the_sweep_covers_the_public_loaders():
    assert set(LOADERS) <= set(ganflow.__all__)
    for name in ("load_prior", "simulate", "solve"):  # no catch-all: Python itself refuses unknown keywords
        params = inspect.signature(LOADERS[name]).parameters.values()
        assert not any(p.kind is p.VAR_KEYWORD for p in params), name


@pytest.mark.parametrize("call", [
    lambda o: load_prior(PRIOR, no_such_option=1),
    lambda o: simulate("linear_gaussian", prior=LinearGaussianProblem().generator(), noise_sigma=0.1, nope=1),
    lambda o: solve(o, PRIOR, config=TINY, progress=False, nope=1),
], ids=["load_prior", "simulate", "solve"])
def test_unknown_keywords_are_refused_by_the_signature(obs, call):
    with pytest.raises(TypeError, match="nope|no_such_option"):
        call(obs)


def test_load_problem_refuses_unknown_factory_options():
    with pytest.raises(GanflowError, match="nope"):
        load_problem("linear_gaussian", nope=1)
    assert load_problem("linear_gaussian", n=8).field_shape == (8, 8)  # and honours the known ones


def test_load_operator_honours_problem_kwargs():
    assert tuple(load_operator("phase_retrieval", problem_kwargs={"n": 16}).field_shape) == (16, 16)
    assert tuple(load_operator("linear_gaussian", problem_kwargs={"n": 8}).field_shape) == (8, 8)
    assert tuple(load_operator(problem="linear_gaussian", problem_kwargs={"n": 8}).field_shape) == (8, 8)
    op = load_operator("linear_gaussian", problem_kwargs={"n": 8}, stride=4)  # both reach their targets
    assert tuple(op.obs_shape) == (4,)


@pytest.mark.parametrize("kwargs, message", [
    ({"spec": "linear_gaussian", "nope": 1}, "nope"),  # make_operator's options are checked
    ({"spec": "linear_gaussian", "problem_kwargs": {"nope": 1}}, "nope"),
    ({"spec": OPERATOR, "problem_kwargs": {"n": 8}}, "names an operator"),
    ({"spec": OPERATOR, "nope": 1}, "nope"),
    ({"spec": "linear_gaussian", "problem": "linear_gaussian"}, "not both"),
    ({"problem": LinearGaussianProblem(), "problem_kwargs": {"n": 8}}, "object already built"),
])
def test_load_operator_refuses_what_it_would_drop(kwargs, message):
    spec = kwargs.pop("spec", None)
    with pytest.raises(GanflowError, match=message):
        load_operator(spec, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"config": {**TINY, "operator": {"nope": 1}}}, "nope"),
    ({"config": {**TINY, "problem": {"nope": 1}}}, "nope"),
    ({"config": TINY, "operator": OPERATOR, "problem": "linear_gaussian"}, "not both"),
    ({"config": TINY, "method": "langevin", "checkpoint_path": "fit.ckpt"}, "checkpoint_path"),
    ({"config": TINY, "resume": True}, "checkpoint_path"),
])
def test_solve_refuses_what_it_would_drop(obs, kwargs, message):
    with pytest.raises(GanflowError, match=message):
        solve(obs, PRIOR, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"operator_kwargs": {"nope": 1}}, "nope"),
    ({"problem_kwargs": {"nope": 1}}, "nope"),
])
def test_simulate_refuses_unknown_plugin_options(kwargs, message):
    with pytest.raises(GanflowError, match=message):
        simulate("linear_gaussian", prior=LinearGaussianProblem().generator(), noise_sigma=0.1, **kwargs)


def test_simulate_honours_problem_and_operator_kwargs():
    G = LinearGaussianProblem(n=8, latent_dim=4).generator()
    o = simulate("linear_gaussian", prior=G, noise_sigma=0.1, problem_kwargs={"n": 8, "latent_dim": 4},
                 operator_kwargs={"stride": 4})
    assert tuple(o.y.shape) == (4,) and tuple(o.x_true.shape) == (8, 8)
    assert torch.isfinite(o.y).all()
