"""Prompts for the tiny text-to-image default: captions of the digits that say only what the pixels show.

A caption names the digit and at least two of three attributes, each measured from the image (``measure``):

* ``stroke``: ink coverage per unit of spread (mean ink / ``size``): thin or bold;
* ``slant``: how far the ink moves right per unit of height going up (the second-moment shear, -cov(x, y) / var(y),
  y pointing down): leaning left or right;
* ``size``: the ink's spread around its centroid (root of the summed variances): small or large.

Words are relative to the digit's own class, since a one is always thinner and narrower than an eight: an
``AttributeScale`` fitted on the training digits holds per-class terciles and medians of each attribute. A caption
uses an attribute only when the image lies in the class's lower or upper third (``describe``), so that training
captions are never borderline; a generated image satisfies a word when it lies on that word's side of the class
median (``satisfies``), the ``prompt_accuracy`` criterion together with the digits classifier's class.

Phrasings (``PHRASINGS``) put the same facts in several sentence shapes ("a bold seven leaning right",
"handwritten 3 with thin strokes, small"); the last ``HELD_OUT`` of them are used only for evaluation prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATTRIBUTES = ("stroke", "slant", "size")
WORDS = {"stroke": ("thin", "bold"), "slant": ("left", "right"), "size": ("small", "large")}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_ATTRIBUTES = 2


def measure(images: np.ndarray) -> np.ndarray:
    """[N, 3] (stroke, slant, size) of images [N, C, H, W] in [-1, 1] (background -1, ink +1)."""
    ink = (np.asarray(images, dtype=np.float64).mean(1) + 1.0) / 2.0           # [N, H, W] in [0, 1]
    n, h, w = ink.shape
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    mass = ink.sum((1, 2)).clip(min=1e-9)
    cy = (ink * y).sum((1, 2)) / mass
    cx = (ink * x).sum((1, 2)) / mass
    dy, dx = y[None] - cy[:, None, None], x[None] - cx[:, None, None]
    var_y = (ink * dy ** 2).sum((1, 2)) / mass
    var_x = (ink * dx ** 2).sum((1, 2)) / mass
    cov = (ink * dx * dy).sum((1, 2)) / mass
    size = np.sqrt(var_x + var_y)
    stroke = ink.mean((1, 2)) / size.clip(min=1e-9)
    slant = -cov / var_y.clip(min=1e-9)
    return np.stack([stroke, slant, size], axis=1)


@dataclass(frozen=True)
class AttributeScale:
    """Per-class lower tercile, median and upper tercile of each attribute: arrays [classes, 3]."""

    low: np.ndarray
    median: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> "AttributeScale":
        q = np.stack([np.quantile(values[labels == c], [1 / 3, 1 / 2, 2 / 3], axis=0) for c in range(num_classes)])
        return cls(low=q[:, 0], median=q[:, 1], high=q[:, 2])

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("low", "median", "high")}

    @classmethod
    def from_dict(cls, d: dict) -> "AttributeScale":
        return cls(**{k: np.asarray(d[k], dtype=np.float64) for k in ("low", "median", "high")})


def describe(values: np.ndarray, labels: np.ndarray, scale: AttributeScale) -> list[dict[str, str]]:
    """Per image, the attributes it shows clearly (outside the class's middle third): attribute -> word."""
    out = []
    for v, c in zip(values, labels):
        words = {}
        for a, name in enumerate(ATTRIBUTES):
            if v[a] <= scale.low[c, a]:
                words[name] = WORDS[name][0]
            elif v[a] >= scale.high[c, a]:
                words[name] = WORDS[name][1]
        out.append(words)
    return out


def satisfies(words: dict[str, str], values: np.ndarray, label: int, scale: AttributeScale) -> bool:
    """Does an image with attribute ``values`` [3] lie on each word's side of its class median?"""
    for name, word in words.items():
        a = ATTRIBUTES.index(name)
        above = values[a] > scale.median[label, a]
        if above != (word == WORDS[name][1]):
            return False
    return True


# --- phrasing ---------------------------------------------------------------------------------------------------
_ADJ = {"stroke": {"thin": "thin", "bold": "bold"}, "size": {"small": "small", "large": "large"}}
_WITH = {"stroke": {"thin": "thin strokes", "bold": "bold strokes"},
         "slant": {"left": "a left slant", "right": "a right slant"},
         "size": {"small": "a small size", "large": "a large size"}}
_LEAN = {"left": "leaning left", "right": "leaning right"}


def _adjectives_then_lean(digit: str, words: dict) -> str:
    adjs = [_ADJ[a][words[a]] for a in ("size", "stroke") if a in words]
    tail = f" {_LEAN[words['slant']]}" if "slant" in words else ""
    return f"{' '.join(adjs)} {digit}{tail}".strip()


def _article(phrase: str) -> str:
    # by sound: of the words a phrase can start with, only "eight" takes "an" ("a one", "a large ...")
    return ("an " if phrase.startswith("eight") else "a ") + phrase


def _with_list(words: dict) -> str:
    parts = [_WITH[a][words[a]] for a in ATTRIBUTES if a in words]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# Each phrasing maps (digit, attribute words) to a sentence; the order is fixed: the last HELD_OUT are for evaluation.
PHRASINGS = (
    lambda d, w: _article(_adjectives_then_lean(DIGIT_WORDS[d], w)),
    lambda d, w: f"handwritten {d} with {_with_list(w)}",
    lambda d, w: f"the digit {DIGIT_WORDS[d]}, {_with_list(w)}",
    lambda d, w: f"{_adjectives_then_lean(str(d), w)}, handwritten",
    lambda d, w: _article(f"{DIGIT_WORDS[d]} drawn with {_with_list(w)}"),
    lambda d, w: f"number {d}: {_adjectives_then_lean('digit', w)}",
)
HELD_OUT = 2


def phrasing_ids(split: str) -> range:
    """Indices of the phrasings of a split: "train" or "eval" (held out)."""
    if split == "train":
        return range(len(PHRASINGS) - HELD_OUT)
    if split == "eval":
        return range(len(PHRASINGS) - HELD_OUT, len(PHRASINGS))
    raise ValueError(f"phrasing split must be 'train' or 'eval', got {split!r}")


def caption(digit: int, words: dict[str, str], phrasing: int) -> str:
    if len(words) < MIN_ATTRIBUTES:
        raise ValueError(f"a caption names at least {MIN_ATTRIBUTES} attributes, got {sorted(words)}")
    return PHRASINGS[phrasing](int(digit), words)


# --- prompt sets of the tiny text-to-image default ------------------------------------------------------------
PROMPT_COLUMNS = ("prompt", "digit", *ATTRIBUTES)


def captionable(images: np.ndarray, labels: np.ndarray, scale: AttributeScale) -> list[tuple[int, int, dict]]:
    """(image index, digit, attribute words) of each image that shows at least ``MIN_ATTRIBUTES`` clear
    attributes, in order: the images a caption can describe."""
    described = describe(measure(images), labels, scale)
    return [(i, digit, words) for i, (digit, words) in enumerate(zip(labels.tolist(), described))
            if len(words) >= MIN_ATTRIBUTES]


def prompt_rows(images: np.ndarray, labels: np.ndarray, scale: AttributeScale, split: str) -> list[dict]:
    """One row per captionable image: its caption (the split's phrasings, taken in turn), its digit and its
    attribute words (empty where the caption says nothing)."""
    ids = list(phrasing_ids(split))
    return [{"prompt": caption(digit, words, ids[k % len(ids)]), "digit": str(digit), "image": str(i),
             **{a: words.get(a, "") for a in ATTRIBUTES}}
            for k, (i, digit, words) in enumerate(captionable(images, labels, scale))]


def write_prompt_file(path, rows: list[dict]) -> None:
    """A TSV (unquoted, as ``dd.pipeline.prompt_files`` reads it) with a header, written atomically."""
    from pathlib import Path

    from dd.io import atomic_write_bytes

    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(r[c] for c in columns) for r in rows]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))


