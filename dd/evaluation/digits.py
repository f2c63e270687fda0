"""The embedded-default data set: scikit-learn's bundled 8x8 handwritten digits as small RGB images.

``sklearn.datasets.load_digits`` ships 1,797 grey 8x8 images (pixel values 0..16, ten classes) inside the
scikit-learn package, so the embedded default needs neither network nor GPU. The tiny tokenizers, teachers and
the digits classifier all see the same images:

* values ``v / 16`` in [0, 1], upsampled 8x8 -> ``size`` x ``size`` with bilinear interpolation
  (``torch.nn.functional.interpolate``, ``align_corners=False``, no antialiasing). Bilinear weights are convex,
  so the result stays in [0, 1] (bicubic would overshoot and need clipping);
* mapped to [-1, 1] (``2 x - 1``; background is -1, ink is +1) and the grey channel replicated to 3 channels.

The train/test split is stratified and fixed by ``seed``: within each class (in dataset order) the indices are
permuted with ``numpy.random.default_rng([seed, class])`` and the first ``round(test_fraction * n_class)`` go to
the test split. Each split keeps dataset order. With the defaults (seed 0, 20%) that is 1,438 train and 359 test
images; the split depends only on (seed, test_fraction), never on ``size``.
"""
from __future__ import annotations

import functools
import io
import os

import numpy as np
import torch
import torch.nn.functional as F

from dd.io import atomic_write_bytes

NUM_CLASSES = 10
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [1797, 8, 8] in 0..16, labels int64 [1797]) from the copy bundled with scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def split_indices(labels: np.ndarray, split: str, seed: int = 0, test_fraction: float = 0.2) -> np.ndarray:
    """Sorted dataset indices of ``split`` under the stratified, seeded split described in the module docstring."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    if split == "all":
        return np.arange(len(labels))
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        # a per-class generator keeps each class's split independent of the others' sizes
        rng = np.random.default_rng([seed, int(c)])
        n_test = int(round(test_fraction * len(members)))
        is_test[rng.permutation(members)[:n_test]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def upsample(pixels01: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 1, h, w] values in [0, 1] -> [N, 1, size, size] by bilinear interpolation (align_corners=False)."""
    if pixels01.shape[-1] == size and pixels01.shape[-2] == size:
        return pixels01
    return F.interpolate(pixels01, size=(size, size), mode="bilinear", align_corners=False)


