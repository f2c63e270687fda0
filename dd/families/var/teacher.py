"""VAR's VQVAE + transformer as a ``dd.method.teacher.Teacher``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dd.families.var.transformer import (
    VAR,
    LayerKV,
    cfg_strength,
    probs_from_logits,
)
from dd.families.var.vqvae import VQVAE
from dd.method.teacher import ARState, SamplingConfig, Teacher


# ==================================================================================================
# Teacher adapter
# ==================================================================================================
@dataclass
class _SamplerCache:
    layers: list                        # one LayerKV per block
    cond_BD: torch.Tensor               # class embeddings, batch doubled (cond, null) under CFG
    f_hat: torch.Tensor                 # [B, Cvae, h, w] accumulated from the folded tokens
    n_folded: int = 0                   # steps whose tokens are in f_hat
    n_run: int = 0                      # scales whose inputs are in the KV cache
    inputs: dict = field(default_factory=dict)   # scale -> its input vectors [B, pn*pn, Cvae], not yet run
    last: tuple | None = None           # (step, guided logits) of the latest next_logits call


class VARTeacher(Teacher):
    """(VQVAE, VAR) as a ``dd.method.teacher.Teacher``: one AR step = one scale."""

    family = "var"

    def __init__(self, tokenizer: VQVAE, model: VAR):
        super().__init__()
        if tuple(tokenizer.patch_nums) != tuple(model.patch_nums):
            raise ValueError(f"tokenizer scales {tokenizer.patch_nums} != transformer scales {model.patch_nums}")
        if (tokenizer.cfg.vocab_size, tokenizer.cfg.z_channels) != (model.cfg.vocab_size, model.cfg.Cvae):
            raise ValueError("tokenizer and transformer disagree on codebook size / code dimension")
        self.tokenizer = tokenizer
        self.model = model
        model.attach_tokenizer(tokenizer)

    @property
    def ar(self) -> VAR:
        return self.model

    # --- layout ---------------------------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.model.patch_nums

    @property
    def step_sizes(self) -> tuple[int, ...]:
        return tuple(pn * pn for pn in self.patch_nums)

    @property
    def codebook(self) -> torch.Tensor:
        return self.tokenizer.quantize.embedding.weight

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def image_size(self) -> int:
        return self.tokenizer.cfg.image_size

    # --- incremental sampling -----------------------------------------------------------------------
    def begin(self, labels: torch.Tensor, sampling: SamplingConfig) -> ARState:
        labels = labels.long()
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)  # < 0: unconditional
        return ARState(labels=labels, sampling=sampling)

    def _new_cache(self, state: ARState) -> _SamplerCache:
        labels = state.labels
        if state.sampling.cfg_scale != 0:
            labels = torch.cat((labels, torch.full_like(labels, self.num_classes)))
        cond_BD = self.model.class_emb(labels)
        B, qcfg = state.labels.shape[0], self.tokenizer.quantize
        f_hat = cond_BD.new_zeros(B, self.tokenizer.cfg.z_channels, qcfg.latent_size, qcfg.latent_size,
                                  dtype=torch.float32)
        return _SamplerCache(layers=[LayerKV() for _ in self.model.blocks], cond_BD=cond_BD, f_hat=f_hat)

    def _fold_tokens(self, c: _SamplerCache, tokens: list) -> None:
        """Add appended tokens to f_hat and queue the inputs they produce for the next scales."""
        q = self.tokenizer.quantize
        while c.n_folded < len(tokens):
            si = c.n_folded
            c.f_hat, nxt = q.next_autoregressive_input(si, c.f_hat, q.codes_to_map(tokens[si]))
            if si + 1 < len(self.patch_nums):
                c.inputs[si + 1] = nxt.flatten(2).transpose(1, 2)
            c.n_folded += 1

    @torch.no_grad()
    def next_logits(self, state: ARState) -> torch.Tensor:
        """Guided logits [B, pn*pn, V] of step len(state.tokens) (before temperature/filtering).

        Runs, in one pass, every scale whose input became available since the last call."""
        s = len(state.tokens)
        if s >= self.n_steps:
            raise ValueError(f"all {self.n_steps} steps have been appended")
        if state.cache is None:
            state.cache = self._new_cache(state)
        c: _SamplerCache = state.cache
        if c.last is not None and c.last[0] == s:
            return c.last[1]
        self._fold_tokens(c, state.tokens)
        m = self.model
        lvl_pos = m.lvl_pos()
        doubled = c.cond_BD.shape[0] != state.labels.shape[0]
        pieces = []
        for si in range(c.n_run, s + 1):
            b, e = m.begin_ends[si]
            if si == 0:
                x = m.start_tokens(c.cond_BD) + lvl_pos[:, b:e]
            else:
                x = m.word_embed(c.inputs.pop(si)) + lvl_pos[:, b:e]
                if doubled:
                    x = x.repeat(2, 1, 1)
            pieces.append(x)
        x = torch.cat(pieces, dim=1)
        # one scale sees everything cached plus itself; several scales need the block-causal mask
        begin, end = m.begin_ends[c.n_run][0], m.begin_ends[s][1]
        attn_bias = None if c.n_run == s else m.attn_bias_for_masking[:, :, begin:end, :end]
        cond = m.block_cond(c.cond_BD)
        for block, kv in zip(m.blocks, c.layers):
            x = block(x, cond, attn_bias=attn_bias, kv=kv)
        logits = m.logits(x[:, -self.step_sizes[s]:], c.cond_BD)
        if doubled:
            t = cfg_strength(state.sampling.cfg_scale, s, self.n_steps)
            B = state.labels.shape[0]
            logits = (1 + t) * logits[:B] - t * logits[B:]
        c.n_run, c.last = s + 1, (s, logits)
        state.step = s
        return logits

    def next_probs(self, state: ARState) -> torch.Tensor:
        return probs_from_logits(self.next_logits(state), state.sampling)

    # --- tokens <-> images --------------------------------------------------------------------------
    def decode_embeddings(self, emb: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        if emb.shape[1] != self.n_tokens:
            raise ValueError(f"expected {self.n_tokens} token vectors, got {emb.shape[1]}")
        return self.tokenizer.decode_tokens(emb, clamp)

    def decode_prefix(self, emb_prefix: torch.Tensor) -> torch.Tensor:
        """Decode the first k tokens only: missing scales are left out of f_hat. A scale that is only
        partly given is completed with zero vectors."""
        B, k, C = emb_prefix.shape
        end = next((e for _, e in self.step_bounds if e >= k), self.n_tokens) if k else 0
        if end > k:
            emb_prefix = torch.cat([emb_prefix, emb_prefix.new_zeros(B, end - k, C)], dim=1)
        return self.tokenizer.decode_tokens(emb_prefix)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.tokenizer.img_to_idx(images), dim=1)


