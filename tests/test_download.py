"""dd.pipeline.download against a fake Hugging Face Hub on 127.0.0.1 (nothing here touches the network).

The fake Hub answers ``HEAD`` and ``GET`` of ``/{repo}/resolve/{revision}/{path}`` with the headers
``huggingface_hub.hf_hub_download`` reads (``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag``, ``X-Linked-Size``,
``Content-Length``; ``Range`` on a resumed body; ``X-Error-Code`` on a 404), and serves plain URLs under ``/plain/``.
Every test gets its own server, ``HF_ENDPOINT`` and Hugging Face cache (``HF_HOME`` under ``tmp_path``).
"""
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.file_download
import huggingface_hub.utils._http
import pytest

from dd.__main__ import main as cli_main
from dd.pipeline.download import (
    REGISTRY,
    SHIPPED_DIR,
    ChecksumError,
    DownloadError,
    ShippedRelease,
    UrlRelease,
    _record_in_lock,
    download,
    expected_sha256,
    read_lock,
    verify_file,
)

REPO = Path(__file__).resolve().parents[1]
GOOD = bytes(range(256)) * 200  # 51200 bytes, several read chunks
OTHER = b"another version " * 1000
C1 = hashlib.sha1(b"first commit").hexdigest()
C2 = hashlib.sha1(b"second commit").hexdigest()
FID = REGISTRY["fid_imagenet256"]   # a file in a sub-folder of its repository
VAE = REGISTRY["vae_var"]           # a file at the top of another repository


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The fake Hub
# ---------------------------------------------------------------------------------------------------------------

