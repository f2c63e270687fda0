"""VAR's multi-scale residual VQVAE (``VQVAE``, configured by ``VQVAEConfig``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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

    def fhat_to_img(self, f_hat: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        img = self.decoder(self.post_quant_conv(f_hat))
        return img.clamp(-1, 1) if clamp else img

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

    def decode_tokens(self, emb: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Token vectors [B, k, C] (whole scales) -> images in [-1, 1] (``clamp=False``: the decoder's raw output)."""
        return self.fhat_to_img(self.tokens_to_fhat(emb), clamp)

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


