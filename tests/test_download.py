"""dd.pipeline.download against a local HTTP server on 127.0.0.1 (nothing here touches the network)."""
import hashlib
import http.server
import json
import re
import sys
import threading
import time

import pytest

from dd.__main__ import main as cli_main
from dd.pipeline.download import REGISTRY, ChecksumError, DownloadError, download, expected_sha256, verify_file

GOOD = bytes(range(256)) * 200  # 51200 bytes, several read chunks of the server's writes
FAST = dict(backoff=0.01, timeout=5, progress=False)


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``body`` at any path, honouring ``Range: bytes=N-``; ``plan`` scripts misbehaviour, one step per
    request: "truncate" (half the body, then close), "500", "404", "ignore-range" (200 with the whole body),
    "stall" (sleep past the client timeout). ``always`` is a step repeated once ``plan`` is empty."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.body = GOOD
        self.plan: list[str] = []
        self.always: str | None = None
        self.requests: list[dict] = []  # headers of every request, in order

    def handle_error(self, request, client_address):
        # a client that gave up (timeout test) makes the handler's write fail; that is expected here
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def url(self, name="file.bin"):
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        server: FileServer = self.server
        server.requests.append(dict(self.headers, path=self.path))
        if self.path.startswith("/redirect/"):  # like the Hugging Face hub sending LFS files to its CDN
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        step = server.plan.pop(0) if server.plan else server.always
        body = server.body
        if step in ("500", "404"):
            self.send_error(int(step))
            return
        if step == "stall":
            time.sleep(0.5)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and step != "ignore-range":
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if step == "truncate":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_good_download_with_pinned_digest(server, tmp_path):
    dest = download(server.url(), tmp_path / "out" / "file.bin", sha256=sha(GOOD), **FAST)
    assert dest.read_bytes() == GOOD
    assert not dest.with_suffix(".bin.part").exists()
    assert "Range" not in server.requests[0]


def test_progress_bar_and_directory_destination(server, tmp_path, capsys):
    dest = download(server.url("named.pt"), tmp_path, backoff=0.01, timeout=5, progress=True)
    assert dest == tmp_path / "named.pt" and dest.read_bytes() == GOOD


def test_resume_after_truncated_response(server, tmp_path):
    server.plan = ["truncate"]
    dest = download(server.url(), tmp_path / "file.bin", sha256=sha(GOOD), **FAST)
    assert dest.read_bytes() == GOOD
    assert len(server.requests) == 2
    assert server.requests[1].get("Range") == f"bytes={len(GOOD) // 2}-"


def test_resume_through_a_redirect_keeps_the_range(server, tmp_path):
    server.plan = ["truncate"]  # redirects consume no step
    dest = download(server.url("redirect/file.bin"), tmp_path / "file.bin", sha256=sha(GOOD), **FAST)
    assert dest.read_bytes() == GOOD
    assert [(r["path"], r.get("Range")) for r in server.requests] == [
        ("/redirect/file.bin", None), ("/file.bin", None),
        ("/redirect/file.bin", f"bytes={len(GOOD) // 2}-"), ("/file.bin", f"bytes={len(GOOD) // 2}-")]


def test_restart_from_zero_when_server_ignores_range(server, tmp_path):
    part = tmp_path / "file.bin.part"
    part.write_bytes(GOOD[:1000])
    server.plan = ["ignore-range"]
    dest = download(server.url(), tmp_path / "file.bin", sha256=sha(GOOD), **FAST)
    assert server.requests[0].get("Range") == "bytes=1000-"
    assert dest.read_bytes() == GOOD and not part.exists()


def test_complete_part_left_by_a_crash_is_finished_without_body(server, tmp_path):
    (tmp_path / "file.bin.part").write_bytes(GOOD)  # crashed after the last byte, before the rename
    dest = download(server.url(), tmp_path / "file.bin", sha256=sha(GOOD), **FAST)
    assert dest.read_bytes() == GOOD and len(server.requests) == 1


def test_stale_part_of_another_version_is_redone_from_scratch(server, tmp_path):
    (tmp_path / "file.bin.part").write_bytes(b"x" * 1000)  # resumable, but wrong bytes
    dest = download(server.url(), tmp_path / "file.bin", sha256=sha(GOOD), **FAST)
    assert dest.read_bytes() == GOOD
    assert [r.get("Range") for r in server.requests] == ["bytes=1000-", None]


def test_pinned_digest_rejects_corrupt_bytes(server, tmp_path):
    server.body = GOOD[:-1] + b"\x00"
    with pytest.raises(ChecksumError) as err:
        download(server.url(), tmp_path / "file.bin", sha256=sha(GOOD), **FAST)
    message = str(err.value)
    assert server.url() in message and "file.bin" in message
    assert sha(GOOD) in message and sha(server.body) in message
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a .part


