"""Prompt accuracy (and per fact) of tiny text-to-image teachers on the evaluation prompts, side by side.

    python docs/sweeps/t2i_prompt_accuracy.py releases/tiny/tiny_llamagen_t2i_ar.safetensors results/other/ar.pt

Each teacher (a GPT checkpoint over the shipped tokenizer, read with the shipped tiny T5 encoder) draws four samples
per evaluation prompt (the test digits' captions in the held-out phrasings: 1,032 samples) at CFG 2.0 with the same
seeds; one JSON line per teacher. The README's comparison of train.attribute_augment with the shipped teacher.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from t2i_teacher_conditioning import report_accuracy  # this folder, on sys.path when run as a script

from dd.evaluation import digit_prompts as dp
from dd.evaluation.classifier import load_classifier
from dd.evaluation.digits import load_digits_images
from dd.families.llamagen.checkpoints import load_teacher
from dd.families.llamagen.teacher import LlamaGenT2ITeacher
from dd.families.llamagen.text_encoder import encode_captions, tiny_t5
from dd.method.teacher import SamplingConfig

RELEASES = Path(__file__).resolve().parents[2] / "releases" / "tiny"
SAMPLES_PER_PROMPT = 4


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    encoder = tiny_t5(weights=RELEASES / "tiny_t5_encoder.safetensors")
    classifier = load_classifier(RELEASES / "digits_classifier_16.safetensors")
    train, train_labels = load_digits_images(16, "train")
    test, test_labels = load_digits_images(16, "test")
    scale = dp.AttributeScale.fit(dp.measure(train.numpy()), train_labels.numpy())
    prompts = dp.prompt_rows(test.numpy(), test_labels.numpy(), scale, "eval")
    rows = prompts * SAMPLES_PER_PROMPT
    f, m = encode_captions([r["prompt"] for r in rows], *encoder)
    for path in paths:
        base = load_teacher(RELEASES / "tiny_llamagen_tokenizer.safetensors", path).float().eval()
        teacher = LlamaGenT2ITeacher(base.tokenizer, base.gpt, torch.from_numpy(f.astype(np.float32)),
                                     torch.from_numpy(m).bool()).eval()
        with torch.no_grad():
            idx = torch.cat([teacher.sample(b, SamplingConfig(cfg_scale=2.0), torch.Generator().manual_seed(k))
                             for k, b in enumerate(torch.arange(len(rows)).split(len(prompts)))])
            images = teacher.decode_indices(idx)
        report_accuracy(str(path), images, rows, classifier, scale, key="teacher")

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
