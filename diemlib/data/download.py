"""Fetching a published file safely: `fetch(url, target, md5=...)`, and `make data`.

The data sets of the paper's image experiments (§5.2 and App. E: CIFAR-10) are published
archives with a known MD5. [`fetch`][] streams one to a temporary file beside the target,
with a [`diemlib.progress.progress`][] bar (bytes; a widget in JupyterLab, plain throttled lines
in a headless log), checks its MD5 (and size), and only then renames it into place with
`os.replace` (`diemlib.em.checkpoint`'s atomic writes). A dropped connection (reset, incomplete
read, timeout) is retried, resuming with an HTTP `Range` request where the server honours one
and restarting otherwise. Any failure raises [`DownloadError`][] and leaves nothing behind:
no target, no temporary file. A server that cannot be reached at all (no network, DNS, a
refused connection) raises [`ServerUnreachable`][] at once, after one connect timeout.

Fetching is on unless the environment variable `DIEMLIB_DOWNLOAD` is `0`
([`downloads_enabled`][]). Loaders that fetch on demand (`diemlib.data.cifar10.cifar10_source`)
raise [`DataUnavailable`][] when the file is missing and cannot be fetched: its message says
which file to put where and where to get it, and a Jupyter notebook shows that message alone,
without a traceback.

`python -m diemlib.data` (`make data`, [`main`][]) stages every data set the notebooks can
fetch into `data/` under the repository root. (Not `python -m diemlib.data.download`: the
package imports this module, so running it as `__main__` would make a second copy of it.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.std import tqdm

from ..em.checkpoint import _atomic_open
from ..progress import progress

__all__ = ["DataUnavailable", "DownloadError", "ENV_DOWNLOAD", "ServerUnreachable", "downloads_enabled", "fetch", "main"]

ENV_DOWNLOAD = "DIEMLIB_DOWNLOAD"
CHUNK = 1 << 20  # bytes per read
RETRY_PAUSE = 2.0  # the pause before retry k is k times this many seconds
# A dropped connection, retried: reset or refused, an incomplete or malformed response, a timeout.
_DROPPED = (ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError)


class DownloadError(OSError):
    """A fetch failed (HTTP error, wrong checksum or size, retries exhausted); nothing was left behind."""


class ServerUnreachable(DownloadError):
    """The server could not be reached at all (no network, DNS, refused connection, connect timeout)."""


class DataUnavailable(FileNotFoundError):
    """A data file is missing and was not fetched; the message says what to put where.

    IPython (a Jupyter notebook) renders an exception through its `_render_traceback_` when it
    has one: the notebook shows this message alone, not a traceback above it.
    """

    def _render_traceback_(self) -> list[str]:
        return f"{type(self).__name__}: {self}".splitlines()


def downloads_enabled(download: bool | None = None) -> bool:
    """Whether to fetch: `download` if given, else `DIEMLIB_DOWNLOAD` (`0` off; `1` or unset on)."""
    if download is not None:
        return bool(download)
    value = os.environ.get(ENV_DOWNLOAD, "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_DOWNLOAD}={value!r}: expected 0 (no downloads) or 1 (fetch missing data)")
    return value == "1"


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _resumes(response, offset: int) -> bool:
    """Whether `response` is the rest of the file from byte `offset` (a 206 with that range)."""
    content_range = response.headers.get("Content-Range", "")
    return response.status == 206 and re.match(rf"bytes {offset}-\d+/", content_range) is not None


def fetch(
    url: str,
    target: str | os.PathLike,
    *,
    md5: str,
    size: int | None = None,
    retries: int = 3,
    timeout: float = 15.0,
    desc: str | None = None,
) -> Path:
    """Downloads `url` to `target` (replacing it) once its MD5 (and size) are right.

    **Arguments:**

    - `url`: the file's address (`http`, `https`).
    - `target`: where it goes (its folder is created if needed). The bytes arrive in a
      temporary file in that folder, renamed to `target` only when complete and checked.
    - `md5`: the published MD5 (32 hex digits).
    - `size`: the published size in bytes, if known (checked too; the progress bar's total).
    - `retries`: attempts in all; after a dropped connection the next attempt resumes
      (HTTP `Range`) where the server allows it, else starts over.
    - `timeout`: seconds to connect and for each read.
    - `desc`: the progress bar's label (default: the target's name).

    **Returns:** `target` as a `Path`.

    **Raises:** `ServerUnreachable` if the first connection fails (no retries: no network);
    `DownloadError` for an HTTP error status, a wrong checksum or size, or `retries` dropped
    connections. Either way neither the target nor a temporary file is left.
    """
    target = Path(target)
    if not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise ValueError(f"md5 must be 32 hex digits, got {md5!r}")
    if size is not None and size < 0:
        raise ValueError(f"size must be a non-negative number of bytes or None, got {size}")
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")

    with _atomic_open(target) as file, contextlib.ExitStack() as stack:
        digest, received, bar = hashlib.md5(usedforsecurity=False), 0, None
        for attempt in range(1, retries + 1):
            headers = {"Range": f"bytes={received}-"} if received else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                    if received and not _resumes(response, received):  # the server sends it all again
                        file.seek(0)
                        file.truncate()
                        digest, received = hashlib.md5(usedforsecurity=False), 0
                    length = _content_length(response)
                    expected = None if length is None else received + length
                    if size is not None and expected is not None and expected != size:
                        raise DownloadError(f"{url}: the server announces {expected} bytes, expected {size}")
                    total = size if size is not None else expected
                    if bar is None:  # the first response: a bar from here on
                        bar = stack.enter_context(progress(total=total, desc=desc or target.name, unit="B",
                                                           unit_scale=True, unit_divisor=1024))
                    elif not received:
                        bar.reset(total=total)
                    while chunk := response.read(CHUNK):
                        file.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                    if expected is not None and received < expected:
                        raise http.client.IncompleteRead(b"", expected - received)
                break
            except urllib.error.HTTPError as error:
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
            except _DROPPED as error:
                reason = getattr(error, "reason", None) or error
                if isinstance(error, urllib.error.URLError) and attempt == 1:
                    raise ServerUnreachable(f"cannot reach {url}: {reason}") from None
                if attempt == retries:
                    raise DownloadError(
                        f"{url}: the connection dropped {retries} times, last after {received} bytes "
                        f"({type(error).__name__}: {reason})"
                    ) from None
                tqdm.write(f"{target.name}: connection dropped after {received} bytes ({reason}); "
                           f"retry {attempt} of {retries - 1}", file=sys.stderr)
                time.sleep(RETRY_PAUSE * attempt)
        if size is not None and received != size:
            raise DownloadError(f"{url}: got {received} bytes, expected {size}")
        if digest.hexdigest() != md5.lower():
            raise DownloadError(
                f"{url}: MD5 {digest.hexdigest()} does not match the published {md5.lower()} "
                "(a corrupted or changed file); nothing was kept"
            )
    return target


# ----------------------------------------------------------------------------- make data


def main(argv: list[str] | None = None) -> int:
    """`python -m diemlib.data` (`make data`): fetches what the notebooks can fetch into `data/`.

    Returns the exit status: 0 when everything is there, 1 when fetching is off or failed.
    """
    from ..workbook.runner import find_root
    from .cifar10 import CIFAR10_ARCHIVE, cifar10_source

    parser = argparse.ArgumentParser(
        prog="python -m diemlib.data",
        description="Fetch the data sets the notebooks can fetch (CIFAR-10) into DIR/data/, "
                    f"checking their MD5. {ENV_DOWNLOAD}=0 turns fetching off.",
    )
    parser.add_argument("--root", type=Path, metavar="DIR", help="repository root (default: found from the working directory)")
    args = parser.parse_args(argv)
    data = (args.root.resolve() if args.root else find_root()) / "data"
    if not downloads_enabled():
        print(f"{ENV_DOWNLOAD}=0: downloads are turned off; nothing fetched (unset it, or set it to 1, to fetch)",
              file=sys.stderr)
        return 1
    try:
        archive = data / CIFAR10_ARCHIVE
        present = archive.exists()
        cifar10_source(archive, download=True)
        print(f"CIFAR-10 (notebooks 03, 05): {archive}{' (already there)' if present else ''}")
    except DataUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    print("brain volume (notebook 04): nothing to fetch, its default template ships with nilearn")
    return 0
