"""Fingerprints (`ganflow.fingerprint`) agree to rounding, not to the bit: the same module built on another CPU
(last-bit differences in computed buffers) is the same; a retrained prior or another operator is not."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ganflow.fingerprint import RTOL, operator_fingerprint, prior_fingerprint, same_fingerprint, short_fingerprint
from ganflow.problems.linear_gaussian import LinearGaussianProblem
from ganflow.problems.phase_retrieval import PhaseRetrievalProblem


def _nudge_floats(module: torch.nn.Module, rel: float, seed: int = 0) -> None:
    """Multiply every floating-point entry by ``1 + rel * u``, ``u`` uniform in [-1, 1]: ``rel`` ~ 1e-7 is what
    another CPU's rounding does to a computed float32 buffer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.mul_(1 + rel * (2 * torch.rand(t.shape, generator=g, dtype=t.dtype) - 1))


def test_rounding_is_the_same_operator_and_prior():
    p = LinearGaussianProblem(n=8, latent_dim=4)
    for make, fp in ((p.make_operator, operator_fingerprint), (p.generator, prior_fingerprint)):
        a, b = make(), make()
        _nudge_floats(b, 2e-7)  # a few float32 ulps
        assert fp(a) != fp(b)  # the bytes differ ...
        assert same_fingerprint(fp(a), fp(b))  # ... the module is the same


@pytest.mark.parametrize("rel", [1e-3, 0.05])
def test_a_changed_float_buffer_is_another_module(rel):
    """A 0.1 % change of the weights (a few more training steps) is seen: 100x RTOL."""
    G = LinearGaussianProblem(n=8, latent_dim=4).generator()
    before = prior_fingerprint(G)
    _nudge_floats(G, rel, seed=1)
    assert rel > 10 * RTOL and not same_fingerprint(before, prior_fingerprint(G))


def test_one_changed_entry_and_other_settings_are_seen():
    G = LinearGaussianProblem(n=8, latent_dim=4).generator()
    before = prior_fingerprint(G)
    with torch.no_grad():
        G.W[3, 1] += 0.05 * G.W.norm()  # one entry, by 5 % of the matrix's norm
    assert not same_fingerprint(before, prior_fingerprint(G))
    pr = PhaseRetrievalProblem(n=8)
    mask = pr.make_operator(mask_fraction=0.5, mask_seed=0)
    assert same_fingerprint(operator_fingerprint(mask), operator_fingerprint(pr.make_operator(mask_fraction=0.5)))
    for other in (pr.make_operator(mask_fraction=0.5, mask_seed=1), pr.make_operator(mask_fraction=0.6),
                  PhaseRetrievalProblem(n=10).make_operator(mask_fraction=0.5)):
        assert not same_fingerprint(operator_fingerprint(mask), operator_fingerprint(other))


def test_legacy_fingerprints_match_bit_exact_only():
    """A fingerprint written by an earlier version (the SHA-1 of every entry's bytes) still matches the module
    it was made from on its machine, and nothing else."""
    op = LinearGaussianProblem(n=8, latent_dim=4).make_operator()
    h = hashlib.sha1(f"{type(op).__qualname__}|{op.extra_repr()}|{tuple(op.field_shape)}|"
                     f"{tuple(op.obs_shape)}".encode())
    for name, t in sorted(op.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    legacy = h.hexdigest()
    assert same_fingerprint(legacy, operator_fingerprint(op))
    assert short_fingerprint(legacy) == legacy[:12]
    _nudge_floats(op, 0.01)
    assert not same_fingerprint(legacy, operator_fingerprint(op))


def test_replica_check_tolerates_rounding_only():
    """The data-parallel replica check (`ganflow.distributed`): rounding-level differences between ranks on
    different CPUs agree, a 1e-3 drift (a rank that missed a gradient all-reduce) does not."""
    from ganflow.distributed import replica_summary
    from ganflow.fingerprint import summaries_agree

    net = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 4))
    a = replica_summary(net)
    _nudge_floats(net, 2e-7)
    b = replica_summary(net)
    lo, hi = torch.minimum(a, b)[None], torch.maximum(a, b)[None]
    assert not torch.equal(lo, hi) and summaries_agree(lo.numpy(), hi.numpy())
    _nudge_floats(net, 1e-3, seed=2)
    c = replica_summary(net)
    assert not summaries_agree(torch.minimum(a, c).numpy(), torch.maximum(a, c).numpy())
    assert np.isfinite(a.numpy()).all()
