"""Released checkpoints and a robust downloader for them.

``REGISTRY`` lists every file the project can fetch (teachers, tokenizers, DD students, the FID statistic) with
the URL the original READMEs give. None of those READMEs publishes a checksum, so integrity rests on a lock
file: the first download records each file's SHA-256 and size, and every later download or check of the same
URL must reproduce them (trust on first use, like a package lock file).

``download`` uses only urllib (plus tqdm for the progress bar) and is built to survive flaky multi-GB transfers:

* the bytes go to ``<dest>.part``; a restart asks for the rest with ``Range: bytes=N-`` and appends if the
  server answers 206 (it starts over on a plain 200);
* connection errors, timeouts, 5xx/429 answers and short bodies are retried with exponential backoff;
* the finished ``.part`` is hashed, checked against the pinned digest or the lock file, fsynced and only then
  renamed over ``dest`` with ``os.replace``, so the final name never holds a partial or unverified file;
* an existing ``dest`` that verifies is reused without touching the network.

Command line: ``python -m dd download NAME... --dest DIR [--lock FILE]``; ``--list`` prints the registry.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from dd import __version__
from dd.families.base import Release
from dd.families.registry import FAMILIES
from dd.io import fsync_dir, sha256_file

DEFAULT_LOCK_FILE = Path("resources/downloads.lock.json")
CHUNK_BYTES = 1 << 20
USER_AGENT = f"distilled-decoding/{__version__} (python-urllib)"


# ---------------------------------------------------------------------------------------------------------------
# Registry of released files
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UrlRelease:
    """A file given by a plain https URL in the config (e.g. pinned feature-extractor weights)."""

    name: str
    filename: str
    url: str
    sha256: str | None = None
    nesting: str = ""
    description: str = ""


# the released files of every family, and the FID statistic of the DD evaluation
_FID_STATISTIC = Release("fid_imagenet256", "microsoft/distilled_decoding", "ImageNet-256_FID_Statistic/statistic.pth",
                         "ImageNet-256 reference statistic for FID, as used by the DD evaluation scripts",
                         '{"m": mean (2048,), "s": covariance (2048, 2048)} of Inception pool3 features')
_RELEASES = [*(r for f in FAMILIES.values() for r in f.releases), _FID_STATISTIC]
REGISTRY: dict[str, Release] = {r.name: r for r in _RELEASES}
assert len(REGISTRY) == len(_RELEASES), "duplicate release name"


def resolve(url_or_name: str) -> Release:
    """A registry entry by short name, or an ad-hoc entry for a plain http(s) URL."""
    if url_or_name in REGISTRY:
        return REGISTRY[url_or_name]
    parsed = urllib.parse.urlparse(url_or_name)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        filename = Path(urllib.parse.unquote(parsed.path)).name
        if not filename:
            raise DownloadError(f"cannot derive a file name from URL {url_or_name!r}")
        return UrlRelease(name=url_or_name, filename=filename, url=url_or_name)
    raise DownloadError(f"unknown release {url_or_name!r}: not a registry name ({', '.join(REGISTRY)}) "
                        "and not an http(s) URL")


# ---------------------------------------------------------------------------------------------------------------
# Errors and verification
# ---------------------------------------------------------------------------------------------------------------

class DownloadError(RuntimeError):
    """A download or verification failed; the message names the URL and/or file and what was expected."""


class ChecksumError(DownloadError):
    """A file's SHA-256 (or size) differs from the pinned or locked one."""


class _RetryableError(Exception):
    """A failure worth another attempt (network trouble, 5xx, short body); never escapes this module."""


def verify_file(path: str | os.PathLike, sha256: str | None = None, *, size: int | None = None,
                source: str = "") -> str:
    """Check ``path`` against an expected size and SHA-256 (either may be None); return its actual digest.

    Raises ``ChecksumError`` naming the file, the expected and the actual value. ``source`` (a URL or lock file)
    only makes the message more useful.
    """
    path = Path(path)
    if not path.is_file():
        raise DownloadError(f"{path}: file does not exist")
    where = f" (expected by {source})" if source else ""
    if size is not None and path.stat().st_size != size:
        raise ChecksumError(f"{path}: size mismatch{where}: expected {size} bytes, found {path.stat().st_size}")
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256.lower():
        raise ChecksumError(f"{path}: SHA-256 mismatch{where}: expected {sha256.lower()}, got {actual}")
    return actual


