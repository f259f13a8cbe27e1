"""``ganflow bench``: accuracy and cost of the posterior methods, and operator throughput (tracker issue 8).

For each problem (``linear_gaussian``: exact reference; ``elliptic`` and ``phase_retrieval``: the bundled demo
priors) a truth ``x = G(z_true)`` is drawn from the prior with a fixed seed and observed with the demo's noise
level (`ganflow.demo.DEMOS`). Then:

1. the reference: the exact Gaussian posterior (linear_gaussian) or a NUTS run (R-hat and ESS recorded);
2. the flow, short-run Langevin from the prior, and Langevin started from the flow (``init=flow.sampler``);
3. per method: latent mean error in reference-sd units, relative errors of the latent sds, of the field mean
   and std maps, a sliced-Wasserstein distance to the reference draws (with a reference-vs-reference
   baseline), forward evaluations, fit wall and CPU time, posterior field samples per second after the fit;
4. the flow overhead: one flow training step against a bare batched ``A(G(z))`` value-and-gradient;
5. operator throughput against plain numpy / scipy implementations of the same computation.

Everything random takes a seed. ganflow knows no physics: the built-in problems are imported inside the
functions here (via `ganflow.load_problem`), never at module import.

Wall times on a shared machine measure the other users too, so CPU times (``time.process_time``, all threads
of this process) are recorded beside them; the header records the load average at the start and at the end.

Modules: `plan` (problems, targets, settings), `cases` (problem, prior, observation), `references` (exact or
NUTS), `metrics` (errors, distance, cost, clocks), `methods` (one function per method), `throughput`
(operators against numpy/scipy), `targets` (the targets judged), `report` (header, results.json/.md, merge),
`run` (the driver, in one process or several).
"""

from .metrics import sliced_wasserstein
from .plan import BENCH_PROBLEMS, BenchPlan, bench_plan
from .report import merge_results, write_markdown
from .run import run_bench, run_bench_parallel
from .throughput import numpy_phase_vjp, scipy_elliptic_vjp

__all__ = [
    "BENCH_PROBLEMS",
    "BenchPlan",
    "bench_plan",
    "run_bench",
    "run_bench_parallel",
    "merge_results",
    "sliced_wasserstein",
    "numpy_phase_vjp",
    "scipy_elliptic_vjp",
    "write_markdown",
]
