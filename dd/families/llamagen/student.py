"""The DD student on LlamaGen (``DDStudent``, configured by ``DDConfig``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from dd.families.llamagen.gpt import (
    GPT,
    CaptionEmbedder,
    GPTConfig,
    LabelEmbedder,
    _Backbone,
    _init_linear_and_embedding,
)
from dd.families.llamagen.teacher import LlamaGenT2ITeacher, LlamaGenTeacher

# =====================================================================================================
# DD student
# =====================================================================================================

@dataclass
class DDConfig(GPTConfig):
    """GPT configuration of the DD student; its dropouts default to 0 and labels never drop."""

    codebook_dim: int = 8
    token_dropout_p: float = 0.0
    resid_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    class_dropout_prob: float = 0.0

    @classmethod
    def from_gpt(cls, gpt: GPTConfig, codebook_dim: int) -> "DDConfig":
        d = asdict(gpt)
        d.update(codebook_dim=codebook_dim, token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0,
                 ffn_dropout_p=0.0, drop_path_rate=0.0, class_dropout_prob=0.0)
        return cls(**d)


class FinalLayer(nn.Module):
    """Embedding head: LayerNorm (no affine), modulated by the class embedding, then Linear.

    shift = table[0] + class embedding and scale = table[1] + class embedding (no SiLU, no Linear).
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + cond).chunk(2, dim=1)  # each [B, 1, D]
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DDStudent(_Backbone):
    """DD student on LlamaGen (``DDTransformer`` of microsoft/distilled_decoding).

    Input: [class token; Linear(x)] for continuous token vectors x [B, n, C], plus a learned
    noise/data embedding at every position (the class token and tokens < t are data). Attention is
    plain causal, so output i, computed at the position of input token i, sees its own noisy input.

    Text-to-image (no released student exists; this follows the class-conditional design): the caption embedder
    takes the class table's place, copied from the teacher as the class table is, so the condition is the 120
    caption positions in LlamaGen's left-padded layout, with the padding hidden from every query (the teacher's
    caption mask). The embedding head, modulated by the class embedding in the class-conditional student, is
    modulated by the caption's projected features averaged over its valid positions: one vector per condition,
    as the class embedding is. Labels are prompt rows of the teacher's prompt set (``LlamaGenT2ITeacher``), whose
    caption table the student is given by ``bind_prompts``.
    """

    def __init__(self, cfg: DDConfig):
        super().__init__()
        self.config = cfg
        if cfg.text_conditional:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, 0.0)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, 0.0, null_row=True)
        self.tok_embeddings = nn.Linear(cfg.codebook_dim, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self._build_blocks(cfg)
        self.final_layer_conti = FinalLayer(cfg.dim, cfg.codebook_dim)
        self.n_d_embed = nn.Embedding(2, cfg.dim)
        _init_linear_and_embedding(self, cfg.initializer_range)
        nn.init.zeros_(self.output.weight)

    def noise_data_index(self, t: torch.Tensor, n_tokens: int, n_cls: int | None = None) -> torch.Tensor:
        """[B, n_cls + n] index into n_d_embed: 1 (data) for the n_cls condition positions run (default
        cls_token_num) and the first t tokens, 0 (noise) after (the class-conditional n_cls is 1: sequence
        index <= t)."""
        n_cls = self.config.cls_token_num if n_cls is None else n_cls
        pos = torch.arange(n_cls + n_tokens, device=t.device)
        return (pos[None, :] < n_cls + t[:, None]).long()

    def bind_prompts(self, captions: torch.Tensor, caption_mask: torch.Tensor) -> "DDStudent":
        """Text-to-image: the prompt set whose rows the labels are (not saved with the student's weights)."""
        if not self.config.text_conditional:
            raise ValueError("only a text-to-image student takes a prompt set")
        self.register_buffer("captions", captions.float(), persistent=False)
        self.register_buffer("caption_mask", caption_mask.bool(), persistent=False)
        return self

    def condition(self, labels: torch.Tensor):
        """(condition positions [B, n_cls, D], keys each query may see [B, n_cls + block_size] or None, the one
        vector [B, 1, D] that modulates the embedding head, position offset). A text-to-image condition runs
        without the caption padding that all its rows share (``drop_caption_padding``: exact), so its n_cls
        positions are the last of the full layout's cls_token_num, after ``position_offset`` dropped ones."""
        if not self.config.text_conditional:
            cond = self.cls_embedding(labels)                                # [B, 1, D]
            return cond, None, cond, 0
        if getattr(self, "captions", None) is None:
            raise ValueError("a text-to-image student needs its prompt set: bind_prompts(captions, mask)")
        labels = labels.long().to(self.captions.device)
        captions, mask, offset = self.drop_caption_padding(self.captions[labels], self.caption_mask[labels])
        keys = self._key_valid(mask)                                          # the GPT's caption mask
        cond = self.cls_embedding(captions)
        valid = mask.to(cond.dtype)[..., None]
        pooled = (cond * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
        return cond, keys, pooled, offset

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                rows: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n, C], labels [B], t [B] (AR step = number of given data tokens) ->
        (logits [B, n, V] float, embeddings [B, n, C] float), raw head outputs at every token; with
        ``rows`` = (logit_tokens, emb_tokens) only the logits and embeddings of those tokens."""
        cond_tokens, keys, cond, offset = self.condition(labels)
        n_cls = cond_tokens.shape[1]
        h = torch.cat([cond_tokens, self.tok_embeddings(x)], dim=1)
        h = h + self.n_d_embed(self.noise_data_index(t.to(x.device).long(), x.shape[1], n_cls))
        h = self.run_blocks(self.tok_dropout(h), key_valid=keys, position_offset=offset)
        if rows is not None:
            tokens = h[:, n_cls:]
            return (self.output(self.norm(tokens[:, rows[0]])).float(),
                    self.final_layer_conti(tokens[:, rows[1]], cond).float())
        logits = self.output(self.norm(h)).float()
        emb = self.final_layer_conti(h, cond).float()                        # on the un-normalised h
        return logits[:, n_cls:], emb[:, n_cls:]

    @classmethod
    def from_teacher(cls, teacher: "GPT | LlamaGenTeacher", codebook_dim: int | None = None,
                     **overrides) -> "DDStudent":
        """A student initialised from the teacher: class table, blocks, final norm and logits head are
        copied; the token Linear, the embedding head and the noise/data embedding are new (N(0, 0.02),
        zero biases; scale_shift_table N(0, 1/dim)), as in the DD code."""
        prompts = (teacher.captions, teacher.caption_mask) if isinstance(teacher, LlamaGenT2ITeacher) else None
        if isinstance(teacher, LlamaGenTeacher):
            codebook_dim = teacher.tokenizer.config.codebook_dim if codebook_dim is None else codebook_dim
            teacher = teacher.gpt
        if codebook_dim is None:
            raise ValueError("codebook_dim is needed when the teacher is a bare GPT")
        ref = next(teacher.parameters())
        with torch.device(ref.device):
            student = cls(replace(DDConfig.from_gpt(teacher.config, codebook_dim), **overrides)).to(ref.dtype)
        with torch.no_grad():
            if student.config.text_conditional:       # caption projection and null caption, as the class table
                student.cls_embedding.load_state_dict(teacher.cls_embedding.state_dict())
            else:
                src = teacher.cls_embedding.embedding_table.weight
                student.cls_embedding.embedding_table.weight[: src.shape[0]].copy_(src)  # no null row: fresh
            for dst, s in zip(student.layers.parameters(), teacher.layers.parameters()):
                dst.copy_(s)
            student.norm.weight.copy_(teacher.norm.weight)
            student.output.weight.copy_(teacher.output.weight)
        return student.bind_prompts(*prompts) if prompts is not None else student


