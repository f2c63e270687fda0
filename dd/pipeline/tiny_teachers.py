"""The tiny embedded-default teachers: training each family's tokenizer and AR teacher on the CPU, and turning them
(with the digits classifier) into the release files this project ships in ``releases/tiny/``.

``python -m dd train-tokenizer --config config/tiny/llamagen.yaml --out tokenizer.pt``
``python -m dd train-teacher --config config/tiny/llamagen.yaml --tokenizer tokenizer.pt --out teacher.pt``
``python -m dd release-tiny --classifier C.pt --teacher llamagen=TOK.pt,AR.pt ... --out DIR``

``snakemake tiny_teachers`` runs all of it (see workflow/rules/teachers.smk); copying its ``release/`` folder to
``releases/tiny/`` publishes a new version.

The config file holds ``family``, ``image_size`` and two sections, ``tokenizer`` and ``teacher``,
each with ``arch`` (the model configuration: the same classes as the released models, only the
numbers differ) and ``train`` (epochs, batch size, learning rate, seed). Images are the bundled 8x8
digits upsampled to ``image_size`` (see ``dd.evaluation.digits``); every epoch sees them randomly shifted by up
to ``max_shift`` pixels, which keeps the small teachers from copying the 1,438 training images.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml

from dd.evaluation.classifier import random_shift
from dd.evaluation.digits import load_digits_images, save_grid_png
from dd.families import loading as families
from dd.families.registry import get_family
from dd.io import atomic_write_json
from dd.method.teacher import SamplingConfig

TRAIN_DEFAULTS = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "seed": 0, "max_shift": 1,
                  "grad_clip": 1.0, "schedule": "constant"}   # schedule: constant | cosine (decay to 0 over training)


def load_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    cfg = yaml.safe_load(path.read_text())
    for key in ("family", "image_size", "tokenizer", "teacher"):
        if key not in cfg:
            raise ValueError(f"{path}: missing key '{key}'")
    get_family(cfg["family"])
    for section in ("tokenizer", "teacher"):
        unknown = set(cfg[section].get("train", {})) - set(TRAIN_DEFAULTS) - {"cfg_scale", "samples_per_class"}
        if unknown:
            raise ValueError(f"{path}: unknown {section}.train keys {sorted(unknown)}; allowed {sorted(TRAIN_DEFAULTS)}")
    return cfg


def _train_settings(cfg: dict, section: str) -> dict:
    return {**TRAIN_DEFAULTS, **cfg[section].get("train", {})}


def train_epochs(images, labels, settings, step_fn, desc):
    """Run ``step_fn(images, labels) -> (loss, stats)`` over shifted, shuffled batches."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(settings["seed"])
    n = len(images)
    stats = {}
    bar = tqdm(range(settings["epochs"]), desc=desc, file=sys.stderr)
    for _ in bar:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, settings["batch_size"]):
            idx = perm[i: i + settings["batch_size"]]
            x = random_shift(images[idx], settings["max_shift"], g)
            stats = step_fn(x, labels[idx])
        bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items() if isinstance(v, float)})
    return stats


