"""Stored NUTS references (`ganflow.bench.stored`): per-mode runs whose masses match quadrature, and a file that
refuses to be read for another prior, noise level or observation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ganflow import GanflowError
from ganflow.bench.exact import CoefficientOperator, CurvedGenerator, _observe, quadrature_moments
from ganflow.bench.stored import load_reference, make_reference, save_reference
from ganflow.posterior import LatentTarget
from ganflow.posterior.nuts import NutsSettings

SETTINGS = NutsSettings(num_chains=4, warmup_steps=150, num_samples=250, max_tree_depth=6)


def _separated_asymmetric_twin():
    """The asymmetric twin (modes at z_1 ~ 0.9 and -1.6) with sigma = 0.2: the valley between the modes is too
    deep for a chain to cross, so each mode needs chains of its own and their masses must be estimated."""
    return _observe("asymmetric_twin_0.2", CurvedGenerator(0.5), CoefficientOperator(twin=True, shift=0.7),
                    (0.8, 0.3), 0.2, seed=2)


def _target(p):
    return LatentTarget(p.generator, p.operator, p.y, p.noise_sigma)


@pytest.fixture(scope="module")
def twin_reference():
    p = _separated_asymmetric_twin()
    ref = make_reference(_target(p), "twin", 0, SETTINGS, torch.Generator().manual_seed(0), echo=lambda *_: None)
    return p, ref


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_per_mode_reference_masses_match_quadrature(twin_reference):
    p, ref = twin_reference
    q = quadrature_moments(p)
    assert q["edge_mass"] < 1e-6
    exact_major = q["mass_above_split"]  # the mode at z_1 ~ 0.9
    assert 0.55 < exact_major < 0.9  # the test needs unequal masses to catch equal weights
    assert len(ref.draws) == 2
    # each mode's chains stay in their mode (the reference is per mode)
    sides = [np.mean(d[..., 0] > q["mode_split"]) for d in ref.draws]
    assert sorted(sides) == [0.0, 1.0]
    major = int(np.argmax(sides))
    # importance-sampling masses from 4,096 draws per mode: Monte-Carlo sd well under 0.01
    assert abs(ref.mode_mass[major] - exact_major) < 0.03
    assert abs(ref.mode_mass.sum() - 1) < 1e-6
    # pooled draws: the posterior mean of z_1 against quadrature
    pooled = ref.pooled(4000, 0)
    assert abs(pooled[:, 0].mean() - q["mean"][0]) < 0.1 * q["sd"][0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_stored_reference_round_trip_and_refusals(twin_reference, tmp_path):
    p, ref = twin_reference
    path = str(tmp_path / "twin_seed0.h5")
    save_reference(ref, path)
    back = load_reference(path, _target(p), "twin", 0)
    for a, b in zip(back.draws, ref.draws, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back.mode_mass, ref.mode_mass)
    for a, b in zip(back.potential, ref.potential, strict=True):
        np.testing.assert_allclose(a, b)
    assert back.mode_attrs == ref.mode_attrs and back.converged() == ref.converged()
    a, b = back.halves(0)
    assert a.shape[1] == 2 and abs(len(a) - len(b)) <= 2

    other_noise = LatentTarget(p.generator, p.operator, p.y, 0.25)
    with pytest.raises(GanflowError, match="noise_sigma"):
        load_reference(path, other_noise, "twin", 0)
    G = CurvedGenerator(0.5)
    G.modes.mul_(1.01)  # a "retrained" prior: other weights
    with pytest.raises(GanflowError, match="prior_sha1"):
        load_reference(path, LatentTarget(G, p.operator, p.y, p.noise_sigma), "twin", 0)
    with pytest.raises(GanflowError, match="observation y"):
        load_reference(path, LatentTarget(p.generator, p.operator, p.y + 0.1, p.noise_sigma), "twin", 0)
    with pytest.raises(GanflowError, match="problem/seed"):
        load_reference(path, _target(p), "twin", 1)
    with pytest.raises(GanflowError, match="no stored reference .*make_references.py"):
        load_reference(str(tmp_path / "missing.h5"), _target(p), "twin", 0)


def test_reference_from_gpu_hmc_draws_round_trip_and_cost_not_judged(twin_reference, tmp_path):
    """A reference from the batched HMC's chains (the GPU path) is stored and read back like a NUTS one; as its
    seconds are not NUTS's, the cost targets that compare the flow with NUTS get no NUTS cost from it."""
    from ganflow.bench.batched_hmc import HmcSettings, run_batched_hmc
    from ganflow.bench.methods import _stored_cost
    from ganflow.bench.stored import reference_from_draws

    p, nuts_ref = twin_reference
    major = nuts_ref.draws[int(np.argmax(nuts_ref.mode_mass))].reshape(-1, 2)
    target = _target(p)
    loc = torch.as_tensor(major.mean(0))
    out = run_batched_hmc(target.log_joint_and_grad, loc.repeat(16, 1).float(), (loc.float(), torch.eye(2)),
                          HmcSettings(windows=(30, 30), num_samples=100), torch.Generator().manual_seed(0))
    run = {k: out[k] for k in ("step_size", "divergences", "n_gradients", "wall_s")}
    ref = reference_from_draws(target, "twin", 0, [out["draws"].double().numpy()], [out["log_joint"].numpy()],
                               [run], "a command", {"sampler": "batched HMC", "chains": 16})
    path = str(tmp_path / "twin_hmc.h5")
    save_reference(ref, path)
    back = load_reference(path, target, "twin", 0)
    assert back.attrs["sampler"] == "batched HMC" and back.draws[0].shape == (16, 100, 2)
    np.testing.assert_allclose(back.potential[0], -out["log_joint"].numpy())
    # the chains stay in the major mode: its mean agrees with NUTS's within both runs' Monte-Carlo error
    assert abs(back.draws[0][..., 0].mean() - major[:, 0].mean()) < 0.1 * major[:, 0].std()
    assert _stored_cost(back.attrs) == (None, None)
    assert _stored_cost(nuts_ref.attrs)[1] == pytest.approx(1000 * nuts_ref.attrs["wall_s"] / nuts_ref.attrs["ess_min"])


