"""diemlib: DiEM and MMPS (Rozet, Andry, Lanusse & Louppe, NeurIPS 2024) in JAX and equinox.

Grouped by role; each module holds one concept of the paper:

- `diffusion`: the noise schedule, the EDM-preconditioned denoiser and its loss, the analytic
  Gaussian denoiser, and the samplers (DDPM, DDIM, predictor-corrector).
- `linalg`: diagonal-plus-low-rank matrices, probabilistic PCA, Krylov solvers (CG, GMRES).
- `inverse`: observation operators and their mask generators, the restoration degradations, the
  MMPS posterior denoiser and the covariance choices of V[x | x_t], and the posterior samplers
  MMPS is compared with (DPS, ΠGDM, TMPD, DiffPIR).
- `nn`: the reference's layers, the manifold MLP and the image U-Net.
- `em`: the E-step, the M-step (training, EMA), the DiEM driver with checkpoints, sharding.
- `eval`: the Sinkhorn number, the evidence check, the covariance study of §4.2, PSNR/SSIM, FID,
  and the measured cost of a sampler.
- `data`: the manifold and Gaussian-mixture priors of the low-dimensional experiments.
- `workbook`: the headless notebook runner, its parameters, metrics files and shared plots.
  Generic tooling, not the method.

Naming: every denoiser, i.e. every estimate of E[x | x_t] a sampler consumes, is a
`...Denoiser` (`Denoiser`, `GaussianDenoiser`, `MMPSDenoiser`); samplers are named after their
update (`DDPM`, `DDIM`, `PC`). The common names are importable from `diemlib` itself.

**XLA flag.** Importing `diemlib` appends
`--xla_cpu_enable_concurrency_optimized_scheduler=false` to `XLA_FLAGS` unless the variable
already sets that option: XLA's concurrency-optimized CPU scheduler deadlocks (every thread idle,
no progress) on some of our programs (GMRES inside the predictor-corrector scan at batch >= 2048,
jaxlib 0.10.2). It must be set before JAX starts its CPU backend and changes nothing on GPUs.
Set `DIEMLIB_XLA_WORKAROUND=0` before importing to leave `XLA_FLAGS` untouched.

**Compilation cache.** Importing `diemlib` also turns on JAX's persistent compilation cache
(`diemlib.compilation.enable_cache`): compiled programs are kept in `~/.cache/diemlib/jax`, so a
rerun loads them instead of compiling again. `DIEMLIB_COMPILATION_CACHE=DIR` moves it, `=0` turns
it off.
"""

import os

XLA_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if os.environ.get("DIEMLIB_XLA_WORKAROUND", "1") != "0" and (
    "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_SCHEDULER_FLAG}".strip()

from .compilation import enable_cache  # noqa: E402

enable_cache()  # JAX's persistent compilation cache, before any computation (diemlib.compilation)

from .diffusion import DDIM, DDPM, PC, Denoiser, GaussianDenoiser, VESchedule, denoising_loss, sampler  # noqa: E402
from .inverse import MaskedFFT, Matrix, MMPSDenoiser, PixelMask, covariance  # noqa: E402
from .linalg import CG, DPLR, GMRES, ppca, solver  # noqa: E402

__all__ = [
    "CG", "DDIM", "DDPM", "DPLR", "GMRES", "PC", "Denoiser", "GaussianDenoiser", "MMPSDenoiser",
    "MaskedFFT", "Matrix", "PixelMask", "VESchedule", "covariance", "denoising_loss", "ppca",
    "sampler", "solver",
]