def optimiser_update(model, loss, opt, sched, grad_clip: float) -> None:
    """One training update of the tiny models: backward, gradient clipping, optimiser and schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()


def make_optimiser(model, settings, n_images: int):
    """AdamW, and the learning-rate schedule to step after every optimiser step."""
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95),
                            weight_decay=settings["weight_decay"])
    if settings["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"train.schedule must be constant or cosine, got {settings['schedule']!r}")
    total = settings["epochs"] * -(-n_images // settings["batch_size"])
    cosine = settings["schedule"] == "cosine"
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, total) / total)).item()) if cosine else 1.0)
    return opt, sched


def train_tokenizer(cfg: dict, out: Path) -> dict:
    settings = _train_settings(cfg, "tokenizer")
    torch.manual_seed(settings["seed"])
    tok = families.build_tokenizer(cfg["family"], cfg["tokenizer"]["arch"]).train()
    images, labels = load_digits_images(cfg["image_size"], "train")
    opt, sched = make_optimiser(tok, settings, len(images))

    def step(x, _):
        loss, stats = tok.training_loss(x)
        optimiser_update(tok, loss, opt, sched, settings["grad_clip"])
        return stats

    t0 = time.perf_counter()
    stats = train_epochs(images, labels, settings, step, f"tokenizer ({cfg['family']})")
    tok.eval()
    test_images, test_labels = load_digits_images(cfg["image_size"], "test")
    with torch.no_grad():
        # the Teacher interface owns encode/decode; an untrained transformer completes it here
        codec = families.make_teacher(cfg["family"], tok, families.build_ar(cfg["family"], cfg["teacher"]["arch"], tok,
                                                                             cfg["image_size"]))
        idx = codec.encode(test_images)
        rec = codec.decode_indices(idx)
    mse = torch.mean((rec - test_images) ** 2).item()
    used = idx.unique().numel()
    report = {"train_seconds": time.perf_counter() - t0, "test_mse": mse, "codes_used": used, **{
        k: v for k, v in stats.items() if isinstance(v, float)}}
    families.save_model(out, cfg["family"], "tokenizer", tok, report=report)
    grid = torch.cat([test_images[:40], rec[:40]])
    save_grid_png(grid, None, Path(out).with_suffix(".png"), nrow=20)
    print(json.dumps({"tokenizer": str(out), **report}))
    return report


def train_teacher(cfg: dict, tokenizer_path: Path, out: Path, classifier: Path | None = None) -> dict:
    settings = _train_settings(cfg, "teacher")
    family, tok = families.load_tokenizer(tokenizer_path)
    if family != cfg["family"]:
        raise ValueError(f"{tokenizer_path}: a {family} tokenizer, but the config is for {cfg['family']}")
    tok.requires_grad_(False)
    torch.manual_seed(settings["seed"])
    ar = families.build_ar(family, cfg["teacher"]["arch"], tok, cfg["image_size"]).train()
    teacher = families.make_teacher(family, tok, ar)
    images, labels = load_digits_images(cfg["image_size"], "train")
    opt, sched = make_optimiser(ar, settings, len(images))

    def step(x, y):
        with torch.no_grad():
            idx = teacher.encode(x)
        loss = ar.training_loss(idx, y)
        optimiser_update(ar, loss, opt, sched, settings["grad_clip"])
        return {"ce": loss.item()}

    t0 = time.perf_counter()
    stats = train_epochs(images, labels, settings, step, f"teacher ({family})")
    ar.eval()
    report = {"train_seconds": time.perf_counter() - t0, **stats}
    families.save_model(out, family, "ar", ar, report=report)
    report.update(check_teacher(teacher, images, cfg, out, classifier, settings))
    families.save_model(out, family, "ar", ar, report=report)
    print(json.dumps({"teacher": str(out), **report}))
    return report


@torch.no_grad()
def check_teacher(teacher, train_images, cfg, out: Path, classifier: Path | None, settings) -> dict:
    """Class-conditional samples: a grid PNG (one row per class); with a classifier, the fraction
    labelled as their class; and the fraction of samples whose token sequence copies a training image."""
    per_class = cfg["teacher"].get("train", {}).get("samples_per_class", 50)
    labels = torch.arange(teacher.num_classes).repeat_interleave(per_class)
    sampling = SamplingConfig(cfg_scale=cfg["teacher"].get("train", {}).get("cfg_scale", 2.0))
    idx = teacher.sample(labels, sampling, torch.Generator().manual_seed(settings["seed"]))
    images = teacher.decode_indices(idx)
    save_grid_png(images, labels, Path(out).with_suffix(".png"), nrow=10)
    train_idx = torch.cat([teacher.encode(b) for b in train_images.split(256)])
    known = {tuple(r) for r in train_idx.tolist()}
    report = {"copy_fraction": sum(tuple(r) in known for r in idx.tolist()) / len(idx),
              "samples_checked": len(idx)}
    if classifier is not None:
        from dd.evaluation.classifier import classify, load_classifier

        pred = classify(load_classifier(classifier), images)
        per = [(pred[labels == c] == c).float().mean().item() for c in range(teacher.num_classes)]
        report.update(classifier_accuracy=(pred == labels).float().mean().item(), classifier_accuracy_per_class=per)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Release files
# ---------------------------------------------------------------------------------------------------------------
FLOAT16_CHECK_SAMPLES = 500   # sequences that must come out identical with float16-rounded weights


def _float16_round_trip(module: torch.nn.Module) -> torch.nn.Module:
    """A copy whose floating-point weights went through float16 and back (what loading a float16 file gives)."""
    import copy

    twin = copy.deepcopy(module)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return twin


@torch.no_grad()
def float16_changes_no_sample(family: str, tokenizer, ar, seed: int = 0) -> dict:
    """Whether storing the teacher in float16 changes any sample: the same seeded draws (CFG 2.0, the family's
    filtering) with float32 and with float16-rounded weights must give the same token sequences, and the decoder the
    same uint8 images."""
    from dd.evaluation.digits import to_uint8

    teacher = families.make_teacher(family, tokenizer, ar).eval()
    rounded = families.make_teacher(family, _float16_round_trip(tokenizer), _float16_round_trip(ar)).eval()
    sampling = get_family(family).default_sampling(2.0)
    labels = torch.arange(FLOAT16_CHECK_SAMPLES) % teacher.num_classes
    a = teacher.sample(labels, sampling, torch.Generator().manual_seed(seed))
    b = rounded.sample(labels, sampling, torch.Generator().manual_seed(seed))
    same_tokens = int((a == b).all(1).sum())
    same_images = int((to_uint8(teacher.decode_indices(a)) == to_uint8(rounded.decode_indices(a))).flatten(1).all(1).sum())
    return {"samples": FLOAT16_CHECK_SAMPLES, "same_tokens": same_tokens, "same_images": same_images,
            "float16": same_tokens == FLOAT16_CHECK_SAMPLES and same_images == FLOAT16_CHECK_SAMPLES}


def release_tiny(classifier: Path, teachers: dict[str, tuple[Path, Path]], out: Path,
                 t2i: tuple[Path, Path] | None = None) -> dict:
    """Write the release files (safetensors) and ``lock.json`` (name -> file, SHA-256, size, dtype) into ``out``.
    Each teacher's tokenizer and transformer go to float16 where ``float16_changes_no_sample``; the classifier stays
    float32 (its features are the FID, to every digit)."""
    from dd.evaluation.classifier import load_checkpoint as load_classifier_checkpoint
    from dd.io import read_checkpoint

    out = Path(out)
    entries, checks = {}, {}

    def ship(name: str, checkpoint: dict, float16: bool, description: str) -> None:
        entries[name] = write_release_file(out, name, checkpoint, float16, description)

    ship("digits_classifier_16", load_classifier_checkpoint(classifier), False,
         "digits classifier: the embedded default's feature network (FID / IS / precision / recall)")
    for family, (tok_path, ar_path) in sorted(teachers.items()):
        _, tok = families.load_tokenizer(tok_path)
        ar = families.load_ar(ar_path, tok, family)
        checks[family] = float16_changes_no_sample(family, tok, ar)
        half = checks[family]["float16"]
        ship(f"tiny_{family}_tokenizer", read_checkpoint(tok_path), half, f"tiny {family} tokenizer (digits)")
        ship(f"tiny_{family}_ar", read_checkpoint(ar_path), half, f"tiny {family} AR teacher (digits)")
    lock = {"files": entries, "float16_check": checks}
    atomic_write_json(out / "lock.json", lock)
    if t2i is not None:
        lock = release_t2i(*t2i, out)
    return lock


def write_release_file(out: Path, name: str, checkpoint: dict, float16: bool, description: str) -> dict:
    """Write ``out/NAME.safetensors`` and return its ``lock.json`` entry. Nothing run-specific goes into a release
    file (training time), so that a retrain can reproduce it bit for bit."""
    from dd.io import sha256_file, write_safetensors

    if "report" in checkpoint:
        checkpoint = {**checkpoint, "report": {k: v for k, v in checkpoint["report"].items() if k != "train_seconds"}}
    path = Path(out) / f"{name}.safetensors"
    write_safetensors(path, checkpoint, float16=float16)
    return {"file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size,
            "dtype": "float16" if float16 else "float32", "description": description}


def release_t2i(ar: Path, encoder: Path, out: Path) -> dict:
    """Add the text-to-image teacher and its text encoder to the release in ``out`` (files and ``lock.json``
    entries). Both were trained with their weights rounded to float16 values (``tiny_t2i``), so the float16 files
    hold the checked models bit for bit; a checkpoint with other weights is refused."""
    from dd.io import read_checkpoint

    out = Path(out)
    lock_path = out / "lock.json"
    lock = json.loads(lock_path.read_text()) if lock_path.is_file() else {"files": {}, "float16_check": {}}
    for name, path, description in (
            ("tiny_llamagen_t2i_ar", ar, "tiny llamagen text-to-image AR teacher (captioned digits)"),
            ("tiny_t5_encoder", encoder, "tiny T5 text encoder of the text-to-image teacher (frozen)")):
        ck = read_checkpoint(path)
        if any(v.is_floating_point() and not torch.equal(v, v.half().float()) for v in ck["model"].values()):
            raise ValueError(f"{path}: weights are not float16 values; retrain with python -m dd train-t2i-teacher")
        lock["files"][name] = write_release_file(out, name, ck, True, description)
    atomic_write_json(lock_path, lock)
    return lock


def add_arguments_for(name: str, parser) -> None:
    if name == "release-tiny":
        parser.add_argument("--classifier", type=Path, default=None,
                            help="digits classifier checkpoint (without it: add only --t2i-teacher to the release)")
        parser.add_argument("--teacher", action="append", default=[], metavar="FAMILY=TOKENIZER,AR",
                            help="a family's trained tokenizer and teacher checkpoints (repeat per family)")
        parser.add_argument("--out", type=Path, required=True, help="folder for the release files and lock.json")
        parser.add_argument("--t2i-teacher", default=None, metavar="AR,TEXT_ENCODER",
                            help="the text-to-image teacher and its text encoder, as train-t2i-teacher wrote them")
        parser.add_argument("--threads", type=int, default=1)
        return
    parser.add_argument("--config", type=Path, required=True, help="tiny-model YAML (config/tiny/*.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (a .png grid is written beside it)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    if name == "train-teacher":
        parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer checkpoint from train-tokenizer")
        parser.add_argument("--classifier", type=Path, help="digits classifier checkpoint: report sample accuracy")


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "release-tiny":
        teachers = {}
        for item in args.teacher:
            family, _, paths = item.partition("=")
            tok, _, ar = paths.partition(",")
            if not (family and tok and ar):
                raise SystemExit(f"release-tiny: --teacher expects FAMILY=TOKENIZER,AR, got {item!r}")
            teachers[family] = (Path(tok), Path(ar))
        t2i = None
        if args.t2i_teacher is not None:
            ar, _, encoder = args.t2i_teacher.partition(",")
            if not (ar and encoder):
                raise SystemExit(f"release-tiny: --t2i-teacher expects AR,TEXT_ENCODER, got {args.t2i_teacher!r}")
            t2i = (Path(ar), Path(encoder))
        if args.classifier is None:
            if t2i is None or teachers:
                raise SystemExit("release-tiny: without --classifier only --t2i-teacher can be added to a release")
            print(json.dumps(release_t2i(*t2i, args.out), indent=2))
            return 0
        print(json.dumps(release_tiny(args.classifier, teachers, args.out, t2i), indent=2))
        return 0
    cfg = load_config(args.config)
    if args.command == "train-tokenizer":
        train_tokenizer(cfg, args.out)
    else:
        if args.classifier is not None:   # the shipped classifier (the tiny_teachers target's judge) as locked
            from dd.pipeline.download import check_shipped_file

            check_shipped_file(args.classifier)
        train_teacher(cfg, args.tokenizer, args.out, args.classifier)
    return 0
