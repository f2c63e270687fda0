"""``python -m dd random-weights NAME --out PATH``: a released file's stand-in with seeded random weights.

The rehearsal configurations (``config/rehearsal/*.yaml``, ``teacher.weights: random``) run every stage of a paper
configuration at real model size on a machine that cannot download: each file the pipeline would download is written
here instead, in the released file's format (nesting, keys, shapes, dtypes), so the same loaders, rules and command
lines run as in the real run. Names are those of ``python -m dd download``: the families' releases, the FID
statistic, and the pinned URLs of the Inception and LPIPS-backbone weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dd.io import atomic_torch_save

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's inception-v3-compat weights
VGG16_FILE = "vgg16-397923af.pth"                             # torchvision's VGG-16 (LPIPS backbone)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def _inception_state_dict() -> dict:
    """torch-fidelity's InceptionV3 feature extractor, built without loading (or downloading) its weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    cls = inc.FeatureExtractorInceptionV3
    saved = inc.load_state_dict_from_url, cls.load_state_dict
    inc.load_state_dict_from_url = lambda *a, **k: None    # the constructor would download, then load
    cls.load_state_dict = lambda self, sd, strict=True: None
    try:
        return cls("inception-v3-compat", ["2048"]).state_dict()
    finally:
        inc.load_state_dict_from_url, cls.load_state_dict = saved


def _fid_statistic(dim: int = 2048) -> dict:
    """{"m", "s"} as in the DD release's statistic.pth: a mean and a positive-definite covariance."""
    a = torch.randn(dim, dim) / dim ** 0.5
    return {"m": torch.randn(dim, dtype=torch.float64) * 0.1, "s": (a @ a.T + 0.1 * torch.eye(dim)).double()}


def random_release(name_or_url: str):
    """The object the released file ``name_or_url`` holds, with random weights from the global RNG."""
    import torchvision

    from dd.families.registry import FAMILIES
    from dd.pipeline.download import resolve

    for family in FAMILIES.values():
        obj = family.random_release(name_or_url)
        if obj is not None:
            return obj
    filename = resolve(name_or_url).filename
    if name_or_url == "fid_imagenet256":
        return _fid_statistic()
    if filename == INCEPTION_FILE:
        return _inception_state_dict()
    if filename in (VGG16_FILE, ALEXNET_FILE):  # LPIPS reads only the convolutional features
        net = torchvision.models.vgg16() if filename == VGG16_FILE else torchvision.models.alexnet()
        return {f"features.{k}": v for k, v in net.features.state_dict().items()}
    raise ValueError(f"no random stand-in for {name_or_url!r} ({filename}); "
                     "random weights cover the families' releases, fid_imagenet256, Inception and LPIPS backbones")


def write_random_release(name_or_url: str, out: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    atomic_torch_save(random_release(name_or_url), out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a release name of python -m dd download, or a pinned URL")
    parser.add_argument("--out", type=Path, required=True, help="file to write (the released file's name)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    write_random_release(args.name, args.out, args.seed)
    print(f"wrote {args.out} (random weights standing in for {args.name})")
    return 0
