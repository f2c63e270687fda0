"""The digits classifier: the embedded default's stand-in for an ImageNet classifier.

It plays two parts: (i) the teacher check, the label accuracy of class-conditional samples, and (ii) the feature
network behind FID / IS / precision / recall (see ``dd.evaluation.metrics``, which registers it with torch-fidelity).

A small CNN on 16x16 RGB images in [-1, 1]:

    conv3x3(3->16) ReLU, maxpool      16x16 -> 8x8
    conv3x3(16->32) ReLU, maxpool     8x8 -> 4x4
    conv3x3(32->64) ReLU              4x4
    flatten, linear(1024 -> 64) ReLU  the "features" used by FID / KID / precision-recall
    linear(64 -> 10)                  the "logits" used by IS and for classification

(for the default width 16, feature_dim 64). Pooling early keeps it cheap: ~0.8 M multiply-adds per image.

Training is on CPU, seeded and deterministic, on the train split of ``dd.evaluation.digits`` with light augmentation
(random shifts of up to ``max_shift`` pixels, padding with background) so that it also recognises slightly
misplaced generated digits; the held-out accuracy is measured on the test split and stored in the checkpoint.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dd.evaluation.digits import NUM_CLASSES, gaussian_blur, load_digits_images, pixel_noise
from dd.io import ArtefactError, atomic_torch_save, read_checkpoint

CHECKPOINT_KIND = "dd-digits-classifier"


@dataclass
class ClassifierConfig:
    image_size: int = 16
    width: int = 16  # channels of the first conv layer; each later one doubles it
    feature_dim: int = 64
    num_classes: int = NUM_CLASSES
    # a fixed Gaussian low-pass (standard deviation in pixels) in front of the network, in training and in use:
    # what it compares is the shape of a digit, so a slightly soft image moves its features little while a broken
    # stroke still does (0: off)
    input_blur: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 2  # augmentation: random translation in pixels (each axis)
    # augmentation: Gaussian blur of standard deviation U(0, blur_max) on a blur_prob share of the images, then
    # pixel noise of standard deviation U(0, noise_max) on a noise_prob share. Softness then moves the features
    # less than broken structure does (see dd.evaluation.validate_features)
    blur_max: float = 0.0
    blur_prob: float = 0.0
    noise_max: float = 0.0
    noise_prob: float = 0.0
    split_seed: int = 0  # of the digits train/test split
    test_fraction: float = 0.2
    # Intra-op threads while training. The convolutions are so small that extra threads mostly add synchronisation
    # (measured: 1 thread ~3 s, 2 threads on a busy 2-core machine ~14 s), and 1 thread keeps results independent
    # of the machine's core count.
    threads: int = 1


class DigitsClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if config.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x poolings), got {config.image_size}")
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.fc_features = nn.Linear(4 * w * (config.image_size // 4) ** 2, config.feature_dim)
        self.fc_logits = nn.Linear(config.feature_dim, config.num_classes)

    def feature_maps(self, images: torch.Tensor, low_pass: bool = True) -> list[torch.Tensor]:
        """The three convolutions' activations [B, C_i, S_i, S_i] of images [B, 3, S, S] in [-1, 1] (with the
        configured input low-pass unless ``low_pass`` is False): what a perceptual distance compares."""
        if low_pass and self.config.input_blur > 0:
            images = gaussian_blur(images, self.config.input_blur)
        a1 = F.relu(self.conv1(images))
        a2 = F.relu(self.conv2(F.max_pool2d(a1, 2)))
        a3 = F.relu(self.conv3(F.max_pool2d(a2, 2)))
        return [a1, a2, a3]

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, S, S] in [-1, 1] -> (features [B, feature_dim], logits [B, num_classes])."""
        features = F.relu(self.fc_features(self.feature_maps(images)[-1].flatten(1)))
        return features, self.fc_logits(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def prepare_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images [B, 3, H, W] -> float32 [-1, 1] at the classifier's resolution.

    Other resolutions are resized with bilinear interpolation (antialiased when shrinking), so e.g. 32x32
    generated digits can still be scored.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    else:
        images = images.float()
    if images.shape[-2:] != (image_size, image_size):
        shrink = images.shape[-1] > image_size or images.shape[-2] > image_size
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=shrink)
    return images


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with background (-1)."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def augment(images: torch.Tensor, tc: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Blur and pixel noise as ``TrainConfig`` says (nothing with the defaults; no random numbers drawn then)."""
    n = images.shape[0]
    if tc.blur_max > 0 and tc.blur_prob > 0:
        sigma = torch.rand(n, generator=generator) * tc.blur_max
        sigma = torch.where(torch.rand(n, generator=generator) < tc.blur_prob, sigma, torch.zeros(n))
        images = gaussian_blur(images, sigma)
    if tc.noise_max > 0 and tc.noise_prob > 0:
        std = torch.rand(n, generator=generator) * tc.noise_max
        std = torch.where(torch.rand(n, generator=generator) < tc.noise_prob, std, torch.zeros(n))
        images = pixel_noise(images, std, generator)
    return images


