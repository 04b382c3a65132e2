"""Linear inverse problems: observation operators, restoration degradations and their generators,
posterior denoisers (MMPS) and the posterior samplers it is compared with."""

from .baselines import DPS, METHODS, Clip, DiffPIRDenoiser, RowSum, pigdm, posterior_sampler, posterior_samples, tmpd
from .degradations import Blur, Downsample, box_mask, gaussian_kernel, motion_kernel
from .mmps import MMPSDenoiser, covariance
from .operators import (
    LinearOperator, MaskedFFT, Matrix, PixelMask, adjoint, apply, broadcast, kspace_mask, log_likelihood,
    pixel_mask, random_projection, simulate_observations, take,
)

__all__ = [
    "DPS", "METHODS", "Blur", "Clip", "DiffPIRDenoiser", "Downsample", "LinearOperator", "MMPSDenoiser",
    "MaskedFFT", "Matrix", "PixelMask", "RowSum", "adjoint", "apply", "box_mask", "broadcast", "covariance",
    "gaussian_kernel", "kspace_mask", "log_likelihood", "motion_kernel", "pigdm", "pixel_mask",
    "posterior_sampler", "posterior_samples", "random_projection", "simulate_observations", "take", "tmpd",
]