def test_lock_file_records_then_refuses_changed_bytes(server, tmp_path):
    lock = tmp_path / "resources" / "downloads.lock.json"
    dest = download(server.url(), tmp_path / "file.bin", lock_file=lock, **FAST)
    entry = json.loads(lock.read_text())[server.url()]
    assert entry["sha256"] == sha(GOOD) and entry["size"] == len(GOOD) and entry["file"] == "file.bin"
    assert expected_sha256(server.url(), lock) == sha(GOOD)

    server.body = b"tampered" + GOOD[8:]
    # a forced re-download fails verification and leaves the previous good file in place
    with pytest.raises(ChecksumError, match=sha(GOOD)):
        download(server.url(), dest, lock_file=lock, force=True, **FAST)
    assert dest.read_bytes() == GOOD and not dest.with_suffix(".bin.part").exists()
    # a fresh destination gets nothing under its final name
    with pytest.raises(ChecksumError):
        download(server.url(), tmp_path / "other" / "file.bin", lock_file=lock, **FAST)
    assert not (tmp_path / "other" / "file.bin").exists()
    assert json.loads(lock.read_text())[server.url()]["sha256"] == sha(GOOD)


def test_existing_file_is_reused_without_network_and_checked_against_lock(server, tmp_path):
    lock = tmp_path / "lock.json"
    dest = download(server.url(), tmp_path / "file.bin", lock_file=lock, **FAST)
    n = len(server.requests)
    assert download(server.url(), dest, lock_file=lock, **FAST) == dest
    assert len(server.requests) == n
    dest.write_bytes(b"corrupted on disk")
    with pytest.raises(ChecksumError, match="file.bin"):
        download(server.url(), dest, lock_file=lock, **FAST)
    assert len(server.requests) == n


def test_server_error_then_success_is_retried(server, tmp_path):
    server.plan = ["500", "500"]
    dest = download(server.url(), tmp_path / "file.bin", sha256=sha(GOOD), retries=3, **FAST)
    assert dest.read_bytes() == GOOD and len(server.requests) == 3


def test_timeout_is_retried(server, tmp_path):
    server.plan = ["stall"]
    dest = download(server.url(), tmp_path / "file.bin", sha256=sha(GOOD), retries=2, backoff=0.01, timeout=0.2,
                    progress=False)
    assert dest.read_bytes() == GOOD and len(server.requests) == 2


def test_server_that_never_succeeds_gives_a_bounded_clear_error(server, tmp_path):
    server.always = "500"
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(server.url(), tmp_path / "file.bin", retries=3, **FAST)
    assert time.monotonic() - start < 5
    assert len(server.requests) == 4
    assert server.url() in str(err.value) and "4 attempts" in str(err.value) and "500" in str(err.value)
    assert not (tmp_path / "file.bin").exists()


def test_persistent_truncation_keeps_the_part_for_later(server, tmp_path):
    server.always = "truncate"
    with pytest.raises(DownloadError, match="short read"):
        download(server.url(), tmp_path / "file.bin", retries=1, **FAST)
    assert not (tmp_path / "file.bin").exists()
    assert (tmp_path / "file.bin.part").stat().st_size == len(GOOD) * 3 // 4  # half, then half of the rest


def test_client_error_is_not_retried(server, tmp_path):
    server.always = "404"
    with pytest.raises(DownloadError, match="404"):
        download(server.url(), tmp_path / "file.bin", retries=3, **FAST)
    assert len(server.requests) == 1


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


def test_cli_downloads_url_and_lists_registry(server, tmp_path, capsys):
    lock = tmp_path / "lock.json"
    args = ["download", server.url("cli.pt"), "--dest", str(tmp_path / "ckpt"), "--lock", str(lock),
            "--no-progress", "--backoff", "0.01"]
    assert cli_main(args) == 0
    assert (tmp_path / "ckpt" / "cli.pt").read_bytes() == GOOD
    assert server.url("cli.pt") in json.loads(lock.read_text())
    assert cli_main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY)
    assert cli_main(["download", "no_such_release", "--dest", str(tmp_path)]) == 2
    assert "no_such_release" in capsys.readouterr().err


EXPECTED_HOSTS = (
    "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/",
    "https://huggingface.co/FoundationVision/var/resolve/main/",
    "https://huggingface.co/microsoft/distilled_decoding/resolve/main/",
)


def test_registry_is_consistent():
    assert {"llamagen_vq16", "llamagen_b", "llamagen_l", "vae_var", "var_d16", "var_d20", "var_d24", "dd_var_d16",
            "dd_var_d20", "dd_var_d24", "dd_llamagen_b", "dd_llamagen_l", "fid_imagenet256"} <= set(REGISTRY)
    urls = [r.url for r in REGISTRY.values()]
    assert len(set(urls)) == len(urls)
    for name, release in REGISTRY.items():
        assert release.name == name
        assert release.url.startswith(EXPECTED_HOSTS), release.url
        assert release.url.endswith("/" + release.filename)
        assert release.sha256 is None  # none are published; the lock file pins them
        assert release.nesting and release.description


def test_registry_urls_match_the_golden_readmes():
    from conftest import golden_dir

    text = "".join((golden_dir(family) / "README.md").read_text() for family in ("llamagen", "var"))
    for release in REGISTRY.values():
        # the READMEs spell some URLs as "<base>/<file>" templates
        base = release.url[: -len(release.filename)]
        assert release.url in text or (base + "<file>" in text and release.filename in text), release.url
