"""Evaluation: FID/KID (torch-fidelity, offline), LPIPS (the reference package, offline), PSNR/SSIM (dm-pix), the Sinkhorn number, the evidence check, the covariance study of §4.2."""

from .evidence import evidence_divergence
from .fid import (
    WeightsNotFoundError,
    convert_fid_helper_weights,
    frechet_distance,
    image_metrics,
    inception_features,
    resolve_inception_weights,
)
from .lpips import LPIPS_WEIGHTS, lpips_distance, lpips_weights
from .quality import psnr, ssim
from .sinkhorn import entropic_ot, sinkhorn_divergence, sinkhorn_divergences

__all__ = [
    "convert_fid_helper_weights",
    "entropic_ot",
    "evidence_divergence",
    "frechet_distance",
    "image_metrics",
    "inception_features",
    "LPIPS_WEIGHTS",
    "lpips_distance",
    "lpips_weights",
    "psnr",
    "resolve_inception_weights",
    "sinkhorn_divergence",
    "sinkhorn_divergences",
    "ssim",
    "WeightsNotFoundError",
]
