"""The tiny text-to-image teacher of the embedded default (issue 13): LlamaGen's t2i GPT on captioned digits.

Same recipe as the class-conditional tiny teachers (``dd.pipeline.tiny_teachers``), with captions in place of
classes: the shipped tiny LlamaGen tokenizer, the training digits that show at least two clear attributes
(``dd.evaluation.digit_prompts``), each epoch one of the training phrasings of each image's caption at random,
whole captions dropped to the null caption at ``caption_dropout`` (for CFG), the tiny T5 features in LlamaGen's
120-position layout. The check samples one image per evaluation prompt (the test digits' captions in the held-out
phrasings) and reports ``prompt_accuracy`` with the shipped digits classifier.

    python -m dd train-t2i-teacher --config config/tiny/llamagen_t2i.yaml --out results/tiny_t2i/teacher.pt
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dd.evaluation import digit_prompts as dp
from dd.evaluation.digits import load_digits_images, save_grid_png
from dd.families.llamagen.gpt import GPT, GPTConfig
from dd.families.llamagen.teacher import LlamaGenT2ITeacher
from dd.families.llamagen.text_encoder import encode_captions, tiny_t5
from dd.io import atomic_torch_save
from dd.method.teacher import SamplingConfig
from dd.pipeline.tiny_teachers import TRAIN_DEFAULTS, make_optimiser, train_epochs

RELEASES = Path(__file__).resolve().parents[3] / "releases" / "tiny"


def shipped_tokenizer():
    from dd.families.loading import load_teacher

    teacher, _ = load_teacher({"family": "llamagen", "tokenizer": RELEASES / "tiny_llamagen_tokenizer.safetensors",
                               "model": RELEASES / "tiny_llamagen_ar.safetensors", "released": True})
    return teacher.tokenizer.eval().requires_grad_(False)


def caption_table(images: np.ndarray, labels: np.ndarray, scale: dp.AttributeScale, split: str):
    """(image index per caption, captions [K] in every phrasing of ``split`` for each captionable image)."""
    index, texts = [], []
    for i, digit, words in dp.captionable(images, labels, scale):
        for k in dp.phrasing_ids(split):
            index.append(i)
            texts.append(dp.caption(digit, words, k))
    return np.array(index), texts


def train_t2i_teacher(cfg: dict, out: Path, classifier: Path | None = None, log=print) -> dict:
    s = cfg["train"]
    torch.manual_seed(s["seed"])
    tok = shipped_tokenizer()
    images, labels = load_digits_images(cfg["image_size"], "train")
    scale = dp.AttributeScale.fit(dp.measure(images.numpy()), labels.numpy())
    image_of, texts = caption_table(images.numpy(), labels.numpy(), scale, "train")
    t5_tok, t5 = tiny_t5()
    feats, masks = encode_captions(texts, t5_tok, t5)
    feats, masks = torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(masks)
    gpt_cfg = GPTConfig(model_type="t2i", vocab_size=tok.config.codebook_size, caption_dim=feats.shape[-1],
                        cls_token_num=feats.shape[1], block_size=(cfg["image_size"] // tok.config.downsample_factor) ** 2,
                        **cfg["arch"])
    gpt = GPT(gpt_cfg).train()
    captioned = np.unique(image_of)
    per_image = {i: np.flatnonzero(image_of == i) for i in captioned}
    settings = {**TRAIN_DEFAULTS, **s}
    opt, sched = make_optimiser(gpt, settings, len(captioned))
    rng = np.random.default_rng(s["seed"])

    def step(x, image_ids):
        cap = np.array([rng.choice(per_image[i]) for i in image_ids.tolist()])   # one phrasing at random
        with torch.no_grad():
            idx = tok.encode(x)[1].flatten(1)
        loss = gpt.training_loss(idx, feats[cap], cond_mask=masks[cap])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), settings["grad_clip"])
        opt.step()
        sched.step()
        return {"ce": loss.item()}

    t0 = time.perf_counter()
    stats = train_epochs(images[captioned], torch.from_numpy(captioned), settings, step, "t2i teacher (llamagen)")
    gpt.eval()
    report = {"train_seconds": time.perf_counter() - t0, "ce": stats["ce"], "captions": len(texts),
              "captioned_images": len(captioned)}
    report.update(check_t2i_teacher(tok, gpt, scale, cfg, out, classifier, (t5_tok, t5)))
    atomic_torch_save({"family": "llamagen", "kind": "ar", "config": gpt_cfg.__dict__, "model": gpt.state_dict(),
                       "report": report}, out)
    log(json.dumps({"t2i_teacher": str(out), **report}))
    return report


@torch.no_grad()
def check_t2i_teacher(tok, gpt, scale, cfg, out: Path, classifier: Path | None, encoder) -> dict:
    """One sample per evaluation prompt (held-out phrasings of the test digits' captions); with the classifier,
    ``prompt_accuracy`` (and the digit alone, ``digit_accuracy``)."""
    test, test_labels = load_digits_images(cfg["image_size"], "test")
    rows = dp.prompt_rows(test.numpy(), test_labels.numpy(), scale, "eval")
    feats, masks = encode_captions([r["prompt"] for r in rows], *encoder)
    teacher = LlamaGenT2ITeacher(tok, gpt, torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(masks))
    sampling = SamplingConfig(cfg_scale=cfg["train"].get("cfg_scale", 2.0))
    labels = torch.arange(len(rows))
    idx = torch.cat([teacher.sample(b, sampling, torch.Generator().manual_seed(cfg["train"]["seed"] + k))
                     for k, b in enumerate(labels.split(128))])
    images = teacher.decode_indices(idx)
    save_grid_png(images[:100], None, Path(out).with_suffix(".png"), nrow=10)
    report = {"eval_prompts": len(rows), "cfg_scale": sampling.cfg_scale}
    if classifier is not None:
        from dd.evaluation.classifier import classify, load_classifier

        pred = classify(load_classifier(classifier), images).numpy()
        acc = dp.prompt_accuracy(images.numpy(), pred, rows, scale)
        digits = np.array([int(r["digit"]) for r in rows])
        report.update(prompt_accuracy=float(acc.mean()), prompt_accuracy_se=float(acc.std(ddof=1) / np.sqrt(len(acc))),
                      digit_accuracy=float((pred == digits).mean()))
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="config/tiny/llamagen_t2i.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classifier", type=Path, default=RELEASES / "digits_classifier_16.safetensors")


def main(args) -> int:
    import yaml

    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(args.config).read_text())
    train_t2i_teacher(cfg, args.out, args.classifier)
    return 0