def prompt_accuracy(images: np.ndarray, predicted_digits: np.ndarray, rows: list[dict],
                    scale: AttributeScale) -> np.ndarray:
    """Per sample, 1.0 where the digits classifier's class is the prompt's digit and every attribute word of the
    prompt holds (``satisfies``), else 0.0; sample i was generated from prompt row i."""
    values = measure(images)
    out = np.zeros(len(rows))
    for i, row in enumerate(rows):
        digit = int(row["digit"])
        words = {a: row[a] for a in ATTRIBUTES if row.get(a)}
        out[i] = float(int(predicted_digits[i]) == digit and satisfies(words, values[i], digit, scale))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--out-dir", required=True, help="writes prompts_train.tsv, prompts_eval.tsv, attribute_scale.json")
    parser.add_argument("--size", type=int, default=16, help="image size the attributes are measured at")
    parser.add_argument("--seed", type=int, default=0, help="the digits' train/test split")


def main(args) -> int:
    """Prompt sets of the tiny text-to-image default: captions of the training digits (training phrasings) and of
    the test digits (held-out phrasings, for evaluation), and the attribute scale fitted on the training digits."""
    import json
    from pathlib import Path

    from dd.evaluation.digits import load_digits_images
    from dd.io import atomic_write_json

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, train_labels = load_digits_images(size=args.size, split="train", seed=args.seed)
    scale = AttributeScale.fit(measure(train.numpy()), train_labels.numpy())
    counts = {}
    for split, digits_split in (("train", "train"), ("eval", "test")):
        images, labels = load_digits_images(size=args.size, split=digits_split, seed=args.seed)
        rows = prompt_rows(images.numpy(), labels.numpy(), scale, split)
        write_prompt_file(out / f"prompts_{split}.tsv", rows)
        counts[split] = len(rows)
    atomic_write_json(out / "attribute_scale.json", {**scale.to_dict(), "attributes": list(ATTRIBUTES),
                                                     "size": args.size, "seed": args.seed})
    print(json.dumps({"out_dir": str(out), "prompts": counts}))
    return 0
