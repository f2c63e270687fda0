"""``python -m dd validate-features``: does FID with this feature network rank what a person sees?

An FID is only as good as its features. With the digits classifier as the feature network, the checks are:

* the floor: held-out real digits (test split) against the training digits, the FID of a perfect sampler;
* corruption curves: FID of the test digits after each corruption at growing strength, against the training
  digits; each curve must grow monotonically. The corruptions: Gaussian blur (softness), pixel noise, and broken
  strokes (``shuffle_patches``: patches taken from other images, as a sampler whose tokens ignore each other
  composes them);
* sample sets, given as NAME=FILE (e.g. the teacher's, onestep*'s and DD's samples): their FIDs, to be read
  against the sample grids.

    python -m dd validate-features --weights classifier_16.pt --out validation.json [teacher=teacher.npz ...]

The report also says whether softness is punished more than broken structure: the FID of the mildest blur that
a person still reads as the same digit (sigma 1 pixel at 16x16) against that of the mildest broken-stroke level
(a quarter of the 4x4 patches swapped).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dd.evaluation.digits import gaussian_blur, load_digits_images, pixel_noise, shuffle_patches, to_uint8
from dd.evaluation.metrics import evaluate_sample_set
from dd.evaluation.sample_sets import SampleSet, load_sample_set
from dd.io import atomic_write_json

# corruption -> strengths (in increasing order)
CORRUPTIONS = {
    "blur_sigma": (0.5, 1.0, 1.5, 2.0),
    "noise_std": (0.1, 0.2, 0.4, 0.8),
    "broken_strokes_4x4": (0.1, 0.25, 0.5, 1.0),
    "broken_strokes_2x2": (0.1, 0.25, 0.5, 1.0),
}


def corrupt(images: torch.Tensor, kind: str, strength: float, generator: torch.Generator) -> torch.Tensor:
    if kind == "blur_sigma":
        return gaussian_blur(images, strength)
    if kind == "noise_std":
        return pixel_noise(images, strength, generator)
    patch = int(kind.rsplit("_", 1)[1].split("x")[0])
    return shuffle_patches(images, strength, patch, generator)


def validate(weights: Path, image_size: int = 16, sample_sets: dict[str, Path] | None = None, seed: int = 0) -> dict:
    train, _ = load_digits_images(image_size, "train")
    test, _ = load_digits_images(image_size, "test")
    reference = SampleSet(to_uint8(train).numpy(), None, "digits:train")

    def fid(images) -> float:
        s = images if isinstance(images, SampleSet) else SampleSet(to_uint8(images).numpy(), None, "corrupted")
        return evaluate_sample_set(s, reference, weights_path=weights, isc=False, kid=False, prc=False)["fid"]

    g = torch.Generator().manual_seed(seed)
    report = {"weights": str(weights), "floor": fid(test), "curves": {}, "sample_sets": {}}
    for kind, strengths in CORRUPTIONS.items():
        values = [fid(corrupt(test, kind, s, g)) for s in strengths]
        report["curves"][kind] = {"strength": list(strengths), "fid": values,
                                  "monotonic": bool(np.all(np.diff([report["floor"], *values]) > 0))}
    for name, path in (sample_sets or {}).items():
        report["sample_sets"][name] = fid(load_sample_set(path))
    blur = report["curves"]["blur_sigma"]
    broken = report["curves"]["broken_strokes_4x4"]
    report["softness_vs_structure"] = {
        "blur_sigma_1": blur["fid"][blur["strength"].index(1.0)],
        "broken_strokes_4x4_quarter": broken["fid"][broken["strength"].index(0.25)]}
    report["passed"] = (all(c["monotonic"] for c in report["curves"].values())
                        and report["softness_vs_structure"]["blur_sigma_1"]
                        < report["softness_vs_structure"]["broken_strokes_4x4_quarter"])
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="digits classifier checkpoint")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="of the noise and the patch shuffling")
    parser.add_argument("--out", type=Path, help="report JSON to write")
    parser.add_argument("sets", nargs="*", metavar="NAME=FILE", help="sample sets to score as well")


def main(args: argparse.Namespace) -> int:
    sets = {}
    for item in args.sets:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"validate-features: expected NAME=FILE, got {item!r}")
        sets[name] = Path(path)
    torch.set_num_threads(1)
    report = validate(args.weights, args.image_size, sets, args.seed)
    if args.out:
        atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1
