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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dd.evaluation import digit_prompts as dp
from dd.evaluation.digits import load_digits_images, save_grid_png, transform_digits
from dd.families.llamagen.gpt import GPT, GPTConfig
from dd.families.llamagen.teacher import LlamaGenT2ITeacher
from dd.families.llamagen.text_encoder import TinyT5Config, encode_captions, tiny_t5
from dd.io import atomic_torch_save
from dd.method.teacher import SamplingConfig
from dd.pipeline.tiny_teachers import TRAIN_DEFAULTS, make_optimiser, optimiser_update, train_epochs

RELEASES = Path(__file__).resolve().parents[3] / "releases" / "tiny"


def shipped_tokenizer():
    from dd.families.loading import load_teacher

    teacher, _ = load_teacher({"family": "llamagen", "tokenizer": RELEASES / "tiny_llamagen_tokenizer.safetensors",
                               "model": RELEASES / "tiny_llamagen_ar.safetensors", "released": True})
    return teacher.tokenizer.eval().requires_grad_(False)


def caption_table(images: np.ndarray, labels: np.ndarray, scale: dp.AttributeScale, split: str):
    """(image index per caption, captions [K] in every phrasing of ``split`` for each captionable image, what each
    caption states: ``caption_facts``)."""
    index, texts, facts = [], [], []
    for i, digit, words in dp.captionable(images, labels, scale):
        for k in dp.phrasing_ids(split):
            index.append(i)
            texts.append(dp.caption(digit, words, k))
            facts.append(caption_facts(digit, words))
    return np.array(index), texts, facts


def caption_facts(digit: int, words: dict[str, str]) -> list[int]:
    """What a caption states, as classes: the digit, then per attribute 0 (not said) or 1 + its word's index."""
    return [int(digit)] + [1 + dp.WORDS[a].index(words[a]) if a in words else 0 for a in dp.ATTRIBUTES]


