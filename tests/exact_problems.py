"""The exact non-Gaussian test problems live in `ganflow.bench.exact` (the benchmark measures Langevin on the
curved one); re-exported here for the tests."""

from ganflow.bench.exact import (  # noqa: F401
    N_PIX,
    CoefficientOperator,
    CurvedGenerator,
    ExactProblem,
    asymmetric_twin_problem,
    curved_problem,
    log_posterior_grid,
    quadrature_moments,
    twin_problem,
)
