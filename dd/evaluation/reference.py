"""FID references: image sets, the bundled digits at the samples' resolution, and precomputed FID statistics.

A reference is a sample-set file (``dd.evaluation.sample_sets``), the digits themselves: ``digits``
(= ``digits:train``), ``digits:test`` or ``digits:all`` (see ``dd.evaluation.digits``), or a file of FID statistics
in the formats the paper and its ancestors use (``load_fid_statistics``): those give FID (and IS, which needs no
reference) but no precision, recall or KID, which need reference images.

    python -m dd digits-reference --size 16 --out results/digits/reference_16.npz
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dd.evaluation.digits import load_digits_images, to_uint8
from dd.evaluation.sample_sets import SampleSet, SampleSetError, load_sample_set, write_sample_set

DIGITS_REFERENCES = {"digits": "train", "digits:train": "train", "digits:test": "test", "digits:all": "all"}


def digits_reference(name: str = "digits", size: int = 16) -> SampleSet:
    if name not in DIGITS_REFERENCES:
        raise SampleSetError(f"unknown digits reference {name!r}; choose from {sorted(DIGITS_REFERENCES)}")
    images, labels = load_digits_images(size=size, split=DIGITS_REFERENCES[name])
    return SampleSet(to_uint8(images).numpy(), labels.numpy(), f"{name}@{size}x{size}")


def write_digits_reference(path, size: int = 16, split: str = "train") -> None:
    """The digits (one split, upsampled to ``size``) as a reference ``.npz`` with labels."""
    ref = digits_reference("digits:" + split, size)
    write_sample_set(path, ref.images, ref.labels)


@dataclass(frozen=True)
class FidStatistics:
    """Mean [D] and covariance [D, D] of a reference's features (e.g. Inception pool3, D = 2048)."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str

    @property
    def dim(self) -> int:
        return self.mu.shape[0]


def load_fid_statistics(path) -> FidStatistics | None:
    """FID statistics from ``path``, or None when the file is an image set. Formats:

    - a torch file holding ``{"m": mean, "s": covariance}`` (the DD release's ``statistic.pth``, read by its
      evaluation scripts; ``{"mu", "sigma"}`` is accepted too), loaded without running code from the file;
    - an ``.npz`` with ``mu`` and ``sigma`` (ADM's / guided-diffusion's reference batches, which the VAR and LlamaGen
      evaluations use; their images under ``arr_0`` are not needed for FID).
    """
    import torch

    from dd.io import read_checkpoint

    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "images" in archive.files or not {"mu", "sigma"} <= set(archive.files):
                return None
            mu, sigma = archive["mu"], archive["sigma"]
    else:
        blob = read_checkpoint(path)
        if not isinstance(blob, dict):
            raise SampleSetError(f"{path}: expected FID statistics {{'m', 's'}} (or {{'mu', 'sigma'}}), got a "
                                 f"{type(blob).__name__}")
        keys = ("m", "s") if {"m", "s"} <= set(blob) else ("mu", "sigma")
        if not set(keys) <= set(blob):
            raise SampleSetError(f"{path}: expected FID statistics with keys 'm' and 's' (or 'mu' and 'sigma'), "
                                 f"found {sorted(blob)[:10]}")
        mu, sigma = (blob[k].double().numpy() if isinstance(blob[k], torch.Tensor) else np.asarray(blob[k])
                     for k in keys)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise SampleSetError(f"{path}: FID statistics need a mean [D] and a covariance [D, D], got "
                             f"{mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise SampleSetError(f"{path}: FID statistics hold non-finite values")
    return FidStatistics(mu, sigma, str(path))


def load_reference(reference, like: SampleSet | None = None) -> SampleSet | FidStatistics:
    """A reference: a digits name (at the resolution of ``like`` when square, else 16), an image set ``.npz``, or
    a file of FID statistics (``load_fid_statistics``)."""
    if str(reference) in DIGITS_REFERENCES:
        h, w = like.images.shape[2:] if like is not None else (16, 16)
        return digits_reference(str(reference), h if h == w else 16)
    stats = load_fid_statistics(reference) if Path(reference).is_file() else None
    return stats if stats is not None else load_sample_set(reference)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=16, help="image size (the digits are upsampled)")
    parser.add_argument("--split", default="train", choices=("train", "test", "all"))
    parser.add_argument("--out", type=Path, required=True, help=".npz sample set to write")


def main(args: argparse.Namespace) -> int:
    write_digits_reference(args.out, size=args.size, split=args.split)
    print(f"wrote {args.out}")
    return 0
