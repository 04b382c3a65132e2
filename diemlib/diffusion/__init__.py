"""Diffusion models (paper §2): schedule, denoisers, samplers."""

from .denoiser import Denoiser, denoising_loss, noise_embedding, preconditioning
from .gaussian import GaussianDenoiser
from .samplers import DDIM, DDPM, PC, Sampler, sampler
from .schedule import VESchedule

__all__ = [
    "DDIM", "DDPM", "PC", "Denoiser", "GaussianDenoiser", "Sampler", "VESchedule",
    "denoising_loss", "noise_embedding", "preconditioning", "sampler",
]