def pretrain_text_encoder(texts: list[str], facts: torch.Tensor, settings: dict, log=print):
    """The tiny T5 encoder, trained once to read the captions, then frozen: the stand-in for FLAN-T5's pretraining.

    Objective: every valid position's RMS-normalised output predicts what the caption states (``caption_facts``)
    through linear heads, which are then discarded. Why every position: LlamaGen's caption positions have zero
    rotary rows, so their queries and keys are zero and each image query averages the caption positions' values
    uniformly, after a per-position RMSNorm. The GPT can only use what every position carries, as the real model
    relies on T5's contextual features. With a random encoder a position carries mostly its own byte: a teacher
    trained on those features ignored its prompts (prompt accuracy 0.04, digit accuracy 0.11 = chance).
    Returns (tokenizer, frozen encoder, report)."""
    import torch.nn.functional as F

    tok, enc = tiny_t5()                                 # seeded start
    torch.manual_seed(settings["seed"])
    enc.train().requires_grad_(True)
    batch = tok(texts, padding="longest", return_tensors="pt")
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    d = enc.config.d_model
    heads = torch.nn.ModuleList([torch.nn.Linear(d, 10)] + [torch.nn.Linear(d, 3) for _ in dp.ATTRIBUTES])
    opt = torch.optim.AdamW([*enc.parameters(), *heads.parameters()], lr=settings["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(settings["seed"])

    def normalised(h):            # what the GPT's per-position RMSNorm leaves of a position's features
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    for _ in range(settings["steps"]):
        i = torch.randint(0, len(texts), (settings["batch_size"],), generator=g)
        h = normalised(enc(input_ids=ids[i], attention_mask=valid[i].long()).last_hidden_state)
        v = valid[i]
        per_position = facts[i][:, None, :].expand(-1, h.shape[1], -1)[v]           # [valid positions, facts]
        loss = sum(F.cross_entropy(head(h[v]), per_position[:, j]) for j, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval().requires_grad_(False)
    with torch.no_grad():
        h = normalised(enc(input_ids=ids, attention_mask=valid.long()).last_hidden_state)
        pred = heads[0](h[valid]).argmax(-1)
        acc = (pred == facts[:, None, 0].expand(-1, h.shape[1])[valid]).float().mean().item()
    report = {"encoder_loss": loss.item(), "encoder_digit_accuracy_per_position": acc}
    log(json.dumps({"text_encoder": report}))
    return tok, enc, report


@torch.no_grad()
def _round_to_float16(model: torch.nn.Module) -> None:
    """Round the weights to float16 values in place: the model that is checked is the one the float16 release file
    holds, bit for bit (the release budget has no room for this teacher in float32)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.copy_(t.half().float())


class AttributeAugment:
    """Training digits redrawn with other attribute values, captioned by what they then show.

    The digits' size and slant vary little within a class (the upper tercile of size is 3-4% above the lower one,
    of slant 0.04-0.09 of shear), and the shipped teacher follows those words least (size 0.85, slant 0.92 at CFG
    2.0). A share ``p`` of each batch is replaced by its 8x8 source digit resampled through a random zoom
    (log-uniform within 1/(1 + zoom) .. 1 + zoom), shear (uniform within +-shear) and the usual shift
    (``dd.evaluation.digits.transform_digits``, one bilinear resampling as for the originals), re-measured and
    described on the training digits' attribute scale; where it shows at least two clear attributes it is trained
    under a caption of those words in a random training phrasing (their features encoded once: every combination
    of digit, words and phrasing), otherwise the original and its caption stay. So the same shape appears under
    several size and slant words, which only the words can explain. Its own random stream: without it, training
    draws exactly as before."""

    def __init__(self, opts: dict, size: int, labels: torch.Tensor, scale: dp.AttributeScale, t5_tok, t5,
                 settings: dict):
        from itertools import combinations, product

        from dd.evaluation.digits import load_digits_pixels

        unknown = set(opts) - {"p", "zoom", "shear"}
        if unknown:
            raise ValueError(f"train.attribute_augment: unknown keys {sorted(unknown)}; allowed p, zoom, shear")
        self.p, self.zoom, self.shear = float(opts["p"]), float(opts["zoom"]), float(opts["shear"])
        self.size, self.scale, self.max_shift = size, scale, settings["max_shift"]
        self.pixels, pixel_labels = load_digits_pixels("train")
        if not torch.equal(pixel_labels, labels):
            raise ValueError("the 8x8 training digits do not line up with the training images")
        self.labels = labels
        keys, texts = [], []
        for digit in range(10):
            for n in range(dp.MIN_ATTRIBUTES, len(dp.ATTRIBUTES) + 1):
                for names in combinations(dp.ATTRIBUTES, n):
                    for values in product(*(dp.WORDS[a] for a in names)):
                        words = dict(zip(names, values))
                        for k in dp.phrasing_ids("train"):
                            keys.append((digit, tuple(sorted(words.items())), k))
                            texts.append(dp.caption(digit, words, k))
        feats, masks = encode_captions(texts, t5_tok, t5)
        self.feats, self.masks = torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(masks)
        self.row = {key: i for i, key in enumerate(keys)}
        self.phrasings = list(dp.phrasing_ids("train"))
        self.g = torch.Generator().manual_seed(settings["seed"] + 1)

    def __call__(self, x, image_ids, cond, cond_mask):
        pick = torch.nonzero(torch.rand(len(image_ids), generator=self.g) < self.p).flatten()
        if len(pick) == 0:
            return x, cond, cond_mask
        n, ids = len(pick), image_ids[pick]
        zoom = torch.exp((torch.rand(n, generator=self.g) * 2 - 1) * np.log1p(self.zoom))
        shear = (torch.rand(n, generator=self.g) * 2 - 1) * self.shear
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (n, 2), generator=self.g)
        phrasing = torch.randint(len(self.phrasings), (n,), generator=self.g)
        images = transform_digits(self.pixels[ids], self.size, zoom, shear, shift)
        digits = self.labels[ids].numpy()
        described = dp.describe(dp.measure(images.numpy()), digits, self.scale)
        x, cond, cond_mask = x.clone(), cond.clone(), cond_mask.clone()
        for j, (i, digit, words) in enumerate(zip(pick.tolist(), digits.tolist(), described)):
            if len(words) < dp.MIN_ATTRIBUTES:
                continue
            row = self.row[(digit, tuple(sorted(words.items())), self.phrasings[phrasing[j]])]
            x[i], cond[i], cond_mask[i] = images[j], self.feats[row], self.masks[row]
        return x, cond, cond_mask


def encoder_path(out: Path) -> Path:
    """Where ``train_t2i_teacher`` writes the pretrained text encoder beside the teacher ``out``."""
    return Path(out).with_name(Path(out).stem + "_text_encoder.pt")


def train_t2i_teacher(cfg: dict, out: Path, classifier: Path | None = None, log=print) -> dict:
    s = cfg["train"]
    torch.manual_seed(s["seed"])
    tok = shipped_tokenizer()
    images, labels = load_digits_images(cfg["image_size"], "train")
    scale = dp.AttributeScale.fit(dp.measure(images.numpy()), labels.numpy())
    image_of, texts, facts = caption_table(images.numpy(), labels.numpy(), scale, "train")
    # The encoder reads the training digits' captions in every phrasing, the held-out ones included: it stands for a
    # language model that knows such sentences (an encoder trained on the four training shapes alone read the
    # held-out ones badly: the teacher's digit accuracy 0.91 with training phrasings, 0.39 with held-out ones). The
    # teacher and the student never see a held-out phrasing, nor any caption of an evaluation (test) digit.
    _, held_out, held_out_facts = caption_table(images.numpy(), labels.numpy(), scale, "eval")
    t5_tok, t5, encoder_report = pretrain_text_encoder(texts + held_out, torch.tensor(facts + held_out_facts),
                                                       cfg["encoder"], log)
    _round_to_float16(t5)
    atomic_torch_save({"kind": "text_encoder", "config": asdict(TinyT5Config()), "model": t5.state_dict()},
                      encoder_path(out))
    torch.manual_seed(s["seed"])
    feats, masks = encode_captions(texts, t5_tok, t5)
    feats, masks = torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(masks)
    gpt_cfg = GPTConfig(model_type="t2i", vocab_size=tok.config.codebook_size, caption_dim=feats.shape[-1],
                        cls_token_num=feats.shape[1], block_size=(cfg["image_size"] // tok.config.downsample_factor) ** 2,
                        **cfg["arch"])
    gpt = GPT(gpt_cfg).train()
    captioned = np.unique(image_of)
    per_image = {i: np.flatnonzero(image_of == i) for i in captioned}
    settings = {**TRAIN_DEFAULTS, **{k: v for k, v in s.items() if k != "attribute_augment"}}
    opt, sched = make_optimiser(gpt, settings, len(captioned))
    rng = np.random.default_rng(s["seed"])
    augment = AttributeAugment(s["attribute_augment"], cfg["image_size"], labels, scale, t5_tok, t5, settings) \
        if s.get("attribute_augment") else None

    def step(x, image_ids):
        cap = np.array([rng.choice(per_image[i]) for i in image_ids.tolist()])   # one phrasing at random
        cond, cond_mask = feats[cap], masks[cap]
        if augment is not None:
            x, cond, cond_mask = augment(x, image_ids, cond, cond_mask)
        with torch.no_grad():
            idx = tok.encode(x)[1].flatten(1)
        loss = gpt.training_loss(idx, cond, cond_mask=cond_mask)
        optimiser_update(gpt, loss, opt, sched, settings["grad_clip"])
        return {"ce": loss.item()}

    t0 = time.perf_counter()
    stats = train_epochs(images[captioned], torch.from_numpy(captioned), settings, step, "t2i teacher (llamagen)")
    gpt.eval()
    _round_to_float16(gpt)
    report = {"train_seconds": time.perf_counter() - t0, "ce": stats["ce"], "captions": len(texts),
              "captioned_images": len(captioned), **encoder_report}
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

    from dd.pipeline.download import check_shipped_file

    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(args.config).read_text())
    check_shipped_file(args.classifier)   # the shipped classifier (the report's judge) as releases/tiny/lock.json has it
    train_t2i_teacher(cfg, args.out, args.classifier)
    return 0