class Hub:
    """What the fake Hub serves and what it was asked (shared by the Hub server and its "CDN" server).

    ``plan[METHOD]`` scripts misbehaviour, one step per request of that method: "404", "500", "short" (a body shorter
    than the file, announced as such: a truncated answer), "drop" (the full length announced, half the body sent, the
    connection closed; a resumed request gets no body at all). ``always[METHOD]`` is repeated once the plan is empty.
    """

    def __init__(self):
        self.refs: dict[tuple[str, str], str] = {}            # (repo, branch) -> commit
        self.files: dict[tuple[str, str, str], bytes] = {}    # (repo, commit, path) -> bytes
        self.plain: dict[str, bytes] = {}                     # URL path -> bytes, for plain URLs
        self.blobs: dict[str, bytes] = {}                     # sha256 -> bytes, for the CDN
        self.plan: dict[str, list[str]] = {"GET": [], "HEAD": []}
        self.always: dict[str, str | None] = {"GET": None, "HEAD": None}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cdn: str | None = None  # set: a file's /resolve answers 302 to <cdn>/cdn/<sha256>, as the Hub does for LFS
        self.endpoint = ""
        self.servers: list[http.server.ThreadingHTTPServer] = []

    def publish(self, release, data: bytes, commit: str = C1, branch: str = "main") -> None:
        """``data`` as ``release``'s file at ``commit``, which ``branch`` then points to."""
        self.files[(release.repo, commit, release.path)] = data
        self.refs[(release.repo, branch)] = commit

    def plain_url(self, name: str) -> str:
        return f"{self.endpoint}/plain/{name}"

    def gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET"]

    def resolves(self) -> list[tuple[str, str]]:
        """(method, path) of the requests for Hub files."""
        return [(method, path) for method, path, _ in self.requests if "/resolve/" in path]

    def start(self) -> str:
        server = HubServer(self)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.servers.clear()


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: Hub):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.hub = hub

    def handle_error(self, request, client_address):
        # a client that gave up makes the handler's write fail; that is expected here
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._answer("HEAD")

    def do_GET(self):
        self._answer("GET")

    def _answer(self, method: str) -> None:
        hub: Hub = self.server.hub
        path = urllib.parse.unquote(self.path)
        hub.requests.append((method, path, self.headers.get("Range")))
        step = hub.plan[method].pop(0) if hub.plan[method] else hub.always[method]
        if step in ("404", "500"):
            return self._error(int(step))
        if path.startswith("/plain/"):
            data = hub.plain.get(path[len("/plain/"):])
            return self._error(404) if data is None else self._body(method, data, step, {})
        if path.startswith("/cdn/"):
            return self._body(method, hub.blobs[path[len("/cdn/"):]], step, {})
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not match or not any(repo == match[1] for repo, _ in hub.refs):
            return self._error(404, "RepoNotFound")
        repo, revision, file = match.groups()
        commit = hub.refs.get((repo, revision), revision)
        if not any(key[:2] == (repo, commit) for key in hub.files):
            return self._error(404, "RevisionNotFound")
        data = hub.files.get((repo, commit, file))
        headers = {"X-Repo-Commit": commit}
        if data is None:
            return self._error(404, "EntryNotFound", headers)
        etag = sha(data)  # an LFS file's ETag is its SHA-256
        headers.update({"ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if hub.cdn:
            hub.blobs[etag] = data
            self.send_response(302)
            for key, value in {**headers, "Location": f"{hub.cdn}/cdn/{etag}", "Content-Length": "0"}.items():
                self.send_header(key, value)
            self.end_headers()
            return
        self._body(method, data, step, headers)

    def _error(self, code: int, error_code: str | None = None, headers: dict | None = None) -> None:
        body = f"error {code}".encode()
        self.send_response(code)
        for key, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self, method: str, data: bytes, step: str | None, headers: dict) -> None:
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if method == "GET" else None
        if match:
            start = int(match[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        payload = data[start:]
        if step == "short":
            payload = payload[: len(payload) // 2]
        for key, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "HEAD":
            return
        if step == "drop":
            self.wfile.write(b"" if start else payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class _NoSleep:
    """The ``time`` module without its waits: the library sleeps 1 s or more between retries."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds):
        pass


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_guard = {"on": False}


def _refuse_the_network(event, args):
    """While a fake Hub runs, a connection or name lookup beyond loopback fails at once (a regression that reaches
    for the real Hub must fail the test fast, not touch the network)."""
    if not _guard["on"]:
        return
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        host = args[1][0]
    else:
        return
    host = host.decode() if isinstance(host, bytes) else host
    if host is not None and host not in _LOOPBACK:
        raise ConnectionRefusedError(f"test_download: no network beyond 127.0.0.1 ({event} {host})")


sys.addaudithook(_refuse_the_network)  # audit hooks cannot be removed; the guard is only on inside the fixture


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub, with HF_ENDPOINT pointing at it and a Hugging Face cache of this test's own; the library's waits
    between retries are skipped."""
    monkeypatch.setitem(_guard, "on", True)
    monkeypatch.setattr(huggingface_hub.file_download, "time", _NoSleep())
    monkeypatch.setattr(huggingface_hub.utils._http, "time", _NoSleep())
    hub = Hub()
    hub.endpoint = hub.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # independent of the environment pytest was started in (the library reads HF_HUB_OFFLINE at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # the library's telemetry fetches an "agent harness" list from its import-time endpoint (the real Hub) on the
    # first request of a process, and caches it in the real HF_HOME: not from a test
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    yield hub
    hub.stop()


def cache_dir(tmp_path) -> Path:
    return tmp_path / "hf_home" / "hub"


def files_in(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# Hub files: lock file, revision pinning, cache reuse
# ---------------------------------------------------------------------------------------------------------------

def test_first_download_records_sha_size_and_commit(hub, tmp_path):
    assert huggingface_hub.constants.ENDPOINT != hub.endpoint  # the endpoint can only come from the call-time read
    hub.publish(FID, GOOD)
    lock = tmp_path / "resources" / "downloads.lock.json"
    dest = download("fid_imagenet256", tmp_path / "ckpt" / FID.filename, lock_file=lock, progress=False)
    assert dest == tmp_path / "ckpt" / "statistic.pth" and dest.read_bytes() == GOOD
    assert files_in(dest.parent) == ["statistic.pth"]  # no temporary file left beside it
    entry = read_lock(lock)[FID.url]
    assert entry == {"name": "fid_imagenet256", "file": "statistic.pth", "sha256": sha(GOOD), "size": len(GOOD),
                     "commit": C1}
    assert expected_sha256("fid_imagenet256", lock) == sha(GOOD)
    assert [(m, p) for m, p, _ in hub.requests] == [
        ("HEAD", f"/{FID.repo}/resolve/main/{FID.path}"), ("GET", f"/{FID.repo}/resolve/main/{FID.path}")]
    # the file went through the cache named by HF_HOME (not the user's real cache), and shares its bytes with the
    # cached blob (a hard link: same filesystem) instead of a second copy
    cached = cache_dir(tmp_path) / "models--microsoft--distilled_decoding" / "snapshots" / C1 / FID.path
    assert cached.is_file() and cached.stat().st_ino == dest.stat().st_ino


def test_later_downloads_ask_for_the_locked_commit_and_reuse_the_cache(hub, tmp_path):
    hub.publish(FID, GOOD, C1)
    lock = tmp_path / "lock.json"
    dest = download("fid_imagenet256", tmp_path, lock_file=lock, progress=False)
    hub.publish(FID, OTHER, C2)  # main moves on
    hub.requests.clear()

    # warm cache: the locked commit is there, so no request at all
    dest.unlink()
    assert download("fid_imagenet256", tmp_path, lock_file=lock, progress=False).read_bytes() == GOOD
    assert hub.requests == []

    # the cache lost its snapshot entry but kept the blob: the server is asked about the locked commit, not main,
    # and the body is not downloaded again
    dest.unlink()
    repo_cache = cache_dir(tmp_path) / "models--microsoft--distilled_decoding"
    for link in (repo_cache / "snapshots").rglob("statistic.pth"):
        link.unlink()
    assert download("fid_imagenet256", tmp_path, lock_file=lock, progress=False).read_bytes() == GOOD
    assert [(m, p) for m, p, _ in hub.requests] == [("HEAD", f"/{FID.repo}/resolve/{C1}/{FID.path}")]
    assert read_lock(lock)[FID.url]["commit"] == C1


def test_locked_commit_is_fetched_on_a_cold_cache_after_main_moved(hub, tmp_path, monkeypatch):
    hub.publish(FID, GOOD, C1)
    lock = tmp_path / "lock.json"
    download("fid_imagenet256", tmp_path / "a", lock_file=lock, progress=False)
    hub.publish(FID, OTHER, C2)
    hub.requests.clear()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "another_machine"))  # a colleague's empty cache, same lock file
    dest = download("fid_imagenet256", tmp_path / "b" / "statistic.pth", lock_file=lock, progress=False)
    assert dest.read_bytes() == GOOD
    assert hub.gets() == [f"/{FID.repo}/resolve/{C1}/{FID.path}"]
    # without a lock file, main is what you get
    assert download("fid_imagenet256", tmp_path / "c" / "statistic.pth", progress=False).read_bytes() == OTHER


def test_existing_file_is_reused_without_network_and_checked_against_lock(hub, tmp_path):
    hub.publish(FID, GOOD)
    lock = tmp_path / "lock.json"
    dest = download("fid_imagenet256", tmp_path, lock_file=lock, progress=False)
    n = len(hub.requests)
    assert download("fid_imagenet256", dest, lock_file=lock, progress=False) == dest
    assert len(hub.requests) == n
    dest.unlink()  # (a hard link to the cached blob: rewriting it in place would damage the cache too)
    dest.write_bytes(b"corrupted on disk")
    with pytest.raises(ChecksumError, match="statistic.pth"):
        download("fid_imagenet256", dest, lock_file=lock, progress=False)
    assert len(hub.requests) == n
    # --force replaces it with a verified copy
    assert download("fid_imagenet256", dest, lock_file=lock, progress=False, force=True).read_bytes() == GOOD


def test_lock_entry_without_commit_gets_one(hub, tmp_path):
    """An entry written before commits were recorded: the digest is enforced and the commit added."""
    hub.publish(FID, GOOD)
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({FID.url: {"name": FID.name, "file": FID.filename, "sha256": sha(GOOD),
                                          "size": len(GOOD)}}))
    dest = tmp_path / "ckpt" / "statistic.pth"
    dest.parent.mkdir()
    dest.write_bytes(GOOD)
    assert download("fid_imagenet256", dest, lock_file=lock, progress=False).read_bytes() == GOOD
    assert read_lock(lock)[FID.url]["commit"] == C1 and read_lock(lock)[FID.url]["sha256"] == sha(GOOD)


def test_lfs_file_through_a_redirect_to_the_cdn(hub, tmp_path):
    """The Hub answers /resolve of an LFS file with a 302 to a CDN on another host, carrying the metadata."""
    hub.cdn = hub.start()
    hub.publish(VAE, GOOD)
    lock = tmp_path / "lock.json"
    dest = download("vae_var", tmp_path, lock_file=lock, progress=False)
    assert dest.read_bytes() == GOOD and read_lock(lock)[VAE.url]["commit"] == C1
    assert hub.gets() == [f"/cdn/{sha(GOOD)}"]


# ---------------------------------------------------------------------------------------------------------------
# Hub files: what goes wrong
# ---------------------------------------------------------------------------------------------------------------

def test_changed_file_on_the_server_is_a_checksum_error(hub, tmp_path, monkeypatch):
    hub.publish(FID, GOOD)
    lock = tmp_path / "lock.json"
    dest = download("fid_imagenet256", tmp_path / "ckpt" / "statistic.pth", lock_file=lock, progress=False)
    hub.publish(FID, OTHER, C1)  # same commit, other bytes: a bad mirror
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cold"))

    fresh = tmp_path / "fresh" / "statistic.pth"
    with pytest.raises(ChecksumError) as err:
        download("fid_imagenet256", fresh, lock_file=lock, progress=False)
    message = str(err.value)
    assert "statistic.pth" in message and sha(GOOD) in message and sha(OTHER) in message
    assert f"{hub.endpoint}/{FID.repo}/resolve/{C1}/{FID.path}" in message
    assert files_in(fresh.parent) == []  # neither the final name nor a temporary file
    # a forced re-download into the existing file fails the same way and leaves the good file in place
    with pytest.raises(ChecksumError):
        download("fid_imagenet256", dest, lock_file=lock, progress=False, force=True)
    assert dest.read_bytes() == GOOD and files_in(dest.parent) == ["statistic.pth"]
    assert read_lock(lock)[FID.url]["sha256"] == sha(GOOD)


def test_damaged_cache_copy_is_caught_and_force_downloads_it_again(hub, tmp_path):
    hub.publish(FID, GOOD)
    lock = tmp_path / "lock.json"
    dest = download("fid_imagenet256", tmp_path / "ckpt" / "statistic.pth", lock_file=lock, progress=False)
    dest.unlink()
    blob, = (cache_dir(tmp_path) / "models--microsoft--distilled_decoding" / "blobs").iterdir()
    blob.write_bytes(b"bit rot")
    with pytest.raises(ChecksumError, match="--force"):
        download("fid_imagenet256", dest, lock_file=lock, progress=False)
    assert not dest.exists()
    hub.requests.clear()
    assert download("fid_imagenet256", dest, lock_file=lock, progress=False, force=True).read_bytes() == GOOD
    assert hub.gets() == [f"/{FID.repo}/resolve/{C1}/{FID.path}"]


def test_truncated_answer_is_a_download_error(hub, tmp_path):
    hub.publish(FID, GOOD)
    hub.plan["GET"] = ["short"]
    lock = tmp_path / "lock.json"
    dest = tmp_path / "ckpt" / "statistic.pth"
    with pytest.raises(DownloadError) as err:
        download("fid_imagenet256", dest, lock_file=lock, progress=False)
    message = str(err.value)
    assert "fid_imagenet256" in message and f"{hub.endpoint}/{FID.repo}/resolve/main/{FID.path}" in message
    assert str(len(GOOD)) in message and str(len(GOOD) // 2) in message  # the size it should have and had
    assert not dest.exists() and files_in(dest.parent) == [] and not lock.exists()
    blobs = cache_dir(tmp_path) / "models--microsoft--distilled_decoding" / "blobs"
    assert files_in(blobs) == []  # the library kept nothing half-written either


def test_dropped_connection_is_retried(hub, tmp_path):
    # (the library resumes with a Range request only past its 10 MB read chunks; this file is smaller, so the
    # second request starts over: either way the result must be whole)
    hub.publish(FID, GOOD)
    hub.plan["GET"] = ["drop"]
    dest = download("fid_imagenet256", tmp_path, progress=False)
    assert dest.read_bytes() == GOOD and len(hub.gets()) == 2


def test_connection_that_keeps_dropping_is_a_bounded_download_error(hub, tmp_path):
    hub.publish(FID, GOOD)
    hub.always["GET"] = "drop"
    dest = tmp_path / "ckpt" / "statistic.pth"
    with pytest.raises(DownloadError, match=re.escape(f"{hub.endpoint}/{FID.repo}/resolve/main/{FID.path}")):
        download("fid_imagenet256", dest, progress=False)
    assert 2 <= len(hub.gets()) <= 10
    assert files_in(dest.parent) == []


def test_server_error_is_retried(hub, tmp_path):
    hub.publish(FID, GOOD)
    hub.plan["HEAD"] = ["500", "500"]
    assert download("fid_imagenet256", tmp_path, progress=False).read_bytes() == GOOD


def test_server_that_never_succeeds_gives_a_bounded_clear_error(hub, tmp_path):
    hub.publish(FID, GOOD)
    hub.always["HEAD"] = "500"
    with pytest.raises(DownloadError) as err:
        download("fid_imagenet256", tmp_path / "ckpt" / "statistic.pth", progress=False)
    assert "500" in str(err.value) and f"{FID.repo}/resolve/main/{FID.path}" in str(err.value)
    assert len(hub.requests) <= 10 and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("what", ["file", "repository"])
def test_404_names_the_url(hub, tmp_path, what):
    if what == "file":
        hub.publish(VAE, GOOD)  # the repository exists, var_d16.pth is not in it
    with pytest.raises(DownloadError) as err:
        download("var_d16", tmp_path / "var_d16.pth", progress=False)
    message = str(err.value)
    assert f"{hub.endpoint}/FoundationVision/var/resolve/main/var_d16.pth" in message and "404" in message
    assert "var_d16" in message and not (tmp_path / "var_d16.pth").exists()


def test_offline_with_a_warm_cache_needs_no_server(hub, tmp_path, monkeypatch):
    hub.publish(FID, GOOD)
    lock = tmp_path / "lock.json"
    dest = download("fid_imagenet256", tmp_path / "ckpt" / "statistic.pth", lock_file=lock, progress=False)
    hub.stop()
    n = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest.unlink()
    assert download("fid_imagenet256", dest, lock_file=lock, progress=False).read_bytes() == GOOD  # locked commit
    dest.unlink()
    assert download("fid_imagenet256", dest, progress=False).read_bytes() == GOOD  # no lock: the cached main
    assert len(hub.requests) == n


def test_offline_with_a_cold_cache_is_a_clear_error(hub, tmp_path, monkeypatch):
    hub.publish(FID, GOOD)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "ckpt" / "statistic.pth"
    with pytest.raises(DownloadError) as err:
        download("fid_imagenet256", dest, lock_file=tmp_path / "lock.json", progress=False)
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "fid_imagenet256" in message and str(cache_dir(tmp_path)) in message
    assert f"{hub.endpoint}/{FID.repo}/resolve/main/{FID.path}" in message
    assert hub.requests == [] and not dest.exists()
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        download(hub.plain_url("w.pt"), tmp_path / "w.pt", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Plain URLs
# ---------------------------------------------------------------------------------------------------------------

def test_plain_url_with_pinned_digest_and_directory_destination(hub, tmp_path):
    hub.plain["named.pt"] = GOOD
    (tmp_path / "weights").mkdir()
    dest = download(hub.plain_url("named.pt"), tmp_path / "weights", sha256=sha(GOOD), progress=False)
    assert dest == tmp_path / "weights" / "named.pt" and dest.read_bytes() == GOOD
    assert files_in(tmp_path / "weights") == ["named.pt"]
    assert hub.requests == [("GET", "/plain/named.pt", None)]  # no Hub metadata call for a plain URL


def test_plain_url_pinned_digest_rejects_corrupt_bytes(hub, tmp_path):
    hub.plain["file.bin"] = GOOD[:-1] + b"\x00"
    with pytest.raises(ChecksumError) as err:
        download(hub.plain_url("file.bin"), tmp_path / "out" / "file.bin", sha256=sha(GOOD), progress=False)
    message = str(err.value)
    assert hub.plain_url("file.bin") in message and "file.bin" in message
    assert sha(GOOD) in message and sha(hub.plain["file.bin"]) in message
    assert files_in(tmp_path / "out") == []


def test_plain_url_lock_file_records_then_refuses_changed_bytes(hub, tmp_path):
    hub.plain["file.bin"] = GOOD
    url = hub.plain_url("file.bin")
    lock = tmp_path / "resources" / "downloads.lock.json"
    dest = download(url, tmp_path / "file.bin", lock_file=lock, progress=False)
    assert read_lock(lock)[url] == {"name": url, "file": "file.bin", "sha256": sha(GOOD), "size": len(GOOD)}
    assert expected_sha256(url, lock) == sha(GOOD)

    hub.plain["file.bin"] = b"tampered" + GOOD[8:]
    with pytest.raises(ChecksumError, match=sha(GOOD)):
        download(url, dest, lock_file=lock, force=True, progress=False)
    assert dest.read_bytes() == GOOD
    with pytest.raises(ChecksumError):
        download(url, tmp_path / "other" / "file.bin", lock_file=lock, progress=False)
    assert files_in(tmp_path / "other") == []
    assert read_lock(lock)[url]["sha256"] == sha(GOOD)

    n = len(hub.requests)  # an existing verified file needs no network
    assert download(url, dest, lock_file=lock, progress=False) == dest and len(hub.requests) == n


def test_plain_url_truncated_and_404(hub, tmp_path):
    # (a plain URL has no metadata call: a body that is short *and announced so* is caught by the digest only)
    hub.plain["file.bin"] = GOOD
    hub.always["GET"] = "drop"
    with pytest.raises(DownloadError, match=re.escape(hub.plain_url("file.bin"))):
        download(hub.plain_url("file.bin"), tmp_path / "out" / "file.bin", progress=False)
    assert files_in(tmp_path / "out") == []
    with pytest.raises(DownloadError) as err:
        download(hub.plain_url("missing.bin"), tmp_path / "out" / "missing.bin", progress=False)
    assert hub.plain_url("missing.bin") in str(err.value) and "404" in str(err.value)
    hub.always["GET"] = "short"
    with pytest.raises(ChecksumError, match="file.bin"):
        download(hub.plain_url("file.bin"), tmp_path / "out" / "file.bin", sha256=sha(GOOD), progress=False)
    assert files_in(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------------------------
# Command line, progress bar, concurrent lock-file updates
# ---------------------------------------------------------------------------------------------------------------

def test_cli_downloads_a_registry_name_in_a_subprocess(hub, tmp_path):
    hub.publish(FID, GOOD)
    dest, lock = tmp_path / "resources" / "checkpoints", tmp_path / "resources" / "downloads.lock.json"
    r = subprocess.run([sys.executable, "-m", "dd", "download", "fid_imagenet256", "--dest", str(dest),
                        "--lock", str(lock), "--no-progress"], cwd=REPO, env=dict(os.environ),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (dest / "statistic.pth").read_bytes() == GOOD and f"fid_imagenet256: {dest / 'statistic.pth'}" in r.stdout
    assert read_lock(lock)[FID.url]["commit"] == C1
    assert "%|" not in r.stderr
    assert hub.resolves() == [("HEAD", f"/{FID.repo}/resolve/main/{FID.path}"),
                              ("GET", f"/{FID.repo}/resolve/main/{FID.path}")]


def test_progress_bar_on_stderr_unless_no_progress(hub, tmp_path, capsys):
    hub.publish(FID, GOOD)
    hub.publish(VAE, GOOD)
    assert cli_main(["download", "fid_imagenet256", "--dest", str(tmp_path), "--no-lock"]) == 0
    err = capsys.readouterr().err
    assert "statistic.pth" in err and "100%|" in err
    assert cli_main(["download", "vae_var", "--dest", str(tmp_path), "--no-lock", "--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err
    # plain URLs too
    hub.plain["w.pt"] = GOOD
    download(hub.plain_url("w.pt"), tmp_path, progress=True)
    assert "w.pt" in (err := capsys.readouterr().err) and "100%|" in err


def test_cli_lists_registry_and_rejects_unknown_names(capsys, tmp_path):
    assert cli_main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY) and "revision:   main" in out
    assert cli_main(["download", "no_such_release", "--dest", str(tmp_path)]) == 2
    assert "no_such_release" in capsys.readouterr().err


def test_cli_failure_exits_1_with_the_error(hub, tmp_path, capsys):
    assert cli_main(["download", "var_d16", "--dest", str(tmp_path), "--no-lock", "--no-progress"]) == 1
    assert "var_d16" in capsys.readouterr().err


_WORKER = """
import sys, time
from pathlib import Path
from dd.pipeline.download import download
tag, lock, endpoint, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(lock.parent / f"ready-{tag}").touch()
while not (lock.parent / "go").exists():
    time.sleep(0.005)
for i in range(n):
    download(f"{endpoint}/plain/{tag}-{i}.bin", lock.parent / tag, lock_file=lock, progress=False)
"""


def test_two_processes_updating_the_lock_file_both_end_up_recorded(hub, tmp_path):
    n = 15
    for tag in "ab":
        for i in range(n):
            hub.plain[f"{tag}-{i}.bin"] = f"{tag}{i}".encode() * 100
    lock = tmp_path / "lock.json"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, tag, str(lock), hub.endpoint, str(n)], cwd=REPO,
                              env=dict(os.environ), stderr=subprocess.PIPE, text=True) for tag in "ab"]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{tag}").exists() for tag in "ab") and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both start writing at the same moment
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert sorted(read_lock(lock)) == sorted(hub.plain_url(f"{tag}-{i}.bin") for tag in "ab" for i in range(n))


# ---------------------------------------------------------------------------------------------------------------
# Verification helper and registry
# ---------------------------------------------------------------------------------------------------------------

def test_lock_file_keeps_the_first_record(tmp_path):
    lock = tmp_path / "lock.json"
    _record_in_lock(lock, FID, sha(GOOD), len(GOOD))
    _record_in_lock(lock, FID, sha(GOOD), len(GOOD), C1)  # the commit is added to an entry without one
    _record_in_lock(lock, FID, sha(GOOD), len(GOOD), C2)  # but never replaced
    assert read_lock(lock)[FID.url]["commit"] == C1
    # another process recorded other bytes meanwhile: refused, naming the file and both digests
    with pytest.raises(ChecksumError, match=f"statistic.pth.*{sha(GOOD)}.*{sha(OTHER)}"):
        _record_in_lock(lock, FID, sha(OTHER), len(OTHER), C1)
    assert read_lock(lock)[FID.url]["sha256"] == sha(GOOD)


def test_verify_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(GOOD)
    assert verify_file(path, sha(GOOD), size=len(GOOD)) == sha(GOOD)
    assert verify_file(path) == sha(GOOD)
    with pytest.raises(ChecksumError, match="size mismatch"):
        verify_file(path, size=1)
    with pytest.raises(ChecksumError, match=sha(b"")):
        verify_file(path, sha(b""))
    with pytest.raises(DownloadError, match="does not exist"):
        verify_file(tmp_path / "missing.pt")


EXPECTED_HOSTS = (
    "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/",
    "https://huggingface.co/FoundationVision/var/resolve/main/",
    "https://huggingface.co/peizesun/llamagen_t2i/resolve/main/",   # LlamaGen's text-to-image checkpoints
    "https://huggingface.co/microsoft/distilled_decoding/resolve/main/",
)


def test_registry_is_consistent():
    assert {"llamagen_vq16", "llamagen_b", "llamagen_l", "vae_var", "var_d16", "var_d20", "var_d24", "dd_var_d16",
            "dd_var_d20", "dd_var_d24", "dd_llamagen_b", "dd_llamagen_l", "fid_imagenet256"} <= set(REGISTRY)
    urls = [r.url for r in REGISTRY.values()]
    assert len(set(urls)) == len(urls)
    for name, release in REGISTRY.items():
        assert release.name == name
        if isinstance(release, ShippedRelease):   # releases/tiny/: pinned by its lock file, in this checkout
            assert release.sha256 and release.url == (SHIPPED_DIR / release.filename).as_uri()
            continue
        if isinstance(release, UrlRelease):       # a file of a Git repository, at a commit the URL names
            assert re.fullmatch(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/.+", release.url)
            assert release.url.endswith("/" + release.filename) and release.description
            continue
        assert release.url.startswith(EXPECTED_HOSTS), release.url
        assert release.url.endswith("/" + release.filename)
        assert release.url == f"https://huggingface.co/{release.repo}/resolve/{release.revision}/{release.path}"
        assert release.sha256 is None  # none are published; the lock file pins them
        assert release.revision == "main"  # the lock file pins the commit
        assert release.nesting and release.description


def test_registry_urls_match_the_golden_readmes():
    from conftest import golden_dir

    text = "".join((golden_dir(family) / "README.md").read_text() for family in ("llamagen", "var"))
    text += (golden_dir("llamagen") / "manifest_gpt_t2i_xl.json").read_text()   # the text-to-image model's URLs
    for release in (r for r in REGISTRY.values() if not isinstance(r, (ShippedRelease, UrlRelease))):
        # the READMEs spell some URLs as "<base>/<file>" templates
        base = release.url[: -len(release.filename)]
        assert release.url in text or (base + "<file>" in text and release.filename in text), release.url


def test_shipped_files_are_obtained_like_releases_and_a_replaced_one_is_refused(tmp_path, monkeypatch):
    """The embedded default's teachers come through the same download path as released checkpoints: copied out of
    releases/tiny/ and checked against its lock; a replaced or damaged file gives an error naming it, and nothing is
    written under the final name."""
    import dd.pipeline.download as dl

    path = download("tiny_var_tokenizer", tmp_path / "a", lock_file=tmp_path / "lock.json", progress=False)
    assert path.read_bytes() == (SHIPPED_DIR / "tiny_var_tokenizer.safetensors").read_bytes()
    fake = tmp_path / "shipped"
    fake.mkdir()
    (fake / "tiny_var_tokenizer.safetensors").write_bytes(b"not the shipped file")
    monkeypatch.setattr(dl, "SHIPPED_DIR", fake)
    with pytest.raises(ChecksumError, match=r"tiny_var_tokenizer.*SHA-256 mismatch"):
        download("tiny_var_tokenizer", tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_a_shipped_file_read_in_place_is_checked_against_the_shipped_lock(tmp_path):
    """The tiny teachers' reports read the digits classifier straight from releases/tiny/ (not through the download
    rule): that file is checked against releases/tiny/lock.json too, a replaced one refused with both digests, one the
    lock does not list refused by name; files outside the folder are not the lock's business."""
    from dd.pipeline.download import check_shipped_file

    check_shipped_file(SHIPPED_DIR / "digits_classifier_16.safetensors")       # the shipped one passes
    shipped = tmp_path / "releases"
    shipped.mkdir()
    good = b"the shipped classifier"
    (shipped / "lock.json").write_text(json.dumps({"files": {"clf": {
        "file": "clf.safetensors", "sha256": hashlib.sha256(good).hexdigest(), "size": len(good)}}}))
    (shipped / "clf.safetensors").write_bytes(good)
    check_shipped_file(shipped / "clf.safetensors", shipped)
    (shipped / "clf.safetensors").write_bytes(b"the shipped classifieR")   # same size, other bytes
    with pytest.raises(ChecksumError, match=r"clf\.safetensors: SHA-256 mismatch \(expected by .*lock\.json\): expected "
                                            + hashlib.sha256(good).hexdigest()):
        check_shipped_file(shipped / "clf.safetensors", shipped)
    (shipped / "other.safetensors").write_bytes(good)
    with pytest.raises(DownloadError, match=r"other\.safetensors: a file in .* that .*lock\.json does not list"):
        check_shipped_file(shipped / "other.safetensors", shipped)
    (tmp_path / "elsewhere.pt").write_bytes(b"anything")
    check_shipped_file(tmp_path / "elsewhere.pt", shipped)