def test_time_split_measures_drift_and_a_changing_spread():
    """The reference's own split (first halves of its chains against second halves) sees a drift of the mean and a
    change of the spread; numbers against the constructed shift, to the Monte-Carlo error of 6,400 draws a half."""
    from ganflow.bench.stored import StoredReference

    d = np.random.default_rng(0).normal(size=(64, 200, 3))
    still = StoredReference("t", 0, None, [d.copy()], [None], np.ones(1), [{}], {}).time_split()
    assert still["mean_sd"] < 0.06 and still["sd_rel"] < 0.06  # max of 3 coordinates, each ~ 0.018 sd
    d[:, 100:, 1] += 0.5  # the mean moves by 0.5 (pooled sd sqrt(1 + 0.0625))
    d[:, 100:, 2] *= 1.2  # the sd grows by 20 %: first / second - 1 = -1/6
    split = StoredReference("t", 0, None, [d], [None], np.ones(1), [{}], {}).time_split()
    assert split["mean_sd"] == pytest.approx(0.5 / np.sqrt(1.0625), abs=0.06)
    assert split["sd_rel"] == pytest.approx(1 / 6, abs=0.03)


def test_bench_falls_back_to_a_long_unconverged_run(tmp_path, monkeypatch):
    """With no converged reference, bench reads the long run kept beside it (`*.unconverged.h5`), not NUTS."""
    from types import SimpleNamespace

    from ganflow.bench import methods
    from ganflow.bench.stored import long_run_path, reference_path

    case = SimpleNamespace(name="twin", prior_path=str(tmp_path / "twin.pt"))
    path = long_run_path(reference_path(case.prior_path, "twin", 0))
    os.makedirs(os.path.dirname(path))
    open(path, "w").close()
    monkeypatch.setattr(methods, "_stored_nuts", lambda case, p, plan, seed, echo: ("read", p))
    lines = []
    assert methods._run_nuts(case, None, None, 0, lines.append, reference_run=False) == ("read", path)
    assert "long unconverged run" in lines[0]


