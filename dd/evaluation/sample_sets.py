"""The sample-set file format that sampling writes and evaluation reads (``.npz``, written by ``write_sample_set``):

* ``images``: uint8 [N, 3, H, W] in [0, 255], channels first (NCHW). Channels-last arrays are rejected with a
  message rather than guessed, since an image 3 pixels high would be ambiguous.
* ``labels``: integer [N] (int64 when we write it), the class each image was generated for. Optional for the
  metrics, required for ``classifier_accuracy``.
* ``teacher_nll_bits``: float [N], optional: each image's token sequence's mean negative log2-likelihood per token
  under the teacher's sampling distribution (``dd.method.sample.teacher_nll_bits``), for the ``teacher_nll_bits``
  column of the tables.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dd.evaluation.digits import to_uint8
from dd.io import atomic_open

SAMPLE_SET_FORMAT = "an .npz with 'images' uint8 [N, 3, H, W] (NCHW, 0..255) and optional 'labels' integer [N]"


class SampleSetError(ValueError):
    """A sample set or reference file that is missing, unreadable or not in the expected format."""


@dataclass
class SampleSet:
    images: np.ndarray  # uint8 [N, 3, H, W]
    labels: np.ndarray | None  # int64 [N]
    source: str  # file path or digits reference name, for messages and the metrics file
    teacher_nll_bits: np.ndarray | None = None  # float64 [N]

    def __len__(self) -> int:
        return len(self.images)


class UInt8Images(Dataset):
    """What torch-fidelity wants from a Dataset: item i is a uint8 tensor [3, H, W]."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i]))


def check_sample_arrays(images, labels, source: str, *, require_labels: bool = False,
                        num_classes: int | None = None, teacher_nll_bits=None) -> SampleSet:
    """Validate (images, labels[, teacher_nll_bits]) against the sample set format; raise SampleSetError naming
    ``source``."""
    sample_set = _check_images_and_labels(images, labels, source, require_labels, num_classes)
    nll = teacher_nll_bits
    if nll is not None:
        if not isinstance(nll, np.ndarray) or not np.issubdtype(nll.dtype, np.floating) or nll.shape != (len(images),):
            raise SampleSetError(f"{source}: 'teacher_nll_bits' must be float [{len(images)}] to match 'images', got "
                                 f"{getattr(nll, 'dtype', type(nll))} {list(getattr(nll, 'shape', []))}")
        sample_set.teacher_nll_bits = nll.astype(np.float64)
    return sample_set


def _check_images_and_labels(images, labels, source: str, require_labels: bool, num_classes: int | None) -> SampleSet:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise SampleSetError(f"{source}: 'images' must be uint8 in [0, 255], got {dtype} "
                             "(convert images in [-1, 1] with dd.evaluation.digits.to_uint8)")
    if images.ndim != 4 or images.shape[1] != 3:
        channels_last = images.ndim == 4 and images.shape[-1] == 3
        hint = " (this looks channels-last; transpose to [N, 3, H, W])" if channels_last else ""
        raise SampleSetError(f"{source}: 'images' must have shape [N, 3, H, W], got {list(images.shape)}{hint}")
    if len(images) == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise SampleSetError(f"{source}: 'images' is empty ({list(images.shape)})")
    if labels is None:
        if require_labels:
            raise SampleSetError(f"{source}: missing key 'labels' (integer [N]), needed here")
        return SampleSet(images, None, source)
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        raise SampleSetError(f"{source}: 'labels' must be integers, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != (len(images),):
        raise SampleSetError(f"{source}: 'labels' must have shape [{len(images)}] to match 'images', "
                             f"got {list(labels.shape)}")
    if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
        raise SampleSetError(f"{source}: 'labels' must lie in [0, {num_classes or 'num_classes'}), "
                             f"got range [{labels.min()}, {labels.max()}]")
    return SampleSet(images, labels.astype(np.int64), source)


def load_sample_set(path, *, require_labels: bool = False, num_classes: int | None = None) -> SampleSet:
    """Read and validate a sample set ``.npz`` (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise SampleSetError(f"{path}: no such file (expected {SAMPLE_SET_FORMAT})")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / npy at all, truncated header, pickled data, ...
        raise SampleSetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e}); "
                             f"expected {SAMPLE_SET_FORMAT}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SampleSetError(f"{path}: holds a single .npy array, expected {SAMPLE_SET_FORMAT}")
    with archive:
        if "images" not in archive.files:
            raise SampleSetError(f"{path}: missing key 'images' (found {sorted(archive.files)}); "
                                 f"expected {SAMPLE_SET_FORMAT}")
        try:
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
            nll = archive["teacher_nll_bits"] if "teacher_nll_bits" in archive.files else None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:  # corrupt member, pickled object array
            raise SampleSetError(f"{path}: corrupt .npz member ({type(e).__name__}: {e})") from e
    return check_sample_arrays(images, labels, str(path), require_labels=require_labels, num_classes=num_classes,
                               teacher_nll_bits=nll)


def write_sample_set(path, images, labels=None, teacher_nll_bits=None) -> None:
    """Write a sample set atomically. ``images``: uint8 [N, 3, H, W], or float in [-1, 1] (converted)."""
    def numpy(x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else (None if x is None else np.asarray(x))

    images, labels, nll = numpy(images), numpy(labels), numpy(teacher_nll_bits)
    if np.issubdtype(images.dtype, np.floating):
        images = to_uint8(images)
    sample_set = check_sample_arrays(images, labels, str(path), teacher_nll_bits=nll)
    arrays = {"images": sample_set.images}
    if sample_set.labels is not None:
        arrays["labels"] = sample_set.labels
    if sample_set.teacher_nll_bits is not None:
        arrays["teacher_nll_bits"] = sample_set.teacher_nll_bits
    # streamed into the temporary file: no in-memory copy of the archive (50k images at 256 px are 9.8 GB)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
