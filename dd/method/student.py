"""Family-independent pieces of the DD student (paper App. B, Eq. 6).

A student sees the whole token sequence at once: data tokens before step t, noise tokens from step t
on. Its forward ``student(x, labels, t)`` returns, for every token position, logits over the codebook
and a continuous embedding; ``student(x, labels, t, rows=(logit_tokens, emb_tokens))``, two slices of
token indices, returns only those logits and those embeddings (what sampling uses, ``output_rows``).
``t`` is always an AR *step* index; ``begin`` is the first token index of that step.
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


def output_rows(begin: int, split: int, n_tokens: int) -> tuple[slice, slice]:
    """The outputs a DD sampling step uses (``assemble``): logits of tokens begin..split-1 and embeddings
    of tokens max(begin, split).. on; the tokens before ``begin`` are given (Eq. 6) and need neither."""
    mid = max(begin, split)
    return slice(begin, mid), slice(mid, n_tokens)


def assemble(logits: torch.Tensor, emb: torch.Tensor, x_t: torch.Tensor, begin: int, split: int,
             codebook: torch.Tensor) -> torch.Tensor:
    """``final_sequence(*final_predict(...), split)`` from the outputs of ``output_rows`` only: [B, n, C].

    Tokens before ``split`` are codes: given ones (< begin) their own nearest code (Eq. 6's one-hot
    logits), the others codebook[argmax logits]; tokens from ``split`` on are vectors: given ones keep
    their input, the others take the embeddings.
    """
    lo, hi = min(begin, split), max(begin, split)
    parts = []
    if lo > 0:
        parts.append(codebook[nearest_code_matmul(x_t[:, :lo], codebook)])
    if hi > lo:
        parts.append(codebook[logits.argmax(-1)] if begin < split else x_t[:, lo:hi])
    parts.append(emb)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def nearest_code_matmul(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``nearest_code`` from |c|^2 - 2 x.c (the flow map's ``FlowCodebook.nearest``, its prepared codebook
    cached per tensor): a [..., V] matrix instead of the [..., V, C] differences (GBs for a batch of
    256-token sequences at V = 16384); the same index except at rounding-level ties, and exactly for
    vectors that are codebook rows (the given tokens of a sampler)."""
    from dd.method.flow import FlowCodebook

    book = FlowCodebook.of(codebook, x.dtype)
    return book.nearest(x.reshape(-1, x.shape[-1]), None).view(x.shape[:-1])
