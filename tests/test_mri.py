"""MRI loaders (paper §5.3) on small files written here: fastMRI-layout HDF5 volumes (h5py) and a
NIfTI volume (nibabel), their normalisation, and every error a user can meet."""

from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from diemlib.data.mri import (
    MRIFormatError,
    from_magnitude,
    holdout,
    load_brain_volume,
    load_fastmri,
    to_magnitude,
)
from diemlib.inverse import MaskedFFT, kspace_mask

SIZE = 8  # image size of the fake fastMRI volumes (the real ones are 320)


def write_fastmri(path: Path, slices: int = 12, size: int = SIZE, seed: int = 0, keys=("kspace", "reconstruction_rss", "reconstruction_esc")):
    """A single-coil fastMRI volume in the data set's layout: raw k-space (readout-oversampled,
    complex), the magnitude reconstructions, and the attributes (`max` over the whole volume)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1e-4, (slices, size, size)).astype(np.float32)  # magnitudes ~ 1e-4, as fastMRI's
    with h5py.File(path, "w") as f:
        for key in keys:
            if key == "kspace":
                f["kspace"] = (rng.normal(size=(slices, 2 * size, size + 3)) + 1j).astype(np.complex64)
            else:
                f[key] = images
        f.attrs["max"] = float(images.max())
        f.attrs["acquisition"] = "CORPD_FBK"
    return images


def test_fastmri_slices_and_normalisation(tmp_path):
    images = write_fastmri(tmp_path / "file1.h5", slices=45)
    x = load_fastmri(tmp_path / "file1.h5", size=SIZE)
    assert x.shape == (30, 1, SIZE, SIZE) and x.dtype == np.float32
    kept = images[10:40]
    np.testing.assert_allclose(x[:, 0], 4 * kept / kept.max() - 2, rtol=1e-6, atol=1e-6)
    assert x.max() == pytest.approx(2.0) and x.min() >= -2
    np.testing.assert_allclose(to_magnitude(x[:, 0]), kept / kept.max(), rtol=1e-6, atol=1e-6)
    # fastMRI's own `max` attribute (over the whole volume) instead, and the other reconstruction.
    y = load_fastmri(tmp_path / "file1.h5", size=SIZE, normalise="attribute", key="reconstruction_esc")
    np.testing.assert_allclose(y[:, 0], from_magnitude(kept / images.max()), rtol=1e-6, atol=1e-6)


def test_fastmri_directory_order_and_limit(tmp_path):
    a = write_fastmri(tmp_path / "b.h5", seed=1, slices=41)[10:40]
    b = write_fastmri(tmp_path / "a.h5", seed=2, slices=41)[10:40]
    (tmp_path / "notes.txt").write_text("not a volume")
    x = load_fastmri(tmp_path, size=SIZE)
    assert x.shape == (60, 1, SIZE, SIZE)
    np.testing.assert_allclose(x[:30, 0], from_magnitude(b / b.max()), rtol=1e-6, atol=1e-6)  # a.h5 first
    np.testing.assert_allclose(x[30:, 0], from_magnitude(a / a.max()), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(load_fastmri(tmp_path, size=SIZE, limit=35), x[:35])
    one = load_fastmri(tmp_path, size=SIZE, slices=(25, 26))  # one slice per volume
    assert one.shape == (2, 1, SIZE, SIZE)


def test_fastmri_errors_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"knee_singlecoil.*no such file|no such file.*knee_singlecoil"):
        load_fastmri(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MRIFormatError, match="holds no .h5 file"):
        load_fastmri(empty)
    write_fastmri(tmp_path / "test_split.h5", keys=("kspace",))
    with pytest.raises(MRIFormatError, match=r"test_split.h5: no dataset 'reconstruction_rss' \(fastMRI's test split ships k-space only\); found \['kspace'\]"):
        load_fastmri(tmp_path / "test_split.h5", size=SIZE)
    write_fastmri(tmp_path / "big.h5", size=SIZE + 2)
    with pytest.raises(MRIFormatError, match=r"big.h5: 'reconstruction_rss' has shape \(12, 10, 10\), expected \(slices, 8, 8\)"):
        load_fastmri(tmp_path / "big.h5", size=SIZE)
    write_fastmri(tmp_path / "short.h5", slices=20)
    with pytest.raises(MRIFormatError, match="short.h5: 'reconstruction_rss' has 20 slices, expected at least 40"):
        load_fastmri(tmp_path / "short.h5", size=SIZE)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(MRIFormatError, match="text.h5: not a readable HDF5 file"):
        load_fastmri(tmp_path / "text.h5", size=SIZE)
    with h5py.File(tmp_path / "nomax.h5", "w") as f:
        f["reconstruction_rss"] = np.ones((40, SIZE, SIZE), np.float32)
    with pytest.raises(MRIFormatError, match="nomax.h5: no 'max' attribute"):
        load_fastmri(tmp_path / "nomax.h5", size=SIZE, normalise="attribute")
    with pytest.raises(ValueError, match="key must be one of"):
        load_fastmri(tmp_path / "nomax.h5", key="kspace")


def write_head(path: Path, shape=(20, 24, 18)) -> np.ndarray:
    """A NIfTI volume (uint8, 1 mm, RAS) of an ellipsoidal 'head' with a brighter inner 'brain'."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(np.sum((grid / np.array([0.8, 0.9, 0.85])[:, None, None, None]) ** 2, axis=0))
    # Asymmetric left-right (x) and front-back (y), so that a flipped slice would show.
    volume = np.where(r < 1, 120, 0) + np.where(r < 0.6, 100, 0) + (3 * (grid[0] > 0) + 5 * (grid[1] > 0.3)) * (r < 1)
    nib.save(nib.Nifti1Image(volume.astype(np.uint8), np.eye(4)), path)
    return volume


