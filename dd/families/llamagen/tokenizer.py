"""LlamaGen's VQ-16 image tokenizer (``VQModel``, configured by ``VQConfig``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Size of the tokenizer's codebook-usage log (a training-time buffer that the checkpoints carry).
CODEBOOK_USAGE_LOG = 65536


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


