"""CIFAR-10 loaders on small file sets written here, in every layout, plus the unpickler's refusal.

The python batches are written the way the official ones are (python 2, pickle protocol 2:
strings as BINSTRING, arrays through `numpy.core.multiarray._reconstruct`), so the restricted
unpickler is tested on the real opcode stream, not on a python 3 re-pickling.
"""

import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from diemlib.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10FormatError,
    UnsafePickleError,
    from_latent,
    load_cifar10,
    to_latent,
)

PER_BATCH = 4  # images per train batch (5 batches) and in the test batch
SHARED_CIFAR = Path("/work/shared/data/cifar10-jpeg.tar.gz")  # outside the repository: optional


# ----------------------------------------------------------------------------- writers


class _Py2Pickler(pickle._Pickler):
    """Writes pickles as python 2's cPickle did for the official batches: str/bytes as BINSTRING."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":  # the module name numpy 1.x (and py2) wrote
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def make_split(seed: int, n: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int32)
    return images, labels


def reference_data():
    train = [make_split(i, PER_BATCH) for i in range(5)]
    test = make_split(10, PER_BATCH)
    return train, test


def write_python_batches(folder: Path):
    folder.mkdir(parents=True)
    train, test = reference_data()
    for name, (x, y) in [(f"data_batch_{i + 1}", b) for i, b in enumerate(train)] + [("test_batch", test)]:
        batch = {
            b"batch_label": b"training batch 1 of 5",
            b"labels": [int(v) for v in y],
            b"data": x.reshape(len(y), 3072),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(y))],
        }
        (folder / name).write_bytes(py2_pickle(batch))
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}))


def write_binary_batches(folder: Path):
    folder.mkdir(parents=True)
    train, test = reference_data()
    for name, (x, y) in [(f"data_batch_{i + 1}.bin", b) for i, b in enumerate(train)] + [("test_batch.bin", test)]:
        records = np.concatenate([y[:, None].astype(np.uint8), x.reshape(len(y), 3072)], axis=1)
        (folder / name).write_bytes(records.tobytes())


def write_image_folder(root: Path, ext: str, per_class=(3, 2)):
    """`root/{train,test}/<class>/NNNN.ext` with 3 classes; returns {split: {class: [HWC images]}}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for split, count in zip(("train", "test"), per_class):
        written[split] = {}
        for cls in ("cat", "airplane", "dog"):  # written unsorted on purpose
            (root / split / cls).mkdir(parents=True)
            written[split][cls] = []
            for i in range(count):
                # smooth images so that JPEG stays close to the pixels
                base = rng.integers(0, 256, size=3)
                ramp = np.linspace(0, 40, 32).astype(np.int64)
                image = np.clip(base[None, None, :] + ramp[:, None, None] + ramp[None, :, None] // 2, 0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / split / cls / f"{i:04d}.{ext}", quality=95)
                written[split][cls].append(image)
    return written


def make_tar(source: Path, target: Path, arcname: str, format=tarfile.DEFAULT_FORMAT):
    mode = "w:gz" if target.name.endswith(".gz") else "w"
    with tarfile.open(target, mode, format=format) as archive:
        archive.add(source, arcname=arcname)
    return target


# ----------------------------------------------------------------------------- batch formats


def expected(split):
    train, test = reference_data()
    if split == "test":
        return test
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])


def check(result, split, limit=None):
    x, y = result
    ex, ey = expected(split)
    if limit is not None:
        ex, ey = ex[:limit], ey[:limit]
    assert x.dtype == np.uint8 and x.shape == ex.shape and x.shape[1:] == (3, 32, 32)
    assert y.shape == ey.shape and np.issubdtype(y.dtype, np.integer)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)


def test_python_batches_directory_and_parent(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder)
    for path in (folder, tmp_path):  # the batches folder itself or its parent
        check(load_cifar10(path, "train"), "train")
        check(load_cifar10(path, "test"), "test")
    check(load_cifar10(folder, "train", limit=6), "train", limit=6)


