"""Data sets and synthetic priors: CIFAR-10 (its official archive fetched on demand) and MRI slices from local files, the random manifold and the Gaussian mixtures."""

from .cifar10 import CIFAR10_CLASSES, CIFAR10FormatError, UnsafePickleError, cifar10_source, from_latent, load_cifar10, to_latent
from .download import DataUnavailable, DownloadError, fetch
from .manifold import RandomManifold, random_manifold, sample_manifold
from .mixture import GaussianMixture, helix_mixture, manifold_mixture
from .mri import MRIFormatError, holdout, load_brain_volume, load_fastmri, to_magnitude

__all__ = [
    "CIFAR10_CLASSES",
    "cifar10_source",
    "CIFAR10FormatError",
    "DataUnavailable",
    "DownloadError",
    "fetch",
    "from_latent",
    "GaussianMixture",
    "helix_mixture",
    "holdout",
    "load_brain_volume",
    "load_cifar10",
    "load_fastmri",
    "manifold_mixture",
    "MRIFormatError",
    "random_manifold",
    "RandomManifold",
    "sample_manifold",
    "to_latent",
    "to_magnitude",
    "UnsafePickleError",
]
