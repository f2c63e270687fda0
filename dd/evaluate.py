"""FID / IS / KID / precision / recall of a sample set, computed by torch-fidelity (no metric code of our own).

Sample set file format (``.npz``, written by ``write_sample_set``):

* ``images``: uint8 [N, 3, H, W] in [0, 255], channels first (NCHW). Channels-last arrays are rejected with a
  message rather than guessed, since an image 3 pixels high would be ambiguous.
* ``labels``: integer [N] (int64 when we write it), the class each image was generated for. Optional for the
  metrics, required for ``classifier_accuracy``.

A reference is another such file or the digits themselves: ``digits`` (= ``digits:train``), ``digits:test`` or
``digits:all``, at the samples' resolution (see ``dd.digits``). ``write_digits_reference`` writes one to a file.

Feature networks: ``digits-classifier`` (``dd.classifier``, registered with torch-fidelity here; the penultimate
``features`` feed FID / KID / precision-recall, the ``logits`` feed IS) or any extractor torch-fidelity knows,
e.g. ``inception-v3-compat`` for ImageNet-scale runs. Weights always come from a local file: nothing is
downloaded, and nothing is cached unless ``cache_dir`` is given (then keyed by content hashes, never by name).

Precision and recall follow torch-fidelity's convention: the samples are input1 ("generated"), the reference is
input2 ("real"); precision = fraction of samples inside the reference manifold, recall = the converse.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from dd.classifier import classify, load_checkpoint, load_classifier, prepare_images
from dd.digits import NUM_CLASSES, load_digits_images, to_uint8
from dd.io import atomic_write_bytes, atomic_write_json, sha256_file

DIGITS_EXTRACTOR = "digits-classifier"
DIGITS_REFERENCES = {"digits": "train", "digits:train": "train", "digits:test": "test", "digits:all": "all"}
SAMPLE_SET_FORMAT = "an .npz with 'images' uint8 [N, 3, H, W] (NCHW, 0..255) and optional 'labels' integer [N]"


# ---------------------------------------------------------------------------------------------------------------
# torch-fidelity feature extractor


class DigitsFeatureExtractor(FeatureExtractorBase):
    """The digits classifier as a torch-fidelity feature extractor.

    torch-fidelity builds it as ``cls(name, features_list, **calculate_metrics_kwargs)`` and feeds it uint8
    [B, 3, H, W] batches in [0, 255]; images are mapped to [-1, 1] and resized to the classifier's resolution
    when they differ. Provided features: ``features`` (penultimate layer, float32 [B, feature_dim]) and
    ``logits`` (float32 [B, 10]).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"the {name!r} feature extractor needs feature_extractor_weights_path: a checkpoint "
                             "written by `python -m dd train-classifier`")
        self.classifier = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        features, logits = self.classifier.features_and_logits(prepare_images(x, self.classifier.config.image_size))
        by_name = {"features": features.float(), "logits": logits.float()}
        return tuple(by_name[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


def register_digits_feature_extractor() -> None:
    """Make ``digits-classifier`` known to torch-fidelity (idempotent; done on import of this module)."""
    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)


register_digits_feature_extractor()


# ---------------------------------------------------------------------------------------------------------------
# sample sets


class SampleSetError(ValueError):
    """A sample set or reference file that is missing, unreadable or not in the expected format."""


@dataclass
class SampleSet:
    images: np.ndarray  # uint8 [N, 3, H, W]
    labels: np.ndarray | None  # int64 [N]
    source: str  # file path or digits reference name, for messages and the metrics file

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
                        num_classes: int | None = None) -> SampleSet:
    """Validate (images, labels) against the sample set format; raise SampleSetError naming ``source``."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise SampleSetError(f"{source}: 'images' must be uint8 in [0, 255], got {dtype} "
                             "(convert images in [-1, 1] with dd.digits.to_uint8)")
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
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:  # corrupt member, pickled object array
            raise SampleSetError(f"{path}: corrupt .npz member ({type(e).__name__}: {e})") from e
    return check_sample_arrays(images, labels, str(path), require_labels=require_labels, num_classes=num_classes)


def write_sample_set(path, images, labels=None) -> None:
    """Write a sample set atomically. ``images``: uint8 [N, 3, H, W], or float in [-1, 1] (converted)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating):
        images = to_uint8(images)
    sample_set = check_sample_arrays(images, None if labels is None else np.asarray(labels), str(path))
    arrays = {"images": sample_set.images}
    if sample_set.labels is not None:
        arrays["labels"] = sample_set.labels
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


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


