"""Fetching a published file (`diemlib.data.download`) and CIFAR-10 on demand, without the internet.

A local HTTP server on 127.0.0.1 (a port the OS picks) serves a small CIFAR-10 archive in the
binary-batch layout, written here, and misbehaves on request: it ignores `Range`, cuts the
connection half-way (announcing the full Content-Length), or answers 404. An unreachable
server is a closed port on 127.0.0.1.
"""

import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
import time

import numpy as np
import pytest

from diemlib.data import download
from diemlib.data.cifar10 import CIFAR10_ARCHIVE, cifar10_source, load_cifar10
from diemlib.data.download import DataUnavailable, DownloadError, ServerUnreachable, downloads_enabled, fetch, main

PER_BATCH = 4


def cifar10_archive() -> bytes:
    """A `.tar.gz` of CIFAR-10's binary layout: 5 training batches and a test batch, `PER_BATCH` images each."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            labels = rng.integers(0, 10, (PER_BATCH, 1), dtype=np.uint8)
            images = rng.integers(0, 256, (PER_BATCH, 3 * 32 * 32), dtype=np.uint8)
            data = np.concatenate([labels, images], axis=1).tobytes()
            member = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


CONTENT = cifar10_archive()
MD5 = hashlib.md5(CONTENT).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """`/ok` honours Range; `/norange` ignores it; `/cut-once...` cut the first response
    half-way, `/cut-always` every one; any other path is a 404."""

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.path not in ("/ok", "/norange", "/cut-once", "/cut-once-norange", "/cut-always"):
            self.send_error(404)
            return
        first = sum(path == self.path for path, _ in self.server.requests) == 1
        if self.path == "/cut-always" or (self.path.startswith("/cut-once") and first):
            self.send_response(200)
            self.send_header("Content-Length", str(len(CONTENT)))
            self.end_headers()
            self.wfile.write(CONTENT[: len(CONTENT) // 2])  # then the connection closes
            return
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if start and "norange" not in self.path:
            offset = int(start.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {offset}-{len(CONTENT) - 1}/{len(CONTENT)}")
            body = CONTENT[offset:]
        else:
            self.send_response(200)
            body = CONTENT
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(download, "RETRY_PAUSE", 0.0)
    monkeypatch.delenv(download.ENV_DOWNLOAD, raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- fetch


def test_fetch_places_the_checked_file_and_cifar10_loads_it(server, tmp_path):
    target = tmp_path / "data" / CIFAR10_ARCHIVE
    assert cifar10_source(target, url=server.url("/ok"), md5=MD5, size=len(CONTENT)) == target
    assert target.read_bytes() == CONTENT
    assert listing(target.parent) == [CIFAR10_ARCHIVE]  # no temporary file left
    images, labels = load_cifar10(target, "test")
    assert images.shape == (PER_BATCH, 3, 32, 32) and labels.shape == (PER_BATCH,)
    assert server.requests == [("/ok", None)]
    # there now: returned as is, no request
    assert cifar10_source(target, url=server.url("/ok"), md5=MD5) == target and len(server.requests) == 1


def test_wrong_checksum_keeps_nothing(server, tmp_path):
    target = tmp_path / CIFAR10_ARCHIVE
    with pytest.raises(DownloadError, match=f"MD5 {MD5} does not match the published 0+"):
        fetch(server.url("/ok"), target, md5="0" * 32)
    assert listing(tmp_path) == []


def test_wrong_announced_size_stops_before_reading(server, tmp_path):
    with pytest.raises(DownloadError, match=f"announces {len(CONTENT)} bytes, expected 7"):
        fetch(server.url("/ok"), tmp_path / "f", md5=MD5, size=7)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("path, second", [("/cut-once", "resumed"), ("/cut-once-norange", "restarted")])
def test_connection_cut_half_way_is_retried(server, tmp_path, path, second):
    target = tmp_path / "archive.tar.gz"
    assert fetch(server.url(path), target, md5=MD5, size=len(CONTENT)).read_bytes() == CONTENT
    assert server.requests == [(path, None), (path, f"bytes={len(CONTENT) // 2}-")]  # asks for the rest
    assert listing(tmp_path) == ["archive.tar.gz"]


def test_connection_cut_every_time_gives_up_and_keeps_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match="the connection dropped 3 times"):
        fetch(server.url("/cut-always"), tmp_path / "f", md5=MD5, retries=3)
    assert len(server.requests) == 3
    assert listing(tmp_path) == []


def test_http_404_is_a_clear_error_without_retries(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url("/gone"), tmp_path / "f", md5=MD5)
    assert len(server.requests) == 1
    assert listing(tmp_path) == []


def test_arguments_are_checked_before_any_request(server, tmp_path):
    with pytest.raises(ValueError, match="md5 must be 32 hex digits"):
        fetch(server.url("/ok"), tmp_path / "f", md5="c58f")
    with pytest.raises(ValueError, match="retries must be >= 1"):
        fetch(server.url("/ok"), tmp_path / "f", md5=MD5, retries=0)
    assert server.requests == [] and listing(tmp_path) == []


# ----------------------------------------------------------------------------- offline: the message


def assert_offline_message(error, target, url):
    message = str(error)
    assert isinstance(error, FileNotFoundError)
    assert f"\n    {target}\n" in message  # the full path where to put the file
    assert f"curl -O {url}" in message and MD5 in message
    assert "cifar-10-batches-py/" in message and "DIEMLIB_DOWNLOAD=0" in message


def test_downloads_turned_off_by_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DIEMLIB_DOWNLOAD", "0")
    target = tmp_path / "data" / CIFAR10_ARCHIVE
    with pytest.raises(DataUnavailable, match=r"fetching is off \(DIEMLIB_DOWNLOAD=0\)") as caught:
        cifar10_source(target, url=server.url("/ok"), md5=MD5)
    assert_offline_message(caught.value, target, server.url("/ok"))
    with pytest.raises(DataUnavailable, match=r"fetching is off \(download=False\)"):
        cifar10_source(target, download=False, url=server.url("/ok"), md5=MD5)
    assert server.requests == [] and not target.parent.exists()


def test_unreachable_server_gives_the_offline_message_fast(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/{CIFAR10_ARCHIVE}"
    target = tmp_path / "data" / CIFAR10_ARCHIVE
    start = time.perf_counter()
    with pytest.raises(DataUnavailable, match=f"fetching it failed: cannot reach {url}") as caught:
        cifar10_source(target, url=url, md5=MD5)
    assert time.perf_counter() - start < 5
    assert isinstance(caught.value.__cause__, ServerUnreachable)
    assert_offline_message(caught.value, target, url)
    assert listing(target.parent) == []


def test_a_failed_fetch_gives_the_same_message(server, tmp_path):
    target = tmp_path / CIFAR10_ARCHIVE
    with pytest.raises(DataUnavailable, match="fetching it failed: .*HTTP 404"):
        cifar10_source(target, url=server.url("/gone"), md5=MD5)
    assert listing(tmp_path) == []


def test_other_missing_paths_are_not_fetched(server, tmp_path):
    with pytest.raises(DataUnavailable, match="only a missing cifar-10-python.tar.gz is fetched") as caught:
        cifar10_source(tmp_path / "cifar10", url=server.url("/ok"), md5=MD5)
    assert f"\n    {tmp_path / CIFAR10_ARCHIVE}\nand set the notebook's `cifar10` parameter" in str(caught.value)
    assert server.requests == []


def test_notebooks_show_the_message_without_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("DIEMLIB_DOWNLOAD", "0")
    with pytest.raises(DataUnavailable) as caught:
        cifar10_source(tmp_path / CIFAR10_ARCHIVE)
    lines = caught.value._render_traceback_()
    assert lines == f"DataUnavailable: {caught.value}".splitlines()
    assert not any("Traceback" in line or "File " in line for line in lines)


def test_download_switch_accepts_only_0_and_1(monkeypatch):
    assert downloads_enabled() and not downloads_enabled(False)
    monkeypatch.setenv("DIEMLIB_DOWNLOAD", "0")
    assert not downloads_enabled() and downloads_enabled(True)
    monkeypatch.setenv("DIEMLIB_DOWNLOAD", "no")
    with pytest.raises(ValueError, match="DIEMLIB_DOWNLOAD='no': expected 0"):
        downloads_enabled()


# ----------------------------------------------------------------------------- make data


def test_make_data_refuses_when_downloads_are_off(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DIEMLIB_DOWNLOAD", "0")
    assert main(["--root", str(tmp_path)]) == 1
    assert "DIEMLIB_DOWNLOAD=0: downloads are turned off" in capsys.readouterr().err
    assert listing(tmp_path) == []


def test_make_data_keeps_what_is_there(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / CIFAR10_ARCHIVE).write_bytes(CONTENT)
    assert main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(already there)" in out and "ships with nilearn" in out
