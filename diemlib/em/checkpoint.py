"""Checkpoints without pickle, and atomic writes.

A checkpoint is one file: a line of JSON (`{"diemlib_checkpoint": 1, "metadata": ...}`)
followed by the array leaves of a pytree, written by `eqx.tree_serialise_leaves`. Loading
needs a `like` tree of the same structure (e.g. from `eqx.filter_eval_shape`) and never runs
code from the file (docs/conventions.md, 'Departures from the reference').

Every write goes to a temporary file in the target's directory, is flushed to disk, then
renamed over the target with `os.replace`: a reader sees the old file or the new one, never
a partial one.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import equinox as eqx
from jaxtyping import PyTree

_FORMAT = 1


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike):
    """Yields a binary file that replaces `path` if and only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as an ordinary open() would: mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with _atomic_open(path) as f:
        f.write(text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save(path: str | os.PathLike, tree: PyTree, *, metadata: dict) -> None:
    """Saves the array leaves of `tree` and a JSON-serialisable `metadata` dict, atomically."""
    header = json.dumps({"diemlib_checkpoint": _FORMAT, "metadata": metadata})
    with _atomic_open(path) as f:
        f.write(header.encode("utf-8") + b"\n")
        eqx.tree_serialise_leaves(f, tree)


def _read_header(f: BinaryIO, path: Path) -> dict:
    try:
        header = json.loads(f.readline())
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("diemlib_checkpoint") != _FORMAT:
        raise ValueError(f"{path} is not a diemlib checkpoint (format {_FORMAT})")
    return header["metadata"]


def load(path: str | os.PathLike, like: PyTree) -> tuple[PyTree, dict]:
    """Loads a checkpoint written by [`save`][] into the structure of `like`.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a pytree with the saved structure; its array leaves may be
        `jax.ShapeDtypeStruct`s (`eqx.filter_eval_shape`) and give the expected shapes.

    **Returns:** `(tree, metadata)`.

    **Raises:** `FileNotFoundError` if there is no file, `ValueError` if it is not a
    checkpoint or does not match `like`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with path.open("rb") as f:
        metadata = _read_header(f, path)
        try:
            tree = eqx.tree_deserialise_leaves(f, like)
        except (RuntimeError, ValueError, EOFError) as e:
            raise ValueError(f"checkpoint {path} does not match `like`: {e}") from e
        if f.read(1):
            raise ValueError(f"checkpoint {path} has more leaves than `like`")
    return tree, metadata