@torch.no_grad()
def classify(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels int64 [N] for images (uint8 [0, 255] or float [-1, 1], [N, 3, H, W])."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        x = prepare_images(chunk.to(device), model.config.image_size)
        out.append(model(x).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (classify(model, images) == labels.cpu()).float().mean().item()


def train_classifier(
    out_path=None,
    epochs: int | None = None,
    seed: int | None = None,
    config: ClassifierConfig | None = None,
    train_config: TrainConfig | None = None,
    log=print,
) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split; return (model, held-out accuracy on the test split).

    Deterministic for a given seed: the initialisation, shuffling and augmentation all draw from generators
    seeded by ``seed`` (the global torch RNG is left untouched), and training runs on ``train_config.threads``
    threads. ``epochs`` / ``seed`` override the fields of ``train_config``. If ``out_path`` is given, the
    checkpoint (weights, both configs, held-out accuracy) is written atomically.
    """
    config = config or ClassifierConfig()
    tc = replace(train_config or TrainConfig())
    if epochs is not None:
        tc.epochs = epochs
    if seed is not None:
        tc.seed = seed
    if tc.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {tc.epochs}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(tc.threads)
    try:
        return _train(out_path, config, tc, log)
    finally:
        torch.set_num_threads(threads_before)


def _train(out_path, config: ClassifierConfig, tc: TrainConfig, log) -> tuple[DigitsClassifier, float]:
    t0 = time.time()
    split = dict(size=config.image_size, seed=tc.split_seed, test_fraction=tc.test_fraction)
    train_x, train_y = load_digits_images(split="train", **split)
    test_x, test_y = load_digits_images(split="test", **split)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)  # initialisation
        model = DigitsClassifier(config)
    gen = torch.Generator().manual_seed(tc.seed + 1)  # shuffling and augmentation
    steps_per_epoch = -(-len(train_x) // tc.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.epochs * steps_per_epoch)
    for epoch in range(tc.epochs):
        model.train()
        total_loss = 0.0
        for idx in torch.randperm(len(train_x), generator=gen).split(tc.batch_size):
            x = augment(random_shift(train_x[idx], tc.max_shift, gen), tc, gen)
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{tc.epochs}  train loss {total_loss / len(train_x):.4f}")
    model.eval()
    heldout = accuracy(model, test_x, test_y)
    if log:
        log(f"held-out accuracy {heldout:.4f} on {len(test_x)} test digits ({time.time() - t0:.1f} s)")
    if out_path is not None:
        atomic_torch_save(
            {
                "kind": CHECKPOINT_KIND,
                "model": model.state_dict(),
                "config": asdict(config),
                "train_config": asdict(tc),
                "heldout_accuracy": heldout,
                "num_test": len(test_x),
            },
            out_path,
        )
    return model, heldout


def load_checkpoint(path) -> dict:
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ArtefactError(f"{path}: not a digits classifier checkpoint (written by `python -m dd train-classifier`)")
    return ckpt


def load_classifier(path, device="cpu") -> DigitsClassifier:
    ckpt = load_checkpoint(path)
    model = DigitsClassifier(ClassifierConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False)


def load_yaml_config(path) -> tuple[ClassifierConfig, TrainConfig]:
    """(model config, training config) of a YAML with sections ``model`` and ``train`` (config/tiny/classifier.yaml);
    an unknown key is an error naming it."""
    import yaml

    from dd.families.base import config_from_dict

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise ArtefactError(f"{path}: unknown sections {sorted(unknown)}; allowed: model, train")
    return config_from_dict(ClassifierConfig, data.get("model", {})), config_from_dict(TrainConfig, data.get("train", {}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--out", required=True, help="checkpoint path to write (atomically)")
    parser.add_argument("--config", type=Path, help="YAML with model / train sections (default: the dataclasses')")
    parser.add_argument("--epochs", type=int, help=f"override (default {d.epochs})")
    parser.add_argument("--seed", type=int, help=f"override (default {d.seed})")
    parser.add_argument("--image-size", type=int, help="input resolution (the digits are upsampled to it)")
    parser.add_argument("--threads", type=int, help=f"torch CPU threads while training (default {d.threads})")


def main(args: argparse.Namespace) -> int:
    config, train_config = load_yaml_config(args.config) if args.config else (ClassifierConfig(), TrainConfig())
    if args.image_size is not None:
        config = replace(config, image_size=args.image_size)
    if args.threads is not None:
        train_config = replace(train_config, threads=args.threads)
    _, heldout = train_classifier(args.out, epochs=args.epochs, seed=args.seed, config=config,
                                  train_config=train_config)
    print(f"wrote {args.out}; held-out accuracy {heldout:.4f}")
    return 0
