"""Linear inverse problems: observation operators, mask generators, posterior denoisers (MMPS)."""

from .mmps import MMPSDenoiser, covariance
from .operators import (
    LinearOperator, MaskedFFT, Matrix, PixelMask, adjoint, apply, broadcast, kspace_mask, log_likelihood,
    pixel_mask, random_projection, simulate_observations, take,
)

__all__ = [
    "LinearOperator", "MMPSDenoiser", "MaskedFFT", "Matrix", "PixelMask", "adjoint", "apply", "broadcast",
    "covariance", "kspace_mask", "log_likelihood", "pixel_mask", "random_projection",
    "simulate_observations", "take",
]
