"""LlamaGen's tokenizer + GPT as a ``dd.method.teacher.Teacher``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dd.families.llamagen.gpt import GPT, KVCache, cfg_mix, logits_to_probs
from dd.families.llamagen.tokenizer import VQModel
from dd.method.teacher import ARState, SamplingConfig, Teacher

# =====================================================================================================
# Teacher adapter
# =====================================================================================================

@dataclass
class _DecodeCache:
    labels: torch.Tensor          # labels as run: [B] or [cond; null] when CFG doubles the batch
    kv: KVCache
    n_run: int = 0                # image tokens already run through the network
    last_logits: torch.Tensor | None = None  # logits of the last position run ([B or 2B, V])


class LlamaGenTeacher(Teacher):
    """VQ tokenizer + class-conditional GPT as a ``dd.method.teacher.Teacher``: one token per AR step.

    The adapter leaves the wrapped models' mode and ``requires_grad`` as they are (a GPT may still be
    in training); for sampling and distillation call ``.eval().requires_grad_(False)`` on it.
    """

    family = "llamagen"

    def __init__(self, tokenizer: VQModel, gpt: GPT):
        super().__init__()
        if gpt.config.vocab_size != tokenizer.config.codebook_size:
            raise ValueError(f"GPT vocab {gpt.config.vocab_size} != codebook size {tokenizer.config.codebook_size}")
        if tokenizer.config.dec_ch_mult != tokenizer.config.ch_mult:
            raise ValueError("the teacher needs the same encoder and decoder downsampling")
        self.tokenizer, self.gpt = tokenizer, gpt

    @property
    def ar(self) -> GPT:
        return self.gpt

    # --- layout --------------------------------------------------------------------------------
    @property
    def step_sizes(self) -> tuple[int, ...]:
        return (1,) * self.gpt.config.block_size

    @property
    def grid(self) -> int:
        return self.gpt.config.grid

    @property
    def codebook(self) -> torch.Tensor:
        # the l2-normalised rows are computed once per weight state, not per access: callers (the flow
        # map) cache per-codebook work by tensor identity, which a fresh tensor per step would defeat
        w = self.tokenizer.quantize.embedding.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = self.__dict__.get("_codebook_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.tokenizer.quantize.codebook().detach())
            self.__dict__["_codebook_cache"] = cached
        return cached[1]

    @property
    def num_classes(self) -> int:
        return self.gpt.config.num_classes

    @property
    def image_size(self) -> int:
        return self.grid * self.tokenizer.config.downsample_factor

    # --- incremental sampling ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.gpt.output.weight.device

    def begin(self, labels: torch.Tensor, sampling: SamplingConfig) -> ARState:
        labels = labels.long().to(self.device)
        run_labels = labels
        if sampling.cfg_scale > 1.0:
            if not self.gpt.has_null_class:
                raise ValueError("CFG needs a GPT trained with class dropout (a null-class row)")
            run_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        return ARState(labels=labels, sampling=sampling,
                       cache=_DecodeCache(labels=run_labels, kv=self.gpt.new_cache()))

    @torch.no_grad()
    def next_logits(self, state: ARState) -> torch.Tensor:
        """[B, V] logits of the next token, CFG-guided when cfg_scale > 1 (before temperature and
        filtering). Runs every token appended since the last call in one pass."""
        c: _DecodeCache = state.cache
        step = len(state.tokens)
        if step >= self.n_steps:
            raise ValueError(f"all {self.n_steps} tokens are already appended")
        if c.last_logits is None or c.n_run < step:
            idx = torch.cat(state.tokens[c.n_run:], dim=1).to(self.device) if c.n_run < step else None
            if idx is not None and c.labels.shape[0] != idx.shape[0]:
                idx = torch.cat([idx, idx])  # both CFG halves see the same tokens
            labels = c.labels if c.kv.length == 0 else None
            c.last_logits = self.gpt(idx, labels, cache=c.kv)[:, -1]
            c.n_run = step
        state.step = step
        logits = c.last_logits
        if c.labels.shape[0] != state.labels.shape[0]:
            cond, uncond = logits.chunk(2)
            logits = cfg_mix(cond, uncond, state.sampling.cfg_scale)
        return logits

    def next_probs(self, state: ARState) -> torch.Tensor:
        s = state.sampling
        probs = logits_to_probs(self.next_logits(state), s.temperature, s.top_k, s.top_p)
        return probs[:, None, :]

    @torch.no_grad()
    def teacher_forced_probs(self, idx: torch.Tensor, labels: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """[B, n, V] probabilities of every token of idx [B, n] from one full-sequence pass (same CFG
        and filtering as ``next_probs``)."""
        labels = labels.long()
        if sampling.cfg_scale > 1.0:
            null = torch.full_like(labels, self.num_classes)
            cond, uncond = self.gpt(torch.cat([idx, idx])[:, :-1], torch.cat([labels, null])).chunk(2)
            logits = cfg_mix(cond, uncond, sampling.cfg_scale)
        else:
            logits = self.gpt(idx[:, :-1], labels)
        return logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)

    # --- tokens <-> images ---------------------------------------------------------------------
    def decode_embeddings(self, emb: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """[B, n, C] raster-order vectors (continuous allowed, not re-quantised) -> images in [-1, 1]
        (``clamp=False``: the decoder's raw output). Differentiable: gradients flow to ``emb`` (e.g. for a
        perceptual loss on student outputs)."""
        B, n, C = emb.shape
        if n != self.grid ** 2:
            raise ValueError(f"expected {self.grid ** 2} tokens, got {n}")
        z = emb.reshape(B, self.grid, self.grid, C).permute(0, 3, 1, 2)
        img = self.tokenizer.decode(z)
        return img.clamp(-1, 1) if clamp else img

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images)[1]