# ---------------------------------------------------------------------------------------------------------------
# metrics


def _array_digest(images: np.ndarray) -> str:
    h = hashlib.sha256(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()[:16]


def evaluate_sample_set(
    samples_npz,
    reference="digits",
    *,
    feature_extractor: str = DIGITS_EXTRACTOR,
    weights_path=None,
    fid: bool = True,
    isc: bool = True,
    kid: bool = True,
    prc: bool = True,
    device: str | None = None,
    batch_size: int = 256,
    seed: int = 2020,
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    cache_dir=None,
) -> dict:
    """Metrics of the samples against the reference, all computed by ``torch_fidelity.calculate_metrics``.

    ``samples_npz`` / ``reference``: paths, or already loaded ``SampleSet``s (reference may also be a digits
    name). KID's subset size is lowered to the smaller set's size when needed (the value used is reported);
    sets too small for IS splits or the precision/recall neighbourhood are refused with a clear error.
    Returns {fid, isc_mean, isc_std, kid_mean, kid_std, precision, recall, f_score} (those requested) plus
    what was measured against what and with which settings.
    """
    if not (fid or isc or kid or prc):
        raise ValueError("no metric requested")
    samples = samples_npz if isinstance(samples_npz, SampleSet) else load_sample_set(samples_npz)
    need_reference = fid or kid or prc
    ref = None
    if need_reference:
        ref = reference if isinstance(reference, SampleSet) else load_reference(reference, like=samples)
    n1, n2 = len(samples), (len(ref) if ref is not None else 0)

    # feasibility checks before any feature extraction
    if fid and min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images in each set (samples {n1}, reference {n2})")
    if isc and n1 < isc_splits:
        raise ValueError(f"IS with {isc_splits} splits needs at least {isc_splits} samples, got {n1}; "
                         "lower isc_splits")
    if kid:
        # at most half the smaller set: a subset as large as the set is the whole set every time, so
        # torch-fidelity's kid_subsets estimates would be one computation repeated (std 0, all the cost)
        kid_subset_size = min(kid_subset_size, n1 // 2, n2 // 2)
        if kid_subset_size < 2:
            raise ValueError(f"KID needs at least 4 images in each set (subsets of half the smaller set; "
                             f"samples {n1}, reference {n2})")
    if prc and min(n1, n2) <= prc_neighborhood:
        raise ValueError(f"precision/recall with a {prc_neighborhood}-nearest-neighbour radius needs more than "
                         f"{prc_neighborhood} images in each set (samples {n1}, reference {n2})")
    weights_sha = _check_weights(feature_extractor, weights_path)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(
        input1=UInt8Images(samples.images),
        fid=fid, isc=isc, kid=kid, prc=prc,
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        cuda=device == "cuda",
        batch_size=batch_size,
        rng_seed=seed,
        isc_splits=isc_splits,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        prc_neighborhood=prc_neighborhood,
        save_cpu_ram=True,  # in-memory arrays: no DataLoader worker processes (num_workers=0)
        verbose=False,
        cache=cache_dir is not None,
        datasets_download=False,
    )
    if ref is not None:
        kwargs["input2"] = UInt8Images(ref.images)
    if cache_dir is not None:
        # cache entries are named by what they hold (images and weights), so a changed file never hits stale ones
        kwargs["cache_root"] = str(cache_dir)
        kwargs["input1_cache_name"] = f"set-{_array_digest(samples.images)}-w-{weights_sha[:16]}"
        if ref is not None:
            kwargs["input2_cache_name"] = f"set-{_array_digest(ref.images)}-w-{weights_sha[:16]}"
    raw = torch_fidelity.calculate_metrics(**kwargs)

    names = {
        torch_fidelity.KEY_METRIC_FID: "fid",
        torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
        torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
        torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
        torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
        torch_fidelity.KEY_METRIC_PRECISION: "precision",
        torch_fidelity.KEY_METRIC_RECALL: "recall",
        torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
    }
    out = {names[k]: float(v) for k, v in raw.items() if k in names}
    out.update(
        samples=samples.source,
        reference=ref.source if ref is not None else None,
        num_samples=n1,
        num_reference=n2,
        feature_extractor=feature_extractor,
        weights=None if weights_path is None else str(weights_path),
        weights_sha256=weights_sha,
        settings=dict(seed=seed, isc_splits=isc_splits, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                      prc_neighborhood=prc_neighborhood),
        torch_fidelity_version=torch_fidelity.__version__,
    )
    return out


def _check_weights(feature_extractor: str, weights_path) -> str:
    """Fail early on a missing or wrong weights file; return its SHA-256 (for the record and cache keys)."""
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {feature_extractor!r}; torch-fidelity knows "
                         f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if weights_path is None:
        raise ValueError(f"feature extractor {feature_extractor!r} needs a local weights file (--weights); this "
                         "tool never downloads weights")
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"feature extractor weights not found: {weights_path}")
    if feature_extractor == DIGITS_EXTRACTOR:
        load_checkpoint(weights_path)  # raises a clear error for a wrong or corrupt file
    return sha256_file(weights_path)


def classifier_accuracy(samples_npz, classifier_path, device: str | None = None) -> float:
    """Fraction of samples that the digits classifier assigns to the class they were generated for."""
    model = load_classifier(classifier_path)
    samples = samples_npz if isinstance(samples_npz, SampleSet) else load_sample_set(samples_npz)
    samples = check_sample_arrays(samples.images, samples.labels, samples.source, require_labels=True,
                                  num_classes=model.config.num_classes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    predicted = classify(model.to(device), torch.from_numpy(samples.images))
    return (predicted == torch.from_numpy(samples.labels)).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help=f"sample set: {SAMPLE_SET_FORMAT}")
    parser.add_argument("--reference", default="digits",
                        help=f"reference .npz, or one of {sorted(DIGITS_REFERENCES)} (default: digits = train split)")
    parser.add_argument("--feature-extractor", default=DIGITS_EXTRACTOR,
                        help="torch-fidelity feature extractor (digits-classifier, inception-v3-compat, ...)")
    parser.add_argument("--weights", required=True, help="feature extractor weights file (never downloaded)")
    parser.add_argument("--out", help="metrics JSON to write (atomically); printed to stdout either way")
    parser.add_argument("--classifier", help="digits classifier for the label accuracy of labelled samples "
                        "(default: --weights when the feature extractor is digits-classifier)")
    for metric in ("fid", "isc", "kid", "prc"):
        parser.add_argument(f"--no-{metric}", action="store_true", help=f"skip {metric.upper()}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=2020, help="torch-fidelity rng_seed (IS shuffling, KID subsets)")
    parser.add_argument("--isc-splits", type=int, default=10)
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="lowered to half the smaller set's size (so that the subsets differ)")
    parser.add_argument("--prc-neighborhood", type=int, default=3)
    parser.add_argument("--cache-dir", help="cache features here, keyed by content (default: no cache)")
    parser.add_argument("--vs-samples", help="a second reference, e.g. the teacher's own sample set: FID and KID of "
                                             "the samples against it (the distillation gap), in the same process")
    parser.add_argument("--vs-key", default="vs_teacher",
                        help="the --vs-samples metrics go into the output JSON under this key")


def main(args: argparse.Namespace) -> int:
    try:
        samples = load_sample_set(args.samples)
        # a bad --vs-samples file fails here, before any feature extraction
        vs_reference = load_sample_set(args.vs_samples) if args.vs_samples else None
        metrics = evaluate_sample_set(
            samples, args.reference,
            feature_extractor=args.feature_extractor, weights_path=args.weights,
            fid=not args.no_fid, isc=not args.no_isc, kid=not args.no_kid, prc=not args.no_prc,
            device=args.device, batch_size=args.batch_size, seed=args.seed, isc_splits=args.isc_splits,
            kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
            prc_neighborhood=args.prc_neighborhood, cache_dir=args.cache_dir,
        )
        classifier = args.classifier or (args.weights if args.feature_extractor == DIGITS_EXTRACTOR else None)
        if classifier is not None and samples.labels is not None:
            metrics["classifier_accuracy"] = classifier_accuracy(samples, classifier, device=args.device)
        vs = None
        if vs_reference is not None:
            vs = evaluate_sample_set(
                samples, vs_reference,
                feature_extractor=args.feature_extractor, weights_path=args.weights,
                fid=not args.no_fid, isc=False, kid=not args.no_kid, prc=False,
                device=args.device, batch_size=args.batch_size, seed=args.seed,
                kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, cache_dir=args.cache_dir,
            )
            if "classifier_accuracy" in metrics:
                vs["classifier_accuracy"] = metrics["classifier_accuracy"]
    except (ValueError, FileNotFoundError) as e:  # SampleSetError is a ValueError
        print(f"python -m dd evaluate: error: {e}", file=sys.stderr)
        return 2
    if vs is not None:
        metrics[args.vs_key] = vs
    if args.out:
        atomic_write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0
