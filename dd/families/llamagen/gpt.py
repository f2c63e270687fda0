"""LlamaGen's GPT (``GPT``, configured by ``GPTConfig``) and its sampling rules.

One transformer serves both of LlamaGen's model types: class-conditional (``c2i``: one class token
before the image tokens) and text-to-image (``t2i``: ``cls_token_num`` projected caption positions,
left-padded, with a mask that hides the padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _dataclass_from_dict(cls, d: dict):
    """Build dataclass ``cls`` from the keys of ``d`` it knows (others are ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# =====================================================================================================
# Configuration
# =====================================================================================================

# LlamaGen's CaptionEmbedder is always built with token_num=120 (FLAN-T5-XL's max length in sample_t2i.py),
# whatever cls_token_num is: its null caption is [120, caption_dim] and captions come as 120 positions.
CAPTION_TOKENS = 120
MODEL_TYPES = ("c2i", "t2i")

@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None           # grouped-query attention when smaller than n_head
    multiple_of: int = 256                 # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1        # c2i: > 0 adds the null-class row (index num_classes) for CFG;
                                           # t2i: the share of training captions dropped to the null caption
    vocab_size: int = 16384
    model_type: str = "c2i"                # "c2i" (class token) or "t2i" (caption positions)
    caption_dim: int = 2048                # t2i: width of the text encoder's features (FLAN-T5-XL: 2048)
    cls_token_num: int = 1                 # condition positions before the image tokens (c2i 1, t2i 120)
    block_size: int = 256                  # image tokens; a square grid

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not a multiple of n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.grid ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError("class-conditional LlamaGen uses exactly one class token (cls_token_num=1)")
        if self.model_type == "t2i" and not 1 <= self.cls_token_num <= CAPTION_TOKENS:
            raise ValueError(f"text-to-image cls_token_num must be in 1..{CAPTION_TOKENS}, got {self.cls_token_num}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def text_conditional(self) -> bool:
        return self.model_type == "t2i"

    @classmethod
    def from_model_args(cls, model_args: dict) -> "GPTConfig":
        """From LlamaGen's ``ModelArgs`` (fields without a meaning here, like max_batch_size, are dropped)."""
        return _dataclass_from_dict(cls, model_args)


# LlamaGen's presets (both model types): name -> (n_layer, n_head, dim)
GPT_PRESETS = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536),
               "XXXL": (48, 40, 2560), "1B": (22, 32, 2048), "3B": (24, 32, 3200), "7B": (32, 32, 4096)}

# the released text-to-image model (t2i_XL_stage1_256.pt): GPT-XL with FLAN-T5-XL's 120 caption positions
T2I_XL = {"model_type": "t2i", "caption_dim": 2048, "cls_token_num": 120}


def gpt_preset(name: str, **overrides) -> GPTConfig:
    n_layer, n_head, dim = GPT_PRESETS[name]
    return GPTConfig(**{"n_layer": n_layer, "n_head": n_head, "dim": dim, **overrides})


def rope_2d_table(grid: int, head_dim: int, base: float, n_class_tokens: int) -> torch.Tensor:
    """[n_class_tokens + grid**2, head_dim/2, 2] (cos, sin) of the 2D rotary embedding.

    Rotation pair j of grid token k (row r, column c) turns by r * f_j for the first head_dim/4 pairs
    and by c * f_j for the last head_dim/4, f_j = base**(-4j / head_dim). The class-token rows are all
    zero: this zeroes the class token's queries and keys (the original layout, not an identity rotation).
    Built on the CPU explicitly so that it has values even when the model is built on the meta device.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid, device="cpu"), freqs)          # [grid, head_dim/4]
    grid_angles = torch.cat([angles[:, None, :].expand(-1, grid, -1),       # row
                             angles[None, :, :].expand(grid, -1, -1)], -1)  # column
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], -1).flatten(0, 1)
    return torch.cat([torch.zeros(n_class_tokens, half, 2, device="cpu"), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x [B, L, heads, head_dim] by table [L, head_dim/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                       xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Keys and values of the positions run so far, per layer, for incremental decoding.

    Preallocated to ``capacity`` positions on the first write; ``length`` positions are filled.
    Not a module: nothing of it ever lands in a state_dict.
    """

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.key_valid: torch.Tensor | None = None  # t2i: [B, capacity] positions a query may see
        self.position_offset = 0                    # t2i: caption padding dropped before position 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, heads, S, head_dim] after the filled positions; return all filled ones."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {end}")
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, cfg.dim + 2 * kv_dim, bias=False)  # [q | k | v], no biases
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None,
                key_valid: torch.Tensor | None = None):
        """``key_valid`` [B, >= start + L] bool hides keys (t2i caption padding) from every query
        but their own position; None: plain causal attention."""
        B, L, _ = x.shape
        cfg = self.cfg
        kv_dim = cfg.kv_heads * cfg.head_dim
        q, k, v = self.wqkv(x).split([cfg.dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(B, L, cfg.n_head, cfg.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, L, cfg.kv_heads, cfg.head_dim), rope).transpose(1, 2)
        v = v.view(B, L, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.extend(self.layer, k, v)
        if cfg.kv_heads != cfg.n_head:
            k = k.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
            v = v.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
        dropout = cfg.attn_dropout_p if self.training else 0.0
        if key_valid is not None:  # causal, minus the hidden keys, plus the diagonal (LlamaGen's t2i mask)
            qpos = torch.arange(start, start + L, device=x.device)
            kpos = torch.arange(start + L, device=x.device)
            mask = (qpos[:, None] >= kpos[None, :]) & key_valid[:, None, :start + L]
            mask = (mask | (qpos[:, None] == kpos[None, :]))[:, None]  # [B, 1, L, start + L]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif start == 0:    # the queries are the whole sequence so far
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif L == 1:        # one new position sees everything cached
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:               # a chunk after a cached prefix: causal, offset by the prefix length
            qpos = torch.arange(start, start + L, device=x.device)
            mask = qpos[:, None] >= torch.arange(start + L, device=x.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, L, cfg.dim)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int, drop_path_p: float):
        super().__init__()
        self.attention = Attention(cfg, layer)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x, rope, cache=None, key_valid=None):
        h = x + drop_path(self.attention(self.attention_norm(x), rope, cache, key_valid),
                          self.drop_path_p, self.training)
        return h + drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path_p, self.training)