# --- issue 32: a bundled reference read on another CPU --------------------------------------------------------
@pytest.fixture(scope="module", params=["phase_retrieval", "elliptic"])
def bundled_case(request):
    from ganflow.bench.cases import _make_case
    from ganflow.bench.stored import long_run_path, reference_path

    case = _make_case(request.param, 0)
    path = reference_path(case.prior_path, request.param, 0)
    return case, path if os.path.isfile(path) else long_run_path(path)


def _other_cpu(case, level: float, seed: int = 0):
    """``case``'s observation as another CPU re-simulates it: every entry off by ``level`` sigma (signs random);
    float32 rounding differences between CPUs measured 1e-4 sigma (issue 32)."""
    import dataclasses

    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, case.obs.y.shape, generator=g).to(case.obs.y.dtype) * 2 - 1
    y = case.obs.y + level * case.obs.noise_sigma * signs
    return dataclasses.replace(case, obs=dataclasses.replace(case.obs, y=y))


def _target_of(case):
    from ganflow.bench.methods import _new_target

    return _new_target(case)


@pytest.mark.parametrize("level", [1e-5, 8e-4])
def test_bundled_reference_accepted_at_rounding_level(bundled_case, level):
    """8e-4 sigma is beyond the old bit-level tolerance (rtol 1e-5, atol 1e-6 max|y|: 5e-5 to 1e-4 sigma) and
    within the new one (1e-3 sigma)."""
    case, path = bundled_case
    ref = load_reference(path, _target_of(_other_cpu(case, level)), case.name, 0)
    assert ref.draws[0].shape[-1] == case.G.latent_dim


def test_bundled_reference_refused_for_another_observation_prior_operator_or_seed(bundled_case):
    import copy

    from ganflow.plugins import load_problem
    from ganflow.posterior import LatentTarget

    case, path = bundled_case
    with pytest.raises(GanflowError, match=r"observation y \(largest difference [0-9.e-]+ > tolerance [0-9.e-]+"):
        load_reference(path, _target_of(_other_cpu(case, 0.1)), case.name, 0)
    G = copy.deepcopy(case.G)
    with torch.no_grad():
        next(G.parameters()).mul_(1.001)  # a retrained prior: other weights
    with pytest.raises(GanflowError, match="prior_sha1"):
        load_reference(path, LatentTarget(G, case.op, case.obs.y, case.obs.noise_sigma), case.name, 0)
    # another operator with the same observation shape: other mask, other sensor layout
    other_kwargs = {"phase_retrieval": {"mask_fraction": 0.5, "mask_seed": 1}, "elliptic": {"sensors": "random:64"}}
    other_op = load_problem(case.name, n=32).make_operator(**other_kwargs[case.name])
    assert tuple(other_op.obs_shape) == tuple(case.op.obs_shape)
    with pytest.raises(GanflowError, match="operator_fingerprint"):
        load_reference(path, LatentTarget(case.G, other_op, case.obs.y, case.obs.noise_sigma), case.name, 0)
    with pytest.raises(GanflowError, match="problem/seed"):
        load_reference(path, _target_of(case), case.name, 1)


def test_bench_uses_the_bundled_reference_on_an_observation_off_by_rounding(bundled_case):
    """`ganflow bench`'s path (`_run_nuts`, no reference run) on an observation re-simulated 8e-4 sigma off:
    the bundled reference is used and defines the observation every method then solves for."""
    from ganflow.bench import methods
    from ganflow.bench.plan import bench_plan

    case, path = bundled_case
    moved = _other_cpu(case, 8e-4, seed=1)
    lines = []
    rec, _ = methods._run_nuts(moved, None, bench_plan(False), 0, lines.append, reference_run=False)
    assert rec["reference"] == "stored" and rec["reference_file"] == os.path.relpath(path)
    with __import__("h5py").File(path, "r") as f:
        np.testing.assert_array_equal(moved.obs.y.double().numpy(), f["y"][()].reshape(moved.obs.y.shape))
        assert moved.obs.noise_sigma == float(f.attrs["noise_sigma"])
