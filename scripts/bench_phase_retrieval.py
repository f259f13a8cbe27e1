"""Time the phase-retrieval operator's forward + VJP against a plain NumPy implementation, and its memory.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_phase_retrieval.py [--repeats 5] [--device cpu]

For each (n, batch): the median wall time of ``y = A(x); grad = VJP(w)`` with the torch operator
(``ganflow.problems.phase_retrieval``) and with NumPy (``fft2`` of the padded object, magnitudes, then the adjoint
``Re(ifft2(w * F / |F|))`` cropped), after checking that both give the same ``y`` and gradient. Then the
memory per sample at n = 256: the bytes autograd saves for the backward (exact, via saved-tensor hooks) and
the peak CUDA allocation when run on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ganflow.bench import numpy_phase_vjp
from ganflow.problems.phase_retrieval import PhaseRetrievalOperator

# The plain-NumPy reference lives in ganflow.bench (one copy for the script and `ganflow bench`).
numpy_forward_vjp = numpy_phase_vjp


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (plans, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(n: int, batch: int, mask_fraction: float, repeats: int, device: str) -> dict:
    op = PhaseRetrievalOperator(n, oversampling=2, mask_fraction=mask_fraction).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, n, n, generator=gen)
    w = torch.randn(batch, *op.obs_shape, generator=gen)
    xd, wd = x.to(device), w.to(device)

    def torch_step():
        xx = xd.clone().requires_grad_(True)
        y = op(xx)
        (grad,) = torch.autograd.grad(y, xx, wd)
        if device != "cpu":
            torch.cuda.synchronize()
        return y, grad

    mask = op.mask.cpu().numpy()
    xn, wn = x.numpy(), w.numpy()
    y_t, g_t = torch_step()
    y_n, g_n = numpy_forward_vjp(xn, op.size, mask, wn)
    np.testing.assert_allclose(y_t.detach().cpu().numpy(), y_n, rtol=1e-4, atol=1e-4 * np.abs(y_n).max())
    np.testing.assert_allclose(g_t.cpu().numpy(), g_n, rtol=1e-3, atol=1e-3 * np.abs(g_n).max())
    return {
        "n": n, "batch": batch, "m": op.obs_shape[0],
        "torch_s": _median_time(torch_step, repeats),
        "numpy_s": _median_time(lambda: numpy_forward_vjp(xn, op.size, mask, wn), repeats),
    }


def saved_bytes_per_sample(n: int, batch: int, mask_fraction: float, device: str) -> tuple[float, float]:
    """Bytes autograd keeps for the backward, per sample; and the peak CUDA allocation per sample (or nan)."""
    op = PhaseRetrievalOperator(n, oversampling=2, mask_fraction=mask_fraction).to(device)
    x = torch.rand(batch, n, n, device=device, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t):
        # a tensor saved twice (or a view of one) is stored once: count each storage once
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = op(x)
    y.sum().backward()
    peak = float("nan")
    if device != "cpu":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / batch
    return sum(seen.values()) / batch, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mask-fraction", type=float, default=1.0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"mask_fraction {args.mask_fraction}, oversampling 2, forward + VJP, median of {args.repeats}")
    print(f"{'n':>5} {'batch':>6} {'m':>8} {'torch [s]':>10} {'numpy [s]':>10} {'speed-up':>9} "
          f"{'torch ms/sample':>16}")
    for n, batch in ((64, 64), (256, 8)):
        r = bench(n, batch, args.mask_fraction, args.repeats, args.device)
        print(f"{r['n']:>5} {r['batch']:>6} {r['m']:>8} {r['torch_s']:>10.4f} {r['numpy_s']:>10.4f} "
              f"{r['numpy_s'] / r['torch_s']:>9.2f} {1e3 * r['torch_s'] / batch:>16.2f}")
    saved, peak = saved_bytes_per_sample(256, 8, args.mask_fraction, args.device)
    line = f"n=256 memory per sample: {saved / 2**20:.2f} MiB saved for backward"
    if args.device != "cpu":
        line += f", peak CUDA allocation {peak / 2**20:.2f} MiB"
    print(line)


if __name__ == "__main__":
    main()
