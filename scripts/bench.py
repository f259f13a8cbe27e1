"""The benchmark suite; the same as ``ganflow bench`` (see ganflow/bench/).

OMP_NUM_THREADS=2 .venv/bin/python scripts/bench.py -o bench_output [--quick] [--problem NAME ...]
"""

from ganflow.cli.bench_cmd import bench

if __name__ == "__main__":
    bench(prog_name="scripts/bench.py")
