"""Where the shipped tiny text-to-image teacher loses prompt accuracy: the text encoder or the GPT?

    python docs/sweeps/t2i_teacher_conditioning.py        # about a minute on one core; prints one JSON line each

0. The ceiling: prompt accuracy of the evaluation prompts' own test digits, as they are and as the shipped tokenizer
   reconstructs them (what a teacher that draws the right digit with the right attributes could reach).
1. The encoder: a linear probe (logistic regression) on each caption's mean RMS-normalised features (what LlamaGen's
   caption positions hand the GPT) predicts the digit and each attribute word; fitted on the training digits'
   captions (training phrasings), scored there and on the test digits' captions (held-out phrasings).
2. The GPT's fit: teacher-forced cross-entropy of the training digits and of the test digits under their captions.
3. The GPT's use of the caption: prompt accuracy (and per attribute) of one sample per prompt, CFG 2.0, on the
   evaluation prompts (test digits, held-out phrasings), on the test digits' captions in the training phrasings,
   and on the training digits' own captions (the first 258 of each).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from dd.evaluation import digit_prompts as dp
from dd.evaluation.classifier import classify, load_classifier
from dd.evaluation.digits import load_digits_images
from dd.families.llamagen.checkpoints import load_teacher
from dd.families.llamagen.teacher import LlamaGenT2ITeacher
from dd.families.llamagen.text_encoder import encode_captions, tiny_t5
from dd.families.llamagen.tiny_t2i import caption_table
from dd.method.teacher import SamplingConfig

RELEASES = Path(__file__).resolve().parents[2] / "releases" / "tiny"
PROMPTS = 258


def encoded(texts, encoder):
    f, m = encode_captions(texts, *encoder)
    return torch.from_numpy(f.astype(np.float32)), torch.from_numpy(m).bool()


def main() -> None:
    torch.set_num_threads(1)
    base = load_teacher(RELEASES / "tiny_llamagen_tokenizer.safetensors",
                        RELEASES / "tiny_llamagen_t2i_ar.safetensors").float().eval()
    encoder = tiny_t5(weights=RELEASES / "tiny_t5_encoder.safetensors")
    classifier = load_classifier(RELEASES / "digits_classifier_16.safetensors")
    train, train_labels = load_digits_images(16, "train")
    test, test_labels = load_digits_images(16, "test")
    scale = dp.AttributeScale.fit(dp.measure(train.numpy()), train_labels.numpy())

    # 0. the ceiling: the evaluation prompts' own digits, real and through the tokenizer
    rows = dp.prompt_rows(test.numpy(), test_labels.numpy(), scale, "eval")
    own = test[[int(r["image"]) for r in rows]]
    with torch.no_grad():
        reconstructed = base.decode_indices(base.tokenizer.encode(own)[1].flatten(1))
    for name, images in {"real": own, "tokenizer reconstruction": reconstructed}.items():
        report_accuracy(f"test digits, {name}", images, rows, classifier, scale)

    # 1. linear probe of the pooled caption features
    pooled = {}
    for name, (x, y, split) in {"train": (train, train_labels, "train"), "test": (test, test_labels, "eval")}.items():
        _, texts, facts = caption_table(x.numpy(), y.numpy(), scale, split)
        f, m = encoded(texts, encoder)
        f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)
        pooled[name] = ((f * m[..., None]).sum(1) / m.sum(1, keepdim=True)).numpy(), np.array(facts)
    for j, fact in enumerate(["digit", *dp.ATTRIBUTES]):
        probe = LogisticRegression(max_iter=2000).fit(pooled["train"][0], pooled["train"][1][:, j])
        print(json.dumps({"probe": fact, "train": probe.score(pooled["train"][0], pooled["train"][1][:, j]),
                          "test_held_out": probe.score(pooled["test"][0], pooled["test"][1][:, j])}))

    # 2. cross-entropy of digits under their own captions (one training phrasing each)
    for name, (x, y) in {"train": (train, train_labels), "test": (test, test_labels)}.items():
        image_of, texts, _ = caption_table(x.numpy(), y.numpy(), scale, "train")
        pick = np.arange(0, len(texts), len(dp.phrasing_ids("train")))[:600]
        f, m = encoded([texts[i] for i in pick], encoder)
        with torch.no_grad():
            codes = base.tokenizer.encode(x[image_of[pick]])[1].flatten(1)
            ce = [base.gpt.training_loss(codes[s:s + 100], f[s:s + 100], cond_mask=m[s:s + 100]).item() * len(codes[s:s + 100])
                  for s in range(0, len(pick), 100)]
        print(json.dumps({"cross_entropy": name, "images": len(pick), "nats_per_token": sum(ce) / len(pick)}))

    # 3. prompt accuracy of the teacher's samples
    sets = {"test digits, held-out phrasings (the pipeline's)": (test, test_labels, "eval"),
            "test digits, training phrasings": (test, test_labels, "train"),
            "training digits, training phrasings": (train, train_labels, "train")}
    for name, (x, y, split) in sets.items():
        rows = dp.prompt_rows(x.numpy(), y.numpy(), scale, split)[:PROMPTS]
        f, m = encoded([r["prompt"] for r in rows], encoder)
        teacher = LlamaGenT2ITeacher(base.tokenizer, base.gpt, f, m).eval()
        with torch.no_grad():
            idx = torch.cat([teacher.sample(b, SamplingConfig(cfg_scale=2.0), torch.Generator().manual_seed(k))
                             for k, b in enumerate(torch.arange(len(rows)).split(129))])
            images = teacher.decode_indices(idx)
        report_accuracy(name, images, rows, classifier, scale)


def report_accuracy(name, images, rows, classifier, scale, key: str = "prompts") -> None:
    """One JSON line ({key: name, ...}): prompt accuracy of images [i] for prompt rows [i], and per fact."""
    pred = classify(classifier, images).numpy()
    ok = dp.prompt_accuracy(images.numpy(), pred, rows, scale)
    values = dp.measure(images.numpy())
    words = {a: float(np.mean([dp.satisfies({a: r[a]}, values[i], int(r["digit"]), scale)
                               for i, r in enumerate(rows) if r[a]])) for a in dp.ATTRIBUTES}
    digit = float((pred == np.array([int(r["digit"]) for r in rows])).mean())
    print(json.dumps({key: name, "n": len(rows), "prompt_accuracy": float(ok.mean()),
                      "se": float(ok.std(ddof=1) / np.sqrt(len(ok))), "digit": digit, **words}))


if __name__ == "__main__":
    main()
