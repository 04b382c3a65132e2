"""diemlib: DiEM and MMPS (Rozet, Andry, Lanusse & Louppe, NeurIPS 2024) in JAX and equinox.

One concept per module, named as in the paper:

- `schedule`: the variance-exploding noise schedule σ_t.
- `denoiser`: EDM-preconditioned denoiser around a network, noise embedding, denoising loss.
- `gaussian`: DPLR covariance algebra and the analytic Gaussian denoiser.
- `ppca`: probabilistic PCA (the Gaussian M-step).
- `samplers`: DDPM, DDIM and predictor-corrector.
- `solvers`: CG and GMRES from zero, as lineax solvers.
- `mmps`: the moment-matching posterior denoiser and the covariance choices.
- `operators`: observation operators A and their mask generators.
- `networks`: the manifold MLP and the image U-Net of the reference.
- `training`: the jitted Adam step, EMA and a resumable `fit`.
- `checkpoint`: equinox serialisation without pickle, atomic writes.
- `em`: the DiEM driver (Gaussian q_0, E-step, M-step, laps, resume).
- `sharding`: data parallelism over all devices.
- `manifold`, `mixture`: the latent manifold and the Gaussian-mixture priors of notebooks 01-02.
- `covariance_study`: the machinery of notebook 02 (paper §4.2).
- `sinkhorn`: the reference's debiased Sinkhorn number.
- `plots`: figures shared by the notebooks.
- `runner`: `diem-run`, the headless notebook runner.
"""

import os

# XLA's CPU "concurrency-optimized" scheduler deadlocks (every thread idle, no progress) on some
# of our programs: GMRES inside the predictor-corrector scan at batch >= 2048, jaxlib 0.10.2.
# The default scheduler does not. The flag must be set before JAX starts its CPU backend, i.e.
# before the first computation; it does nothing on GPUs.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}".strip()


from .denoiser import Denoiser, denoising_loss, noise_embedding, preconditioning
from .gaussian import DPLR, GaussianDenoiser
from .mmps import MMPS, covariance
from .operators import MaskedFFT, Matrix, PixelMask, kspace_mask, pixel_mask, random_projection
from .samplers import DDIM, DDPM, PC, sampler
from .schedule import VESchedule
from .solvers import CG, GMRES, solver
