"""Digests of seeded end-to-end results, to compare before and after a refactor on one machine.

    python scripts/pin_results.py > before.txt      # on the old code
    python scripts/pin_results.py > after.txt       # on the new code, same machine, same torch
    diff before.txt after.txt                       # a refactor that changes no computation prints nothing

Each line is a short SHA-1 of a small seeded run's numbers: a WGAN-GP training with clamp, annealing and a resume;
the flow (one mode, and a two-mode mixture); Langevin; the refiner with HMC; SMC; NUTS; batched HMC; the amortised
posterior; the linear-Gaussian demo. The digests are bit-exact by design, so they only mean something on the
machine that made both files (floating point differs between CPUs, docs/reliability.md); they are not stored
anywhere and no test compares them with numbers made elsewhere. Takes about a minute on one core.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings

import numpy as np
import torch


def _digest(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(torch.as_tensor(a).detach().double().numpy()).tobytes())
    return h.hexdigest()[:16]


def _linear_target(k: int = 4):
    from ganflow.posterior import LatentTarget
    from ganflow.problems.linear_gaussian import LinearGaussianProblem

    p = LinearGaussianProblem(n=8, latent_dim=k)
    G, A = p.generator(), p.make_operator()
    y = A(G(torch.zeros(1, k)))[0] + 0.05 * torch.randn(A.obs_shape, generator=torch.Generator().manual_seed(2))
    return LatentTarget(G, A, y, 0.05), G, A


def pin_training(d: str) -> str:
    from ganflow.data import write_fields
    from ganflow.prior.trainer import TrainSettings, train_prior

    x = (torch.rand(64, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    fields = os.path.join(d, "f.h5")
    write_fields(fields, x)
    s = TrainSettings(latent_dim=4, steps=12, batch_size=8, n_critic=2, output="tanh", tanh_margin=0.1,
                      clamp="anneal", anneal_steps=4, representation_fields=8, base_channels=4)
    out = os.path.join(d, "p.pt")
    train_prior(fields, out, s, seed=3, steps=7, progress=False, report=False)
    train_prior(fields, out, s, seed=3, resume=True, progress=False, report=False)
    ck = torch.load(out, weights_only=True)
    return _digest(*(t for k in ("G", "D", "G_ema") for _, t in sorted(ck[k].items())))


def pin_posteriors() -> dict[str, str]:
    from ganflow.bench.batched_hmc import HmcSettings, run_batched_hmc
    from ganflow.bench.exact import CoefficientOperator, CurvedGenerator, _observe
    from ganflow.posterior import LatentTarget
    from ganflow.posterior.flow import FlowSettings, fit_flow
    from ganflow.posterior.langevin import LangevinSettings, moment_frame, run_langevin
    from ganflow.posterior.nuts import NutsSettings, run_nuts
    from ganflow.posterior.smc import SmcSettings, run_smc

    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    T, _, _ = _linear_target()
    out = {}
    flow = fit_flow(T, FlowSettings(max_iter=80, min_iter=10, batch_size=16, progress=False), g(0))
    out["flow"] = _digest(flow.draw(200, g(1)))
    q = _observe("twin", CurvedGenerator(0.5), CoefficientOperator(twin=True, shift=0.7), (0.8, 0.3), 0.2, seed=2)
    twin = fit_flow(LatentTarget(q.generator, q.operator, q.y, q.noise_sigma),
                    FlowSettings(max_iter=80, min_iter=10, batch_size=16, map_starts=16, estimator="dreg",
                                 progress=False), g(0))
    out["flow mixture"] = _digest(twin.draw(200, g(1)), twin.attrs["mode_weights"])
    fit = run_langevin(T, LangevinSettings(n_samples=64, n_steps=5, mala=True, search_chains=32, search_grid=4,
                                           search_refine=2), g(0), progress=False)
    out["langevin"] = _digest(fit.samples)
    fit = run_langevin(T, LangevinSettings(n_samples=64, n_steps=3, mala=True, leapfrog=4, init="flow"), g(0),
                       init=flow.sampler, frame=moment_frame(flow.sampler, g(3), 500), progress=False)
    out["refiner"] = _digest(fit.samples)
    out["smc"] = _digest(run_smc(T, SmcSettings(n_particles=128, progress=False), g(0)).samples)
    nuts = run_nuts(T, NutsSettings(num_chains=2, warmup_steps=40, num_samples=40), g(0), progress=False)
    out["nuts"] = _digest(nuts.samples, nuts.trace["accept_prob"])
    z0 = torch.zeros(4)
    bh = run_batched_hmc(T.log_joint_and_grad, z0.repeat(8, 1), (z0, torch.eye(4)),
                         HmcSettings(windows=(10, 10), num_samples=20), g(0))
    out["batched hmc"] = _digest(bh["draws"])
    return out


def pin_amortized(d: str) -> str:
    from ganflow.posterior.amortized import AmortizedSettings, load_amortized, train_amortized

    _, G, A = _linear_target()
    s = AmortizedSettings(n_layers=2, hidden=16, embed_hidden=16, embed_dim=8, max_iter=40, batch_size=32,
                          n_val=64, eval_every=10, reverse_iter=10, progress=False)
    out = os.path.join(d, "a.pt")
    train_amortized(G, A, 0.05, out, s, seed=3)
    z, log_q = load_amortized(out).sample(torch.zeros(A.obs_shape), 50, torch.Generator().manual_seed(0))
    return _digest(z, log_q)


def pin_demo(d: str) -> str:
    from ganflow.demo import run_demo

    row = run_demo(d, "linear_gaussian", seed=0, progress=False, echo=lambda *a: None)
    return _digest([v for k, v in sorted(row.items()) if isinstance(v, float) and k not in ("total_s", "fit_s")])


def main() -> dict[str, str]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        pins = {"training": pin_training(d), **pin_posteriors(), "amortized": pin_amortized(d),
                "demo linear_gaussian": pin_demo(d)}
    return pins


if __name__ == "__main__":
    for name, value in main().items():
        print(f"{name:22s} {value}", file=sys.stdout)
