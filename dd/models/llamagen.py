"""LlamaGen, checkpoint-compatible: the VQ tokenizer, the class-conditional GPT and its DD student.

Three models, each configured by a small dataclass:

* ``VQModel`` (``VQConfig``): the VQ-16 family image tokenizer. A taming-style conv encoder maps an
  image in [-1, 1] to a grid of ``codebook_dim`` vectors; both the vectors and the codebook are
  l2-normalised before the nearest-code lookup; a conv decoder maps (possibly continuous) vectors back.
* ``GPT`` (``GPTConfig``): the class-conditional LlamaGen transformer. The sequence is
  [class token, image tokens in raster order]; RMSNorm, SwiGLU, 2D RoPE and no absolute position
  embedding. The logit at sequence position p predicts image token p.
* ``DDStudent`` (``DDConfig``): the Distilled-Decoding student of microsoft/distilled_decoding. Same
  blocks; its input tokens are continuous vectors (data before step t, noise from t on), and it returns
  logits and a continuous embedding for every token, computed at that token's own position.

``LlamaGenTeacher`` adapts tokenizer + GPT to ``dd.teacher.Teacher``; ``load_teacher`` and
``load_student`` read the released checkpoint files. State-dict keys, shapes and dtypes are those of
the original code (FoundationVision/LlamaGen, microsoft/distilled_decoding), so released weights load
unchanged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dd.teacher import ARState, SamplingConfig, Teacher

# Size of the tokenizer's codebook-usage log (a training-time buffer that the checkpoints carry).
CODEBOOK_USAGE_LOG = 65536


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _dataclass_from_dict(cls, d: dict):
    """Build dataclass ``cls`` from the keys of ``d`` it knows (others are ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# =====================================================================================================
# VQ tokenizer
# =====================================================================================================

@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_dim: int = 8                  # LlamaGen's codebook_embed_dim
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True       # keeps the usage-log buffer that the checkpoints carry
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    ch: int = 128                          # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # one level per entry; downsampling 2**(len-1)
    decoder_ch_mult: tuple[int, ...] | None = None  # None: same as ch_mult
    num_res_blocks: int = 2                # per encoder level; the decoder has one more per level
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32                  # GroupNorm groups (32 in the released models)
    norm_eps: float = 1e-6

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        if self.decoder_ch_mult is not None:
            self.decoder_ch_mult = tuple(self.decoder_ch_mult)

    @property
    def dec_ch_mult(self) -> tuple[int, ...]:
        return self.ch_mult if self.decoder_ch_mult is None else self.decoder_ch_mult

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_model_args(cls, model_args: dict, ch: int = 128, num_res_blocks: int = 2,
                        norm_groups: int = 32, norm_eps: float = 1e-6) -> "VQConfig":
        """From LlamaGen's tokenizer ``ModelArgs`` (whose Encoder/Decoder hard-code ch and res blocks)."""
        return cls(
            codebook_size=model_args["codebook_size"], codebook_dim=model_args["codebook_embed_dim"],
            codebook_l2_norm=model_args.get("codebook_l2_norm", True),
            codebook_show_usage=model_args.get("codebook_show_usage", True),
            commit_loss_beta=model_args.get("commit_loss_beta", 0.25),
            entropy_loss_ratio=model_args.get("entropy_loss_ratio", 0.0),
            ch=ch, ch_mult=tuple(model_args["encoder_ch_mult"]),
            decoder_ch_mult=tuple(model_args.get("decoder_ch_mult", model_args["encoder_ch_mult"])),
            num_res_blocks=num_res_blocks, z_channels=model_args["z_channels"],
            dropout=model_args.get("dropout_p", 0.0), norm_groups=norm_groups, norm_eps=norm_eps)


def vq_16(**overrides) -> VQConfig:
    """The released VQ-16 tokenizer (vq_ds16_c2i.pt): 16x downsampling, 16384 x 8 codebook."""
    return VQConfig(**overrides)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cfg: VQConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # 1x1 projection of the shortcut only when the width changes
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with separate 1x1 q, k, v convs."""

    def __init__(self, c: int, cfg: VQConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # scale C**-0.5
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        # pad right and bottom only, so that a stride-2 3x3 conv maps 2n -> n
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResBlocks, each followed by an AttnBlock where ``attn`` is not empty."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.downsample = None  # set by the encoder (all levels but the last)
        self.upsample = None    # set by the decoder (all levels but the last processed)

    def forward(self, h):
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


def _mid_block(c: int, cfg: VQConfig) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, cfg), AttnBlock(c, cfg), ResnetBlock(c, c, cfg)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = cfg.ch_mult
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = cfg.ch
        for i, m in enumerate(mult):
            lowest = i == len(mult) - 1  # attention only at the lowest resolution
            res, attn = [], []
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(c, cfg.ch * m, cfg))
                c = cfg.ch * m
                if lowest:
                    attn.append(AttnBlock(c, cfg))
            level = Level(res, attn)
            if not lowest:
                level.downsample = Downsample(c)
            self.conv_blocks.append(level)
        self.mid = _mid_block(c, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder. ``conv_blocks[0]`` is the lowest-resolution level (processing order)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = cfg.dec_ch_mult
        c = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid_block(c, cfg)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            lowest = i == len(mult) - 1
            res, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(c, cfg.ch * mult[i], cfg))
                c = cfg.ch * mult[i]
                if lowest:
                    attn.append(AttnBlock(c, cfg))
            level = Level(res, attn)
            if i != 0:
                level.upsample = Upsample(c)
            self.conv_blocks.append(level)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus the entropy of the batch-average code distribution (codebook spread)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg = probs.mean(0)
    return -(probs * log_probs).sum(-1).mean() + (avg * torch.log(avg + 1e-5)).sum()


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            if cfg.codebook_l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if cfg.codebook_show_usage:
            # recent code indices, written in training mode only (a float buffer, as in the checkpoints)
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_LOG))

    def codebook(self) -> torch.Tensor:
        """[V, C] code vectors as used for lookup (l2-normalised rows when codebook_l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.cfg.codebook_l2_norm else w

    def forward(self, z: torch.Tensor):
        """z [B, C, h, w] -> (straight-through z_q [B, C, h, w], indices [B*h*w], losses dict)."""
        z = z.permute(0, 2, 3, 1).contiguous()
        if self.cfg.codebook_l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        e = self.codebook()
        flat = z.view(-1, self.cfg.codebook_dim)
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        indices = d.argmin(1)
        z_q = e[indices].view(z.shape)
        losses = {
            "codebook": (z_q - z.detach()).pow(2).mean(),
            "commit": self.cfg.commit_loss_beta * (z_q.detach() - z).pow(2).mean(),
            "entropy": (self.cfg.entropy_loss_ratio * entropy_loss(-d) if self.cfg.entropy_loss_ratio > 0
                        else d.new_zeros(())),
        }
        if self.cfg.codebook_show_usage and self.training:
            with torch.no_grad():
                n = min(indices.numel(), CODEBOOK_USAGE_LOG)
                self.codebook_used.copy_(torch.cat([self.codebook_used[n:], indices[-n:].float()]))
        z_q = z + (z_q - z).detach()  # straight-through gradient to the encoder
        return z_q.permute(0, 3, 1, 2), indices, losses

    def usage(self) -> float:
        """Fraction of the codebook seen in the usage log (meaningful after training steps)."""
        return torch.unique(self.codebook_used).numel() / self.cfg.codebook_size

    def lookup(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Code vectors of ``indices``; with ``shape`` = (B, C, h, w) (or (B, h, w, C) when not
        channel_first) reshaped to that layout; otherwise [..., C]."""
        z_q = self.codebook()[indices]
        if shape is None:
            return z_q
        if channel_first:
            B, C, H, W = shape
            return z_q.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        return z_q.reshape(shape)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> continuous latent [B, C, h, w] (before normalisation)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (quantised vectors [B, C, h, w], indices [B, h*w] in raster order)."""
        quant, indices, _ = self.quantize(self.encode_latent(x))
        return quant, indices.view(x.shape[0], -1)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Vectors [B, C, h, w] (continuous allowed) -> images, unclamped."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        return self.decode(self.quantize.lookup(indices, shape, channel_first))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of images [B, 3, H, W] in [-1, 1] (unclamped)."""
        return self.decode(self.encode(x)[0])

    def training_loss(self, images: torch.Tensor, reconstruction: str = "l2",
                      codebook_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Reconstruction (``"l2"`` or ``"l1"``) + codebook + commitment (+ entropy) losses.

        Gradients reach the encoder through the straight-through estimator and the codebook
        through the codebook loss. Perceptual and GAN losses are left out at this scale.
        """
        quant, _, q = self.quantize(self.encode_latent(images))
        rec = self.decode(quant)
        mse, l1 = F.mse_loss(rec, images), F.l1_loss(rec, images)
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        rec_loss = mse if reconstruction == "l2" else l1
        loss = rec_loss + codebook_weight * (q["codebook"] + q["commit"] + q["entropy"])
        stats = {"loss": loss.item(), "rec_mse": mse.item(), "rec_l1": l1.item(),
                 "codebook": q["codebook"].item(), "commit": q["commit"].item(),
                 "entropy": q["entropy"].item()}
        if self.config.codebook_show_usage:
            stats["codebook_usage"] = self.quantize.usage()
        return loss, stats


# =====================================================================================================
# Class-conditional GPT
# =====================================================================================================

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
    class_dropout_prob: float = 0.1        # > 0 adds the null-class row (index num_classes) for CFG
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256                  # image tokens; a square grid

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not a multiple of n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.grid ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid")
        if self.cls_token_num != 1:
            raise ValueError("class-conditional LlamaGen uses exactly one class token (cls_token_num=1)")

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

    @classmethod
    def from_model_args(cls, model_args: dict) -> "GPTConfig":
        """From LlamaGen's ``ModelArgs`` (fields without a meaning here, like caption_dim, are dropped)."""
        if model_args.get("model_type", "c2i") != "c2i":
            raise ValueError(f"only class-conditional (c2i) models are supported, got {model_args['model_type']!r}")
        return _dataclass_from_dict(cls, model_args)


# LlamaGen's class-conditional presets: name -> (n_layer, n_head, dim)
GPT_PRESETS = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536),
               "XXXL": (48, 40, 2560), "1B": (22, 32, 2048), "3B": (24, 32, 3200), "7B": (32, 32, 4096)}


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

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None):
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
        if start == 0:      # the queries are the whole sequence so far
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

    def forward(self, x, rope, cache=None):
        h = x + drop_path(self.attention(self.attention_norm(x), rope, cache), self.drop_path_p, self.training)
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

    def run_blocks(self, h: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        rope = self.rope(start, h.shape[1], h.device)
        for layer in self.layers:
            h = layer(h, rope, cache)
        return h


class GPT(_Backbone):
    """Class-conditional LlamaGen transformer (``autoregressive/models/gpt.py``, c2i)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob,
                                           null_row=cfg.class_dropout_prob > 0)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self._build_blocks(cfg)
        _init_linear_and_embedding(self, cfg.initializer_range)
        nn.init.zeros_(self.output.weight)

    @property
    def has_null_class(self) -> bool:
        return self.cls_embedding.embedding_table.num_embeddings > self.config.num_classes

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.cls_token_num + self.config.block_size)

    def forward(self, idx: torch.Tensor | None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Float logits [B, L, V] at each input position; position p predicts image token p.

        ``labels`` [B] starts a sequence with the class token; ``idx`` [B, n] are the image tokens
        that follow (None: class token only). With ``cache``, the input continues the cached sequence
        (pass ``labels`` only for its first chunk) and the cache is extended.
        """
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels)[:, :self.config.cls_token_num])
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        if not parts:
            raise ValueError("nothing to run: give labels and/or idx")
        start = 0 if cache is None else cache.length
        if (start == 0) != (labels is not None):
            raise ValueError("labels go with the first chunk of a sequence, and only with it")
        h = self.tok_dropout(torch.cat(parts, dim=1))
        h = self.run_blocks(h, start, cache)
        if cache is not None:
            cache.length += h.shape[1]
        return self.output(self.norm(h)).float()

    def training_loss(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy over all tokens of idx [B, n]; in training mode labels drop
        to the null class at ``class_dropout_prob`` (what makes CFG possible)."""
        logits = self(idx[:, :-1], labels)
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
    """

    def __init__(self, cfg: DDConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, 0.0, null_row=True)
        self.tok_embeddings = nn.Linear(cfg.codebook_dim, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self._build_blocks(cfg)
        self.final_layer_conti = FinalLayer(cfg.dim, cfg.codebook_dim)
        self.n_d_embed = nn.Embedding(2, cfg.dim)
        _init_linear_and_embedding(self, cfg.initializer_range)
        nn.init.zeros_(self.output.weight)

    @staticmethod
    def noise_data_index(t: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """[B, 1 + n] index into n_d_embed: 1 (data) for sequence index <= t (class token and the
        first t tokens), 0 (noise) after."""
        pos = torch.arange(n_tokens + 1, device=t.device)
        return (pos[None, :] <= t[:, None]).long()

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                rows: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n, C], labels [B], t [B] (AR step = number of given data tokens) ->
        (logits [B, n, V] float, embeddings [B, n, C] float), raw head outputs at every token; with
        ``rows`` = (logit_tokens, emb_tokens) only the logits and embeddings of those tokens."""
        cond = self.cls_embedding(labels)                                    # [B, 1, D]
        h = torch.cat([cond, self.tok_embeddings(x)], dim=1)
        h = h + self.n_d_embed(self.noise_data_index(t.to(x.device).long(), x.shape[1]))
        h = self.run_blocks(self.tok_dropout(h))
        n_cls = self.config.cls_token_num
        if rows is not None:
            tokens = h[:, n_cls:]
            return (self.output(self.norm(tokens[:, rows[0]])).float(),
                    self.final_layer_conti(tokens[:, rows[1]], cond).float())
        logits = self.output(self.norm(h)).float()
        emb = self.final_layer_conti(h, cond).float()                        # on the un-normalised h
        return logits[:, n_cls:], emb[:, n_cls:]

    @classmethod
    def from_teacher(cls, teacher: "GPT | LlamaGenTeacher", codebook_dim: int | None = None) -> "DDStudent":
        """A student initialised from the teacher: class table, blocks, final norm and logits head are
        copied; the token Linear, the embedding head and the noise/data embedding are new (N(0, 0.02),
        zero biases; scale_shift_table N(0, 1/dim)), as in the DD code."""
        if isinstance(teacher, LlamaGenTeacher):
            codebook_dim = teacher.tokenizer.config.codebook_dim if codebook_dim is None else codebook_dim
            teacher = teacher.gpt
        if codebook_dim is None:
            raise ValueError("codebook_dim is needed when the teacher is a bare GPT")
        ref = next(teacher.parameters())
        with torch.device(ref.device):
            student = cls(DDConfig.from_gpt(teacher.config, codebook_dim)).to(ref.dtype)
        with torch.no_grad():
            src = teacher.cls_embedding.embedding_table.weight
            student.cls_embedding.embedding_table.weight[: src.shape[0]].copy_(src)  # no null row: fresh
            for dst, s in zip(student.layers.parameters(), teacher.layers.parameters()):
                dst.copy_(s)
            student.norm.weight.copy_(teacher.norm.weight)
            student.output.weight.copy_(teacher.output.weight)
        return student


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
    """VQ tokenizer + class-conditional GPT as a ``dd.teacher.Teacher``: one token per AR step.

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

    @classmethod
    def from_configs(cls, vq_config: VQConfig, gpt_config: GPTConfig) -> "LlamaGenTeacher":
        return cls(VQModel(vq_config), GPT(gpt_config))

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
    def decode_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """[B, n, C] raster-order vectors (continuous allowed, not re-quantised) -> images in [-1, 1].
        Differentiable: gradients flow to ``emb`` (e.g. for a perceptual loss on student outputs)."""
        B, n, C = emb.shape
        if n != self.grid ** 2:
            raise ValueError(f"expected {self.grid ** 2} tokens, got {n}")
        z = emb.reshape(B, self.grid, self.grid, C).permute(0, 3, 1, 2)
        return self.tokenizer.decode(z).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images)[1]


# =====================================================================================================
# Checkpoints
# =====================================================================================================

def _torch_load(path) -> dict:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def _weights(ckpt: dict, prefer: tuple[str, ...]) -> dict:
    """The state dict nested in a checkpoint under the first key of ``prefer`` present, else ckpt."""
    for key in prefer:
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def _load_into(model: nn.Module, sd: dict, strict: bool, what: str) -> nn.Module:
    """Load onto a meta-built model (assign=True). Unexpected keys are ignored when not strict, as the
    original loaders do; missing keys always fail (they would stay unallocated)."""
    missing, unexpected = model.load_state_dict(sd, strict=strict, assign=True)
    if missing:
        raise KeyError(f"{what}: checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}")
    return model


def _infer_vq_config(sd: dict) -> VQConfig:
    """The tokenizer configuration of a state dict (GroupNorm groups cannot be seen: 32 assumed)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))
    mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
    dec_mult = tuple(sd[f"decoder.conv_blocks.{n_levels - 1 - i}.res.0.conv1.weight"].shape[0] // ch
                     for i in range(n_levels))
    n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.0.res."))
    V, C = sd["quantize.embedding.weight"].shape
    return VQConfig(codebook_size=V, codebook_dim=C, codebook_show_usage="quantize.codebook_used" in sd,
                    ch=ch, ch_mult=mult, decoder_ch_mult=dec_mult, num_res_blocks=n_res,
                    z_channels=sd["encoder.conv_out.weight"].shape[0])


def _infer_gpt_config(sd: dict, block_size: int, cls=GPTConfig, **extra) -> GPTConfig:
    """The GPT configuration of a state dict; n_head from LlamaGen's presets (by width)."""
    dim = sd["norm.weight"].shape[0]
    heads = {d: h for _, h, d in GPT_PRESETS.values()}
    if dim not in heads:
        raise ValueError(f"width {dim} is not a LlamaGen preset: pass the model configuration explicitly")
    n_head = heads[dim]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv = (qkv_rows // (dim // n_head) - n_head) // 2
    rows = sd["cls_embedding.embedding_table.weight"].shape[0]
    cfg = cls(dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=None if n_kv == n_head else n_kv,
              vocab_size=sd["output.weight"].shape[0], num_classes=rows - 1, block_size=block_size, **extra)
    if cfg.ffn_hidden != sd["layers.0.feed_forward.w1.weight"].shape[0]:
        raise ValueError("FFN width differs from the default rule: pass the model configuration explicitly")
    return cfg


def _config_of(ckpt: dict, cls, given):
    """``given`` (a config or a dict of its fields), else a ``config`` dict saved in the checkpoint
    by this project, else None."""
    if isinstance(given, dict):
        return cls(**given)
    if given is not None:
        return given
    if isinstance(ckpt.get("config"), dict):
        return cls(**ckpt["config"])
    return None


def load_tokenizer(path, config: VQConfig | dict | None = None) -> VQModel:
    """A tokenizer checkpoint: the released ``vq_ds16_c2i.pt`` (weights under ``model``, strict) or
    one of ours (``{"model": state_dict, "config": asdict(VQConfig)}``)."""
    ckpt = _torch_load(path)
    sd = _weights(ckpt, ("model", "state_dict"))
    cfg = _config_of(ckpt, VQConfig, config) or _infer_vq_config(sd)
    with torch.device("meta"):
        model = VQModel(cfg)
    return _load_into(model, sd, strict=True, what=str(path)).eval()


def load_gpt(path, config: GPTConfig | dict | None = None, image_size: int = 256, downsample: int = 16) -> GPT:
    """A GPT checkpoint: released ``c2i_*.pt`` (``model`` / ``module`` / ``state_dict`` / raw; loaded
    non-strictly, so a stray ``freqs_cis`` key is ignored) or one of ours (with a ``config``). Without a
    config, the grid is image_size / downsample and the widths come from the weights."""
    ckpt = _torch_load(path)
    sd = _weights(ckpt, ("model", "module", "state_dict"))
    cfg = _config_of(ckpt, GPTConfig, config) or _infer_gpt_config(sd, (image_size // downsample) ** 2)
    with torch.device("meta"):
        model = GPT(cfg)
    return _load_into(model, sd, strict=False, what=str(path)).eval()


def load_teacher(tokenizer_path, model_path, vq_config: VQConfig | dict | None = None,
                 gpt_config: GPTConfig | dict | None = None, image_size: int = 256) -> LlamaGenTeacher:
    """Teacher from a tokenizer file and a GPT file (see ``load_tokenizer`` / ``load_gpt``)."""
    tokenizer = load_tokenizer(tokenizer_path, vq_config)
    gpt = load_gpt(model_path, gpt_config, image_size, tokenizer.config.downsample_factor)
    return LlamaGenTeacher(tokenizer, gpt)


def load_student(path, config: DDConfig | dict | None = None, ema: bool = True, image_size: int = 256,
                 downsample: int = 16) -> DDStudent:
    """A DD student checkpoint: released ``llamagen-*.pt`` (weights under ``ema`` when ``ema``, else
    ``model`` / ``module`` / ``state_dict`` / raw; non-strict like the DD scripts) or one of ours."""
    ckpt = _torch_load(path)
    prefer = (("ema",) if ema else ()) + ("model", "module", "state_dict")
    sd = _weights(ckpt, prefer)
    cfg = _config_of(ckpt, DDConfig, config)
    if cfg is None:
        cfg = _infer_gpt_config(sd, (image_size // downsample) ** 2, DDConfig,
                                codebook_dim=sd["tok_embeddings.weight"].shape[1])
    with torch.device("meta"):
        model = DDStudent(cfg)
    return _load_into(model, sd, strict=False, what=str(path)).eval()


def checkpoint(model: VQModel | GPT | DDStudent, **extra) -> dict:
    """What to ``torch.save`` so that the loaders above rebuild the model without being told its
    configuration: ``{"model": state_dict, "config": asdict(config), **extra}``."""
    return {"model": model.state_dict(), "config": asdict(model.config), **extra}
