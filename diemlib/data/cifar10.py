r"""CIFAR-10 (Krizhevsky 2009) from local files, the official archive fetched on demand; no pickle code execution.

`load_cifar10(path, split)` returns `(images, labels)`: `images` a `uint8` array of shape
`(N, 3, 32, 32)` (channels first), `labels` an `int32` array of shape `(N,)` with the official
class indices (airplane 0, automobile 1, bird 2, cat 3, deer 4, dog 5, frog 6, horse 7, ship 8,
truck 9; this is also the alphabetical order, so image folders get the same labels).

The source layout is detected from the one `path`:

1. the official python batches, a directory `cifar-10-batches-py/` with `data_batch_1..5` and
   `test_batch` (pickled dicts with `b"data"` `(N, 3072)` uint8 and `b"labels"`). They are read
   with a restricted unpickler that resolves only the globals numpy array reconstruction needs
   (`numpy.core.multiarray._reconstruct`, `numpy._core.multiarray._reconstruct`,
   `numpy.ndarray`, `numpy.dtype`) and raises `UnsafePickleError` for any other global, so a
   tampered file cannot run code;
2. the official binary batches, a directory `cifar-10-batches-bin/` with `data_batch_1.bin..5`
   and `test_batch.bin` (records of 1 label byte and 3072 pixel bytes), read with numpy;
3. an image folder `<root>/<split>/<class>/*.png|jpg|jpeg`, classes sorted alphabetically give
   the labels (the union of the class folders of all splits, so train and test agree), every
   image read with PIL and converted to RGB; every image must be 32 x 32;
4. any of these inside a `.tar`, `.tar.gz`, `.tgz` (or other `tarfile`-readable) archive, such
   as the official `cifar-10-python.tar.gz`; members are read in one sequential pass, nothing
   is extracted to disk.

`path` may be the batches directory itself, the image-folder root, a directory that contains
one of them (e.g. the folder where `cifar-10-python.tar.gz` was extracted) or the archive.

Order and `limit`: batch formats keep the official order (batches 1 to 5, records in file
order; the official batches are already shuffled). Image folders are *interleaved*: sorting
the files of every class by name, the order is file 0 of every class (in class order), then
file 1 of every class, and so on; the first `limit` images therefore cover all classes as
evenly as possible, and `load_cifar10(p, s, limit=n)` is exactly the first `n` images of
`load_cifar10(p, s)`. Only the images kept are decoded.

`cifar10_source(path)` is what the notebooks call first with their `cifar10` parameter: `path`
if it exists, else, when it names the official `cifar-10-python.tar.gz`, that archive fetched
there from Krizhevsky's page and checked against its published MD5 (off with
`DIEMLIB_DOWNLOAD=0`); otherwise a `DataUnavailable` whose message says what to put where.
`load_cifar10` itself only reads local files.

`to_latent` maps a pixel $p \in \{0, \dots, 255\}$ to $x = 4p/256 - 2 \in [-2, 2)$ (float32),
`from_latent` is its inverse (rounded to the nearest pixel, clipped to $[0, 255]$).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .download import ENV_DOWNLOAD, DataUnavailable, downloads_enabled, fetch

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_SIZE",
    "CIFAR10_URL",
    "CIFAR10FormatError",
    "DataUnavailable",
    "UnsafePickleError",
    "cifar10_source",
    "from_latent",
    "load_cifar10",
    "restricted_unpickle",
    "to_latent",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_RECORD = 1 + 3 * 32 * 32
_PY_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_BIN_FILES = {split: [name + ".bin" for name in names] for split, names in _PY_FILES.items()}
_EXPECTED = (
    "expected one of: a 'cifar-10-batches-py/' directory (data_batch_1..5, test_batch), a "
    "'cifar-10-batches-bin/' directory (data_batch_1.bin..5, test_batch.bin), an image folder "
    "'<root>/{train,test}/<class>/*.png|jpg|jpeg', a directory containing one of these, or a "
    ".tar/.tar.gz archive of one of these"
)


class CIFAR10FormatError(ValueError):
    """The path exists but does not hold CIFAR-10 in a recognised layout (or a split is missing)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy-array whitelist; nothing was executed."""


# ----------------------------------------------------------------------------- pixels <-> latent


def to_latent(images) -> np.ndarray:
    """Pixels $p \\in \\{0..255\\}$ (any shape, integer) to $x = 4p/256 - 2$ as float32."""
    p = np.asarray(images)
    if not (np.issubdtype(p.dtype, np.integer) or p.dtype == np.bool_):
        raise TypeError(f"to_latent expects integer pixels in 0..255, got dtype {p.dtype}")
    return p.astype(np.float32) * np.float32(4 / 256) - np.float32(2)


def from_latent(x) -> np.ndarray:
    """Inverse of `to_latent`: $p = \\mathrm{round}(64 (x + 2))$ clipped to $[0, 255]$, as uint8.

    Non-finite values map to 0 (NaN) or the clip bounds (±inf) instead of undefined casts.
    """
    x = np.asarray(x, dtype=np.float32)
    p = np.rint((x + np.float32(2)) * np.float32(64))
    p = np.nan_to_num(p, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(p, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- restricted unpickler


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy array reconstruction needs; refuses every other one."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(f"{self.source}: refusing global '{module}.{name}' (only numpy array reconstruction is allowed)")
        return factory()


def restricted_unpickle(data: bytes, source: str = "<bytes>"):
    """Unpickles `data` (python 2 pickles: `encoding="bytes"`) allowing only numpy array globals."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # truncated or corrupt file
        raise CIFAR10FormatError(f"{source}: not a readable CIFAR-10 python batch ({type(error).__name__}: {error})") from error