def test_brain_volume_slices_orientations_and_normalisation(tmp_path):
    volume = write_head(tmp_path / "head.nii.gz")
    axial = load_brain_volume(tmp_path / "head.nii.gz", size=16, orientations=("axial",))
    assert axial.shape[1:] == (1, 16, 16) and axial.dtype == np.float32
    tissue = ((volume > 0.1 * volume.max()).mean(axis=(0, 1)) >= 0.25).sum()
    assert len(axial) == tissue and 0 < tissue < volume.shape[2]
    assert axial.min() >= -2 and axial.max() == pytest.approx(2.0)  # divided by the slices' max
    assert np.all(axial[:, 0, 0, 0] == -2)  # the padded corner stays background
    every = load_brain_volume(tmp_path / "head.nii.gz", size=16, orientations=("axial", "coronal", "sagittal"))
    assert len(every) > len(axial)
    # The same slices at full resolution (24 rows after the square padding of 20 x 24).
    full = load_brain_volume(tmp_path / "head.nii.gz", size=24, orientations=("axial",))
    middle = volume[:, :, volume.shape[2] // 2]
    upright = np.flipud(middle.T)  # rows: anterior at the top
    square = np.zeros((24, 24))
    square[:, 2:22] = upright
    np.testing.assert_allclose(to_magnitude(full[len(full) // 2, 0]) * volume.max(), square, atol=1e-3)


def test_brain_volume_kspace_is_the_masked_fft(tmp_path):
    """Observations of the stand-in are made by MaskedFFT: with every column kept, an isometry."""
    write_head(tmp_path / "head.nii")
    x = jnp.asarray(load_brain_volume(tmp_path / "head.nii", size=16))
    k = jax.vmap(MaskedFFT(jnp.ones(16)))(x)
    np.testing.assert_allclose(jnp.sum(k**2, axis=(1, 2, 3)), jnp.sum(x**2, axis=(1, 2, 3)), rtol=1e-5)
    mask = kspace_mask(jax.random.key(0), 4, 16)
    assert jnp.all(MaskedFFT(mask.astype(x.dtype))(x[0])[..., ~mask] == 0)


def test_brain_volume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.nii.gz: no such file; expected a 3-D MRI volume in NIfTI format"):
        load_brain_volume(tmp_path / "nowhere.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(MRIFormatError, match="junk.nii.gz: not a readable NIfTI volume"):
        load_brain_volume(tmp_path / "junk.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 5), np.uint8), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(MRIFormatError, match=r"flat.nii: the image has shape \(4, 5\)"):
        load_brain_volume(tmp_path / "flat.nii")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.uint8), np.eye(4)), tmp_path / "empty.nii")
    with pytest.raises(MRIFormatError, match="empty.nii: no slice has 25% of its voxels"):
        load_brain_volume(tmp_path / "empty.nii")
    write_head(tmp_path / "head.nii")
    with pytest.raises(ValueError, match="orientations must be"):
        load_brain_volume(tmp_path / "head.nii", orientations=("oblique",))


@pytest.mark.parametrize("count, held_out, gap", [(100, 8, 2), (10, 3, 0), (30, 29, 0)])
def test_holdout_keeps_neighbours_of_held_out_slices_out_of_training(count, held_out, gap):
    train, test = holdout(count, held_out, gap)
    assert len(test) == held_out and len(np.intersect1d(train, test)) == 0
    assert np.abs(train[:, None] - test[None, :]).min() > gap
    assert len(train) + len(test) + 2 * gap * len(test) >= count  # only the gaps are dropped
    with pytest.raises(ValueError):
        holdout(count, count, gap)


@pytest.mark.parametrize("profile", [None, "ci", "laptop"])
def test_profiles_on_the_template_fit_its_slices(profile):
    """Notebook 04's runs without data of their own (Run All, `ci`, `laptop`) read the MNI152
    template: its slices must cover what they ask for, or the run stops in its data cell."""
    from diemlib.data.mri import mni152_template
    from diemlib.workbook import runner

    p = runner.resolve("04_mri", profile).values
    assert p["brain_volume"] == "" and p["fastmri"] == ""
    slices = load_brain_volume(mni152_template(), size=p["size"], orientations=tuple(p["orientations"]),
                               min_tissue=p["min_tissue"])
    train, _ = holdout(len(slices), p["held_out"], p["holdout_gap"])
    observations = len(train[: p["observations"] or None])
    assert p["gaussian_observations"] <= observations and 2 * p["eval_samples"] <= observations
