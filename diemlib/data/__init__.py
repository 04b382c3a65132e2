"""Data sets and synthetic priors: CIFAR-10 from local files, the random manifold and the Gaussian mixtures."""

from .cifar10 import CIFAR10_CLASSES, CIFAR10FormatError, UnsafePickleError, from_latent, load_cifar10, to_latent
from .manifold import RandomManifold, random_manifold, sample_manifold
from .mixture import GaussianMixture, helix_mixture, manifold_mixture

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10FormatError",
    "from_latent",
    "GaussianMixture",
    "helix_mixture",
    "load_cifar10",
    "manifold_mixture",
    "random_manifold",
    "RandomManifold",
    "sample_manifold",
    "to_latent",
    "UnsafePickleError",
]
