"""FID statistics of a folder of real images (the text-to-image protocol's COCO val2014 reference).

LlamaGen evaluates its text-to-image model by FID against COCO val2014 at 256 px (GigaGAN's evaluation code). The user
gives the image folder; this computes its FID statistics once (mean and covariance of the feature network's FID layer,
torch-fidelity's extractor and statistics) into an ``.npz`` with ``mu`` and ``sigma``, the format every ``evaluate``
job reads as a reference (``dd.evaluation.reference.load_fid_statistics``). Each image is centre-cropped to a square
and resized to the samples' size with PIL's bicubic filter (GigaGAN uses clean-fid's resize; the numbers are close,
not identical).

    python -m dd image-statistics --images /data/coco/val2014 --size 256 \
        --feature-extractor inception-v3-compat --weights pt_inception.pth --out coco_val2014_256.npz

Images are read one batch at a time, so a 40k-image folder needs no more memory than a batch. A file that is not a
readable image is refused with its path before any feature is extracted (all files are opened once up front).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dd.evaluation.sample_sets import SampleSetError
from dd.io import atomic_open

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_files(folder, limit: int | None = None) -> list[Path]:
    """The image files of ``folder`` (recursively, sorted by path), the first ``limit`` of them when given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleSetError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SampleSetError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit else files


def check_images(files: list[Path]) -> None:
    """Refuse an unreadable or truncated file by name (PIL's verify reads the whole file, decodes nothing)."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for a bad file
            raise SampleSetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def centre_crop_resize(path: Path, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: the largest centred square of the image, resized (bicubic), as RGB."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFolder(Dataset):
    """torch-fidelity input: the folder's images, centre-cropped and resized on the fly."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return centre_crop_resize(self.files[i], self.size)


def folder_statistics(folder, size: int, feature_extractor: str, weights_path=None, *, device: str | None = None,
                      batch_size: int = 200, limit: int | None = None) -> dict:
    """{"mu", "sigma", "num_images"} of the folder's images at ``size`` under the feature network's FID layer."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

    from dd.evaluation.metrics import _split_features, register_digits_feature_extractor

    files = image_files(folder, limit)
    check_images(files)
    register_digits_feature_extractor()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the evaluation's feature extraction (torch-fidelity's extractor and FID layer), one part: the whole folder
    features, _, layers = next(_split_features(
        1, input1=ImageFolder(files, size), fid=True, feature_extractor=feature_extractor,
        feature_extractor_weights_path=None if weights_path is None else str(weights_path), cuda=device == "cuda",
        batch_size=batch_size, save_cpu_ram=True, verbose=False, cache=False, datasets_download=False))
    stats = fid_featuresdict_to_statistics(features, layers["fid"])
    return {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64),
            "num_images": len(files)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of real images (searched recursively)")
    parser.add_argument("--size", type=int, required=True, help="the samples' image size")
    parser.add_argument("--feature-extractor", default="inception-v3-compat")
    parser.add_argument("--weights", help="feature extractor weights file (never downloaded)")
    parser.add_argument("--limit", type=int, help="only the first N images (sorted by path)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--out", required=True, help=".npz with mu, sigma, num_images (written atomically)")


def main(args: argparse.Namespace) -> int:
    if args.size < 1:
        raise SampleSetError(f"--size {args.size}: must be positive")
    stats = folder_statistics(args.images, args.size, args.feature_extractor, args.weights, device=args.device,
                              batch_size=args.batch_size, limit=args.limit)
    with atomic_open(args.out) as f:
        np.savez(f, mu=stats["mu"], sigma=stats["sigma"], num_images=stats["num_images"],
                 source=str(Path(args.images).resolve()))
    print(f"{args.out}: FID statistics of {stats['num_images']} images from {args.images} at {args.size} px")
    return 0
