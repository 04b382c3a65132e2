r"""MRI slices for accelerated MRI (paper §5.3, Fig. 6): fastMRI knee volumes, or a brain volume.

Both loaders return magnitude images as latents `(N, 1, H, W)` (float32): every slice of a
volume is divided by the largest value over the slices kept from that volume, then mapped
from $[0, 1]$ to $x = 4 m - 2 \in [-2, 2]$ ([`from_magnitude`][]; [`to_magnitude`][] is
its inverse). The observations are then simulated by [`MaskedFFT`][]: k-space is the centred
orthonormal 2-D FFT of the latent, under-sampled by a column mask.

- [`load_fastmri`][]: the fastMRI single-coil knee data set (Zbontar et al. 2018;
  `knee_singlecoil_{train,val}`), HDF5 volumes as it ships them: a dataset `kspace` (the raw,
  readout-oversampled k-space, not used here), the $320 \times 320$ magnitude reconstructions
  `reconstruction_rss` (or `reconstruction_esc`) and an attribute `max`. Like the paper, we keep
  slices 10 to 39 of every volume (the outer slices hold little knee) and simulate k-space from
  the reconstructions. The data needs a licence and a download, so it is never fetched.
- [`load_brain_volume`][]: an offline stand-in, the slices with tissue of one 3-D brain MRI
  volume (NIfTI, read with nibabel), in one to three orientations, zero-padded to a square and
  resized to $N \times N$. It is magnitude-only data without phase or coil noise: k-space made
  from it is *simulated* single-coil data, to be labelled as such. [`mni152_template`][] is the
  volume every install has: the MNI152 T1 template (ICBM 2009a, symmetric, 1 mm; an average of
  152 brains, skull removed) that the `nilearn` wheel ships; any other NIfTI volume, such as the
  Colin27 head of one subject, can take its place.

[`holdout`][] splits slices into training and held-out sets, keeping held-out slices away from
their neighbours (adjacent slices of a volume look alike).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

__all__ = [
    "FASTMRI_SLICES",
    "MRIFormatError",
    "ORIENTATIONS",
    "holdout",
    "load_brain_volume",
    "load_fastmri",
    "mni152_template",
    "from_magnitude",
    "to_magnitude",
]

FASTMRI_SLICES = (10, 40)  # slices [10, 40) of every volume (paper §5.3)
FASTMRI_KEYS = ("reconstruction_rss", "reconstruction_esc")
ORIENTATIONS = ("axial", "coronal", "sagittal")
_FASTMRI_EXPECTED = (
    "expected fastMRI single-coil knee volumes (HDF5 files of knee_singlecoil_train or "
    "knee_singlecoil_val, downloaded from https://fastmri.med.nyu.edu after accepting its licence): "
    "one .h5 file or a directory of them, each with a dataset 'reconstruction_rss' or "
    "'reconstruction_esc' of shape (slices, 320, 320)"
)


class MRIFormatError(ValueError):
    """A file exists but does not hold what the loader expects (keys, shapes, slices)."""


def from_magnitude(magnitude) -> np.ndarray:
    """Magnitudes in $[0, 1]$ to latents $x = 4 m - 2$ (float32)."""
    return np.asarray(magnitude, np.float32) * np.float32(4) - np.float32(2)


def to_magnitude(x):
    """Latents to magnitudes, $m = (x + 2) / 4$ (numpy or JAX arrays)."""
    return (x + 2) / 4


def _h5_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; {_FASTMRI_EXPECTED}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".h5", ".hdf5"))
    if not files:
        raise MRIFormatError(f"{path}: the directory holds no .h5 file; {_FASTMRI_EXPECTED}")
    return files


def load_fastmri(
    path: str | os.PathLike,
    *,
    key: str = "reconstruction_rss",
    slices: tuple[int, int] = FASTMRI_SLICES,
    size: int = 320,
    limit: int | None = None,
    normalise: str = "slices",
) -> np.ndarray:
    """Reads fastMRI single-coil knee volumes into latents `(N, 1, size, size)` (paper §5.3).

    **Arguments:**

    - `path`: one HDF5 volume, or a directory of them (read in sorted file order).
    - `key`: the image dataset, `reconstruction_rss` (the paper's) or `reconstruction_esc`.
    - `slices`: the slice range `[start, stop)` kept from every volume (paper: 10 to 40).
    - `size`: the expected image size (fastMRI's reconstructions are 320 × 320).
    - `limit`: stop after this many slices (the first volumes, in order); all by default.
    - `normalise`: what every volume is divided by: `"slices"`, its largest value over the slices
      kept (the paper's); `"attribute"`, the file's `max` attribute (fastMRI's, over the whole
      volume).

    **Raises:** `FileNotFoundError` (no such path), `MRIFormatError` (not HDF5, no image dataset,
    images that are not `size × size`, fewer than `stop` slices, no `max` attribute when
    `normalise="attribute"`).
    """
    import h5py

    if key not in FASTMRI_KEYS:
        raise ValueError(f"key must be one of {FASTMRI_KEYS}, got {key!r}")
    if normalise not in ("slices", "attribute"):
        raise ValueError(f"normalise must be 'slices' or 'attribute', got {normalise!r}")
    start, stop = slices
    images = []
    count = 0
    for file in _h5_files(Path(path).expanduser()):
        if limit is not None and count >= limit:
            break
        try:
            handle = h5py.File(file, "r")
        except OSError as error:
            raise MRIFormatError(f"{file}: not a readable HDF5 file ({error}); {_FASTMRI_EXPECTED}") from error
        with handle:
            if key not in handle:
                hint = " (fastMRI's test split ships k-space only)" if "kspace" in handle else ""
                raise MRIFormatError(
                    f"{file}: no dataset '{key}'{hint}; found {sorted(handle.keys())}; {_FASTMRI_EXPECTED}"
                )
            data = handle[key]
            if data.ndim != 3 or data.shape[1:] != (size, size):
                raise MRIFormatError(f"{file}: '{key}' has shape {data.shape}, expected (slices, {size}, {size})")
            if data.shape[0] < stop:
                raise MRIFormatError(f"{file}: '{key}' has {data.shape[0]} slices, expected at least {stop} (slices {start}..{stop - 1})")
            volume = np.asarray(data[start:stop], np.float32)
            if normalise == "attribute":
                if "max" not in handle.attrs:
                    raise MRIFormatError(f"{file}: no 'max' attribute (normalise='attribute'); found {sorted(handle.attrs)}")
                scale = float(handle.attrs["max"])
            else:
                scale = float(volume.max())
        if not scale > 0:
            raise MRIFormatError(f"{file}: '{key}' slices {start}..{stop - 1} are all zero")
        images.append(volume / scale)
        count += len(volume)
    x = from_magnitude(np.concatenate(images)[:, None])
    return x if limit is None else x[:limit]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads a slice to a centred square, then resizes it to `size × size` (anti-aliased)."""
    import jax

    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side), np.float32)
    square[top : top + h, left : left + w] = image
    if side == size:
        return square
    return np.asarray(jax.image.resize(square, (size, size), "linear", antialias=True))


MNI152_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def mni152_template() -> Path:
    """The MNI152 T1 template that the `nilearn` wheel ships (the file its
    `load_mni152_template` reads; 197 × 233 × 189 voxels of 1 mm, an average of 152 brains,
    skull removed), found without importing nilearn.

    **Raises:** `ModuleNotFoundError` naming the package to install, `FileNotFoundError` if this
    nilearn does not ship the file.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the MNI152 template ships with nilearn: pip install nilearn (the workbook's `data` extra), "
            "or give a NIfTI volume of your own"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / MNI152_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this nilearn does not ship {MNI152_FILE}; give a NIfTI volume of your own")
    return path


def load_brain_volume(
    path: str | os.PathLike,
    *,
    size: int = 64,
    orientations: tuple[str, ...] = ("axial",),
    min_tissue: float = 0.25,
) -> np.ndarray:
    r"""The slices with tissue of a 3-D MRI volume (NIfTI) as latents `(N, 1, size, size)`.

    The volume is reoriented to RAS (nibabel's closest canonical orientation) and cut along
    each orientation in `orientations` (axial, coronal, sagittal). A slice is kept when at least
    `min_tissue` of its voxels exceed a tenth of the volume's largest value. Every kept slice
    is shown upright (anterior or superior at the top), zero-padded to a centred square, resized
    to `size × size` (linear, anti-aliased), then all are divided by their largest value and
    mapped to $4 m - 2$, as [`load_fastmri`][] does. Order: orientation by orientation, slices
    in position order.

    **Raises:** `FileNotFoundError` (no such path), `MRIFormatError` (not a readable NIfTI
    volume, not 3-D, no slice with tissue).
    """
    import nibabel as nib

    path = Path(path).expanduser()
    expected = "expected a 3-D MRI volume in NIfTI format (.nii or .nii.gz), e.g. a T1-weighted brain scan"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; {expected}")
    unknown = [o for o in orientations if o not in ORIENTATIONS]
    if unknown or not orientations:
        raise ValueError(f"orientations must be a non-empty subset of {ORIENTATIONS}, got {orientations!r}")
    if not 0 <= min_tissue < 1:
        raise ValueError(f"min_tissue must be in [0, 1), got {min_tissue}")
    try:
        image = nib.as_closest_canonical(nib.load(path))
        volume = np.asarray(image.dataobj, np.float32)
    except Exception as error:  # nibabel raises several types for unreadable files
        raise MRIFormatError(f"{path}: not a readable NIfTI volume ({type(error).__name__}: {error}); {expected}") from error
    volume = np.squeeze(volume)
    if volume.ndim != 3:
        raise MRIFormatError(f"{path}: the image has shape {volume.shape}, {expected}")
    threshold = 0.1 * volume.max()
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS: x left-right, y back-front, z down-up
    slices = []
    for orientation in orientations:
        stack = np.moveaxis(volume, axis[orientation], 0)  # (slice, first, second): RAS order
        tissue = (stack > threshold).mean(axis=(1, 2))
        for cut in stack[tissue >= min_tissue]:
            slices.append(_resize(np.flipud(cut.T), size))  # rows: the second axis, top = anterior/superior
    if not slices:
        raise MRIFormatError(f"{path}: no slice has {min_tissue:.0%} of its voxels above a tenth of the maximum")
    slices = np.stack(slices)
    return from_magnitude(np.clip(slices, 0, None)[:, None] / slices.max())


def holdout(count: int, held_out: int, gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Splits `count` slices into training and held-out indices.

    The `held_out` slices are evenly spaced over `0..count-1` (the middle of each of `held_out`
    equal parts); the training slices are the
    others, less the `gap` slices on each side of every held-out slice, so that no training
    slice is a near copy of a held-out one.

    **Returns:** `(train, test)`, sorted index arrays.
    """
    if not 0 < held_out < count:
        raise ValueError(f"need 0 < held_out < count, got held_out={held_out}, count={count}")
    test = ((np.arange(held_out) + 0.5) * count / held_out).astype(int)  # distinct: a step > 1
    near = np.abs(np.arange(count)[:, None] - test[None, :]).min(axis=1) <= gap
    train = np.flatnonzero(~near)
    if train.size == 0:
        raise ValueError(f"no training slice left: {count} slices, {held_out} held out with gap {gap}")
    return train, test
