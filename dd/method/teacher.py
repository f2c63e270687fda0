"""The one teacher interface that all Distilled-Decoding code uses.

A teacher is an image autoregressive model plus its tokenizer, seen as a sequence of AR *steps*:
LlamaGen produces one token per step (256 steps at 256 px), VAR one whole scale per step (10 steps,
680 tokens at 256 px). Tokens are indices into a codebook of V vectors of dimension C; images are
float tensors in [-1, 1] of shape [B, 3, H, W].

Incremental sampling with a KV cache::

    state = teacher.begin(labels, sampling)          # nothing is run yet
    for step in range(teacher.n_steps):
        probs = teacher.next_probs(state)            # [B, step_size, V], CFG + filtering applied
        idx = torch.multinomial(...)                 # or flow_map(noise, probs, teacher.codebook)
        teacher.append(state, idx)                   # records the tokens; they are run lazily

``next_probs`` runs the network on every token appended since the previous call in one pass, so a
full sample costs one incremental pass per step, and a prefix appended up front (teacher-involved
sampling) is prefilled in one pass.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SamplingConfig:
    """How the teacher turns logits into probabilities. Off values: top_k=0, top_p=1.0.

    ``cfg_scale`` is classifier-free guidance as each family's released sampler applies it: LlamaGen mixes
    uncond + (cond - uncond) * cfg_scale at every step, and only when cfg_scale > 1 (otherwise it runs the
    conditional branch alone); VAR ramps the guidance over its scales, (1 + w) cond - w uncond with w growing
    linearly from 0 at the first scale to cfg_scale at the last. The same number therefore guides the two
    families differently; the paper uses 2.0 for both."""

    cfg_scale: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class ARState:
    """Incremental-decoding state of one batch. Families keep their caches in ``cache``."""

    labels: torch.Tensor                      # [B] long
    sampling: SamplingConfig
    step: int = 0                             # index of the next step whose probabilities are asked
    tokens: list = field(default_factory=list)  # one [B, step_size] long tensor per appended step
    cache: Any = None


def draw_tokens(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token index per row of ``p`` [N, V] (rows of probabilities): [N, 1].

    ``dd sample`` keeps one CPU generator, so that a seed names the same sample set on every device. torch's
    multinomial needs the generator on the probabilities' device, so a generator elsewhere draws the uniforms on
    its own device and the draw inverts the cumulative distribution on ``p``'s (``inverse_cdf_draw``)."""
    if generator is None or generator.device == p.device:
        return torch.multinomial(p, 1, generator=generator)
    u = torch.rand(p.shape[0], 1, generator=generator, device=generator.device, dtype=torch.float64)
    return inverse_cdf_draw(p, u.to(p.device))


def inverse_cdf_draw(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index i with cdf[i-1] <= u * cdf[-1] < cdf[i] per row, for uniforms ``u`` [N, 1] in [0, 1): a token of
    zero probability (a flat step of the cdf) is never drawn; the cdf is summed in float64."""
    cdf = p.double().cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp_(max=p.shape[-1] - 1)


class Teacher(nn.Module, ABC):
    family: str = ""

    tokenizer: nn.Module

    @property
    @abstractmethod
    def ar(self) -> nn.Module:
        """The AR transformer (the network that distillation initialises the student from)."""

    # --- token layout -------------------------------------------------------------------------
    @property
    @abstractmethod
    def step_sizes(self) -> tuple[int, ...]:
        """Number of tokens produced at each AR step."""

    @property
    def n_steps(self) -> int:
        return len(self.step_sizes)

    @property
    def n_tokens(self) -> int:
        return sum(self.step_sizes)

    @property
    def step_bounds(self) -> list[tuple[int, int]]:
        """[(begin, end)] token range of each step."""
        out, b = [], 0
        for s in self.step_sizes:
            out.append((b, b + s))
            b += s
        return out

    def step_begin(self, t: int) -> int:
        """Index of the first token of step t (t == n_steps gives n_tokens)."""
        return sum(self.step_sizes[:t])

    @property
    @abstractmethod
    def codebook(self) -> torch.Tensor:
        """[V, C] codebook as used for lookup (LlamaGen: l2-normalised rows; VAR: raw embedding)."""

    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    # --- incremental AR sampling ----------------------------------------------------------------
    @abstractmethod
    def begin(self, labels: torch.Tensor, sampling: SamplingConfig) -> ARState: ...

    @abstractmethod
    def next_probs(self, state: ARState) -> torch.Tensor:
        """[B, step_size, V] probabilities of the tokens of step ``state.step``."""

    def append(self, state: ARState, idx: torch.Tensor) -> None:
        """Record the tokens [B, step_size] of step ``len(state.tokens)``."""
        t = len(state.tokens)
        want = (state.labels.shape[0], self.step_sizes[t])
        if tuple(idx.shape) != want:
            raise ValueError(f"step {t} expects token indices of shape {want}, got {tuple(idx.shape)}")
        state.tokens.append(idx.long())

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None, n_steps: int | None = None) -> torch.Tensor:
        """Ordinary ancestral sampling: [B, n_tokens] (or the tokens of the first n_steps)."""
        state = self.begin(labels, sampling)
        for _ in range(self.n_steps if n_steps is None else n_steps):
            p = self.next_probs(state)
            B, S, V = p.shape
            idx = draw_tokens(p.reshape(B * S, V), generator).view(B, S)
            self.append(state, idx)
        return torch.cat(state.tokens, dim=1)

    @torch.no_grad()
    def token_probs(self, idx: torch.Tensor, labels: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """[B, n_tokens] probability of each token of ``idx`` [B, n_tokens] under the distribution ``sample``
        draws it from (CFG, temperature and filtering included), given the tokens before it: one teacher-forced
        pass per step through the same KV-cached interface."""
        state = self.begin(labels, sampling)
        out = []
        for begin, end in self.step_bounds:
            tokens = idx[:, begin:end].to(self.codebook.device)
            out.append(self.next_probs(state).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self.append(state, tokens)
        return torch.cat(out, dim=1)

    # --- tokens <-> embeddings <-> images -------------------------------------------------------
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """[..., n] indices -> [..., n, C] codebook vectors."""
        return self.codebook[idx]

    @abstractmethod
    def decode_embeddings(self, emb: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """[B, n_tokens, C] (continuous allowed) -> images [B, 3, H, W] in [-1, 1] (clamped; ``clamp=False``:
        the decoder's raw output, for a loss that should see pixels beyond the range)."""

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        return self.decode_embeddings(self.embed(idx))

    def decode_prefix(self, emb_prefix: torch.Tensor) -> torch.Tensor:
        """Decode only the first k tokens [B, k, C] (the skip-n baseline): the missing tokens
        contribute nothing. Default: a zero latent vector at every missing position (raster order);
        a multi-scale family overrides this to leave the missing scales out of its accumulated latent.

        Why zeros, although the zero vector is no codebook entry (LlamaGen's rows are l2-normalised): the paper
        (Sec. 5.1) defines skip-n only as "directly skipping the last several steps" and counts n_steps - n network
        passes, so nothing may be spent on the skipped tokens; any code put there (random, most frequent, repeated)
        would be a guess that adds content, while the zero vector is equally far from every normalised code and
        carries no content, which is what VAR's skip-n does by leaving the scale out of its sum. The decoder turns it
        into a flat region, so skip-n's FID measures the missing tokens, as the baseline intends."""
        B, k, C = emb_prefix.shape
        pad = emb_prefix.new_zeros(B, self.n_tokens - k, C)
        return self.decode_embeddings(torch.cat([emb_prefix, pad], dim=1))

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> token indices [B, n_tokens]."""
