"""The shipped digits teachers and classifier (releases/tiny/): they verify, load, make class-consistent digits, the
classifier's FID passes its validation, the teacher NLL separates coherent from incoherent token sequences, and the
retraining target (`snakemake tiny_teachers`) works at a reduced size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dd.evaluation.classifier import classify, load_classifier
from dd.families import loading
from dd.families.registry import FAMILIES
from dd.io import read_checkpoint, sha256_file
from dd.method.sample import onestep_star_sample, onestep_star_table, teacher_nll_bits
from dd.pipeline.download import DIGITS_CLASSIFIER, SHIPPED_DIR, SHIPPED_LOCK

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TEACHERS = {name: (family, t) for family, f in FAMILIES.items() for name, t in f.released_teachers.items()
                    if not t.original_format}
TINY = {name: v for name, v in SHIPPED_TEACHERS.items() if v[1].text_encoder is None}       # class-conditional


def shipped(name: str) -> Path:
    return SHIPPED_DIR / f"{name}.safetensors"


def tiny_teacher(name: str):
    family, released = TINY[name]
    teacher, _ = loading.load_teacher({"family": family, "tokenizer": shipped(released.tokenizer),
                                       "model": shipped(released.model)})
    return teacher, released


def test_every_shipped_file_matches_the_lock_and_the_size_limit():
    lock = json.loads(SHIPPED_LOCK.read_text())["files"]
    expected = {DIGITS_CLASSIFIER} | {n for _, t in SHIPPED_TEACHERS.values()
                                      for n in (t.tokenizer, t.model, t.text_encoder) if n}
    assert set(lock) == expected
    total = 0
    for name, entry in lock.items():
        path = SHIPPED_DIR / entry["file"]
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["size"], name
        assert read_checkpoint(path)["model"]            # safetensors with our metadata
        total += entry["size"]
    assert total <= 10 * 2**20                           # the repository's budget for weights


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_teacher_draws_class_consistent_digits(name):
    teacher, released = tiny_teacher(name)
    assert teacher.n_steps == released.steps and teacher.image_size == released.image_size
    # the config that retrains it (snakemake tiny_teachers) describes the same token layout
    family = TINY[name][0]
    assert loading.tiny_steps(yaml.safe_load((REPO / "config" / "tiny" / f"{family}.yaml").read_text())) == released.steps
    labels = torch.arange(300) % 10
    sampling = FAMILIES[TINY[name][0]].default_sampling(2.0)
    images = teacher.decode_indices(teacher.sample(labels, sampling, torch.Generator().manual_seed(0)))
    accuracy = (classify(load_classifier(shipped(DIGITS_CLASSIFIER)), images) == labels).float().mean().item()
    assert accuracy >= 0.8, accuracy


def test_shipped_classifier_passes_its_feature_validation():
    from dd.evaluation.validate_features import validate

    report = validate(shipped(DIGITS_CLASSIFIER))
    assert report["passed"], report
    assert report["floor"] < min(c["fid"][0] for c in report["curves"].values())


@pytest.mark.parametrize("name", sorted(TINY))
def test_teacher_nll_separates_the_teachers_samples_from_independent_tokens(name):
    """The teacher's own samples have its entropy rate; sequences whose tokens are drawn independently from the
    same per-position marginals (onestep*) are far less likely under it: beyond 10 standard errors."""
    teacher, _ = tiny_teacher(name)
    sampling = FAMILIES[TINY[name][0]].default_sampling(2.0)
    labels = torch.arange(400) % 10
    own = teacher.sample(labels, sampling, torch.Generator().manual_seed(1))
    table = onestep_star_table(labels.numpy(), own.numpy(), 10)
    independent, _ = onestep_star_sample(table, labels, torch.Generator().manual_seed(2))
    a = teacher_nll_bits(teacher, own, labels, sampling)
    b = teacher_nll_bits(teacher, independent, labels, sampling)
    se = (a.var() / len(a) + b.var() / len(b)).sqrt()
    assert b.mean() - a.mean() > 10 * se, (a.mean().item(), b.mean().item(), se.item())


def test_retraining_target_at_a_reduced_size(tmp_path):
    """`snakemake tiny_teachers` at a reduced size (half-width transformers of two layers, a few minutes of training
    in all): the release files, their lock and the float16 check come out, and the retrained teachers already draw
    digits of their class well above chance (0.1), as judged by the shipped classifier."""
    reduced = {"llamagen": ({"dim": 64, "n_layer": 2}, 30), "var": ({"depth": 2, "embed_dim": 64}, 16)}
    configs = {}
    for family in FAMILIES:
        tiny = yaml.safe_load((REPO / "config" / "tiny" / f"{family}.yaml").read_text())
        arch, epochs = reduced[family]
        tiny["tokenizer"]["train"]["epochs"] = 4
        tiny["teacher"]["arch"].update(arch)
        tiny["teacher"]["train"]["epochs"] = epochs
        configs[family] = str(tmp_path / f"{family}.yaml")
        Path(configs[family]).write_text(yaml.safe_dump(tiny))
    classifier = yaml.safe_load((REPO / "config" / "tiny" / "classifier.yaml").read_text())
    classifier["train"]["epochs"] = 5
    (tmp_path / "classifier.yaml").write_text(yaml.safe_dump(classifier))
    t2i = yaml.safe_load((REPO / "config" / "tiny" / "llamagen_t2i.yaml").read_text())
    t2i["arch"].update(dim=32, n_layer=1, n_head=2, multiple_of=32)
    t2i["train"]["epochs"] = 1
    t2i["encoder"]["steps"] = 20
    (tmp_path / "t2i.yaml").write_text(yaml.safe_dump(t2i))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["tiny_teachers"] = {"configs": configs, "classifier": str(tmp_path / "classifier.yaml"),
                               "t2i": str(tmp_path / "t2i.yaml")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(REPO / "Snakefile"),
                        "--directory", str(work), "tiny_teachers", "--configfile", str(tmp_path / "config.yaml")],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    release = work / "results" / "tiny_teachers" / "release"
    lock = json.loads((release / "lock.json").read_text())
    assert set(lock["files"]) == {DIGITS_CLASSIFIER, "tiny_llamagen_t2i_ar", "tiny_t5_encoder"} | \
        {f"tiny_{f}_{k}" for f in FAMILIES for k in ("tokenizer", "ar")}
    assert lock["files"]["tiny_llamagen_t2i_ar"]["dtype"] == "float16"
    for entry in lock["files"].values():
        assert sha256_file(release / entry["file"]) == entry["sha256"]
    for family in FAMILIES:
        check = lock["float16_check"][family]
        assert (check["float16"] is True) == (check["same_tokens"] == check["samples"] == check["same_images"])
        teacher, _ = loading.load_teacher({"family": family, "tokenizer": release / f"tiny_{family}_tokenizer.safetensors",
                                           "model": release / f"tiny_{family}_ar.safetensors"})
        labels = torch.arange(200) % 10
        images = teacher.decode_indices(teacher.sample(labels, FAMILIES[family].default_sampling(2.0),
                                                       torch.Generator().manual_seed(0)))
        accuracy = (classify(load_classifier(shipped(DIGITS_CLASSIFIER)), images) == labels).float().mean().item()
        assert accuracy > 0.3, (family, accuracy)
    assert json.loads((release / "feature_validation.json").read_text())["floor"] > 0


def test_shipped_text_to_image_teacher_follows_held_out_prompts():
    """The shipped t2i teacher, given the held-out phrasings of the test digits' captions through the shipped
    encoder, draws the prompt's digit far above chance, and matches digit and attributes far more often than for
    the same samples paired with other prompts (beyond 4 standard errors)."""
    pytest.importorskip("transformers", reason="transformers is a dependency of the text-to-image pipeline")
    import numpy as np

    from dd.evaluation import digit_prompts as dp
    from dd.evaluation.digits import load_digits_images
    from dd.families.llamagen.teacher import LlamaGenT2ITeacher
    from dd.families.llamagen.text_encoder import encode_captions, tiny_t5

    family, released = SHIPPED_TEACHERS["tiny_llamagen_t2i"]
    c2i, _ = loading.load_teacher({"family": family, "tokenizer": shipped(released.tokenizer),
                                   "model": shipped("tiny_llamagen_ar")})
    t2i = loading.load_ar(shipped(released.model), c2i.tokenizer, family)
    train, train_labels = load_digits_images(16, "train")
    scale = dp.AttributeScale.fit(dp.measure(train.numpy()), train_labels.numpy())
    test, test_labels = load_digits_images(16, "test")
    rows = dp.prompt_rows(test.numpy(), test_labels.numpy(), scale, "eval")
    feats, mask = encode_captions([r["prompt"] for r in rows], *tiny_t5(weights=shipped(released.text_encoder)))
    teacher = LlamaGenT2ITeacher(c2i.tokenizer, t2i, torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(mask))
    labels = torch.arange(len(rows))
    idx = teacher.sample(labels, FAMILIES[family].default_sampling(2.0), torch.Generator().manual_seed(3))
    images = teacher.decode_indices(idx)
    pred = classify(load_classifier(shipped(DIGITS_CLASSIFIER)), images).numpy()
    digits = np.array([int(r["digit"]) for r in rows])
    own = dp.prompt_accuracy(images.numpy(), pred, rows, scale)
    other = dp.prompt_accuracy(images.numpy(), pred, rows[7:] + rows[:7], scale)
    assert (pred == digits).mean() >= 0.7
    se = np.sqrt(own.var() / len(own) + other.var() / len(other))
    assert own.mean() - other.mean() > 4 * se, (own.mean(), other.mean(), se)