def test_python_pickle_is_python2_style(tmp_path):
    """The test writer really produces the official opcode stream (no _codecs, numpy.core name)."""
    import pickletools

    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder)
    ops = {(op.name, arg) for op, arg, _ in pickletools.genops((folder / "test_batch").read_bytes())}
    globals_ = {arg for name, arg in ops if name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert not any(name in ("BINUNICODE", "SHORT_BINUNICODE") for name, _ in ops)


def test_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_binary_batches(folder)
    for path in (folder, tmp_path):
        check(load_cifar10(path, "train"), "train")
        check(load_cifar10(path, "test"), "test")
    check(load_cifar10(tmp_path, "train", limit=5), "train", limit=5)


@pytest.mark.parametrize("kind", ["py", "bin"])
@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_batches_in_archive(tmp_path, kind, suffix):
    folder = tmp_path / "src" / f"cifar-10-batches-{kind}"
    (write_python_batches if kind == "py" else write_binary_batches)(folder)
    archive = make_tar(folder, tmp_path / f"cifar-10-{kind}{suffix}", f"cifar-10-batches-{kind}")
    check(load_cifar10(archive, "train"), "train")
    check(load_cifar10(archive, "test"), "test")
    check(load_cifar10(archive, "train", limit=9), "train", limit=9)


# ----------------------------------------------------------------------------- image folders


def interleaved(written_split):
    classes = sorted(written_split)
    items = []
    for i in range(max(len(v) for v in written_split.values())):
        for label, cls in enumerate(classes):
            if i < len(written_split[cls]):
                items.append((written_split[cls][i], label))
    return np.stack([im.transpose(2, 0, 1) for im, _ in items]), np.array([lab for _, lab in items])


@pytest.mark.parametrize("ext", ["png", "jpg", "jpeg"])
def test_image_folder(tmp_path, ext):
    root = tmp_path / "cifar10-images"
    written = write_image_folder(root, ext)
    tolerance = 0 if ext == "png" else 8  # JPEG is lossy
    for path in (root, tmp_path):  # the root itself or the folder holding it
        for split in ("train", "test"):
            x, y = load_cifar10(path, split)
            ex, ey = interleaved(written[split])
            assert x.dtype == np.uint8 and x.shape == ex.shape
            np.testing.assert_array_equal(y, ey)  # airplane 0, cat 1, dog 2, interleaved
            assert np.abs(x.astype(int) - ex.astype(int)).max() <= tolerance
    x, y = load_cifar10(root, "train", limit=4)
    np.testing.assert_array_equal(y, [0, 1, 2, 0])  # the first images cover every class
    np.testing.assert_array_equal(x, load_cifar10(root, "train")[0][:4])


def test_image_folder_grayscale_is_converted_to_rgb(tmp_path):
    from PIL import Image

    (tmp_path / "train" / "cat").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(tmp_path / "train" / "cat" / "a.png")
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (1, 3, 32, 32) and (x == 77).all() and y.tolist() == [0]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_image_folder_in_archive(tmp_path, suffix):
    root = tmp_path / "src" / "cifar10-jpeg"
    written = write_image_folder(root, "jpg")
    archive = make_tar(root, tmp_path / f"cifar10-jpeg{suffix}", "cifar10-jpeg")
    for split in ("train", "test"):
        x, y = load_cifar10(archive, split)
        ex, ey = interleaved(written[split])
        np.testing.assert_array_equal(y, ey)
        assert np.abs(x.astype(int) - ex.astype(int)).max() <= 8
        np.testing.assert_array_equal(x, load_cifar10(root, split)[0])  # same bytes, same decode
    x, y = load_cifar10(archive, "train", limit=5)
    np.testing.assert_array_equal(y, [0, 1, 2, 0, 1])


# ----------------------------------------------------------------------------- unsafe pickles


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


@pytest.mark.parametrize("wrapped", [False, True])
def test_restricted_unpickler_refuses_code(tmp_path, wrapped):
    target = tmp_path / "pwned.txt"
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder)
    payload = _Payload(target)
    if wrapped:  # inside an official-looking batch dict, as a tampered download would be
        data = py2_pickle({b"batch_label": b"x", b"labels": [0], b"data": payload})
    else:
        data = pickle.dumps(payload, protocol=2)
    (folder / "data_batch_1").write_bytes(data)
    assert not target.exists()
    with pytest.raises(UnsafePickleError) as info:
        load_cifar10(folder, "train")
    message = str(info.value)
    assert str(folder / "data_batch_1") in message
    assert "refusing global" in message and "system" in message  # os.system pickles as posix.system
    assert not target.exists()

    # the same payload inside an archive
    archive = make_tar(folder, tmp_path / "evil.tar.gz", "cifar-10-batches-py")
    with pytest.raises(UnsafePickleError, match="data_batch_1: refusing global"):
        load_cifar10(archive, "train")
    assert not target.exists()


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder)
    # a python 3 protocol-2 pickle of bytes needs `_codecs.encode`: not on the whitelist either
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": b"x", b"labels": []}, protocol=2))
    with pytest.raises(UnsafePickleError, match="refusing global '_codecs.encode'"):
        load_cifar10(folder, "test")


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_cifar10(missing)


