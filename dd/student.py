"""Family-independent pieces of the DD student (paper App. B, Eq. 6).

A student sees the whole token sequence at once: data tokens before step t, noise tokens from step t
on. Its forward returns, for every token position, logits over the codebook and a continuous
embedding. ``t`` is always an AR *step* index; ``begin`` is the first token index of that step.
"""
from __future__ import annotations

import torch


def data_mask(n_tokens: int, begin: torch.Tensor) -> torch.Tensor:
    """[B, n] bool, True where the position holds data (index < begin[b])."""
    pos = torch.arange(n_tokens, device=begin.device)
    return pos[None, :] < begin[:, None]


def perturb(x0: torch.Tensor, noise: torch.Tensor, begin: torch.Tensor) -> torch.Tensor:
    """X_t: data x0 before ``begin``, the (same, initial) noise from ``begin`` on. [B, n, C]."""
    keep = data_mask(x0.shape[1], begin).unsqueeze(-1).to(x0.dtype)
    return x0 * keep + noise * (1 - keep)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean distance) for x [..., C]."""
    d = (x.unsqueeze(-2) - codebook).pow(2).sum(-1)
    return d.argmin(-1)


def final_predict(logits: torch.Tensor, emb: torch.Tensor, x_t: torch.Tensor, begin: torch.Tensor,
                  codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: positions before ``begin`` are copied from the input.

    Given positions keep their input vectors and get logits that are 0 at the nearest code and -inf
    elsewhere; the other positions take the network outputs.
    """
    keep = data_mask(x_t.shape[1], begin)
    gt_idx = nearest_code(x_t, codebook)
    given = torch.full_like(logits, float("-inf"))
    given.scatter_(-1, gt_idx.unsqueeze(-1), 0.0)
    logits = torch.where(keep.unsqueeze(-1), given, logits)
    tokens = torch.where(keep.unsqueeze(-1), x_t, emb)
    return tokens, logits


def final_sequence(tokens: torch.Tensor, logits: torch.Tensor, codebook: torch.Tensor,
                   split_begin: int) -> torch.Tensor:
    """Positions before ``split_begin`` take codebook[argmax logits]; later ones keep the continuous tokens."""
    head = codebook[logits[:, :split_begin].argmax(-1)]
    return torch.cat([head, tokens[:, split_begin:]], dim=1)
