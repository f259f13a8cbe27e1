"""Stage two: posteriors in the latent space (flow, short-run Langevin, NUTS) on one shared target."""

from .target import LatentTarget

__all__ = ["LatentTarget"]