def test_empty_folder_and_unknown_layout(tmp_path):
    with pytest.raises(CIFAR10FormatError, match=rf"{tmp_path}: the folder is empty.*cifar-10-batches-py"):
        load_cifar10(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CIFAR10FormatError, match=rf"{tmp_path}: no recognised CIFAR-10 layout"):
        load_cifar10(tmp_path)
    with pytest.raises(CIFAR10FormatError, match="not a readable tar archive"):
        load_cifar10(tmp_path / "notes.txt")
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(CIFAR10FormatError, match=rf"{empty}: the archive is empty"):
        load_cifar10(empty)


def test_wrong_image_size_names_the_file(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, "png")
    from PIL import Image

    bad = root / "train" / "dog" / "0001.png"
    Image.fromarray(np.zeros((28, 30, 3), np.uint8)).save(bad)
    with pytest.raises(CIFAR10FormatError, match=rf"{bad}: image is 30x28, expected 32x32"):
        load_cifar10(root, "train")
    load_cifar10(root, "test")  # the other split is fine
    archive = make_tar(root, tmp_path / "imgs.tar.gz", "imgs")
    with pytest.raises(CIFAR10FormatError, match=r"imgs.tar.gz:imgs/train/dog/0001.png: image is 30x28"):
        load_cifar10(archive, "train")


def test_missing_split(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(CIFAR10FormatError, match=rf"{folder}: split 'test' is missing \(test_batch"):
        load_cifar10(tmp_path, "test")
    archive = make_tar(folder, tmp_path / "py.tar.gz", "cifar-10-batches-py")
    with pytest.raises(CIFAR10FormatError, match="split 'test' is missing"):
        load_cifar10(archive, "test")

    root = tmp_path / "imgs"
    write_image_folder(root, "png")
    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(CIFAR10FormatError, match=rf"{root}: split 'test' is missing"):
        load_cifar10(root, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        load_cifar10(root, "validation")


def test_limit_too_large(tmp_path):
    write_binary_batches(tmp_path / "cifar-10-batches-bin")
    with pytest.raises(ValueError, match="limit=5 but the split holds only 4"):
        load_cifar10(tmp_path, "test", limit=5)
    x, y = load_cifar10(tmp_path, "test", limit=0)
    assert x.shape == (0, 3, 32, 32) and y.shape == (0,)


# ----------------------------------------------------------------------------- latent map


def test_to_latent_values_and_round_trip():
    p = np.arange(256, dtype=np.uint8)
    x = to_latent(p)
    assert x.dtype == np.float32
    assert x[0] == -2.0 and x[255] == np.float32(4 * 255 / 256 - 2)
    np.testing.assert_allclose(x, 4 * np.arange(256) / 256 - 2, rtol=0, atol=0)
    np.testing.assert_array_equal(from_latent(x), p)
    # noise below half a level rounds back; out-of-range values clip
    np.testing.assert_array_equal(from_latent(x + 0.49 / 64), p)
    np.testing.assert_array_equal(from_latent(np.array([-5.0, 9.0, np.nan])), [0, 255, 0])
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(from_latent(to_latent(images)), images)
    with pytest.raises(TypeError):
        to_latent(np.zeros(3, np.float32))


# ----------------------------------------------------------------------------- optional real data


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"optional real-data check: {SHARED_CIFAR} not present")
def test_optional_real_cifar10_jpeg_archive():
    """OPTIONAL: reads the shared JPEG re-encoding of CIFAR-10 (outside the repository) if present."""
    start = time.perf_counter()
    x, y = load_cifar10(SHARED_CIFAR, "test", limit=1000)  # indexes all 60 000 members, decodes 1000
    elapsed = time.perf_counter() - start
    assert x.shape == (1000, 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 100))  # interleaved order
    np.testing.assert_array_equal(y[:10], np.arange(10))
    assert 50 < x.mean() < 200 and x.std() > 30
    assert elapsed < 60, f"reading 1000 test images took {elapsed:.1f} s"
