"""FID / IS / KID / precision / recall of a sample set, computed by torch-fidelity (no metric code of our own).

Sample sets are ``.npz`` files (``dd.evaluation.sample_sets``); a reference is another such file or the digits
themselves (``dd.evaluation.reference``).

Feature networks: ``digits-classifier`` (``dd.evaluation.classifier``, registered with torch-fidelity here; the penultimate
``features`` feed FID / KID / precision-recall, the ``logits`` feed IS) or any extractor torch-fidelity knows,
e.g. ``inception-v3-compat`` for ImageNet-scale runs. Weights always come from a local file: nothing is
downloaded, and nothing is cached unless ``cache_dir`` is given (then keyed by content hashes, never by name).

Precision and recall follow torch-fidelity's convention: the samples are input1 ("generated"), the reference is
input2 ("real"); precision = fraction of samples inside the reference manifold, recall = the converse.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from dd.evaluation.classifier import classify, load_checkpoint, load_classifier, prepare_images
from dd.evaluation.reference import DIGITS_REFERENCES, FidStatistics, load_reference
from dd.evaluation.sample_sets import SAMPLE_SET_FORMAT, SampleSet, UInt8Images, check_sample_arrays, load_sample_set
from dd.evaluation.settings import EvaluationSettings
from dd.io import atomic_write_json, sha256_file

DIGITS_EXTRACTOR = "digits-classifier"


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
    splits: int = EvaluationSettings.splits,
    batch_size: int = EvaluationSettings.batch_size,
    seed: int = EvaluationSettings.seed,
    isc_splits: int = EvaluationSettings.isc_splits,
    kid_subsets: int = EvaluationSettings.kid_subsets,
    kid_subset_size: int = EvaluationSettings.kid_subset_size,
    prc_neighborhood: int = EvaluationSettings.prc_neighborhood,
    cache_dir=None,
) -> dict:
    """Metrics of the samples against the reference, computed by torch-fidelity from features extracted once.

    The samples are cut into ``splits`` equal, consecutive parts (independent draws of the same sampler: several
    sampling seeds in one file) and every metric is computed on each part against the whole reference: the result
    is the mean over the parts and, for ``splits`` > 1, its standard error ``<metric>_std`` = SD / sqrt(splits)
    (``per_split`` keeps the values). With one split this is exactly ``torch_fidelity.calculate_metrics``.
    ``samples_npz`` / ``reference``: paths, or already loaded ``SampleSet``s (reference may also be a digits name).
    KID's subset size is lowered to half the smaller set's size when needed (the value used is reported); sets too
    small for IS splits or the precision/recall neighbourhood are refused with a clear error. A sample set that
    carries ``teacher_nll_bits`` gets that metric (mean per token) and its standard error the same way.
    """
    if not (fid or isc or kid or prc):
        raise ValueError("no metric requested")
    samples = samples_npz if isinstance(samples_npz, SampleSet) else load_sample_set(samples_npz)
    need_reference = fid or kid or prc
    ref = stats = None
    skipped = {}
    if need_reference:
        ref = reference if isinstance(reference, (SampleSet, FidStatistics)) else load_reference(reference,
                                                                                                  like=samples)
    if isinstance(ref, FidStatistics):  # FID against the statistics; the metrics that need reference images: none
        stats, ref = ref, None
        for metric, wanted in (("kid", kid), ("prc", prc)):
            if wanted:
                skipped[metric] = f"the reference {stats.source} holds FID statistics only, no images"
        kid = prc = False
    if splits < 1 or len(samples) % splits:
        raise ValueError(f"{len(samples)} samples do not split into {splits} equal parts")
    n1, n2 = len(samples) // splits, (len(ref) if ref is not None else 0)

    # feasibility checks (per part) before any feature extraction
    if fid and min(n1, n2 if stats is None else n1) < 2:
        raise ValueError(f"FID needs at least 2 images in each set (samples {n1} per part, reference {n2})")
    if isc and n1 < isc_splits:
        raise ValueError(f"IS with {isc_splits} splits needs at least {isc_splits} samples, got {n1} per part; "
                         "lower isc_splits")
    if kid:
        # at most half the smaller set: a subset as large as the set is the whole set every time, so
        # torch-fidelity's kid_subsets estimates would be one computation repeated (std 0, all the cost)
        kid_subset_size = min(kid_subset_size, n1 // 2, n2 // 2)
        if kid_subset_size < 2:
            raise ValueError(f"KID needs at least 4 images in each set (subsets of half the smaller set; "
                             f"samples {n1} per part, reference {n2})")
    if prc and min(n1, n2) <= prc_neighborhood:
        raise ValueError(f"precision/recall with a {prc_neighborhood}-nearest-neighbour radius needs more than "
                         f"{prc_neighborhood} images in each set (samples {n1} per part, reference {n2})")
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
    parts = [_fidelity_metrics(part, ref_features, layers, kwargs, stats)
             for part, ref_features, layers in _split_features(splits, **kwargs)]
    if samples.teacher_nll_bits is not None:
        for part, nll in zip(parts, np.split(samples.teacher_nll_bits, splits)):
            part["teacher_nll_bits"] = float(nll.mean())
    out = _mean_and_standard_error(parts)
    out.update(
        samples=samples.source,
        reference=ref.source if ref is not None else (stats.source if stats is not None else None),
        num_samples=len(samples),
        splits=splits,
        num_reference=n2,
        feature_extractor=feature_extractor,
        weights=None if weights_path is None else str(weights_path),
        weights_sha256=weights_sha,
        settings=dict(seed=seed, isc_splits=isc_splits, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                      prc_neighborhood=prc_neighborhood),
        torch_fidelity_version=torch_fidelity.__version__,
    )
    if skipped:
        out["not_computed"] = skipped
    return out


# torch-fidelity's result keys -> ours
_NAMES = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


def _split_features(splits: int, **kwargs):
    """Extract the features of both inputs once (torch-fidelity's extractor, cache and layers) and yield, per part
    of the samples, (its features, the reference's features, {metric: layer})."""
    from torch_fidelity.helpers import get_kwarg
    from torch_fidelity.metric_fid import extract_featuresdict_from_input_id_cached
    from torch_fidelity.utils import (
        create_feature_extractor,
        resolve_feature_extractor,
        resolve_feature_layer_for_metric,
    )

    metrics = [m for m in ("isc", "fid", "kid", "prc") if get_kwarg(m, kwargs)]
    layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m in metrics}
    extractor = create_feature_extractor(resolve_feature_extractor(**kwargs), sorted(set(layers.values())), **kwargs)
    samples = extract_featuresdict_from_input_id_cached(1, extractor, **kwargs)
    reference = (extract_featuresdict_from_input_id_cached(2, extractor, **kwargs)
                 if kwargs.get("input2") is not None else None)
    n = next(iter(samples.values())).shape[0] // splits
    for k in range(splits):
        yield {name: f[k * n:(k + 1) * n] for name, f in samples.items()}, reference, layers


def _fidelity_metrics(samples: dict, reference: dict | None, layers: dict, kwargs: dict,
                      stats: FidStatistics | None = None) -> dict:
    """torch-fidelity's metrics of one part, from features (the steps of ``calculate_metrics``); FID against
    ``stats`` instead of the reference's features when given."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    raw = {}
    if "isc" in layers:
        raw.update(isc_featuresdict_to_metric(samples, layers["isc"], **kwargs))
    if "fid" in layers:
        ours = fid_featuresdict_to_statistics(samples, layers["fid"])
        if stats is not None:
            if ours["mu"].shape[0] != stats.dim:
                raise ValueError(f"FID statistics {stats.source} are {stats.dim}-dimensional, but the feature "
                                 f"extractor's FID layer {layers['fid']!r} gives {ours['mu'].shape[0]} features")
            theirs = {"mu": stats.mu.astype(ours["mu"].dtype), "sigma": stats.sigma.astype(ours["sigma"].dtype)}
        else:
            theirs = fid_featuresdict_to_statistics(reference, layers["fid"])
        raw.update(fid_statistics_to_metric(ours, theirs, False))
    if "kid" in layers:
        raw.update(kid_featuresdict_to_metric(samples, reference, layers["kid"], **kwargs))
    if "prc" in layers:
        raw.update(prc_featuresdict_to_metric(samples, reference, layers["prc"], **kwargs))
    return {_NAMES[k]: float(v) for k, v in raw.items() if k in _NAMES}


def _mean_and_standard_error(parts: list[dict]) -> dict:
    """{metric: mean over the parts, metric_std: its standard error (parts > 1)}, and the parts' values. torch-
    fidelity's own isc_std / kid_std (a spread within one part) are averaged like the other values; the standard
    errors of the IS and KID means are isc_mean_std / kid_mean_std."""
    out: dict = {}
    for key in parts[0]:
        values = np.array([p[key] for p in parts], dtype=np.float64)
        out[key] = float(values.mean())
        if len(parts) > 1 and key not in ("isc_std", "kid_std"):
            out[f"{key}_std"] = float(values.std(ddof=1) / np.sqrt(len(values)))
    if len(parts) > 1:
        out["per_split"] = {key: [p[key] for p in parts] for key in parts[0]}
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


def prompt_accuracies(samples_npz, classifier_path, prompts_path, scale_path, device: str | None = None) -> dict:
    """Text-to-image digits: ``prompt_accuracy`` (the classifier's digit and every measured attribute word match the
    prompt, ``digit_prompts.prompt_accuracy``) and ``classifier_accuracy`` (the digit alone), each with its standard
    error over samples (``_std``). Sample i was generated from prompt row ``labels[i]`` of ``prompts_path`` (the
    prompt file the sampler's caption features encode); ``scale_path`` is ``attribute_scale.json``."""
    import json as _json

    from dd.evaluation import digit_prompts as dp
    from dd.pipeline.prompt_files import read_prompts

    rows = read_prompts(prompts_path, "prompt", extra_columns=dp.PROMPT_COLUMNS[1:])
    scale = dp.AttributeScale.from_dict(_json.loads(Path(scale_path).read_text()))
    samples = samples_npz if isinstance(samples_npz, SampleSet) else load_sample_set(samples_npz)
    if samples.labels is None or len(samples.labels) == 0:
        raise ValueError(f"{samples.source}: prompt accuracy needs the prompt row of every sample (labels)")
    if samples.labels.min() < 0 or samples.labels.max() >= len(rows):
        raise ValueError(f"{samples.source}: labels must be rows 0..{len(rows) - 1} of {prompts_path}, got "
                         f"{int(samples.labels.min())}..{int(samples.labels.max())}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.from_numpy(samples.images)
    predicted = classify(load_classifier(classifier_path).to(device), images).cpu().numpy()
    sample_rows = [rows[i] for i in samples.labels.tolist()]
    in_range = prepare_images(images, images.shape[-1])          # [-1, 1] at the samples' own size
    correct = dp.prompt_accuracy(in_range.numpy(), predicted, sample_rows, scale)
    digit = (predicted == np.array([int(r["digit"]) for r in sample_rows])).astype(float)
    n = len(correct)
    return {"prompt_accuracy": float(correct.mean()), "prompt_accuracy_std": float(correct.std(ddof=1) / np.sqrt(n)),
            "classifier_accuracy": float(digit.mean()), "classifier_accuracy_std": float(digit.std(ddof=1) / np.sqrt(n))}


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
    parser.add_argument("--prompts", help="text-to-image digits: the prompt file whose rows the sample labels are; adds "
                        "prompt_accuracy (and classifier_accuracy against the prompts' digits)")
    parser.add_argument("--attribute-scale", help="with --prompts: attribute_scale.json of python -m dd digit-prompts")
    parser.add_argument("--prompt-column", default="prompt", help="the prompt file's column of prompts")
    parser.add_argument("--clip-model", help="with --prompts: CLIP score (torchmetrics) with this CLIP model, a Hugging "
                        "Face id or a local folder (dd.evaluation.clip_score)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    d = EvaluationSettings()
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seed", type=int, default=d.seed, help="torch-fidelity rng_seed (IS shuffling, KID subsets)")
    parser.add_argument("--splits", type=int, default=d.splits,
                        help="evaluate the samples in this many equal parts: means and standard errors")
    parser.add_argument("--isc-splits", type=int, default=d.isc_splits)
    parser.add_argument("--kid-subsets", type=int, default=d.kid_subsets)
    parser.add_argument("--kid-subset-size", type=int, default=d.kid_subset_size,
                        help="lowered to half the smaller set's size (so that the subsets differ)")
    parser.add_argument("--prc-neighborhood", type=int, default=d.prc_neighborhood)
    parser.add_argument("--cache-dir", help="cache features here, keyed by content (default: no cache)")
    parser.add_argument("--vs-samples", help="a second reference, e.g. the teacher's own sample set: FID and KID of "
                                             "the samples against it (the distillation gap), in the same process")
    parser.add_argument("--vs-key", default="vs_teacher",
                        help="the --vs-samples metrics go into the output JSON under this key")


def main(args: argparse.Namespace) -> int:
    if bool(args.prompts) != bool(args.attribute_scale or args.clip_model):
        print("python -m dd evaluate: error: --prompts goes with --attribute-scale (digits prompt accuracy) or "
              "--clip-model (CLIP score), and they with it", file=sys.stderr)
        return 2
    try:
        samples = load_sample_set(args.samples)
        # a bad --vs-samples file fails here, before any feature extraction
        vs_reference = load_sample_set(args.vs_samples) if args.vs_samples else None
        clip_prompts = None
        if args.clip_model:  # a bad prompt file or labels outside it fail here too, read once
            from dd.evaluation.clip_score import sample_prompts

            clip_prompts = sample_prompts(samples, args.prompts, args.prompt_column)
        metrics = evaluate_sample_set(
            samples, args.reference,
            feature_extractor=args.feature_extractor, weights_path=args.weights,
            fid=not args.no_fid, isc=not args.no_isc, kid=not args.no_kid, prc=not args.no_prc,
            device=args.device, splits=args.splits, batch_size=args.batch_size, seed=args.seed,
            isc_splits=args.isc_splits,
            kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
            prc_neighborhood=args.prc_neighborhood, cache_dir=args.cache_dir,
        )
        classifier = args.classifier or (args.weights if args.feature_extractor == DIGITS_EXTRACTOR else None)
        if args.clip_model:
            from dd.evaluation.clip_score import clip_scores

            metrics.update(clip_scores(samples, args.prompts, args.prompt_column, args.clip_model, splits=args.splits,
                                       batch_size=args.batch_size, device=args.device, prompts=clip_prompts))
        if args.attribute_scale:
            if classifier is None:
                raise ValueError("--prompts needs the digits classifier (--classifier, or the digits feature network)")
            metrics.update(prompt_accuracies(samples, classifier, args.prompts, args.attribute_scale, args.device))
        elif classifier is not None and samples.labels is not None:
            metrics["classifier_accuracy"] = classifier_accuracy(samples, classifier, device=args.device)
        vs = None
        if vs_reference is not None:
            vs = evaluate_sample_set(
                samples, vs_reference,
                feature_extractor=args.feature_extractor, weights_path=args.weights,
                fid=not args.no_fid, isc=False, kid=not args.no_kid, prc=False,
                device=args.device, splits=args.splits, batch_size=args.batch_size, seed=args.seed,
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