# ----------------------------------------------------------------------------- decoders


def _decode_python_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_unpickle(data, source)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CIFAR10FormatError(f"{source}: expected a dict with b'data' and b'labels', got {keys}")
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072 or labels.shape != (images.shape[0],):
        raise CIFAR10FormatError(
            f"{source}: expected b'data' uint8 (N, 3072) and N labels, got {images.dtype} {images.shape} and {labels.shape}"
        )
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int32)


def _decode_binary_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % _RECORD:
        raise CIFAR10FormatError(f"{source}: size {len(data)} bytes is not a multiple of the {_RECORD}-byte CIFAR-10 record")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), records[:, 0].astype(np.int32)


def _decode_image(data: bytes | Path, source: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            if image.size != (32, 32):
                raise CIFAR10FormatError(f"{source}: image is {image.size[0]}x{image.size[1]}, expected 32x32")
            image.load()
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise CIFAR10FormatError(f"{source}: cannot read image ({error})") from error


def _take_batches(
    names: list[str], read, decode, limit: int | None, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes batches in order until `limit` images are there; `read(name) -> (bytes, source)`."""
    if limit == 0:
        return np.zeros((0, 3, 32, 32), np.uint8), np.zeros((0,), np.int32)
    images, labels, count = [], [], 0
    for name in names:
        if limit is not None and count >= limit:
            break
        data, where = read(name)
        x, y = decode(data, where)
        images.append(x)
        labels.append(y)
        count += len(y)
    images, labels = np.concatenate(images), np.concatenate(labels)
    return _apply_limit(images, labels, limit, source)


def _apply_limit(images, labels, limit, source):
    if limit is not None:
        if limit > len(labels):
            raise ValueError(f"{source}: limit={limit} but the split holds only {len(labels)} images")
        images, labels = images[:limit], labels[:limit]
    return np.ascontiguousarray(images), np.ascontiguousarray(labels)


def _interleave(files_by_class: dict[str, list[str]], classes: list[str]) -> list[tuple[str, int]]:
    """(file, label) in the interleaved order: file i of every class, for i = 0, 1, ..."""
    ordered = []
    columns = [sorted(files_by_class.get(c, [])) for c in classes]
    for i in range(max((len(c) for c in columns), default=0)):
        for label, files in enumerate(columns):
            if i < len(files):
                ordered.append((files[i], label))
    return ordered


def _decode_images(items: list[tuple[str, int]], read, limit, source) -> tuple[np.ndarray, np.ndarray]:
    if limit is not None:
        if limit > len(items):
            raise ValueError(f"{source}: limit={limit} but the split holds only {len(items)} images")
        items = items[:limit]
    images = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    for i, (name, _) in enumerate(items):
        data, where = read(name)
        images[i] = _decode_image(data, where)
    labels = np.fromiter((label for _, label in items), dtype=np.int32, count=len(items))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


# ----------------------------------------------------------------------------- directory sources


def _is_image(name: str) -> bool:
    """An image file name; hidden files (such as macOS `._*` resource forks in archives) are not."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _image_root_splits(root: Path) -> dict[str, Path]:
    """The split folders of `root` that contain at least one class folder with an image."""
    found = {}
    for split in SPLITS:
        folder = root / split
        if folder.is_dir():
            for cls in folder.iterdir():
                if cls.is_dir() and any(_is_image(f.name) for f in cls.iterdir() if f.is_file()):
                    found[split] = folder
                    break
    return found


@dataclass
class _Layout:
    kind: str  # "py" | "bin" | "images"
    root: Path


def _detect_directory(path: Path) -> _Layout:
    def batches(folder: Path) -> str | None:
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        if names & {"data_batch_1", "test_batch"}:
            return "py"
        if names & {"data_batch_1.bin", "test_batch.bin"}:
            return "bin"
        return None

    kind = batches(path)
    if kind:
        return _Layout(kind, path)
    for sub, kind in (("cifar-10-batches-py", "py"), ("cifar-10-batches-bin", "bin")):
        if batches(path / sub) == kind:
            return _Layout(kind, path / sub)
    if _image_root_splits(path):
        return _Layout("images", path)
    roots = [child for child in sorted(path.iterdir()) if child.is_dir() and _image_root_splits(child)]
    if len(roots) == 1:
        return _Layout("images", roots[0])
    if len(roots) > 1:
        raise CIFAR10FormatError(f"{path}: several image-folder roots ({', '.join(r.name for r in roots)}); pass one of them")
    if not any(path.iterdir()):
        raise CIFAR10FormatError(f"{path}: the folder is empty; {_EXPECTED}")
    raise CIFAR10FormatError(f"{path}: no recognised CIFAR-10 layout; {_EXPECTED}")


def _load_directory(path: Path, split: str, limit: int | None):
    layout = _detect_directory(path)
    root = layout.root
    if layout.kind in ("py", "bin"):
        names = (_PY_FILES if layout.kind == "py" else _BIN_FILES)[split]
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CIFAR10FormatError(f"{root}: split '{split}' is missing ({', '.join(missing)} not found)")
        decode = _decode_python_batch if layout.kind == "py" else _decode_binary_batch
        return _take_batches(names, lambda n: ((root / n).read_bytes(), str(root / n)), decode, limit, str(root))

    splits = _image_root_splits(root)
    if split not in splits:
        raise CIFAR10FormatError(f"{root}: split '{split}' is missing (no '{split}/<class>/*.png|jpg|jpeg'; found {sorted(splits)})")
    listing = {
        name: {c.name: [str(f) for f in c.iterdir() if _is_image(f.name) and f.is_file()] for c in folder.iterdir() if c.is_dir()}
        for name, folder in splits.items()
    }
    # labels: the class folders holding images in any split, sorted (as for archives)
    classes = sorted({c for by_class in listing.values() for c, files in by_class.items() if files})
    items = _interleave(listing[split], classes)
    return _decode_images(items, lambda n: (Path(n), n), limit, str(root))


# ----------------------------------------------------------------------------- archive sources

_SPLIT_OF_BATCH = {name: split for split, names in _PY_FILES.items() for name in names}
_SPLIT_OF_BATCH.update({name: split for split, names in _BIN_FILES.items() for name in names})


def _read_archive(path: Path) -> bytes:
    """The uncompressed bytes of a tar, tar.gz, tar.bz2 or tar.xz archive (held in memory)."""
    import bz2
    import gzip
    import lzma

    data = path.read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as error:
        raise CIFAR10FormatError(f"{path}: cannot decompress the archive ({error}); {_EXPECTED}") from error
    return data


def _index_archive(path: Path) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The uncompressed archive and its regular files as (name, data offset, size)."""
    raw = _read_archive(path)
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
            members = [(m.name, m.offset_data, m.size) for m in archive.getmembers() if m.isreg() and not m.issparse()]
    except tarfile.TarError as error:
        raise CIFAR10FormatError(f"{path}: not a readable tar archive ({error}); {_EXPECTED}") from error
    return raw, [(name.removeprefix("./"), start, size) for name, start, size in members]


def _load_archive(path: Path, split: str, limit: int | None):
    """Indexes the (decompressed, in-memory) archive, then reads only the members `split` needs."""
    raw, members = _index_archive(path)
    where = str(path)

    batch_members: dict[str, dict[str, tuple[int, int]]] = {"py": {}, "bin": {}}  # kind -> {name: (start, size)}
    images: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}  # root -> split -> {member: (start, size)}
    image_classes: dict[str, dict[str, set[str]]] = {}  # root -> split -> class folders
    for name, start, size in members:
        parts = name.split("/")
        base = parts[-1]
        if base in _SPLIT_OF_BATCH:
            batch_members["bin" if base.endswith(".bin") else "py"][name] = (start, size)
        elif _is_image(base) and len(parts) >= 3 and parts[-3] in SPLITS:
            root, folder = "/".join(parts[:-3]), parts[-3]
            image_classes.setdefault(root, {}).setdefault(folder, set()).add(parts[-2])
            images.setdefault(root, {}).setdefault(folder, {})[name] = (start, size)

    def read(name, table):
        start, size = table[name]
        return raw[start : start + size], f"{where}:{name}"

    for kind, names in (("py", _PY_FILES[split]), ("bin", _BIN_FILES[split])):
        found = batch_members[kind]
        if not found:
            continue
        folders = sorted({name.rpartition("/")[0] for name in found})
        if len(folders) > 1:
            raise CIFAR10FormatError(f"{where}: several CIFAR-10 batch folders in the archive ({', '.join(folders)})")
        prefix = folders[0] + "/" if folders[0] else ""
        wanted = [prefix + n for n in names]
        missing = [m for m in wanted if m not in found]
        if missing:
            raise CIFAR10FormatError(f"{where}: split '{split}' is missing ({', '.join(missing)} not in the archive)")
        decode = _decode_python_batch if kind == "py" else _decode_binary_batch
        return _take_batches(wanted, lambda m, found=found: read(m, found), decode, limit, where)

    if images:
        roots = sorted(images)
        if len(roots) > 1:
            raise CIFAR10FormatError(f"{where}: several image-folder roots in the archive ({', '.join(roots)})")
        root = roots[0]
        if split not in images[root]:
            raise CIFAR10FormatError(
                f"{where}: split '{split}' is missing (no '{root + '/' if root else ''}{split}/<class>/*.png|jpg|jpeg' in the archive)"
            )
        table = images[root][split]
        files: dict[str, list[str]] = {}
        for name in table:
            files.setdefault(name.split("/")[-2], []).append(name)
        classes = sorted(set().union(*image_classes[root].values()))
        return _decode_images(_interleave(files, classes), lambda m: read(m, table), limit, where)

    if not members:
        raise CIFAR10FormatError(f"{where}: the archive is empty; {_EXPECTED}")
    raise CIFAR10FormatError(f"{where}: no recognised CIFAR-10 layout in the archive; {_EXPECTED}")


# ----------------------------------------------------------------------------- public entry point


def load_cifar10(path: str | os.PathLike, split: str = "train", *, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads a CIFAR-10 split from local files (see the module docstring for layouts and order).

    **Arguments:**

    - `path`: a batches directory, an image-folder root, a directory containing one of them, or
      a tar archive of any of these.
    - `split`: `"train"` (50 000 images in the official sets) or `"test"` (10 000).
    - `limit`: keep only the first `limit` images (and read/decode no more than needed for
      batch formats and image folders on disk); `ValueError` if the split has fewer.

    **Returns:** `(images, labels)`, `uint8 (N, 3, 32, 32)` and `int32 (N,)`.

    **Raises:** `FileNotFoundError` (no such path), `CIFAR10FormatError` (no recognised layout,
    empty folder or archive, missing split, an image that is not 32x32, a corrupt batch),
    `UnsafePickleError` (a python batch that references a non-numpy global).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; {_EXPECTED}")
    if path.is_dir():
        return _load_directory(path, split, limit)
    return _load_archive(path, split, limit)


# ----------------------------------------------------------------------------- the official archive, on demand

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SIZE = 170_498_071


def _unavailable(path: Path, reason: str, url: str, md5: str, size: int | None) -> DataUnavailable:
    """The message of a missing CIFAR-10: what to put where, where to get it, the other layouts."""
    archive = path if path.name == CIFAR10_ARCHIVE else path.parent / CIFAR10_ARCHIVE
    point = "" if archive == path else "and set the notebook's `cifar10` parameter to it, "
    return DataUnavailable(
        f"CIFAR-10 is missing: {reason}.\n"
        f"Put the official archive {CIFAR10_ARCHIVE}{'' if size is None else f' ({size:,} bytes)'} at\n"
        f"    {archive}\n"
        f"{point}fetching it on a machine with internet access if this one has none:\n"
        f"    curl -O {url}\n"
        f"    md5sum {CIFAR10_ARCHIVE}    # must print {md5}\n"
        f"Or point `cifar10` at a copy in another layout; {_EXPECTED}.\n"
        f"Fetching a missing {CIFAR10_ARCHIVE} is on by default, off with {ENV_DOWNLOAD}=0 or download=False "
        f"(unset the variable or set it to 1 to turn it on); `make data` fetches it ahead into data/."
    )


def cifar10_source(
    path: str | os.PathLike,
    *,
    download: bool | None = None,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    size: int | None = CIFAR10_SIZE,
) -> Path:
    """The CIFAR-10 source at `path`, fetching the official archive there if it is missing.

    The notebooks pass their `cifar10` parameter (resolved against the repository root) and
    hand the result to `load_cifar10`. An existing `path` (any layout) is returned as is. A
    missing `path` named `cifar-10-python.tar.gz` is fetched from `url` (Krizhevsky's page,
    the address torchvision uses), its folder created, its MD5 and size checked
    (`diemlib.data.download.fetch`), unless fetching is off: `download=False`, or
    `download=None` and `DIEMLIB_DOWNLOAD=0`.

    **Raises:** `DataUnavailable` (a `FileNotFoundError`) when `path` is missing and was not
    fetched: fetching off, the server unreachable (one connect timeout, no retries), the fetch
    failed, or a name other than the official archive's. Its message names the file, the full
    path where to put it, its address and MD5, the other layouts, and the switch; a notebook
    shows it without a traceback.
    """
    path = Path(path).expanduser().absolute()
    if path.exists():
        return path
    if path.name != CIFAR10_ARCHIVE:
        raise _unavailable(path, f"{path} does not exist (only a missing {CIFAR10_ARCHIVE} is fetched)", url, md5, size)
    if not downloads_enabled(download):
        why = "download=False" if download is False else f"{ENV_DOWNLOAD}=0"
        raise _unavailable(path, f"{path} does not exist and fetching is off ({why})", url, md5, size)
    try:
        return fetch(url, path, md5=md5, size=size, desc=f"CIFAR-10 {CIFAR10_ARCHIVE}")
    except OSError as error:  # ServerUnreachable, another DownloadError, or a folder that cannot be written
        raise _unavailable(path, f"{path} does not exist and fetching it failed: {error}", url, md5, size) from error