def load_digits_images(
    size: int = 16, split: str = "train", seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 3, size, size] in [-1, 1], labels int64 [N]) of one split of the digits."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    pixels, labels = _raw_digits()
    idx = split_indices(labels, split, seed, test_fraction)
    grey = torch.from_numpy(pixels[idx].astype(np.float32) / 16.0).unsqueeze(1)
    grey = upsample(grey, size).clamp(0.0, 1.0)  # the clamp only removes float rounding
    images = (grey * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(labels[idx].copy())


def load_digits_pixels(split: str = "train", seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(grey values float32 [N, 1, 8, 8] in [0, 1], labels int64 [N]): the 8x8 source of ``load_digits_images``."""
    pixels, labels = _raw_digits()
    idx = split_indices(labels, split, seed, test_fraction)
    return torch.from_numpy(pixels[idx].astype(np.float32) / 16.0).unsqueeze(1), torch.from_numpy(labels[idx].copy())


def transform_digits(pixels01: torch.Tensor, size: int, zoom: torch.Tensor, shear: torch.Tensor,
                     shift: torch.Tensor) -> torch.Tensor:
    """8x8 digits [N, 1, 8, 8] in [0, 1] resampled once to images [N, 3, size, size] in [-1, 1] through an affine map
    of each: zoomed by ``zoom`` [N] about the centre, sheared by ``shear`` [N] (a point moves right by shear times
    its height below the centre: positive leans the top left), moved by ``shift`` [N, 2] output pixels (x, y).
    Bilinear with border values as ``load_digits_images``, which is the identity map of this one."""
    n = pixels01.shape[0]
    # affine_grid maps each output position to the input position it reads: the inverse map, S^-1 (p - t) / zoom
    inv = torch.zeros(n, 2, 3)
    inv[:, 0, 0] = 1.0
    inv[:, 0, 1] = -shear
    inv[:, 1, 1] = 1.0
    t = shift.float() * 2.0 / size                                          # output pixels -> normalised units
    inv[:, :, 2] = -torch.einsum("nij,nj->ni", inv[:, :, :2], t)
    inv = inv / zoom.float()[:, None, None]
    grid = F.affine_grid(inv, [n, 1, size, size], align_corners=False)
    grey = F.grid_sample(pixels01, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0.0, 1.0)
    return (grey * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Corruptions of images in [-1, 1]: the feature network's training augmentations and its validation
# ---------------------------------------------------------------------------------------------------------------
def gaussian_blur(images: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] with standard deviation ``sigma`` (a number, or [N] per image; 0 =
    unchanged), replicate padding."""
    # the kernel on the images' device: the digits classifier blurs its input, and `dd evaluate --device cuda`
    # failed on a CPU kernel
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(images.shape[0]).clamp(min=1e-6)
    r = max(1, int(np.ceil(3 * float(sigma.max()))))
    sigma = sigma.to(images.device)
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=images.device)
    k = torch.exp(-t[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                                                  # [N, 2r+1]
    n, c, h, w = images.shape
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = (x.unfold(3, 2 * r + 1, 1) * k[:, None, None, None, :]).sum(-1)           # rows
    return (x.unfold(2, 2 * r + 1, 1) * k[:, None, None, None, :]).sum(-1)        # columns


def pixel_noise(images: torch.Tensor, std, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian pixel noise of standard deviation ``std`` (a number or [N]), clipped to [-1, 1]."""
    std = torch.as_tensor(std, dtype=torch.float32).expand(images.shape[0]).view(-1, 1, 1, 1)
    return (images + std * torch.randn(images.shape, generator=generator)).clamp(-1.0, 1.0)


def shuffle_patches(images: torch.Tensor, fraction: float, patch: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Broken strokes: at each patch x patch position, a ``fraction`` of the images take that patch from another
    image (of any class), as a sampler whose tokens ignore each other would compose them."""
    out = images.clone()
    n, _, h, w = images.shape
    for i in range(0, h, patch):
        for j in range(0, w, patch):
            take = torch.rand(n, generator=generator) < fraction
            donor = torch.randperm(n, generator=generator)
            out[take, :, i:i + patch, j:j + patch] = images[donor][take, :, i:i + patch, j:j + patch]
    return out


def to_uint8(images):
    """Images in [-1, 1] -> uint8 in [0, 255] (round to nearest, clipped). Same kind (torch/numpy) as the input."""
    if isinstance(images, np.ndarray):
        return np.clip(np.rint((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _as_uint8_nchw(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 3, H, W] (or [N, 1, H, W]), got shape {images.shape}")
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return images


def save_grid_png(images, labels=None, path="grid.png", nrow: int = 10, scale: int = 2, pad: int = 1) -> None:
    """Write a PNG grid of images (uint8 [N,3,H,W] or float in [-1, 1]).

    Without labels: images in order, ``nrow`` per row. With labels: one row per class present (ascending), holding
    that class's first ``nrow`` images; short rows are left blank. Each image is enlarged ``scale`` times (nearest
    neighbour) and cells are separated by ``pad`` grey pixels. Written atomically (temporary file + os.replace).
    """
    from PIL import Image

    images = _as_uint8_nchw(images)
    if nrow < 1 or scale < 1 or pad < 0:
        raise ValueError(f"need nrow >= 1, scale >= 1, pad >= 0; got nrow={nrow}, scale={scale}, pad={pad}")
    if labels is None:
        rows = [list(range(i, min(i + nrow, len(images)))) for i in range(0, len(images), nrow)]
    else:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        rows = [list(np.flatnonzero(labels == c)[:nrow]) for c in np.unique(labels)]
    rows = rows or [[]]
    h, w = images.shape[2] * scale, images.shape[3] * scale
    canvas = np.full((len(rows) * (h + pad) + pad, nrow * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, i in enumerate(row):
            cell = images[i].transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = cell
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write_bytes(os.fspath(path), buf.getvalue())

