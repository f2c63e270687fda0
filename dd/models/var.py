"""VAR (next-scale prediction) and its Distilled-Decoding student, checkpoint-compatible with the
released FoundationVision/VAR and microsoft/distilled_decoding files.

Three models, read top to bottom:

1. ``VQVAE``: a taming/LDM-style conv autoencoder whose latent f [B, Cvae, h, w] is quantised
   *residually over scales*: for each patch size pn (coarse to fine) the remaining residual is
   area-downsampled to pn x pn, each vector is snapped to its nearest code, and the codes are
   bicubic-upsampled back to h x w, passed through a small residual conv "phi" and added to the
   running reconstruction f_hat. The token sequence is all scales' indices, concatenated coarse to
   fine, row-major within a scale (680 tokens for patch sizes 1,2,3,4,5,6,8,10,13,16).
2. ``VAR``: a class-conditional transformer with AdaLN blocks that predicts a whole scale at once.
   The input of scale k is the area-downsample of f_hat after scales < k; attention is block-causal
   over scales. Sampling uses a scale-wise KV cache and VAR's own classifier-free guidance
   (1+t)*cond - t*uncond with t growing linearly from 0 (first scale) to cfg (last scale).
3. ``VARStudent``: the DD student (``DD_Model``): the same transformer over an extra start token plus
   all 680 token vectors (data before step t, noise after), which outputs logits and continuous
   vectors for every token in one pass.

``VARTeacher`` wraps (VQVAE, VAR) in the family-independent ``dd.teacher.Teacher`` interface.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd.teacher import ARState, SamplingConfig, Teacher

# The released 256-px models: 10 scales, 16x16 latent.
RELEASED_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _config_from_dict(cls, d: dict):
    """Build a config dataclass from a dict, ignoring unknown keys and turning lists into tuples."""
    names = {f.name for f in fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kw)


# ==================================================================================================
# 1. VQVAE
# ==================================================================================================
@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32                # Cvae: dimension of a code vector
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # the downsampling factor is 2**(len(ch_mult)-1)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    using_sa: bool = True               # attention blocks at the lowest resolution
    using_mid_sa: bool = True
    beta: float = 0.25                  # commitment loss weight
    using_znorm: bool = False           # nearest code by cosine similarity instead of Euclidean distance
    quant_conv_ks: int = 3
    quant_resi: float = 0.5             # phi(h) = (1-r) h + r conv(h)
    share_quant_resi: int = 4           # 0: one phi per scale, 1: one shared phi, K>1: K phis over the scales
    default_qresi_counts: int = 0       # with share_quant_resi=0: number of phis (0 = one per scale)
    patch_nums: tuple[int, ...] = RELEASED_PATCH_NUMS
    in_channels: int = 3

    def __post_init__(self):
        self.ch_mult, self.patch_nums = tuple(self.ch_mult), tuple(self.patch_nums)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        d = dict(d)
        # the golden files and the original code name a few things differently
        for ours, theirs in (("patch_nums", "v_patch_nums"), ("norm_groups", "groupnorm_groups"),
                             ("norm_eps", "groupnorm_eps")):
            if theirs in d and ours not in d:
                d[ours] = d[theirs]
        return _config_from_dict(cls, d)


def _group_norm(cfg: VQVAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VQVAEConfig, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _group_norm(cfg, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(cfg, out_ch)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head attention over spatial positions; one fused 1x1 conv makes q, k, v (in that order)."""

    def __init__(self, cfg: VQVAEConfig, ch: int):
        super().__init__()
        self.norm = _group_norm(cfg, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w = torch.bmm(q.transpose(1, 2), k).mul_(C ** -0.5).softmax(dim=2)   # [B, HW(q), HW(k)]
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric: pad only right and bottom, as the released weights expect
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(**modules) -> nn.Module:
    """A plain container, so that state_dict keys read ``down.0.block.1...`` like the original."""
    m = nn.Module()
    for name, mod in modules.items():
        setattr(m, name, mod)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            last = i == n_levels - 1
            ch_out = cfg.ch * mult
            blocks = [ResnetBlock(cfg, ch_in if b == 0 else ch_out, ch_out) for b in range(cfg.num_res_blocks)]
            attn = [AttnBlock(cfg, ch_out) for _ in blocks] if (last and cfg.using_sa) else []
            level = _level(block=nn.ModuleList(blocks), attn=nn.ModuleList(attn))
            if not last:
                level.downsample = Downsample2x(ch_out)
            self.down.append(level)
            ch_in = ch_out
        self.mid = _level(block_1=ResnetBlock(cfg, ch_in, ch_in),
                          attn_1=AttnBlock(cfg, ch_in) if cfg.using_mid_sa else nn.Identity(),
                          block_2=ResnetBlock(cfg, ch_in, ch_in))
        self.norm_out = _group_norm(cfg, ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        ch_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _level(block_1=ResnetBlock(cfg, ch_in, ch_in),
                          attn_1=AttnBlock(cfg, ch_in) if cfg.using_mid_sa else nn.Identity(),
                          block_2=ResnetBlock(cfg, ch_in, ch_in))
        # built from the lowest resolution up, stored in resolution order (up.0 = full resolution)
        levels = []
        for i in reversed(range(n_levels)):
            ch_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cfg, ch_in if b == 0 else ch_out, ch_out) for b in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(cfg, ch_out) for _ in blocks] if (i == n_levels - 1 and cfg.using_sa) else []
            level = _level(block=nn.ModuleList(blocks), attn=nn.ModuleList(attn))
            if i != 0:
                level.upsample = Upsample2x(ch_out)
            levels.insert(0, level)
            ch_in = ch_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(cfg, ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- the per-scale residual convs (phi) -----------------------------------------------------------
def phi_ticks(n_phi: int) -> np.ndarray:
    """Positions in [0, 1] that the n_phi convs are responsible for (float64, as the original)."""
    if n_phi == 4:
        return np.linspace(1 / 3 / n_phi, 1 - 1 / 3 / n_phi, n_phi)
    return np.linspace(1 / 2 / n_phi, 1 - 1 / 2 / n_phi, n_phi)


def phi_index(si: int, n_scales: int, n_phi: int) -> int:
    """Which of n_phi convs serves scale si: the tick nearest to si/(n_scales-1).

    Exact mathematical ties occur (10 scales, si=2; 5 scales, si=2); the float64 rounding of the
    ticks and numpy's first-minimum rule decide them, so this must stay in numpy float64.
    """
    at = si / (n_scales - 1) if n_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(n_phi) - at)))


