"""What a GAN case's latent posterior looks like, measured against its stored converged reference (issue 34).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/posterior_geometry.py --problem elliptic typical   # or gaussian
    OMP_NUM_THREADS=2 .venv/bin/python scripts/posterior_geometry.py --problem elliptic map map_starts=32 map_restarts=8
    OMP_NUM_THREADS=2 .venv/bin/python scripts/posterior_geometry.py --problem elliptic oracle "" "kind='spline'"

On the observation ``ganflow bench --problem P`` solves (seed 0, adopted from the stored reference):

- ``typical``: ``log p(y, z)`` of 2,000 reference draws (mean, sd, max); with the reference's ``log p(y)`` their
  mean gives the posterior's entropy, ``log p(y) - E log p(y, z)``.
- ``gaussian``: the ELBO, importance estimate of ``log p(y)`` and PSIS k-hat of a Gaussian with the reference's
  mean and covariance (and its entropy): how far from Gaussian, in the sense the flow's objective sees.
- ``map [key=value ...]``: the flow's MAP search (the bench plan's ``[flow]`` settings, these overrides), each
  mode's ``log p(y, z)``, distance from the reference mean (in reference sd), Laplace and importance-sampled mass;
  and the best reference draw polished uphill (where the global maximum is).
- ``hessian``: at 5 reference draws, the eigenvalues of ``-Hessian`` of ``log p(y, z)`` by central differences of
  the gradient (steps 1e-2 and 1e-3; torch's second-order autograd through the elliptic solver disagrees with
  them) and the singular values of the generator's Jacobian: the local scale of the density against the
  posterior's sds.
- ``oracle [settings ...]``: a flow (``[flow]`` settings as ``key=value,...``) fitted by maximum likelihood to
  the reference's own draws (28,000 to train, the rest held out) and judged as the solve judges a flow: held-out
  ``log q``, ELBO, importance ``log p(y)``, k-hat, moment errors. Can the flow family hold this posterior at all?

The evidence ``log p(y)`` for the entropy is given by ``--log-evidence`` (elliptic: 180.6, the SMC runs').
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time

import numpy as np
import torch

from ganflow.bench.cases import _make_case
from ganflow.bench.methods import _adopt_observation, _new_target
from ganflow.bench.plan import bench_plan
from ganflow.bench.stored import load_reference, reference_path
from ganflow.config import parse_settings
from ganflow.diagnostics import psis
from ganflow.posterior.flow import FlowSettings
from ganflow.posterior.flows import LatentFlow
from ganflow.posterior.modes import find_modes, latent_hessian, log_joints


def _case(problem: str):
    """The bench's case with the stored reference's observation adopted; its target and pooled draws."""
    case = _make_case(problem, 0)
    sref = load_reference(reference_path(case.prior_path, problem, 0), _new_target(case), problem, 0)
    _adopt_observation(case, sref)
    pooled = sref.pooled(sum(d.shape[0] * d.shape[1] for d in sref.draws), 4)
    return _new_target(case), pooled


def _log_p(target, z: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([log_joints(target, b.float()) for b in z.split(200)]).double().numpy()


def _subsample(pooled: np.ndarray, n: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor(pooled[np.random.default_rng(seed).choice(len(pooled), n, replace=False)],
                        dtype=torch.float32)


def _log_mean_w(log_w: np.ndarray) -> float:
    """The importance estimate of ``log p(y)``, ``log mean w`` over the finite weights."""
    log_w = log_w[np.isfinite(log_w)]
    return float(np.logaddexp.reduce(log_w) - math.log(len(log_w)))


def _weights_line(log_w: np.ndarray) -> str:
    log_w = log_w[np.isfinite(log_w)]
    return f"ELBO {log_w.mean():.2f}, IS log p(y) {_log_mean_w(log_w):.2f}, k-hat {psis(log_w).khat:.2f}"


def _gaussian_log_w(target, loc: torch.Tensor, scale_tril: torch.Tensor, n: int = 2000, seed: int = 7) -> np.ndarray:
    """``log p(y, z) - log N(z; loc, L L^T)`` of ``n`` seeded draws of that Gaussian."""
    mvn = torch.distributions.MultivariateNormal(loc.double(), scale_tril=scale_tril.double())
    z = loc.double() + torch.randn(n, loc.shape[0], generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64) @ scale_tril.double().T
    return _log_p(target, z) - mvn.log_prob(z).numpy()


def typical(target, pooled, log_evidence: float) -> None:
    lp = _log_p(target, _subsample(pooled, 2000))
    print(f"reference draws: log p(y, z) {lp.mean():.2f} +- {lp.std():.2f}, max {lp.max():.2f}; entropy "
          f"{log_evidence - lp.mean():.1f} nats (log p(y) {log_evidence}); prior entropy "
          f"{0.5 * pooled.shape[1] * math.log(2 * math.pi * math.e):.1f}")


def gaussian(target, pooled) -> None:
    cov = torch.tensor(np.cov(pooled.T))
    entropy = 0.5 * (pooled.shape[1] * math.log(2 * math.pi * math.e) + float(torch.logdet(cov)))
    log_w = _gaussian_log_w(target, torch.tensor(pooled.mean(0)), torch.linalg.cholesky(cov))
    print(f"Gaussian at the reference's moments (entropy {entropy:.1f}): " + _weights_line(log_w))


def map_search(target, pooled, problem: str, overrides: dict) -> None:
    m, sd = pooled.mean(0), pooled.std(0, ddof=1)
    fs = parse_settings(FlowSettings, dict(bench_plan().flow[problem], progress=False, **overrides), "flow")
    t0, e0 = time.perf_counter(), target.n_forward_evals
    torch.manual_seed(0)
    modes, _ = find_modes(target, fs, torch.Generator().manual_seed(4), 0)
    print(f"search {overrides}: {time.perf_counter() - t0:.0f} s, {target.n_forward_evals - e0} evaluations, "
          f"{len(modes)} mode(s)")
    for mode in modes:
        d = (mode.loc.double().numpy() - m) / sd
        lap = mode.log_mass + 0.5 * target.latent_dim * math.log(2 * math.pi)
        is_ = _log_mean_w(_gaussian_log_w(target, mode.loc, mode.scale_tril))
        print(f"  mode: log p(y, z) {mode.log_joint:.2f}, from the reference mean max {np.abs(d).max():.2f} sd "
              f"(rms {np.sqrt((d ** 2).mean()):.2f}); log mass: Laplace {lap:.2f}, importance {is_:.2f}")
    sub = _subsample(pooled, 2000)
    z = sub[int(np.argmax(_log_p(target, sub)))].clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = -target.log_joint(z[None]).sum()
        loss.backward()
        opt.step()
    d = (z.detach().double().numpy() - m) / sd
    print(f"best reference draw polished uphill: log p(y, z) {-loss.item():.2f}, from the mean max "
          f"{np.abs(d).max():.2f} sd")


def oracle(target, pooled, settings: dict, steps: int = 4000, n_train: int = 28000) -> None:
    m, sd = pooled.mean(0), pooled.std(0, ddof=1)
    perm = np.random.default_rng(0).permutation(len(pooled))
    train, test = (torch.tensor(pooled[idx], dtype=torch.float32) for idx in (perm[:n_train], perm[n_train:]))
    L = torch.linalg.cholesky(torch.tensor(np.cov(pooled.T), dtype=torch.float32))
    torch.manual_seed(0)
    q = LatentFlow(pooled.shape[1], FlowSettings(**settings), torch.tensor(m, dtype=torch.float32), L)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g, t0 = torch.Generator().manual_seed(1), time.perf_counter()
    for _ in range(steps):
        loss = -q.log_prob(train[torch.randint(0, len(train), (256,), generator=g)]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(q.parameters(), 10.0)
        opt.step()
        sched.step()
    with torch.no_grad():
        held_out, fitted = float(q.log_prob(test).mean()), float(q.log_prob(train[:4000]).mean())
        z, log_q = q.sample(2000, torch.Generator().manual_seed(2))
    zn = z.double().numpy()
    sd_err = np.abs(zn.std(0, ddof=1) / sd - 1)
    print(f"oracle {settings}: held-out log q {held_out:.2f} (training draws {fitted:.2f}); "
          + _weights_line(_log_p(target, z) - log_q.double().numpy())
          + f"; mean err {np.max(np.abs(zn.mean(0) - m) / sd):.3f} sd, sd err {sd_err.max():.3f} / "
          f"{np.median(sd_err):.3f}; {time.perf_counter() - t0:.0f} s", flush=True)


def hessian(target, pooled, n: int = 5) -> None:
    print(f"reference sds {pooled.std(0, ddof=1).min():.2f}-{pooled.std(0, ddof=1).max():.2f}")
    for z in _subsample(pooled, n, seed=1):
        row = []
        for h in (1e-2, 1e-3):
            ev = np.linalg.eigvalsh(latent_hessian(target, z, h).numpy())
            row.append(f"h {h}: -Hessian eigenvalues {ev.min():.0f} .. {ev.max():.0f}, {(ev < 0).sum()} < 0, "
                       f"{(ev > 100).sum()} > 100")
        jac = torch.autograd.functional.jacobian(lambda v: target.generator(v[None]).reshape(-1), z)
        sv = np.linalg.svd(jac.double().numpy(), compute_uv=False)
        print(" | ".join(row) + f" | generator Jacobian singular values {sv.min():.3f} .. {sv.max():.1f}")


def _kv(items: list[str]) -> dict:
    return {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in items)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", choices=("elliptic", "phase_retrieval"), default="elliptic")
    ap.add_argument("--log-evidence", type=float, default=180.6, help="the reference's log p(y) [180.6: elliptic]")
    ap.add_argument("what", choices=("typical", "gaussian", "map", "hessian", "oracle"))
    ap.add_argument("args", nargs="*", help="map: key=value overrides; oracle: one settings string per flow")
    args = ap.parse_args(argv)
    target, pooled = _case(args.problem)
    if args.what == "typical":
        typical(target, pooled, args.log_evidence)
    elif args.what == "gaussian":
        gaussian(target, pooled)
    elif args.what == "hessian":
        hessian(target, pooled)
    elif args.what == "map":
        map_search(target, pooled, args.problem, _kv(args.args))
    else:
        for spec in args.args or [""]:
            oracle(target, pooled, _kv([p for p in spec.split(",") if p]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