class LabelEmbedder(nn.Module):
    """Class table; row ``num_classes`` is the null class. In training, labels drop to it at ``drop_prob``."""

    def __init__(self, num_classes: int, dim: int, drop_prob: float, null_row: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_row), dim)
        self.num_classes, self.drop_prob = num_classes, drop_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)  # [B, 1, D]


class CaptionMLP(nn.Module):
    """Caption projection: fc1 (no bias), tanh-GELU, fc2 (no bias)."""

    def __init__(self, caption_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(caption_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text-encoder features [B, CAPTION_TOKENS, caption_dim] -> [B, CAPTION_TOKENS, dim].

    The null caption (CFG's unconditional input) is the buffer ``uncond_embedding``, so it travels in
    the checkpoint. In training, whole captions drop to it at ``drop_prob``.
    """

    def __init__(self, caption_dim: int, dim: int, drop_prob: float, token_num: int = CAPTION_TOKENS):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)
        self.drop_prob = drop_prob

    def null(self, batch: int) -> torch.Tensor:
        return self.uncond_embedding.expand(batch, -1, -1)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        if captions.ndim != 3 or captions.shape[-1] != self.uncond_embedding.shape[1]:
            raise ValueError(f"captions must be [B, T, {self.uncond_embedding.shape[1]}], got {tuple(captions.shape)}")
        if self.training and self.drop_prob > 0:
            drop = torch.rand(captions.shape[0], device=captions.device) < self.drop_prob
            null = self.uncond_embedding[-captions.shape[1]:].to(captions.dtype)  # captions may come trimmed
            captions = torch.where(drop[:, None, None], null, captions)
        return self.cap_proj(captions)


def _init_linear_and_embedding(module: nn.Module, std: float):
    """LlamaGen's init: N(0, std) for Linear / Embedding weights, zero Linear biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class _Backbone(nn.Module):
    """What the GPT and the DD student share: class table, blocks, final norm, logits head, RoPE."""

    def _build_blocks(self, cfg: GPTConfig):
        rates = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(cfg, i, rates[i]) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # plain attribute, not a buffer: it is not in the checkpoints
        self.freqs_cis = rope_2d_table(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)

    def rope(self, start: int, length: int, device) -> torch.Tensor:
        if self.freqs_cis.device != torch.device(device):
            self.freqs_cis = self.freqs_cis.to(device)
        if start + length > self.freqs_cis.shape[0]:
            raise ValueError(f"positions up to {start + length} exceed the sequence of "
                             f"{self.freqs_cis.shape[0]} (class token + block_size)")
        return self.freqs_cis[start:start + length]

    def _key_valid(self, cond_mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, n + block_size] visibility of each position as a key (t2i caption mask), for the mask [B, n] of the
        caption positions run (``drop_caption_padding``'s)."""
        if cond_mask is None:
            return None
        if not self.config.text_conditional:
            raise ValueError("cond_mask applies to text-to-image models only")
        valid = cond_mask > 0
        return torch.cat([valid, valid.new_ones(valid.shape[0], self.config.block_size)], dim=1)

    def drop_caption_padding(self, captions: torch.Tensor, cond_mask: torch.Tensor | None):
        """(captions, cond_mask, position_offset) without the leading caption positions that are padding in every row.

        Exact, not an approximation: caption positions carry no rotary angle (their rows of the RoPE table are
        zero), so they are interchangeable, and a padding position is hidden as a key from every query but its
        own, so nothing else reads it. What is dropped is compute: 120 T5 positions of which a short caption
        fills few (the tiny default's captions are 17-65 of them). The image positions keep their rotary angles
        through ``position_offset``. Only the outputs' rounding can differ from the full layout.
        """
        n_cls = self.config.cls_token_num
        captions = captions[:, :n_cls]
        if cond_mask is None:
            return captions, None, 0
        if cond_mask.ndim != 2 or cond_mask.shape[1] < n_cls:
            raise ValueError(f"cond_mask must be [B, >= {n_cls}], got {tuple(cond_mask.shape)}")
        used = (cond_mask[:, :n_cls] > 0).any(0)
        first = int(used.int().argmax()) if bool(used.any()) else n_cls - 1  # keep the last position at least
        return captions[:, first:], cond_mask[:, first:n_cls], first

    def run_blocks(self, h: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                   key_valid: torch.Tensor | None = None, position_offset: int = 0) -> torch.Tensor:
        """``position_offset``: positions of the full layout dropped before h's first (``drop_caption_padding``)."""
        rope = self.rope(position_offset + start, h.shape[1], h.device)
        for layer in self.layers:
            h = layer(h, rope, cache, key_valid)
        return h


class GPT(_Backbone):
    """LlamaGen transformer (``autoregressive/models/gpt.py``): class-conditional or text-to-image."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.text_conditional:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob,
                                               null_row=cfg.class_dropout_prob > 0)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self._build_blocks(cfg)
        _init_linear_and_embedding(self, cfg.initializer_range)
        nn.init.zeros_(self.output.weight)

    @property
    def has_null_class(self) -> bool:
        if self.config.text_conditional:
            return True  # the null caption is part of every t2i model
        return self.cls_embedding.embedding_table.num_embeddings > self.config.num_classes

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """CFG's unconditional input for a batch of conditions: the null class or the null caption."""
        if self.config.text_conditional:
            if cond.shape[1] != self.cls_embedding.uncond_embedding.shape[0]:
                raise ValueError(f"CFG needs captions of {self.cls_embedding.uncond_embedding.shape[0]} positions "
                                 f"(the null caption's), got {cond.shape[1]}")
            return self.cls_embedding.null(cond.shape[0]).to(cond)
        if not self.has_null_class:
            raise ValueError("CFG needs a GPT trained with class dropout (a null-class row)")
        return torch.full_like(cond, self.config.num_classes)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.cls_token_num + self.config.block_size)

    def forward(self, idx: torch.Tensor | None, cond: torch.Tensor | None = None,
                cache: KVCache | None = None, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits [B, L, V]; the first returned position predicts the next image token.

        ``cond`` starts a sequence: class labels [B] (c2i) or caption features [B, T, caption_dim]
        (t2i; the first cls_token_num positions are kept, ``cond_mask`` [B, T] marks the valid ones,
        left padding as in LlamaGen's sample_t2i.py). ``idx`` [B, n] are the image tokens that follow
        (None: condition only). Logits are returned from the last condition position on, so a call
        with cond and n tokens gives n + 1 positions. With ``cache``, the input continues the cached
        sequence (pass ``cond`` / ``cond_mask`` only with its first chunk) and the cache is extended.
        """
        parts, offset = [], 0
        if cond is not None:
            if self.config.text_conditional:
                cond, cond_mask, offset = self.drop_caption_padding(cond, cond_mask)
            parts.append(self.cls_embedding(cond)[:, :self.config.cls_token_num])
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        if not parts:
            raise ValueError("nothing to run: give a condition and/or idx")
        start = 0 if cache is None else cache.length
        if (start == 0) != (cond is not None):
            raise ValueError("the condition goes with the first chunk of a sequence, and only with it")
        key_valid = self._key_valid(cond_mask) if start == 0 else cache.key_valid
        if cache is not None and start == 0:
            cache.key_valid, cache.position_offset = key_valid, offset
        elif cache is not None:
            offset = cache.position_offset
        h = self.tok_dropout(torch.cat(parts, dim=1))
        h = self.run_blocks(h, start, cache, key_valid, offset)
        if cache is not None:
            cache.length += h.shape[1]
        if cond is not None:
            h = h[:, parts[0].shape[1] - 1:]  # condition positions before the last predict nothing
        return self.output(self.norm(h)).float()

    def training_loss(self, idx: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced cross-entropy over all tokens of idx [B, n]; in training mode conditions
        drop to the null class / caption at ``class_dropout_prob`` (what makes CFG possible)."""
        logits = self(idx[:, :-1], cond, cond_mask=cond_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx.reshape(-1))


# =====================================================================================================
# Sampling: CFG, temperature, top-k, top-p exactly as LlamaGen's generate.py
# =====================================================================================================

def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """LlamaGen's guidance: uncond + (cond - uncond) * scale."""
    return uncond + (cond - uncond) * scale


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Copy of logits [..., V] with removed entries set to -inf.

    top-k keeps every logit >= the k-th largest (ties kept; k clamped to [1, V]); top-p then keeps
    the smallest prefix of the descending order whose softmax mass reaches top_p, including the
    token that crosses it.
    """
    logits = logits.clone()
    if top_k > 0:
        k = min(max(top_k, 1), logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shift: keep the crossing token
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filter(logits, top_k, top_p)
    return F.softmax(logits, dim=-1)


