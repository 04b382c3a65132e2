"""Networks F_θ(x, emb) of the reference: its layers, the manifold MLP and the image U-Net."""

from .layers import count_parameters
from .mlp import MLP
from .unet import UNet, cifar_unet, fastmri_unet

__all__ = ["MLP", "UNet", "cifar_unet", "count_parameters", "fastmri_unet"]