# ---------------------------------------------------------------------------------------------------------------
# Lock file: URL -> {name, file, sha256, size}
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Serialise read-modify-write of the lock file between processes (parallel pipeline jobs).

    The lock is taken on a hidden sibling because the JSON itself is replaced atomically (a new inode each time).
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file.parent / f".{lock_file.name}.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def read_lock(lock_file: str | os.PathLike | None) -> dict[str, dict]:
    if lock_file is None or not Path(lock_file).is_file():
        return {}
    try:
        entries = json.loads(Path(lock_file).read_text())
    except json.JSONDecodeError as e:
        raise DownloadError(f"lock file {lock_file} is not valid JSON: {e}") from e
    if not isinstance(entries, dict):
        raise DownloadError(f"lock file {lock_file} must hold a JSON object (URL -> entry)")
    return entries


def expected_sha256(url_or_name: str, lock_file: str | os.PathLike | None = None) -> str | None:
    """The digest a file must have: pinned in the registry, else recorded in the lock file, else None."""
    release = resolve(url_or_name)
    if release.sha256:
        return release.sha256
    return read_lock(lock_file).get(release.url, {}).get("sha256")


def _record_in_lock(lock_file: Path, release: Release, sha256: str, size: int) -> None:
    """Add an entry (first download wins); refuse to overwrite a different recorded digest."""
    with _exclusive(lock_file):
        entries = read_lock(lock_file)
        old = entries.get(release.url)
        if old is not None:
            if old.get("sha256") != sha256:
                raise ChecksumError(f"{release.filename}: lock file {lock_file} already records SHA-256 "
                                    f"{old.get('sha256')} for {release.url}, refusing to record {sha256}")
            return
        entries[release.url] = {"name": release.name, "file": release.filename, "sha256": sha256, "size": size}
        fd, tmp = tempfile.mkstemp(prefix=f".{lock_file.name}.", suffix=".tmp", dir=lock_file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, lock_file)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(lock_file.parent)


# ---------------------------------------------------------------------------------------------------------------
# HTTP transfer
# ---------------------------------------------------------------------------------------------------------------

def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) into (START, TOTAL); unknown parts are None."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _is_retryable_status(code: int) -> bool:
    return code >= 500 or code in (408, 425, 429)


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    """One HTTP request that brings ``part`` closer to the whole file.

    Resumes from the current size of ``part`` if the server honours the range, otherwise starts over.
    Returns once ``part`` holds a body of the announced length; raises ``_RetryableError`` otherwise.
    """
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    # identity encoding: byte offsets must refer to the file itself, not to a compressed stream.
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing left after `offset`: either the part is already complete (a crash between the last byte
            # and the rename) or it is longer than the file (a stale part of another version).
            _, total = _content_range(e.headers.get("Content-Range"))
            if total == offset:
                return
            part.unlink()
            raise _RetryableError(f"HTTP 416 for a range from byte {offset}; discarded the partial file") from e
        if _is_retryable_status(e.code):
            raise _RetryableError(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _RetryableError(f"cannot connect: {getattr(e, 'reason', e)}") from e

    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _RetryableError(f"server resumed at byte {start}, asked for {offset}; starting over")
            mode = "ab"
        else:  # 200: the server ignored (or was not sent) the range, so the body is the whole file.
            offset, mode, total = 0, "wb", None
        body_length = response.headers.get("Content-Length")
        body_length = int(body_length) if body_length is not None else None
        if total is None and body_length is not None:
            total = offset + body_length

        received = 0
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=part.name[: -len(".part")],
                                          disable=not progress, leave=False) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (http.client.HTTPException, OSError) as e:
                    raise _RetryableError(f"connection lost after {offset + received} bytes: {e!r}") from e
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    # urllib does not always complain when the peer closes early; count the bytes ourselves.
    if body_length is not None and received != body_length:
        raise _RetryableError(f"short read: got {received} of {body_length} bytes (from byte {offset})")
    if total is not None and part.stat().st_size != total:
        raise _RetryableError(f"partial file has {part.stat().st_size} bytes, the server announced {total}")


def _fetch_with_retries(url: str, part: Path, *, retries: int, backoff: float, timeout: float,
                        progress: bool) -> None:
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout=timeout, progress=progress)
            return
        except _RetryableError as e:
            if attempt == retries:
                kept = f"; {part.stat().st_size} bytes kept in {part} for a later resume" if part.exists() else ""
                raise DownloadError(f"{url}: giving up after {retries + 1} attempts, last error: {e}{kept}") from e
            wait = backoff * 2 ** attempt
            print(f"download {url}: {e}; retry {attempt + 1}/{retries} in {wait:.2f}s", file=sys.stderr)
            time.sleep(wait)


