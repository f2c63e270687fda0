"""Released checkpoints and the downloader for them.

``REGISTRY`` lists every file the project can fetch (teachers, tokenizers, DD students, the FID statistic). Each is a
file in a Hugging Face Hub repository (``dd.families.base.Release``). None of the original READMEs publishes a
checksum, so integrity rests on a lock file: the first download records each file's SHA-256, its size and the Hub
commit it came from, and every later download or check must reproduce them (trust on first use, like a package
lock file).

Hub files are fetched with ``huggingface_hub.hf_hub_download``:

* the user's Hugging Face cache is reused (``HF_HOME`` / ``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), and
  ``HF_ENDPOINT`` (a mirror) and ``HF_HUB_OFFLINE`` are honoured. The library reads these variables once, when it is
  imported; this module reads them again at every call and passes them on, so a change made after the import
  (a test, a notebook) counts too;
* revision pinning: the registry asks for the branch ``main``; the lock file records the commit that resolved to, and
  every later download asks for exactly that commit, so a new push to ``main`` never changes what the pipeline gets
  (and a cached commit needs no network at all);
* retries, resuming after a dropped connection, the size check of the body and the progress bar are the library's.
  The file stays in the library's cache; this module hard-links it (same filesystem) or copies it to a temporary
  name beside ``dest``, verifies it against the lock file, fsyncs it and only then renames it over ``dest`` with
  ``os.replace``, so the final name never holds a partial or unverified file.

Plain https URLs (``UrlRelease``, e.g. pinned feature-extractor weights in a config) are not Hub files. They are
fetched with the library's HTTP helper ``huggingface_hub.file_download.http_get`` (the same retries, resume and
progress bar; no Hub token is sent) into the temporary file beside ``dest`` and installed the same way. They have no
commit: their lock entry holds SHA-256 and size only.

Command line: ``python -m dd download NAME... --dest DIR [--lock FILE]``; ``--list`` prints the registry. Timeouts
are the library's settings ``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT`` (seconds, environment).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import sys
import urllib.parse
import uuid
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import huggingface_hub
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import tqdm as hf_tqdm

from dd import __version__
from dd.families.base import Release
from dd.families.registry import FAMILIES
from dd.io import atomic_write_json, fsync_dir, sha256_file

DEFAULT_LOCK_FILE = Path("resources/downloads.lock.json")
LIBRARY_NAME = "distilled-decoding"  # goes into the User-Agent of every request
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as a true environment flag


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


@dataclasses.dataclass(frozen=True)
class ShippedRelease:
    """A file this project ships in ``releases/tiny/`` (the embedded default's teachers and digits classifier), pinned
    by the SHA-256 that ``releases/tiny/lock.json`` records; "downloading" it copies it out of the checkout and
    verifies it. ``sha256`` is None when the lock file does not list it (not shipped in this checkout)."""

    name: str
    sha256: str | None
    description: str = ""
    nesting: str = "safetensors: the state dict's tensors, the rest as JSON strings in the metadata"
    revision: str = "this checkout"

    @property
    def filename(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def url(self) -> str:
        return (SHIPPED_DIR / self.filename).as_uri()


SHIPPED_DIR = Path(__file__).resolve().parents[2] / "releases" / "tiny"
SHIPPED_LOCK = SHIPPED_DIR / "lock.json"
DIGITS_CLASSIFIER = "digits_classifier_16"


def shipped_lock_entries(lock_file: Path = SHIPPED_LOCK) -> dict[str, dict]:
    """Release name -> its ``lock.json`` entry (file, sha256, size, ...) of a shipped releases folder; {} without one."""
    return json.loads(lock_file.read_text())["files"] if lock_file.is_file() else {}


def shipped_releases(lock_file: Path = SHIPPED_LOCK) -> list[ShippedRelease]:
    """The shipped files: every family's digits teacher (tokenizer and transformer) and the digits classifier, with
    the digests ``releases/tiny/lock.json`` records."""
    entries = shipped_lock_entries(lock_file)
    names = [DIGITS_CLASSIFIER] + [name for f in FAMILIES.values() for t in f.released_teachers.values()
                                   if not t.original_format for name in (t.tokenizer, t.model, t.text_encoder) if name]
    names = list(dict.fromkeys(names))     # teachers may share a tokenizer
    return [ShippedRelease(name, entries.get(name, {}).get("sha256"), entries.get(name, {}).get("description", ""))
            for name in names]


# the released files of every family, and the FID statistic of the DD evaluation
_FID_STATISTIC = Release("fid_imagenet256", "microsoft/distilled_decoding", "ImageNet-256_FID_Statistic/statistic.pth",
                         "ImageNet-256 reference statistic for FID, as used by the DD evaluation scripts",
                         '{"m": mean (2048,), "s": covariance (2048, 2048)} of Inception pool3 features')
# LlamaGen's text-to-image FID prompts (its evaluations/t2i, GigaGAN's protocol), at the commit the golden files were
# recorded from; no checksum is published: the lock file records it at the first download
_COCO_CAPTIONS = UrlRelease("coco_captions", "coco_captions.csv",
                            "https://raw.githubusercontent.com/FoundationVision/LlamaGen/"
                            "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec/evaluations/t2i/coco_captions.csv",
                            description="30,000 COCO val2014 captions, one per image (column Prompt): LlamaGen's "
                            "text-to-image FID prompts")
_RELEASES = [*(r for f in FAMILIES.values() for r in f.releases), _FID_STATISTIC, _COCO_CAPTIONS,
             *shipped_releases()]
REGISTRY: dict[str, Release | UrlRelease] = {r.name: r for r in _RELEASES}
assert len(REGISTRY) == len(_RELEASES), "duplicate release name"


def resolve(url_or_name: str) -> Release | UrlRelease:
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
    found = path.stat().st_size
    if size is not None and found != size and sha256 is None:
        raise ChecksumError(f"{path}: size mismatch{where}: expected {size} bytes, found {found}")
    actual = sha256_file(path)
    if size is not None and found != size:  # both digests too: they tell which version each one is
        raise ChecksumError(f"{path}: size mismatch{where}: expected {size} bytes, found {found} "
                            f"(SHA-256 expected {sha256.lower()}, got {actual})")
    if sha256 is not None and actual != sha256.lower():
        raise ChecksumError(f"{path}: SHA-256 mismatch{where}: expected {sha256.lower()}, got {actual}")
    return actual


def check_shipped_file(path: str | os.PathLike, shipped_dir: Path = SHIPPED_DIR) -> None:
    """A file read straight from the shipped releases folder (``releases/tiny/``) must be the one its ``lock.json``
    records, as the ``download`` rule's copy is: raises ``ChecksumError`` naming the file, the lock and both digests
    (or ``DownloadError`` when the lock does not list it). Files elsewhere are not checked."""
    path = Path(path)
    if path.resolve().parent != Path(shipped_dir).resolve():
        return
    lock_file = Path(shipped_dir) / "lock.json"
    entry = next((e for e in shipped_lock_entries(lock_file).values() if e.get("file") == path.name), None)
    if entry is None:
        raise DownloadError(f"{path}: a file in {shipped_dir} that {lock_file} does not list")
    verify_file(path, entry["sha256"], size=entry.get("size"), source=str(lock_file))


def _describe(error: BaseException) -> str:
    """One line: the exception and the chain of its explicit causes. The library wraps e.g. an HTTP 500 in a generic
    "cannot find the file in the local cache" error, and the cause is the useful part; a cause that only repeats
    what is already said is left out."""
    parts: list[str] = []
    while error is not None and len(parts) < 3:
        text = " ".join(str(error).split())
        if not any(text in part for part in parts):
            parts.append(f"{type(error).__name__}: {text}" if text else type(error).__name__)
        error = error.__cause__
    return "; caused by ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Lock file: URL -> {name, file, sha256, size[, commit]}
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


def _record_in_lock(lock_file: Path, release: Release | UrlRelease, sha256: str, size: int,
                    commit: str | None = None) -> None:
    """Add an entry, or the commit to an entry that lacks one; what was recorded first wins. Refuses to record a
    digest that differs from the one already there (another process may have recorded it meanwhile)."""
    with _exclusive(lock_file):
        entries = read_lock(lock_file)
        old = entries.get(release.url)
        if old is not None and old.get("sha256") != sha256:
            raise ChecksumError(f"{release.filename}: lock file {lock_file} already records SHA-256 "
                                f"{old.get('sha256')} for {release.url}, refusing to record {sha256}")
        new = {"name": release.name, "file": release.filename, "sha256": sha256, "size": size}
        if commit is not None:
            new["commit"] = commit
        merged = {**new, **(old or {})}
        if merged != old:
            entries[release.url] = merged
            atomic_write_json(lock_file, entries)


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face settings, read from the environment at call time
# ---------------------------------------------------------------------------------------------------------------

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def _offline() -> bool:
    # the library's import-time copy counts too: it blocks every request itself when set
    return (_env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
            or huggingface_hub.constants.is_offline_mode())


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now; None leaves the library's (https://huggingface.co unless set at import)."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


def _cache_dir() -> str | None:
    """The Hub cache as the environment names it now, by the library's rules; None leaves the library's default."""
    def expand(value: str) -> str:
        return os.path.expandvars(os.path.expanduser(value))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return expand(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(expand(os.environ["HF_HOME"]), "hub")
    return None


class _ProgressBar(hf_tqdm):
    """The library's progress bar, shown even when stderr is not a terminal (a log file, a captured stream): the
    library would hide it there, but ``--no-progress`` is this tool's switch for that. The library's own switches
    (``HF_HUB_DISABLE_PROGRESS_BARS``, ``disable_progress_bars()``) still win."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("disable") is None:  # the library passes None for "decide by the terminal"
            kwargs["disable"] = False
        super().__init__(*args, **kwargs)


class _NoProgressBar(hf_tqdm):
    """``--no-progress`` for one call, without touching the library's process-wide progress-bar state."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _bar(progress: bool) -> type[hf_tqdm]:
    return _ProgressBar if progress else _NoProgressBar


# ---------------------------------------------------------------------------------------------------------------
# Fetching: Hub files through the library's cache, plain URLs with the library's HTTP helper
# ---------------------------------------------------------------------------------------------------------------

def _hub_url(release: Release, revision: str | None = None) -> str:
    """Where the file is fetched from: the release at ``revision`` on the endpoint in effect now."""
    return huggingface_hub.hf_hub_url(release.repo, release.path, revision=revision or release.revision,
                                      endpoint=_endpoint())


def _snapshot_commit(cached: Path, release: Release) -> str:
    """The commit of a file in the Hub cache: the library keeps it at ``snapshots/<commit>/<path in the repo>``."""
    snapshot = cached.parents[len(PurePosixPath(release.path).parts) - 1]
    if snapshot.parent.name != "snapshots" or not _COMMIT.fullmatch(snapshot.name):
        raise DownloadError(f"{release.name}: cannot tell the commit of {cached}: not in a Hub cache snapshot folder")
    return snapshot.name


def _fetch_from_hub(release: Release, revision: str, *, force: bool, progress: bool) -> tuple[Path, str]:
    """The file in the Hugging Face cache (downloaded there first if needed) and the commit it belongs to."""
    offline = _offline()
    try:
        cached = huggingface_hub.hf_hub_download(
            repo_id=release.repo, filename=release.path, revision=revision, endpoint=_endpoint(),
            cache_dir=_cache_dir(), local_files_only=offline, force_download=force,
            library_name=LIBRARY_NAME, library_version=__version__, tqdm_class=_bar(progress))
    except Exception as e:  # noqa: BLE001 - the library's error types differ between versions and HTTP backends
        url = _hub_url(release, revision)
        if offline:
            cache = _cache_dir() or huggingface_hub.constants.HF_HUB_CACHE
            need = " (--force needs the network)" if force else ""
            raise DownloadError(f"{release.name}: HF_HUB_OFFLINE is set and {url} is not in the Hugging Face cache "
                                f"{cache}{need}; download it once with network access or unset HF_HUB_OFFLINE "
                                f"[{_describe(e)}]") from e
        raise DownloadError(f"{release.name}: cannot download {url}: {_describe(e)}") from e
    cached = Path(cached)
    return cached, _snapshot_commit(cached, release)


def _fetch_url(release: UrlRelease, path: Path, *, progress: bool) -> None:
    """A plain URL into ``path``; only our User-Agent is sent (no Hub token to a foreign host)."""
    if _offline():
        raise DownloadError(f"{release.url}: HF_HUB_OFFLINE is set, so this URL cannot be fetched")
    try:
        with open(path, "wb") as f:
            http_get(release.url, f, headers={"User-Agent": f"{LIBRARY_NAME}/{__version__}"},
                     displayed_filename=release.filename, tqdm_class=_bar(progress))
    except Exception as e:  # noqa: BLE001 - as in _fetch_from_hub
        raise DownloadError(f"{release.url}: {_describe(e)}") from e


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link the cached blob where the cache shares the filesystem (no second copy of a multi-GB file), else copy
    it. A hard link shares the bytes with the cache: the pipeline only ever reads checkpoints, and a re-download
    (``--force``) gives the cache a new file rather than rewriting this one."""
    blob = src.resolve()  # the snapshot entry is a symlink to the blob (a plain file where symlinks are unsupported)
    try:
        os.link(blob, dst)
    except OSError:
        shutil.copyfile(blob, dst)


@contextlib.contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A fresh temporary name beside ``dest`` (the pattern of ``dd.io.atomic_open``, so ``remove_stale_temps`` knows
    it). What the block leaves there is fsynced and renamed over ``dest`` when the block ends cleanly; it is deleted
    when the block raises (then ``dest``, if any, is untouched)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _install(dest: Path, fill: Callable[[Path], None], check: Callable[[Path], str], source: str,
             hint: str = "") -> str:
    """``fill`` a temporary file beside ``dest``, ``check`` it, and only then move it to ``dest``; its digest."""
    try:
        with _staged(dest) as tmp:
            fill(tmp)
            return check(tmp)
    except ChecksumError as e:
        raise ChecksumError(f"{source} failed verification, nothing was written to {dest}: {e}{hint}") from e
    except DownloadError:
        raise
    except OSError as e:  # a full disk or a read-only folder: still a failed download, not a crash
        raise DownloadError(f"{source}: cannot write {dest}: {e}") from e


def download(url_or_name: str, dest: str | os.PathLike, *, sha256: str | None = None,
             lock_file: str | os.PathLike | None = None, progress: bool = True, force: bool = False) -> Path:
    """Fetch a registry release (by short name) or a URL to ``dest`` and return the verified path.

    ``dest`` is the final file path, or an existing directory to put the release's file name in. ``sha256`` pins the
    digest (overrides the registry's). With ``lock_file``, the digest, size and (Hub files) commit are recorded on the
    first download and enforced afterwards; a Hub file is then always fetched at the recorded commit. An existing
    ``dest`` that verifies against what the lock file records is returned without network unless ``force``; with
    ``force`` the file is downloaded again (also into the Hub cache) and the old ``dest`` stays in place until the new
    one has been verified.
    """
    release = resolve(url_or_name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / release.filename
    lock_file = Path(lock_file) if lock_file is not None else None
    pinned = (sha256 or release.sha256 or "").lower() or None
    locked = read_lock(lock_file).get(release.url) if lock_file is not None else None
    on_hub = isinstance(release, Release)

    def check(path: Path) -> str:
        if locked is not None:
            actual = verify_file(path, locked.get("sha256"), size=locked.get("size"),
                                 source=f"lock file {lock_file} for {release.url}")
        else:
            actual = verify_file(path)
        if pinned is not None and actual != pinned:
            raise ChecksumError(f"{path}: SHA-256 mismatch (pinned for {release.url}): expected {pinned}, got {actual}")
        return actual

    commit = locked.get("commit") if locked else None
    # An existing file is reused without network, except a Hub file whose commit the lock file does not know yet
    # (a first download into an existing file, or an entry written before commits were recorded): that one goes
    # through the Hub cache, which tells the commit.
    if dest.exists() and not force and (lock_file is None or not on_hub or commit):
        actual = check(dest)
    elif isinstance(release, ShippedRelease):
        if release.sha256 is None or not (SHIPPED_DIR / release.filename).is_file():
            raise DownloadError(f"{release.name}: {SHIPPED_DIR / release.filename} is not shipped in this checkout "
                                f"(no entry in {SHIPPED_LOCK} or no file); `snakemake tiny_teachers` trains it")
        actual = _install(dest, lambda tmp: shutil.copyfile(SHIPPED_DIR / release.filename, tmp), check,
                          f"{release.name} ({SHIPPED_DIR / release.filename})",
                          hint=f"; the file in the checkout does not match {SHIPPED_LOCK} (replaced or damaged?)")
    elif on_hub:
        cached, commit = _fetch_from_hub(release, commit or release.revision, force=force, progress=progress)
        actual = _install(dest, lambda tmp: _link_or_copy(cached, tmp), check,
                          f"{release.name} ({_hub_url(release, commit)})",
                          hint="; if the copy in the Hugging Face cache is damaged, --force downloads it again")
    else:
        actual = _install(dest, lambda tmp: _fetch_url(release, tmp, progress=progress), check, release.url)

    if lock_file is not None and (locked is None or (commit and not locked.get("commit"))):
        _record_in_lock(lock_file, release, actual, dest.stat().st_size, commit)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Hub files go through the Hugging Face cache (HF_HOME / HF_HUB_CACHE); HF_ENDPOINT, "
                     "HF_HUB_OFFLINE, HF_TOKEN, HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT are honoured.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="registry names (see --list) or http(s) URLs")
    parser.add_argument("--dest", type=Path, default=Path("resources/checkpoints"),
                        help="folder to download into (default: %(default)s)")
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK_FILE,
                        help="JSON lock file recording SHA-256, size and Hub commit per file (default: %(default)s)")
    parser.add_argument("--no-lock", action="store_true", help="neither read nor write a lock file")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    parser.add_argument("--force", action="store_true",
                        help="download again even if the file exists or is cached (the old one stays until the new "
                             "one verifies)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def print_registry(file=None) -> None:
    file = file or sys.stdout  # looked up at call time so redirected/captured stdout is honoured
    for release in REGISTRY.values():
        pinned = release.sha256 or "not published (the lock file records it)"
        print(f"{release.name}: {release.description}\n  file:       {release.filename}\n  url:        {release.url}\n"
              f"  revision:   {getattr(release, 'revision', None) or 'fixed by the URL'}"
              f"{' (the lock file records the commit of the first download)' if isinstance(release, Release) else ''}\n"
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
            path = download(release.name, args.dest / release.filename, lock_file=lock_file,
                            progress=not args.no_progress, force=args.force)
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        print(f"{release.name}: {path}")
    return 1 if failures else 0
