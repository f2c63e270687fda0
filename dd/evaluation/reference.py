"""FID references of the embedded default: the bundled digits at the samples' resolution.

A reference is a sample-set file (``dd.evaluation.sample_sets``) or the digits themselves: ``digits``
(= ``digits:train``), ``digits:test`` or ``digits:all`` (see ``dd.evaluation.digits``).

    python -m dd digits-reference --size 16 --out results/digits/reference_16.npz
"""
from __future__ import annotations

import argparse
from pathlib import Path

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


def load_reference(reference, like: SampleSet | None = None) -> SampleSet:
    """A reference: a digits name (at the resolution of ``like`` when square, else 16) or an ``.npz`` path."""
    if str(reference) in DIGITS_REFERENCES:
        h, w = like.images.shape[2:] if like is not None else (16, 16)
        return digits_reference(str(reference), h if h == w else 16)
    return load_sample_set(reference)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=16, help="image size (the digits are upsampled)")
    parser.add_argument("--split", default="train", choices=("train", "test", "all"))
    parser.add_argument("--out", type=Path, required=True, help=".npz sample set to write")


def main(args: argparse.Namespace) -> int:
    write_digits_reference(args.out, size=args.size, split=args.split)
    print(f"wrote {args.out}")
    return 0
