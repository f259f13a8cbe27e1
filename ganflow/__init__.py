"""ganflow: physics-based Bayesian inverse problems with GAN priors and normalizing-flow posteriors.

Data flows one way: data -> prior (stage one, WGAN-GP) -> posterior (stage two, in the latent space)
-> predictive statistics -> results (HDF5) and figures. ``ganflow`` itself knows no physics: problems,
operators and generators are plug-ins (see ``ganflow.operators`` and ``ganflow.plugins``).
"""

# The one definition of the version: pyproject.toml reads it, `ganflow --version` prints it, and every output
# file records it as ganflow_version.
__version__ = "0.1.0"

from .arviz_export import to_arviz  # noqa: E402
from .errors import GanflowError  # noqa: E402
from .operators import ForwardOperator, GaussianNoise, Generator, Problem  # noqa: E402
from .plugins import load_operator, load_problem  # noqa: E402
from .results import PosteriorResult  # noqa: E402
from .simulate import simulate  # noqa: E402
from .solve import load_prior, solve  # noqa: E402

__all__ = [
    "__version__",
    "GanflowError",
    "ForwardOperator",
    "Generator",
    "Problem",
    "GaussianNoise",
    "load_problem",
    "load_operator",
    "load_prior",
    "solve",
    "simulate",
    "PosteriorResult",
    "to_arviz",
]
