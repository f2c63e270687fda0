"""A toy teacher/student pair implementing the DD interfaces, small enough for fast unit tests of
the family-independent machinery (pairs, distillation, sampling)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dd.method.teacher import ARState, Teacher


class ToyTeacher(Teacher):
    family = "toy"

    def __init__(self, step_sizes=(1, 2, 3), vocab=16, dim=4, classes=3, width=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)  # nn.Linear biases draw from the global generator
        g = torch.Generator().manual_seed(seed)
        self._step_sizes = tuple(step_sizes)
        self._classes = classes
        self.register_buffer("_codebook", torch.randn(vocab, dim, generator=g))
        self.class_emb = nn.Embedding(classes + 1, width)
        self.tok = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(sum(step_sizes), width, generator=g) * 0.5)
        self.head = nn.Linear(width, vocab)
        self.to_pixels = nn.Linear(dim, 3 * 4)
        with torch.no_grad():
            for p in (self.class_emb.weight, self.tok.weight, self.head.weight, self.to_pixels.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)
        self.forward_calls = 0

    ar = property(lambda self: self)
    step_sizes = property(lambda self: self._step_sizes)
    codebook = property(lambda self: self._codebook)
    num_classes = property(lambda self: self._classes)
    image_size = property(lambda self: 4)

    def _logits(self, labels, prefix_idx, step):
        self.forward_calls += 1
        b, e = self.step_bounds[step]
        ctx = self.class_emb(labels)
        if prefix_idx.shape[1]:
            ctx = ctx + self.tok(self.codebook[prefix_idx]).mean(1)
        return self.head(torch.tanh(ctx[:, None, :] + self.pos[None, b:e]))

    def begin(self, labels, sampling):
        return ARState(labels=labels, sampling=sampling)

    def next_probs(self, state):
        prefix = torch.cat(state.tokens, 1) if state.tokens else state.labels.new_zeros(len(state.labels), 0)
        step = len(state.tokens)
        s = state.sampling
        logits = self._logits(state.labels, prefix, step)
        if s.cfg_scale != 1.0:
            null = torch.full_like(state.labels, self._classes)
            u = self._logits(null, prefix, step)
            logits = u + (logits - u) * s.cfg_scale
        logits = logits / s.temperature
        if s.top_k:
            kth = logits.topk(min(s.top_k, logits.shape[-1]), -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        state.step = step
        return F.softmax(logits, -1)

    def decode_embeddings(self, emb, clamp=True):   # tanh: never beyond [-1, 1], clamped or not
        B = emb.shape[0]
        return torch.tanh(self.to_pixels(emb).mean(1)).view(B, 3, 2, 2).repeat(1, 1, 2, 2)

    def encode(self, images):
        raise NotImplementedError("the toy teacher has no encoder")


class ToyStudent(nn.Module):
    """Sees the whole sequence; logits and embedding heads for every position."""

    def __init__(self, teacher: ToyTeacher, width=32, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        V, C = teacher.codebook.shape
        n = teacher.n_tokens
        self.inp = nn.Linear(C * n, width)
        self.cls = nn.Embedding(teacher.num_classes + 1, width)
        self.t_emb = nn.Embedding(teacher.n_steps, width)
        self.out_logits = nn.Linear(width, n * V)
        self.out_emb = nn.Linear(width, n * C)
        self.n, self.V, self.C = n, V, C

    def forward(self, x, labels, t, rows=None):
        h = torch.tanh(self.inp(x.flatten(1)) + self.cls(labels) + self.t_emb(t))
        logits, emb = self.out_logits(h).view(-1, self.n, self.V), self.out_emb(h).view(-1, self.n, self.C)
        return (logits, emb) if rows is None else (logits[:, rows[0]], emb[:, rows[1]])
