"""The text encoder of LlamaGen's text-to-image model, and caption features in LlamaGen's layout.

The released model reads FLAN-T5-XL encoder features (2048-d) of at most 120 tokens. The embedded default uses the
same class (``transformers``' ``T5EncoderModel``) at a tiny configuration, pretrained once (``tiny_t2i``) and frozen as
the real one is, and the byte-level T5 tokenizer (``ByT5Tokenizer``: one token per UTF-8 byte, no vocabulary file, so
nothing is downloaded). A caption set is encoded once, by its own pipeline job, and stored as float16 features with
their mask (``write_caption_features``), so that pair generation, distillation and sampling never hold the encoder.

Layout (``../shared/golden/llamagen/README.md``, section 5, from LlamaGen's ``sample_t2i.py``): always 120 positions;
a prompt's n valid features are moved to the *end* (positions 120-n .. 119), the rest are zero, and the mask is 1
exactly on the valid positions (left padding). The encoder itself runs on right-padded tokens with its attention
mask, as T5 is used there.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dd.io import atomic_write_bytes

CAPTION_TOKENS = 120


@dataclass(frozen=True)
class TinyT5Config:
    """The embedded default's encoder: ``T5EncoderModel`` at this size (ByT5's 384-token vocabulary)."""

    d_model: int = 64
    d_kv: int = 16
    d_ff: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 384
    seed: int = 0


def tiny_t5(cfg: TinyT5Config = TinyT5Config(), weights: str | Path | None = None):
    """(tokenizer, frozen encoder) of the embedded default: the weights of the file ``weights`` (the shipped encoder,
    pretrained by ``tiny_t2i.pretrain_text_encoder``), else seeded random weights from ``cfg.seed`` alone."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        fields = {k: v for k, v in asdict(cfg).items() if k != "seed"}
        encoder = T5EncoderModel(T5Config(**fields, dropout_rate=0.0))
    if weights is not None:
        from dd.io import ArtefactError, read_checkpoint

        ck = read_checkpoint(weights, "text_encoder")
        try:
            encoder.load_state_dict({k: v.float() for k, v in ck["model"].items()})
        except RuntimeError as e:
            raise ArtefactError(f"{weights}: not the tiny T5 encoder's weights ({str(e).splitlines()[0]})") from None
    return ByT5Tokenizer(), encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(prompts: list[str], tokenizer, encoder, max_length: int = CAPTION_TOKENS,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(features float16 [N, max_length, D], mask bool [N, max_length]) in LlamaGen's left-padded layout.

    A prompt longer than ``max_length`` tokens (the end-of-sequence token included) is an error, not truncated: the
    prompt file check (``dd.pipeline.prompt_files``) refuses it before this runs."""
    device = next(encoder.parameters()).device
    feats, masks = [], []
    for start in range(0, len(prompts), batch_size):
        part = prompts[start:start + batch_size]
        enc = tokenizer(part, padding="max_length", max_length=max_length)    # lists: a longer one stays longer
        for i, ids in enumerate(enc["input_ids"]):
            if len(ids) > max_length:
                raise ValueError(f"caption {start + i} is {len(ids)} tokens, longer than {max_length}: {part[i][:60]!r}")
        ids = torch.tensor(enc["input_ids"], device=device)
        valid = torch.tensor(enc["attention_mask"], device=device).bool()
        h = encoder(input_ids=ids, attention_mask=valid.long()).last_hidden_state.float()
        n = valid.sum(1)
        out = torch.zeros_like(h)
        for i in range(len(part)):                       # valid positions to the end, zeros before them
            out[i, max_length - n[i]:] = h[i, :n[i]]
        left = torch.arange(max_length, device=device)[None, :] >= (max_length - n)[:, None]
        feats.append(out.half().cpu().numpy())
        masks.append(left.cpu().numpy())
    return np.concatenate(feats), np.concatenate(masks)


def prompts_sha256(prompts: list[str]) -> str:
    """Identity of a caption set: the prompts in order (a feature file is only valid for the prompts it encodes)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\0")
    return h.hexdigest()


def write_caption_features(path: str | Path, features: np.ndarray, mask: np.ndarray, prompts: list[str],
                           encoder: str) -> None:
    """One ``.npz`` (atomic): float16 features, the mask, the prompts' SHA-256 and the encoder's name."""
    if len(features) != len(prompts) or mask.shape != features.shape[:2]:
        raise ValueError(f"{len(prompts)} prompts, features {features.shape}, mask {mask.shape}: they must agree")
    buf = io.BytesIO()
    # compressed: the padding (about two thirds of the 120 positions for short prompts) is zeros
    np.savez_compressed(buf, features=features.astype(np.float16), mask=mask.astype(bool),
             prompts_sha256=np.array(prompts_sha256(prompts)), encoder=np.array(encoder))
    atomic_write_bytes(Path(path), buf.getvalue())


def read_caption_features(path: str | Path, prompts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [N, T, D], mask [N, T]); with ``prompts``, refuses a file written for other prompts."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if prompts is not None and str(z["prompts_sha256"]) != prompts_sha256(prompts):
            raise ValueError(f"{path}: caption features of other prompts (SHA-256 {str(z['prompts_sha256'])[:12]}...); "
                             f"re-run the caption-features job for this prompt file")
        return torch.from_numpy(z["features"].astype(np.float32)), torch.from_numpy(z["mask"])


def load_encoder(name: str, encoder_dir: Path | None = None, weights: Path | None = None):
    """(tokenizer, frozen encoder, name): "tiny" (the embedded default; ``weights``: the shipped encoder file, else
    seeded random weights), or "flan-t5-xl" from a local copy of the Hugging Face snapshot ``google/flan-t5-xl``
    (``encoder_dir``: nothing is fetched here)."""
    if name == "tiny":
        return (*tiny_t5(weights=weights), "tiny-t5" if weights is None else f"tiny-t5:{Path(weights).name}")
    if name == "flan-t5-xl":
        if encoder_dir is None or not Path(encoder_dir).is_dir():
            raise ValueError(f"--encoder flan-t5-xl needs --encoder-dir, a local copy of google/flan-t5-xl "
                             f"(got {encoder_dir})")
        from transformers import AutoTokenizer, T5EncoderModel

        tok = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
        enc = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True)
        return tok, enc.eval().requires_grad_(False), "flan-t5-xl"
    raise ValueError(f"unknown text encoder {name!r}: choose tiny or flan-t5-xl")


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=Path, required=True, help="prompt file (.csv, or .tsv unquoted)")
    parser.add_argument("--column", default="prompt", help="the prompt file's column of prompts")
    parser.add_argument("--encoder", choices=["tiny", "flan-t5-xl"], default="tiny")
    parser.add_argument("--encoder-dir", type=Path, default=None, help="flan-t5-xl: local snapshot folder")
    parser.add_argument("--encoder-weights", type=Path, default=None,
                        help="tiny: the shipped encoder's weights (releases/tiny/tiny_t5_encoder.safetensors)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True, help="caption features .npz")


def main(args) -> int:
    from dd.pipeline.prompt_files import read_prompts

    tokenizer, encoder, name = load_encoder(args.encoder, args.encoder_dir, args.encoder_weights)
    rows = read_prompts(args.prompts, args.column, count_tokens=lambda s: len(tokenizer(s)["input_ids"]))
    prompts = [r[args.column] for r in rows]
    feats, mask = encode_captions(prompts, tokenizer, encoder.to(args.device), batch_size=args.batch_size)
    write_caption_features(args.out, feats, mask, prompts, name)
    print(f"wrote {args.out}: {len(prompts)} captions, features {feats.shape[1:]} ({name})")
    return 0
