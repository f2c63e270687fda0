"""The VAR next-scale transformer (``VAR``, configured by ``VARConfig``) and VAR's sampling rules."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dd.families.var.vqvae import RELEASED_PATCH_NUMS, VQVAE, _config_from_dict
from dd.method.teacher import SamplingConfig


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


