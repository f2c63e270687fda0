"""The settings of the method's three stages as small dataclasses: pair generation (``PairSettings``),
distillation (``DistillConfig``) and sampling (``SampleSettings``). Their defaults are the only defaults: the
command line and the pipeline config (``dd.pipeline.config`` fills a missing key from here) both read them.

No heavy imports here: the Snakefile reads these while it parses the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def timestep_problem(timesteps, n_steps: int | None = None) -> str | None:
    """What is wrong with a DD timestep set (paper notation: 1 = the first AR step), in words, or None. A set
    starts at 1, increases strictly, and (given the teacher's ``n_steps``) stays within the teacher's steps."""
    allowed = ("allowed: strictly increasing integers from 1" + (f" to {n_steps} (the teacher's AR steps)" if n_steps
               else "") + ", starting at 1")
    timesteps = list(timesteps)
    if not timesteps or timesteps[0] != 1:
        return f"{timesteps} must start at 1, the first AR step; {allowed}"
    if any(b <= a for a, b in zip(timesteps, timesteps[1:])):
        return f"{timesteps} is not strictly increasing; {allowed}"
    if n_steps is not None and timesteps[-1] > n_steps:
        return f"{timesteps} goes beyond the teacher's last step {n_steps}; {allowed}"
    return None


@dataclass(frozen=True)
class PairSettings:
    """Pair-generation settings that are not part of the teacher: the defaults of ``generate-pairs`` and of the
    pipeline config's ``pairs`` section (the paper: CFG 2.0, 10-NFE third-order multistep DPM-Solver++)."""

    seed: int = 0                   # base seed of the whole pair set
    chunk: int = 32                 # pairs per batch and per committed chunk
    cfg: float = 2.0                # classifier-free guidance scale
    top_k: int | None = None        # None: the family's released FID setting
    top_p: float | None = None
    temperature: float = 1.0
    nfe: int = 10                   # flow-map solver function evaluations
    order: int = 3                  # multistep DPM-Solver++ order


LR_SCHEDULES = ("constant", "cosine")
EMB_LOSSES = ("lpips", "classifier", "mse")


@dataclass
class DistillConfig:
    timesteps: list[int] = field(default_factory=lambda: [1])  # paper notation: 1 = the first AR step
    batch_size: int = 512             # global batch
    # Per-process micro-batch: gradients of batch_size / processes samples are accumulated over micro-batches of
    # this size (the same update: the losses are means over samples). None: the whole per-process batch at once.
    # Measured on an H200 (bf16 autocast, LPIPS): LlamaGen-B 108 GB and VAR-d16 139 GB at 64 samples per GPU.
    micro_batch_size: int | None = None
    lr: float = 1e-4
    lr_per_256: bool = True           # VAR: lr scales with batch/256; LlamaGen: fixed lr
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # "constant" (the DD code's) or "cosine": after the warmup, lr falls along a half cosine to 0 at the last step
    lr_schedule: str = "constant"
    grad_clip: float = 2.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False          # decay min(ema_decay, (1+s)/(10+s)): useful for short runs
    ce_weight: float = 0.1
    emb_weight: float = 1.0
    emb_loss: str = "lpips"           # "lpips" | "classifier" (LPIPS's recipe on the digits classifier) | "mse"
    lpips_net: str = "vgg"
    lpips_backbone: str | None = None  # local torchvision state_dict of the backbone; None = random backbone
    perceptual_classifier: str | None = None  # emb_loss "classifier": the digits classifier checkpoint
    # The perceptual losses compare decoded images clamped to [-1, 1] (as the sampler outputs them; a saturated pixel
    # of the prediction then gets no gradient), or, False, the decoder's raw output. Kept True by measurement: tiny
    # LlamaGen, emb_loss "classifier", 1,400 steps, 2,000 samples, two training seeds: DD 1-step FID 57.3 / 46.9
    # clamped vs 58.6 / 53.0 raw, 2-step 53.2 / 44.3 vs 47.6 / 50.5 (sampling SE 0.6-1.8): the training seed moves
    # FID by up to 10, the clamp by no consistent sign (14-22% of the targets' pixels lie below -1: background).
    perceptual_clamp: bool = True
    lambda_t: list[float] | None = None  # per-timestep loss weight, default 1
    student_config: dict = field(default_factory=dict)  # fields of the family's student config to override (VAR:
                                                        # within_scale_attention); the rest follows the teacher
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    amp: bool = True                  # bf16 autocast on CUDA
    # bf16 autocast on the CPU as well. Measured on the 2-core machine (AVX-512 BF16, one thread per job): tiny
    # LlamaGen steps 1.3x faster, DD 1-step FID 57.9 +- 0.8 at 1,400 steps vs 57.8 +- 0.6 in float32. A CPU without
    # bf16 instructions emulates them and is slower: leave it off there.
    cpu_amp: bool = False

    def __post_init__(self):
        problem = timestep_problem(self.timesteps)
        if problem:
            raise ValueError(f"timesteps: {problem}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.emb_loss not in EMB_LOSSES:
            raise ValueError(f"emb_loss must be one of {', '.join(EMB_LOSSES)}, got {self.emb_loss!r}")
        if self.emb_loss == "classifier" and not self.perceptual_classifier:
            raise ValueError("emb_loss 'classifier' needs perceptual_classifier (a digits classifier checkpoint)")
        if self.lambda_t is not None and len(self.lambda_t) != len(self.timesteps):
            raise ValueError(f"lambda_t needs one weight per timestep ({len(self.timesteps)}), got {self.lambda_t}")
        if self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("batch_size and lr must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {self.micro_batch_size}")


@dataclass(frozen=True)
class SampleSettings:
    """Defaults of ``python -m dd sample`` and of the pipeline config's ``sample`` section.

    ``cfg`` is the teacher's classifier-free guidance scale (teacher, skip-n and teacher-involved sets), read as
    each family's own sampler reads it: LlamaGen mixes uncond + (cond - uncond) * cfg at every step, and only for
    cfg > 1; VAR ramps the guidance linearly over its scales, from 0 at the first to cfg at the last. ``top_k`` /
    ``top_p`` None take the family's released FID setting (``Family.default_sampling``)."""

    batch_size: int = 250
    seed: int = 1
    cfg: float = 2.0
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
