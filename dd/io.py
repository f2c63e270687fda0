"""Crash-safe file output: everything the pipeline writes goes through a temporary file in the same
folder, fsync, then ``os.replace``, so a killed job or a full disk never leaves a half-written file
under the final name and never destroys the previous good one."""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; some filesystems refuse to open directories, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary sibling of ``path``; on clean exit fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _temp_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of ``atomic_open``'s temporary files for ``path`` (hidden, beside it)."""
    return f".{path.name}.", ".tmp"


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete the temporary files ``atomic_open`` left beside ``path`` when its writer was killed between
    creating and renaming them; returns how many. The pattern also matches the temporary files of
    names that extend ``path``'s (``NAME.part.json`` for ``NAME``), so only for the job that owns all of
    them: a concurrent writer's temporary file would go too."""
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    stale = list(path.parent.glob(f"{glob.escape(prefix)}*{suffix}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: the one reader of torch files
# ---------------------------------------------------------------------------------------------------------------
class ArtefactError(ValueError):
    """A file that is missing, corrupt, or does not belong with the others; the message names it."""


def _checkpoint_safe_globals() -> list:
    """The non-tensor, non-container types a checkpoint may hold, beyond what ``weights_only=True`` allows anyway.

    Found from the original loaders and the golden READMEs (``../shared/golden/*/README.md``, manifests):
    - ``argparse.Namespace``: LlamaGen's ``train_c2i.py``, ``train_t2i.py`` and ``vq_train.py`` save their
      command-line arguments as ``"args"`` beside the weights, so the released ``c2i_*.pt``, ``t2i_*.pt`` and
      ``vq_ds16_*.pt`` files may hold one. Unpickling it only sets attributes; it calls nothing from the file.
    Nothing else: the VAR releases (``vae_ch160v4096z32.pth``, ``var_d*.pth``) are plain state dicts, the DD releases
    nest state dicts (``["trainer"]["ema_parameters"]``, ``["ema"]``), the golden files and every checkpoint this
    project writes hold tensors and plain Python values (their ``config`` dicts are JSON-like).
    """
    return [argparse.Namespace]


def _refused_globals(path: Path) -> list[str]:
    """Globals a pickle-based checkpoint refers to beyond the allowlist, read from the pickle without running it."""
    import torch

    allowed = {f"{t.__module__}.{t.__qualname__}" for t in _checkpoint_safe_globals()}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip/pickle we can scan (truncated, corrupt): the caller says so
        return []
    return sorted(set(found) - allowed)


def _refusal(path: Path, refused: list[str]) -> ArtefactError:
    allowed = ", ".join(t.__qualname__ for t in _checkpoint_safe_globals())
    return ArtefactError(f"{path}: refused: the file refers to {', '.join(refused)}, which a checkpoint never needs "
                         f"(allowed: tensors, plain Python values, {allowed}); loading it could run code from the "
                         "file, so nothing of it was loaded")


def read_checkpoint(path: str | os.PathLike, kind: str | None = None) -> Any:
    """The contents of a torch checkpoint file, loaded with ``weights_only=True`` and the explicit allowlist of
    ``_checkpoint_safe_globals``: tensors, plain Python values and those types only, so loading runs no code from the
    file. A file that refers to anything else is refused (ArtefactError naming the file and the refused types) before
    any object of it is built. With ``kind``, a checkpoint of this project that records another kind
    (``{"kind": "tokenizer", ...}``) is refused. ArtefactError naming the file otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        ck = read_safetensors(path)
    else:
        refused = _refused_globals(path)
        if refused:
            raise _refusal(path, refused)
        try:
            with torch.serialization.safe_globals(_checkpoint_safe_globals()):
                ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure: the file is damaged or not a checkpoint
            # a legacy (non-zip) file cannot be scanned beforehand; torch's weights-only unpickler stops at the first
            # global it does not allow, before building anything from it
            unsupported = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e))
            if unsupported:
                raise _refusal(path, [unsupported.group(1)]) from None
            raise ArtefactError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); truncated or corrupt, or "
                                "holding more than tensors and plain Python values") from None
    if kind is not None and isinstance(ck, dict) and "kind" in ck and ck["kind"] != kind:
        raise ArtefactError(f"{path}: is a {ck['kind']} checkpoint, expected a {kind} checkpoint")
    return ck


# Checkpoints we ship for others to load (the tiny release files) are safetensors: tensors and a flat str -> str
# metadata map, nothing executable. A checkpoint dict {"model": state_dict, key: JSON-able value, ...} is stored as
# the state dict's tensors and the other keys as one JSON string (metadata key "dd_checkpoint").
SAFETENSORS_FORMAT = "dd-checkpoint/1"
SAFETENSORS_KEY = "dd_checkpoint"


def write_safetensors(path, checkpoint: dict, float16: bool = False) -> None:
    """Write ``checkpoint`` (``model``: a state dict; other keys JSON-serialisable) atomically as safetensors;
    with ``float16``, floating-point tensors are stored in half precision (loading casts them back)."""
    import torch
    from safetensors.torch import save

    tensors = {k: (v.half() if float16 and v.is_floating_point() else v).contiguous()
               for k, v in checkpoint["model"].items()}
    # one metadata entry: safetensors writes its metadata map in hash order, so several keys would make two writes of
    # the same checkpoint differ in their bytes (a retrain could then never reproduce a shipped file exactly)
    fields = {k: v for k, v in checkpoint.items() if k != "model"}
    metadata = {SAFETENSORS_KEY: json.dumps({"format": SAFETENSORS_FORMAT, **fields}, sort_keys=True)}
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_safetensors(path) -> dict:
    """The checkpoint dict ``write_safetensors`` stored (tensors as written, e.g. float16)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtefactError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e}); truncated or corrupt") \
            from None
    try:
        out = json.loads(metadata[SAFETENSORS_KEY])
        assert out.pop("format") == SAFETENSORS_FORMAT
    except (KeyError, ValueError, AssertionError):
        raise ArtefactError(f"{path}: not a dd checkpoint (no {SAFETENSORS_KEY!r} metadata of format "
                            f"{SAFETENSORS_FORMAT!r})") from None
    out["model"] = tensors
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metric logs: append-only JSON lines
# ---------------------------------------------------------------------------------------------------------------
class JsonlLogger:
    """Append-only JSON-lines log of params and metrics; on resume, lines from steps after the resume point are
    dropped (the resumed run writes them again)."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            steps = [json.loads(line).get("step", -1) for line in rows]   # params lines have no step
            keep = [line for line, step in zip(rows, steps) if step is not None and step <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None:
            self.path.write_text("")
        self._f = open(self.path, "a")

    def log_params(self, params: dict) -> None:
        self._f.write(json.dumps({"params": params}, default=str) + "\n")
        self._f.flush()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
