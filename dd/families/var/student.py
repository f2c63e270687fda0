"""The DD student on VAR (``VARStudent``, configured by ``VARStudentConfig``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dd.families.var.teacher import VARTeacher
from dd.families.var.transformer import VAR, VARConfig


# ==================================================================================================
# 3. DD student
# ==================================================================================================
@dataclass
class VARStudentConfig(VARConfig):
    """``patch_nums`` are the teacher's; the student prepends a 1x1 start/class token."""

    n_d_embed_enable: bool = True       # add a learned "noise or data" embedding to every position
    layerwise_n_d_embed: bool = True    # ... through a per-block linear, plus one after the last block
    # Which tokens of its own scale a token sees. False: only itself (the released DD code, `(q > k) | eye`, which
    # the released checkpoints were trained with, hence the default of this config); True: all of them, as the
    # paper's App. B describes ("for VAR, all tokens generated at the same step can see each other as well"), the
    # default for students distilled here (VARFamily.new_student_defaults, with the measurement)
    within_scale_attention: bool = False

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
    0 (start), 1..K (the teacher's scales). A token attends to strictly coarser levels and itself
    (or, with ``within_scale_attention``, to its whole level too).
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the attention mask follows the config (within_scale_attention), never a file's copy of it
        key = prefix + "attn_bias_for_masking"
        if key in state_dict:
            state_dict[key] = self.attn_bias_for_masking
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def attention_bias(self, levels: torch.Tensor) -> torch.Tensor:
        """0 where the key's level < the query's level, or key == query (``within_scale_attention``: the key's
        level <= the query's); -inf elsewhere."""
        q, k = levels.view(-1, 1), levels.view(1, -1)
        L = levels.numel()
        if self.cfg.within_scale_attention:
            see = q >= k
        else:
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
        raise TypeError("the DD student is trained by dd.method.distill on noise/data pairs, not with teacher forcing")

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