def download(url_or_name: str, dest: str | os.PathLike, *, sha256: str | None = None,
             lock_file: str | os.PathLike | None = None, retries: int = 5, backoff: float = 1.0,
             timeout: float = 60, progress: bool = True, force: bool = False) -> Path:
    """Fetch a registry release (by short name) or a URL to ``dest`` and return the verified path.

    ``dest`` is the final file path, or an existing directory to put the release's file name in.
    ``sha256`` pins the digest (overrides the registry's). With ``lock_file``, an unpinned digest is recorded
    on first download and enforced afterwards. ``retries`` extra attempts follow the first, waiting
    ``backoff * 2**k`` seconds. An existing verified ``dest`` is returned without network unless ``force``;
    with ``force`` the old file stays in place until the new one has been verified.
    """
    release = resolve(url_or_name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / release.filename
    lock_file = Path(lock_file) if lock_file is not None else None
    pinned = (sha256 or release.sha256 or "").lower() or None
    locked = read_lock(lock_file).get(release.url) if lock_file is not None else None

    def check(path: Path) -> str:
        if locked is not None:
            actual = verify_file(path, locked.get("sha256"), size=locked.get("size"),
                                 source=f"lock file {lock_file} for {release.url}")
        else:
            actual = verify_file(path)
        if pinned is not None and actual != pinned:
            raise ChecksumError(f"{path}: SHA-256 mismatch (pinned for {release.url}): expected {pinned}, got {actual}")
        return actual

    if dest.exists() and not force:
        actual = check(dest)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_suffix(dest.suffix + ".part")
        # A part left by an earlier run may belong to another version of the file; if the resumed result does
        # not verify, one clean download from byte 0 settles whether the server or the old part is at fault.
        resumed_old_part = part.exists() and part.stat().st_size > 0
        while True:
            _fetch_with_retries(release.url, part, retries=retries, backoff=backoff, timeout=timeout,
                                progress=progress)
            try:
                actual = check(part)
                break
            except ChecksumError as e:
                part.unlink()
                if not resumed_old_part:
                    raise ChecksumError(f"downloaded {release.url} to {dest} but it failed verification; "
                                        f"nothing was written under {dest.name}: {e}") from e
                resumed_old_part = False
                print(f"download {release.url}: resumed file failed verification, starting over", file=sys.stderr)
        os.replace(part, dest)
        fsync_dir(dest.parent)

    if lock_file is not None and locked is None:
        _record_in_lock(lock_file, release, actual, dest.stat().st_size)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="registry names (see --list) or http(s) URLs")
    parser.add_argument("--dest", type=Path, default=Path("resources/checkpoints"),
                        help="folder to download into (default: %(default)s)")
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK_FILE,
                        help="JSON lock file recording SHA-256 and size per URL (default: %(default)s)")
    parser.add_argument("--no-lock", action="store_true", help="neither read nor write a lock file")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    parser.add_argument("--force", action="store_true",
                        help="download again even if the file exists (the old one stays until the new one verifies)")
    parser.add_argument("--retries", type=int, default=5, help="extra attempts after a failure (default: %(default)s)")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="first wait between attempts in seconds, doubled each time (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def print_registry(file=None) -> None:
    file = file or sys.stdout  # looked up at call time so redirected/captured stdout is honoured
    for release in REGISTRY.values():
        pinned = release.sha256 or "not published (the lock file records it)"
        print(f"{release.name}: {release.description}\n  file:       {release.filename}\n  url:        {release.url}\n"
              f"  sha256:     {pinned}\n  state dict: {release.nesting}", file=file)


def main(args: argparse.Namespace) -> int:
    if args.list:
        print_registry()
        return 0
    if not args.names:
        print("python -m dd download: give at least one NAME (see --list)", file=sys.stderr)
        return 2
    try:
        releases = [resolve(name) for name in args.names]
    except DownloadError as e:
        print(f"python -m dd download: {e}", file=sys.stderr)
        return 2
    lock_file = None if args.no_lock else args.lock
    failures = 0
    for release in releases:
        try:
            path = download(release.name, args.dest / release.filename, lock_file=lock_file, retries=args.retries,
                            backoff=args.backoff, timeout=args.timeout, progress=not args.no_progress,
                            force=args.force)
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        print(f"{release.name}: {path}")
    return 1 if failures else 0
