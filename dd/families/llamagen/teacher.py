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

    # --- conditions: what the GPT's first chunk is given for a batch of labels ------------------------------------
    def null_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels of CFG's unconditional half: the null class."""
        if not self.gpt.has_null_class:
            raise ValueError("CFG needs a GPT trained with class dropout (a null-class row)")
        return torch.full_like(labels, self.num_classes)

    def condition(self, run_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the GPT's ``cond``, its ``cond_mask``) for labels as run (a class GPT takes the labels themselves)."""
        return run_labels, None

    def begin(self, labels: torch.Tensor, sampling: SamplingConfig) -> ARState:
        labels = labels.long().to(self.device)
        run_labels = labels
        if sampling.cfg_scale > 1.0:
            run_labels = torch.cat([labels, self.null_labels(labels)])
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
            cond, cond_mask = self.condition(c.labels) if c.kv.length == 0 else (None, None)
            c.last_logits = self.gpt(idx, cond, cache=c.kv, cond_mask=cond_mask)[:, -1]
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
        labels = labels.long().to(self.device)
        if sampling.cfg_scale > 1.0:
            cond, cond_mask = self.condition(torch.cat([labels, self.null_labels(labels)]))
            logits = cfg_mix(*self.gpt(torch.cat([idx, idx])[:, :-1], cond, cond_mask=cond_mask).chunk(2),
                             sampling.cfg_scale)
        else:
            cond, cond_mask = self.condition(labels)
            logits = self.gpt(idx[:, :-1], cond, cond_mask=cond_mask)
        return logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)

    # a teacher-forced pass holds [rows, n_tokens, V] logits (twice the rows under CFG): the rows of one pass are
    # capped so that these stay near 2**26 floats (256 MiB) at any vocabulary (16,384 codes: 8 rows of 256 tokens)
    FORCED_LOGITS_BUDGET = 2 ** 26

    @torch.no_grad()
    def token_probs(self, idx: torch.Tensor, labels: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """``Teacher.token_probs`` from teacher-forced full-sequence passes (``teacher_forced_probs``, equal to the
        KV-cached steps: tests/test_llamagen.py) over groups of rows: one network call per group instead of one per
        token, which is what makes ``teacher_nll_bits`` cheap beside sampling (256 calls per batch at 256 px)."""
        idx, labels = idx.long().to(self.device), labels.long().to(self.device)
        per_row = idx.shape[1] * self.codebook.shape[0] * (2 if sampling.cfg_scale > 1.0 else 1)
        rows = max(1, self.FORCED_LOGITS_BUDGET // per_row)
        return torch.cat([self.teacher_forced_probs(i, y, sampling).gather(-1, i.unsqueeze(-1)).squeeze(-1)
                          for i, y in zip(idx.split(rows), labels.split(rows))])

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




class LlamaGenT2ITeacher(LlamaGenTeacher):
    """LlamaGen's text-to-image GPT as a ``Teacher`` over a fixed prompt set: a label is a prompt's row.

    The prompt set's caption features (``dd.families.llamagen.text_encoder``: [P, 120, D] in the left-padded layout,
    with their mask) are buffers of the adapter, so the whole method (pairs, whose records keep a label per pair;
    distillation; sampling, whose labels cycle over the set; onestep*, whose marginals are per label) runs unchanged
    with prompts in place of classes. CFG's unconditional half is the null caption under the prompt's own mask, as
    LlamaGen's ``sample_t2i.py`` does; it runs as label ``-1 - row``.
    """

    def __init__(self, tokenizer: VQModel, gpt: GPT, captions: torch.Tensor, caption_mask: torch.Tensor):
        super().__init__(tokenizer, gpt)
        if not gpt.config.text_conditional:
            raise ValueError("a text-to-image teacher needs a t2i GPT (model_type 't2i')")
        if captions.ndim != 3 or captions.shape[-1] != gpt.config.caption_dim:
            raise ValueError(f"captions must be [P, T, {gpt.config.caption_dim}], got {tuple(captions.shape)}")
        if caption_mask.shape != captions.shape[:2]:
            raise ValueError(f"caption mask {tuple(caption_mask.shape)} does not match captions {tuple(captions.shape)}")
        self.register_buffer("captions", captions.float(), persistent=False)
        self.register_buffer("caption_mask", caption_mask.bool(), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.captions.shape[0]

    def null_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return -1 - labels

    def condition(self, run_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        null = run_labels < 0
        rows = torch.where(null, -1 - run_labels, run_labels)
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.num_classes):
            raise ValueError(f"prompt rows must lie in 0..{self.num_classes - 1}")
        cond = torch.where(null[:, None, None], self.gpt.null_condition(self.captions[rows]), self.captions[rows])
        return cond, self.caption_mask[rows]
