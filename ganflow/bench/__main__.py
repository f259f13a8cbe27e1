"""``python -m ganflow.bench [OUTDIR]``: the quick benchmark (``ganflow bench --quick`` is the full CLI)."""

import sys

from .run import run_bench

if __name__ == "__main__":  # pragma: no cover
    run_bench(sys.argv[1] if len(sys.argv) > 1 else "bench_output", quick=True)