class Phi(nn.Conv2d):
    """phi(h) = (1-r) h + r conv3x3(h)."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


def _make_phi(cfg: VQVAEConfig) -> nn.Module:
    return Phi(cfg.z_channels, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.qresi = _make_phi(cfg)

    def for_scale(self, si: int, n_scales: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.qresi_ls = nn.ModuleList([_make_phi(cfg) for _ in range(cfg.share_quant_resi)])

    def for_scale(self, si: int, n_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, n_scales, len(self.qresi_ls))]


class PhiNonShared(nn.ModuleList):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__([_make_phi(cfg) for _ in range(cfg.default_qresi_counts or len(cfg.patch_nums))])

    def for_scale(self, si: int, n_scales: int) -> nn.Module:
        return self[phi_index(si, n_scales, len(self))]


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation over scales (the original ``VectorQuantizer2``).

    Index lists are per scale: ``idx[si]`` is [B, pn*pn], row-major. f_hat always lives at the full
    latent size; scales other than the last are bicubic-upsampled before their phi.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(cfg.patch_nums)
        if cfg.share_quant_resi == 0:
            self.quant_resi = PhiNonShared(cfg)
        elif cfg.share_quant_resi == 1:
            self.quant_resi = PhiShared(cfg)
        else:
            self.quant_resi = PhiPartiallyShared(cfg)
        # training-time code usage statistics (never read at inference; kept for checkpoint compatibility)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    @property
    def n_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """argmin_v |z - e_v|^2, computed as |z|^2 + |e|^2 - 2 z.e (first index wins ties);
        with using_znorm, the code of largest cosine similarity."""
        e = self.embedding.weight.detach()
        if self.cfg.using_znorm:
            return (F.normalize(z_NC, dim=-1) @ F.normalize(e.T, dim=0)).argmax(dim=1)
        d = z_NC.square().sum(dim=1, keepdim=True) + e.square().sum(dim=1)
        d.addmm_(z_NC, e.T, alpha=-2, beta=1)
        return d.argmin(dim=1)

    def scale_residual(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """Bring scale si's code map to full size (bicubic, except the last scale) and apply its phi."""
        if si != self.n_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(self.latent_size, self.latent_size), mode="bicubic")
        return self.quant_resi.for_scale(si, self.n_scales)(h_BChw)

    def codes_to_map(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """[B, pn*pn] indices -> [B, C, pn, pn] code vectors."""
        return self.tokens_to_map(self.embedding(idx_Bl))

    @staticmethod
    def tokens_to_map(h_BlC: torch.Tensor) -> torch.Tensor:
        """[B, pn*pn, C] vectors (row-major) -> [B, C, pn, pn]."""
        B, l, C = h_BlC.shape
        pn = math.isqrt(l)
        return h_BlC.transpose(1, 2).reshape(B, C, pn, pn)

    def downsample_to(self, f_hat: torch.Tensor, pn: int) -> torch.Tensor:
        """Area-downsample f_hat to pn x pn and flatten row-major: [B, pn*pn, C]."""
        B, C = f_hat.shape[:2]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").view(B, C, -1).transpose(1, 2)

    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor, return_fhat: bool = False):
        """Quantise a latent: list of per-scale indices (and, optionally, the f_hat after each scale)."""
        B, C, H, W = f_BChw.shape
        assert H == W == self.latent_size, f"latent {H}x{W} != last patch size {self.latent_size}"
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list, fhat_list = [], []
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == self.n_scales - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = self.scale_residual(si, self.codes_to_map(idx))
            f_hat = f_hat + h
            f_rest = f_rest - h
            idx_list.append(idx)
            fhat_list.append(f_hat)
        return (idx_list, fhat_list) if return_fhat else idx_list

    def embed_to_fhat(self, h_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale code maps [B, C, pn, pn] -> cumulative f_hat after each scale (full size)."""
        B = h_list[0].shape[0]
        f_hat = h_list[0].new_zeros(B, self.cfg.z_channels, self.latent_size, self.latent_size, dtype=torch.float32)
        out = []
        for si, h in enumerate(h_list):
            f_hat = f_hat + self.scale_residual(si, h)
            out.append(f_hat)
        return out

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of VAR: for scales 1..K-1, the area-downsample of f_hat after the
        previous scales. [B, L - first_l, C] float32."""
        B = idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.cfg.z_channels, self.latent_size, self.latent_size,
                            device=idx_list[0].device, dtype=torch.float32)
        nxt = []
        for si in range(self.n_scales - 1):
            f_hat = f_hat + self.scale_residual(si, self.codes_to_map(idx_list[si]))
            nxt.append(self.downsample_to(f_hat, self.patch_nums[si + 1]))
        return torch.cat(nxt, dim=1)

    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """Add scale si's code map to f_hat; return (new f_hat, next scale's input map [B, C, pn', pn']).

        At the last scale the "next input" is f_hat itself. Not in place (the original is)."""
        f_hat = f_hat + self.scale_residual(si, h_BChw)
        if si == self.n_scales - 1:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    def forward(self, f_BChw: torch.Tensor):
        """Training path: (straight-through f_hat, VQ loss, per-scale indices).

        VQ loss, averaged over scales: beta * |sg(f_hat) - f|^2 (commitment, trains the encoder)
        + |f_hat - sg(f)|^2 (trains the codebook and the phis)."""
        B, C, H, W = f_BChw.shape
        f_ng = f_BChw.detach()
        f_rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
        vq_loss, idx_list = 0.0, []
        for si, pn in enumerate(self.patch_nums):
            with torch.no_grad():
                z = f_rest if si == self.n_scales - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
                idx = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = self.scale_residual(si, self.codes_to_map(idx))
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq_loss = vq_loss + self.cfg.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_ng)
            idx_list.append(idx)
            if self.training:
                self._record_usage(si, idx)
        vq_loss = vq_loss / self.n_scales
        f_hat_st = (f_hat.detach() - f_ng) + f_BChw   # straight-through: decoder gradient flows to the encoder
        return f_hat_st, vq_loss, idx_list

    @torch.no_grad()
    def _record_usage(self, si: int, idx: torch.Tensor):
        hit = idx.flatten().bincount(minlength=self.cfg.vocab_size).float()
        buf = self.ema_vocab_hit_SV[si]
        if self.record_hit < self.n_scales:
            buf.copy_(hit)
        else:
            buf.mul_(0.99).add_(hit, alpha=0.01)
        self.record_hit += 1


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        pad = cfg.quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    def img_to_f(self, img: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> continuous latent [B, Cvae, h, w]."""
        return self.quant_conv(self.encoder(img))

    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idx(self.img_to_f(img))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def tokens_to_fhat(self, emb: torch.Tensor) -> torch.Tensor:
        """f_hat from token vectors [B, k, C] of whole scales, concatenated coarse to fine (k may stop
        after any scale). Continuous (not snapped) vectors are fine: this is how DD outputs decode."""
        q = self.quantize
        B, k, C = emb.shape
        f_hat = emb.new_zeros(B, C, q.latent_size, q.latent_size, dtype=torch.float32)
        begin = 0
        for si, pn in enumerate(q.patch_nums):
            if begin >= k:
                break
            if begin + pn * pn > k:
                raise ValueError(f"{k} tokens end inside scale {si}")
            f_hat = f_hat + q.scale_residual(si, q.tokens_to_map(emb[:, begin:begin + pn * pn].float()))
            begin += pn * pn
        return f_hat

    def decode_tokens(self, emb: torch.Tensor) -> torch.Tensor:
        """Token vectors [B, k, C] (whole scales) -> images in [-1, 1]."""
        return self.fhat_to_img(self.tokens_to_fhat(emb))

    def idx_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        h = [self.quantize.codes_to_map(idx) for idx in idx_list]
        return self.fhat_to_img(self.quantize.embed_to_fhat(h)[-1])

    def forward(self, img: torch.Tensor):
        """Training reconstruction: (reconstruction, VQ loss, per-scale indices)."""
        f_hat, vq_loss, idx = self.quantize(self.img_to_f(img))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, idx

    def training_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """L1 + L2 reconstruction + VQ (codebook/commitment) loss, for training at small scale."""
        rec, vq_loss, idx = self(images)
        l1, l2 = F.l1_loss(rec, images), F.mse_loss(rec, images)
        loss = l1 + l2 + vq_loss
        used = torch.cat([i.flatten() for i in idx]).unique().numel()
        stats = {"l1": l1.item(), "l2": l2.item(), "vq": float(vq_loss.detach()),
                 "codebook_usage": used / self.cfg.vocab_size}
        return loss, stats

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # the usage statistic depends on the number of scales; a file made for another scale list
        # still loads (as the original allows): keep our own buffer
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.detach().clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ==================================================================================================
# 2. VAR transformer
# ==================================================================================================
@dataclass
class VARConfig:
    vocab_size: int = 4096
    Cvae: int = 32
    num_classes: int = 1000             # the null (unconditional) class is index num_classes
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1         # label dropout to the null class, training only
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = RELEASED_PATCH_NUMS

    def __post_init__(self):
        self.patch_nums = tuple(self.patch_nums)

    @classmethod
    def from_depth(cls, depth: int, **kw) -> "VARConfig":
        """The release builder's rule: width 64*depth, depth heads, drop-path 0.1*depth/24."""
        kw.setdefault("embed_dim", 64 * depth)
        kw.setdefault("num_heads", depth)
        kw.setdefault("drop_path_rate", 0.1 * depth / 24)
        return cls(depth=depth, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "VARConfig":
        return _config_from_dict(cls, d)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class LayerKV:
    """One block's scale-wise KV cache: keys/values of all positions run so far, [B, H, l, hd]."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k, v):
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v


class SelfAttention(nn.Module):
    """Multi-head attention. With attn_l2_norm, q and k are L2-normalised per head and q is scaled
    by a learnable per-head exp(s) (s clamped at ln 100); the softmax scale is then 1."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        assert C % H == 0, "embed_dim must be divisible by num_heads"
        self.num_heads, self.head_dim = H, C // H
        self.attn_l2_norm = cfg.attn_l2_norm
        if self.attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        # the key bias is fixed at zero (a buffer, so that it is part of the checkpoint)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.proj_drop = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity()
        self.attn_drop = cfg.attn_drop_rate

    def forward(self, x, attn_bias=None, kv: LayerKV | None = None):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)              # each [B, H, L, hd]
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if kv is not None:
            k, v = kv.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class DropPath(nn.Module):
    """Stochastic depth (training only): drop a sample's whole residual branch."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class AdaLNSelfAttn(nn.Module):
    """Pre-LN block whose LayerNorm scale/shift and residual gains come from the class embedding.

    Modulation split order: gamma1, gamma2, scale1, scale2, shift1, shift2."""

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio), cfg.drop_rate)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, cond, attn_bias=None, kv: LayerKV | None = None, mid_residual=None):
        """``cond``: class embedding [B, D] (or, with shared_aln, the shared projection [B, 1, 6, C]).
        ``mid_residual`` is added between the attention and the FFN (the DD student's n/d embedding)."""
        if self.shared_aln:
            mods = (self.ada_gss + cond).unbind(2)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.drop_path(self.attn(h, attn_bias=attn_bias, kv=kv).mul_(gamma1))
        if mid_residual is not None:
            x = x + mid_residual
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        return x + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """LayerNorm modulated by the class embedding (split order: scale, shift)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


def _scale_levels(patch_nums) -> torch.Tensor:
    """[L] long: the scale index of every token position."""
    return torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)])


class VAR(nn.Module):
    """Next-scale-prediction transformer.

    ``tokenizer`` (the VQVAE) is held by reference, not as a submodule, so that the state_dict is the
    released one; it is needed only by ``training_loss``. ``VARTeacher`` owns both.
    """

    def __init__(self, cfg: VARConfig, tokenizer: VQVAE | None = None):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = self.layout(cfg)
        C = cfg.embed_dim
        self.C = C
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_classes = cfg.num_classes
        self._tokenizer = (tokenizer,)

        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)        # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        # stochastic depth grows linearly over depth; computed in Python so that meta construction works
        dpr = [cfg.drop_path_rate * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0 for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg, dpr[i]) for i in range(cfg.depth)])

        levels = _scale_levels(self.patch_nums)
        self.register_buffer("lvl_1L", levels.view(1, self.L).contiguous())
        self.register_buffer("attn_bias_for_masking", self.attention_bias(levels))

        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.build_extra()
        self.init_weights()

    def build_extra(self) -> None:
        """Hook for subclasses to add modules before initialisation."""

    # --- layout hooks (overridden by the DD student) ----------------------------------------------
    @staticmethod
    def layout(cfg: VARConfig) -> tuple[int, ...]:
        return tuple(cfg.patch_nums)

    @staticmethod
    def attention_bias(levels: torch.Tensor) -> torch.Tensor:
        """[1, 1, L, L]: 0 where the key's scale <= the query's scale, -inf elsewhere."""
        q, k = levels.view(-1, 1), levels.view(1, -1)
        L = levels.numel()
        return torch.where(q >= k, 0.0, -torch.inf).reshape(1, 1, L, L).contiguous()

    @property
    def tokenizer(self) -> VQVAE | None:
        return self._tokenizer[0]

    def attach_tokenizer(self, tokenizer: VQVAE) -> None:
        self._tokenizer = (tokenizer,)

    # --- initialisation (the release builder's init_weights) ----------------------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1.0):
        if any(p.is_meta for p in self.parameters()):
            return   # shape-only construction
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        depth = len(self.blocks)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                w = block.ada_lin[-1].weight
                w[2 * self.C:].mul_(init_adaln)       # scales and shifts
                w[:2 * self.C].mul_(init_adaln_gamma)  # residual gains start near zero
                block.ada_lin[-1].bias.zero_()

    # --- pieces of the forward pass -------------------------------------------------------------------
    def lvl_pos(self) -> torch.Tensor:
        """[1, L, C] level embedding + absolute position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def start_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """The first scale's input: class embedding + pos_start (without lvl_pos)."""
        B = cond_BD.shape[0]
        return cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)

    def embed(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor):
        """Teacher-forcing input embedding: ([B, L, C], cond_BD [B, C])."""
        B = labels.shape[0]
        cond_BD = self.class_emb(labels)
        x = torch.cat((self.start_tokens(cond_BD), self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        return x, cond_BD

    def block_cond(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.shared_ada_lin(cond_BD)

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Class-label dropout to the null class, for CFG training. Training mode only (the original
        also drops in eval mode, which makes its eval forward random)."""
        if not self.training or self.cfg.cond_drop_rate <= 0:
            return labels
        drop = torch.rand(labels.shape[0], device=labels.device) < self.cfg.cond_drop_rate
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, V]; position p predicts token p."""
        x, cond_BD = self.embed(self.drop_labels(labels), x_BLCv_wo_first_l)
        cond = self.block_cond(cond_BD)
        for block in self.blocks:
            x = block(x, cond, attn_bias=self.attn_bias_for_masking)
        return self.logits(x, cond_BD)

    def split_scales(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """[B, L] token sequence -> list of [B, pn*pn] per scale."""
        return [idx[:, b:e] for b, e in self.begin_ends]

    def training_loss(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy over all L tokens (labels dropped to the null class at
        cond_drop_rate in training mode)."""
        if self.tokenizer is None:
            raise RuntimeError("VAR.training_loss needs the tokenizer: VAR(cfg, tokenizer) or attach_tokenizer()")
        with torch.no_grad():
            x = self.tokenizer.quantize.idx_to_var_input(self.split_scales(idx))
        logits = self(labels, x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx.reshape(-1))


# ==================================================================================================
# Sampling semantics (VAR's own)
# ==================================================================================================
def cfg_strength(cfg_scale: float, si: int, n_scales: int) -> float:
    """VAR's guidance strength at scale si: 0 at the first scale, cfg at the last."""
    return cfg_scale * si / (n_scales - 1) if n_scales > 1 else 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """VAR's top-k then top-p filtering (filtered entries become -inf).

    top-k keeps logits >= the k-th largest (ties kept). top-p sorts ascending, and drops entries
    whose cumulative softmax mass is <= 1 - top_p; the largest entry is always kept."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return logits


def probs_from_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    logits = logits.float()
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    return filter_logits(logits, sampling.top_k, sampling.top_p).softmax(dim=-1)


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
    """(VQVAE, VAR) as a ``dd.teacher.Teacher``: one AR step = one scale."""

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

    @classmethod
    def from_configs(cls, tokenizer_cfg: VQVAEConfig, model_cfg: VARConfig) -> "VARTeacher":
        return cls(VQVAE(tokenizer_cfg), VAR(model_cfg))

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
    def decode_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.shape[1] != self.n_tokens:
            raise ValueError(f"expected {self.n_tokens} token vectors, got {emb.shape[1]}")
        return self.tokenizer.decode_tokens(emb)

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


# ==================================================================================================
# 3. DD student
# ==================================================================================================
@dataclass
class VARStudentConfig(VARConfig):
    """``patch_nums`` are the teacher's; the student prepends a 1x1 start/class token."""

    n_d_embed_enable: bool = True       # add a learned "noise or data" embedding to every position
    layerwise_n_d_embed: bool = True    # ... through a per-block linear, plus one after the last block

    @classmethod
    def from_teacher_config(cls, cfg: VARConfig, **kw) -> "VARStudentConfig":
        return cls(**{**asdict(cfg), **kw})


class FinalLayer(nn.Module):
    """Continuous head: LN, then x*(1+scale)+shift with (shift, scale) = table + raw class embedding."""

    def __init__(self, C: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(C, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, C) / C ** 0.5)

    def forward(self, x, cond_BD):
        shift, scale = (self.scale_shift_table[None] + cond_BD[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class VARStudent(VAR):
    """The DD student (``DD_Model``).

    Input: the teacher's n token vectors, data before step t and noise from there on. Position 0 is
    an extra start token (class embedding), so the transformer runs over n+1 positions at levels
    0 (start), 1..K (the teacher's scales). A token attends to strictly coarser levels and itself.
    """

    def __init__(self, cfg: VARStudentConfig):
        super().__init__(cfg)

    def build_extra(self) -> None:
        cfg, C = self.cfg, self.C
        teacher_pns = tuple(cfg.patch_nums)
        # first token index of each teacher step (step K = n_tokens)
        self.step_begins = [sum(pn * pn for pn in teacher_pns[:t]) for t in range(len(teacher_pns) + 1)]
        if cfg.n_d_embed_enable:
            self.n_d_embed = nn.Embedding(2, C)          # row 1: data, row 0: noise
            if cfg.layerwise_n_d_embed:
                self.layerwise_n_d_embed = nn.ModuleList([nn.Linear(C, C) for _ in range(cfg.depth + 1)])
        self.final_layer_conti = FinalLayer(C, cfg.Cvae)

    @staticmethod
    def layout(cfg: VARConfig) -> tuple[int, ...]:
        return (1,) + tuple(cfg.patch_nums)

    @staticmethod
    def attention_bias(levels: torch.Tensor) -> torch.Tensor:
        """0 where the key's level < the query's level, or key == query; -inf elsewhere."""
        q, k = levels.view(-1, 1), levels.view(1, -1)
        L = levels.numel()
        see = (q > k) | torch.eye(L, dtype=torch.bool, device=levels.device)
        return torch.where(see, 0.0, -torch.inf).reshape(1, 1, L, L).contiguous()

    @property
    def n_tokens(self) -> int:
        return self.L - 1

    def data_flags(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L] long: 1 where the position holds data (the start token and tokens before step t)."""
        begin = torch.tensor(self.step_begins, device=t.device)[t.long()]
        return (torch.arange(self.L, device=t.device)[None, :] < begin[:, None] + 1).long()

    def embed_student(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor):
        """(input embeddings [B, L, C], cond_BD, n/d embedding or None)."""
        h, cond_BD = self.embed(labels, x)
        nd = None
        if self.cfg.n_d_embed_enable:
            nd = self.n_d_embed(self.data_flags(t))
            h = h + nd
        return h, cond_BD, nd

    def nd_for_block(self, i: int, nd):
        """The n/d embedding added inside block i (i = depth: after the last block), or None."""
        if nd is None:
            return None
        return self.layerwise_n_d_embed[i](nd) if self.cfg.layerwise_n_d_embed else nd

    def heads(self, h: torch.Tensor, cond_BD: torch.Tensor, nd,
              rows: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, n, V], continuous vectors [B, n, Cvae]); the start token is dropped. With ``rows``
        = (logit_tokens, emb_tokens): only the logits and vectors of those tokens."""
        extra = self.nd_for_block(self.cfg.depth, nd)
        if extra is not None:
            h = h.float() + extra
        if rows is not None:
            tokens = h[:, 1:]
            return self.logits(tokens[:, rows[0]], cond_BD), self.final_layer_conti(tokens[:, rows[1]], cond_BD)
        return self.logits(h, cond_BD)[:, 1:], self.final_layer_conti(h, cond_BD)[:, 1:]

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, rows: tuple[slice, slice] | None = None):
        """x [B, n, Cvae] (data before step t, noise after), labels [B], t [B] step index
        -> (logits [B, n, V], emb [B, n, Cvae]) for every position, or with ``rows`` = (logit_tokens,
        emb_tokens) for those tokens only."""
        h, cond_BD, nd = self.embed_student(x, labels, t)
        cond = self.block_cond(cond_BD)
        for i, block in enumerate(self.blocks):
            h = block(h, cond, attn_bias=self.attn_bias_for_masking, mid_residual=self.nd_for_block(i, nd))
        return self.heads(h, cond_BD, nd, rows)

    def training_loss(self, *args, **kwargs):
        # the inherited teacher-forcing loss does not apply to the student
        raise TypeError("the DD student is trained by dd.distill on noise/data pairs, not with teacher forcing")

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher: VAR | VARTeacher, **kw) -> "VARStudent":
        """A student initialised from the teacher: every tensor of the same name and shape is copied;
        the start token's extra level/position rows are shifted in (rows 1.. of the teacher go to
        2..), and the new pieces keep the DD initialisation (truncated normal, std sqrt(1/3C))."""
        var = teacher.model if isinstance(teacher, VARTeacher) else teacher
        student = cls(VARStudentConfig.from_teacher_config(var.cfg, **kw))
        own = student.state_dict()
        buffers = {name for name, _ in student.named_buffers()}
        for name, src in var.state_dict().items():
            if name in buffers or name not in own:
                continue
            dst = own[name]
            if dst.shape == src.shape:
                dst.copy_(src)
        # level rows: 0 -> 0 (start token), teacher 1.. -> 2..; row 1 (the 1x1 token) stays fresh
        student.lvl_embed.weight[0].copy_(var.lvl_embed.weight[0])
        student.lvl_embed.weight[2:].copy_(var.lvl_embed.weight[1:])
        student.pos_1LC[:, 0].copy_(var.pos_1LC[:, 0])
        student.pos_1LC[:, 2:].copy_(var.pos_1LC[:, 1:])
        return student


# ==================================================================================================
# Checkpoints
# ==================================================================================================
def _torch_load(path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def _unwrap(obj: Any, keys: list[tuple[str, ...]]) -> dict:
    """The first nested dict found along one of the key paths, or obj itself."""
    for path in keys:
        cur = obj
        for k in path:
            if not isinstance(cur, dict) or k not in cur:
                break
            cur = cur[k]
        else:
            return cur
    return obj


def _infer_var_config(sd: dict, cls=VARConfig, patch_nums=None, **kw) -> VARConfig:
    """Config of a checkpoint made by the release builder (width 64*depth), from its tensor shapes."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    C = sd["word_embed.weight"].shape[0]
    L = sd["pos_1LC"].shape[1] - (1 if cls is VARStudentConfig else 0)
    if patch_nums is None:
        patch_nums = RELEASED_PATCH_NUMS
        if sum(p * p for p in patch_nums) != L:
            raise ValueError(f"checkpoint has {L} token positions; pass its config (patch_nums) explicitly")
    return cls(vocab_size=sd["head.weight"].shape[0], Cvae=sd["word_embed.weight"].shape[1],
               num_classes=sd["class_emb.weight"].shape[0] - 1, depth=depth, embed_dim=C,
               num_heads=C // 64, drop_path_rate=0.1 * depth / 24,
               shared_aln="shared_ada_lin.1.weight" in sd,
               attn_l2_norm="blocks.0.attn.scale_mul_1H11" in sd, patch_nums=tuple(patch_nums), **kw)


def load_vqvae(path, config: VQVAEConfig | dict | None = None) -> VQVAE:
    """A VQVAE from a raw state_dict (the release format) or a dict with 'config' and 'state_dict'/'model'."""
    obj = _torch_load(path)
    if config is None:
        config = obj.get("config") if isinstance(obj, dict) and "config" in obj else VQVAEConfig()
    if isinstance(config, dict):
        config = VQVAEConfig.from_dict(config)
    sd = _unwrap(obj, [("state_dict",), ("model",)])
    model = VQVAE(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_var(path, config: VARConfig | dict | None = None, tokenizer: VQVAE | None = None) -> VAR:
    """VAR from a raw state_dict (release), a training checkpoint (['trainer']['var_wo_ddp']) or a dict
    with 'config' and 'state_dict'/'model'. Strict, as the original loads it."""
    obj = _torch_load(path)
    sd = _unwrap(obj, [("trainer", "var_wo_ddp"), ("state_dict",), ("model",)])
    if config is None and isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "depth" in obj["config"]:
        config = obj["config"]
    if isinstance(config, dict):
        config = VARConfig.from_dict(config)
    model = VAR(config or _infer_var_config(sd), tokenizer)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_teacher(tokenizer_path, model_path, tokenizer_config=None, model_config=None,
                 device: str | torch.device = "cpu") -> VARTeacher:
    """The frozen teacher from checkpoint files (defaults: the released 256-px configuration)."""
    tok = load_vqvae(tokenizer_path, tokenizer_config)
    var = load_var(model_path, model_config, tok)
    return VARTeacher(tok, var).to(device).eval().requires_grad_(False)


# buffers that the student constructs itself; a file's copies (present or not) are ignored
_STUDENT_BUILT_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


def load_student(path, config: VARStudentConfig | dict | None = None, ema: bool = True):
    """A DD student from a released DD file (['trainer']['ema_parameters'] or ['var_wo_ddp']) or a
    dd.distill checkpoint ('ema' / 'model'). Loads non-strictly, like the original sample.py.

    Returns (student, missing_keys, unexpected_keys)."""
    obj = _torch_load(path)
    first, second = (("ema_parameters",), ("var_wo_ddp",)) if ema else (("var_wo_ddp",), ("ema_parameters",))
    sd = _unwrap(obj, [("trainer",) + first, ("trainer",) + second,
                       ("ema",) if ema else ("model",), ("model",), ("state_dict",)])
    sd = {k: v for k, v in sd.items() if not k.endswith(_STUDENT_BUILT_BUFFERS)}
    if isinstance(config, dict):
        config = VARStudentConfig.from_dict(config)
    student = VARStudent(config or _infer_var_config(sd, VARStudentConfig))
    missing, unexpected = student.load_state_dict(sd, strict=False)
    built = {n for n, _ in student.named_buffers()}
    missing = [k for k in missing if k not in built]
    return student.eval(), missing, unexpected
