"""Sampling: DD few-step (paper Alg. 3), teacher-involved DD (Alg. 4), the teacher, and the baselines.

Timesteps here are AR *steps* in the paper's notation: 1 is the first step. Every sampler returns
the final token embeddings [B, n, C] (continuous where the student's embedding head is used) and
the number of network forward passes it spent per image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dd.student import final_predict, final_sequence, nearest_code, perturb
from dd.teacher import SamplingConfig, Teacher


def _begin(teacher: Teacher, step: int, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), teacher.step_begin(step - 1), device=device, dtype=torch.long)


@torch.no_grad()
def dd_step(student: nn.Module, teacher: Teacher, x: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor,
            step: int, split_step: int) -> torch.Tensor:
    """One DD jump from step ``step``: re-noise positions from that step on, predict the whole sequence."""
    B = x.shape[0]
    begin = _begin(teacher, step, B, x.device)
    x_t = perturb(x, noise, begin)
    logits, emb = student(x_t, labels, torch.full((B,), step - 1, device=x.device, dtype=torch.long))
    tokens, logits = final_predict(logits, emb, x_t, begin, teacher.codebook)
    return final_sequence(tokens, logits, teacher.codebook, teacher.step_begin(split_step - 1))


@torch.no_grad()
def dd_sample(student, teacher: Teacher, labels, noise, steps: list[int], split_step: int) -> tuple[torch.Tensor, int]:
    """Alg. 3 over the timestep path ``steps`` (a subset of the trained ones, starting at 1)."""
    if not steps or steps[0] != 1:
        raise ValueError(f"a DD timestep path must start at step 1, got {steps}")
    x = noise
    for step in steps:
        x = dd_step(student, teacher, x, noise, labels, step, split_step)
    return x, len(steps)


@torch.no_grad()
def dd_teacher_sample(student, teacher: Teacher, labels, noise, start: int, second: int, split_step: int,
                      sampling: SamplingConfig, generator=None) -> tuple[torch.Tensor, int]:
    """Alg. 4, the paper's "pre-trained-<start>-<second>": the DD first step, the teacher regenerates steps
    start..second-1 (KV cache, one pass each, the kept prefix prefilled in the first of them), then the
    DD step at ``second``. With start == 1 the first DD step is not needed and not run."""
    if not 1 <= start < second <= teacher.n_steps:
        raise ValueError(f"teacher-involved sampling needs 1 <= start < second <= {teacher.n_steps}, got {start}, {second}")
    passes = 0
    state = teacher.begin(labels, sampling)
    if start > 1:
        x = dd_step(student, teacher, noise, noise, labels, 1, split_step)
        passes += 1
        idx = nearest_code(x, teacher.codebook)
        for b, e in teacher.step_bounds[: start - 1]:
            teacher.append(state, idx[:, b:e])
    for _ in range(start - 1, second - 1):
        p = teacher.next_probs(state)
        B, S, V = p.shape
        teacher.append(state, torch.multinomial(p.reshape(B * S, V), 1, generator=generator).view(B, S))
        passes += 1
    prefix = teacher.embed(torch.cat(state.tokens, dim=1))
    x = torch.cat([prefix, noise[:, prefix.shape[1]:]], dim=1)
    x = dd_step(student, teacher, x, noise, labels, second, split_step)
    return x, passes + 1


@torch.no_grad()
def teacher_sample(teacher: Teacher, labels, sampling: SamplingConfig, generator=None) -> tuple[torch.Tensor, int]:
    idx = teacher.sample(labels, sampling, generator)
    return teacher.embed(idx), teacher.n_steps


@torch.no_grad()
def skip_sample(teacher: Teacher, labels, skip: int, sampling: SamplingConfig, generator=None) -> tuple[torch.Tensor, int]:
    """skip-n: run the teacher for all but its last ``skip`` steps; the skipped tokens contribute
    nothing (``Teacher.decode_prefix``). Returns the prefix embeddings [B, k, C]."""
    if not 0 < skip < teacher.n_steps:
        raise ValueError(f"skip must be in 1..{teacher.n_steps - 1}, got {skip}")
    idx = teacher.sample(labels, sampling, generator, n_steps=teacher.n_steps - skip)
    return teacher.embed(idx), teacher.n_steps - skip


def onestep_star_table(labels: np.ndarray, tokens: np.ndarray, num_classes: int, vocab_size: int) -> torch.Tensor:
    """Prop. 3.1's optimum: per class and position, the empirical token frequencies of the pair set.
    Returns [num_classes, n, V] probabilities (a class absent from the pairs falls back to all pairs)."""
    n = tokens.shape[1]
    counts = np.zeros((num_classes, n, vocab_size), dtype=np.float64)
    for c in range(num_classes):
        sel = tokens[labels == c]
        for j in range(n):
            counts[c, j] = np.bincount(sel[:, j], minlength=vocab_size)
    overall = counts.sum(0, keepdims=True)
    empty = counts.sum(-1, keepdims=True) == 0
    counts = np.where(empty, overall, counts)
    return torch.from_numpy(counts / counts.sum(-1, keepdims=True)).float()


@torch.no_grad()
def onestep_star_sample(table: torch.Tensor, labels: torch.Tensor, generator=None) -> tuple[torch.Tensor, int]:
    """onestep*: every position drawn independently from its class-conditional frequencies. No network."""
    p = table[labels.cpu()]                                   # [B, n, V]
    B, n, V = p.shape
    idx = torch.multinomial(p.reshape(B * n, V), 1, generator=generator).view(B, n)
    return idx, 1  # one draw from the (idealised) one-step model of Prop. 3.1
