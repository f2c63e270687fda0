"""Distillation of a DD student on noise/data pairs (paper Alg. 2, Eq. 7, App. C).

At every step a batch of pairs and, per pair, a timestep t from the configured set are drawn; the
student sees X_t (data tokens before step t, the pair's noise from step t on) and is trained on the
positions >= t: cross-entropy of its logits head against the data indices (weight 0.1) plus an
embedding loss of its continuous head (weight 1.0): LPIPS between the images the frozen tokenizer
decodes from the predicted and the target embeddings, or MSE in embedding space.

Everything that decides a step (data order, timesteps, noise) is a function of (seed, step), so a
resumed run, or a run split over several processes (torchrun / DDP), computes the same losses as an
uninterrupted single-process run on the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd.io import JsonlLogger, atomic_torch_save, read_checkpoint, remove_stale_temps
from dd.method.pairs import PairSet, read_index
from dd.method.settings import EMB_LOSSES, LR_SCHEDULES, DistillConfig, timestep_problem
from dd.method.student import perturb
from dd.method.teacher import Teacher


class DistillError(RuntimeError):
    pass


def batch_indices(n_pairs: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Global pair indices of ``step``: epochs of seeded permutations, read as one stream."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_pairs)
        perm = np.random.default_rng([seed, epoch]).permutation(n_pairs)
        take = perm[offset: offset + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.asarray(out)


def batch_timesteps(cfg: DistillConfig, batch_size: int, step: int) -> torch.Tensor:
    """Index into cfg.timesteps for every sample of the global batch of ``step``."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(len(cfg.timesteps), (batch_size,), generator=g)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def build_lpips(cfg: DistillConfig, device) -> nn.Module:
    """LPIPS with the package's linear heads; the backbone comes from a local file or is random.

    The VGG/AlexNet backbone weights cannot be downloaded offline, so with no ``lpips_backbone`` the
    backbone keeps a seeded random initialisation (lpips' ``pnet_rand``)."""
    import lpips

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = lpips.LPIPS(net=cfg.lpips_net, pretrained=True, pnet_rand=True, verbose=False)
    if cfg.lpips_backbone:
        path = Path(cfg.lpips_backbone)
        if not path.is_file():
            raise DistillError(f"lpips_backbone: {path} does not exist (expected a torchvision {cfg.lpips_net} state_dict)")
        sd = read_checkpoint(path)
        mapped = {}
        for key in model.net.state_dict():
            _, layer, param = key.split(".")          # slice{k}.{layer}.{weight|bias}
            src = f"features.{layer}.{param}"
            if src not in sd:
                raise DistillError(f"lpips_backbone {path}: missing {src} (not a torchvision {cfg.lpips_net} state_dict?)")
            mapped[key] = sd[src]
        model.net.load_state_dict(mapped)
    model.eval().requires_grad_(False)
    return model.to(device)


class ClassifierPerceptualLoss(nn.Module):
    """LPIPS's recipe on the digits classifier instead of VGG: the activations of its three convolutions, each
    unit-normalised over channels, squared differences summed over channels, averaged over positions, summed over
    layers (LPIPS's learned per-channel weights have no digits counterpart, so every channel weighs one). The
    classifier sees the images without its input low-pass: the student is pushed towards sharp strokes."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.net = classifier.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B] distances between image batches x, y in [-1, 1]."""
        total = x.new_zeros(x.shape[0])
        for a, b in zip(self.net.feature_maps(x, low_pass=False), self.net.feature_maps(y, low_pass=False)):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).pow(2).sum(1).mean((1, 2))
        return total


def build_perceptual(cfg: DistillConfig, device) -> nn.Module | None:
    """The image-space distance of the embedding loss (None for "mse", which compares embeddings)."""
    if cfg.emb_loss == "lpips":
        return build_lpips(cfg, device)
    if cfg.emb_loss == "classifier":
        from dd.evaluation.classifier import load_classifier

        return ClassifierPerceptualLoss(load_classifier(cfg.perceptual_classifier)).to(device)
    return None


def distill_losses(student: nn.Module, teacher: Teacher, cfg: DistillConfig, labels, tokens, noise, t_idx,
                   lpips_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """Per-term losses (means over the batch of per-sample means over positions >= t)."""
    codebook = teacher.codebook
    steps = torch.tensor(cfg.timesteps, device=tokens.device)[t_idx] - 1           # 0-based AR step
    begin = torch.tensor([teacher.step_begin(int(s)) for s in steps], device=tokens.device)
    x0 = codebook[tokens]
    x_t = perturb(x0, noise, begin)
    logits, emb = student(x_t, labels, steps)
    n = tokens.shape[1]
    predicted = torch.arange(n, device=tokens.device)[None, :] >= begin[:, None]      # [B, n]
    weight = predicted.float() / predicted.sum(1, keepdim=True).clamp(min=1)
    lam = (torch.tensor(cfg.lambda_t, device=tokens.device)[t_idx] if cfg.lambda_t is not None
           else torch.ones(len(tokens), device=tokens.device))

    ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")   # [B, n]
    ce = ((ce * weight).sum(1) * lam).mean()
    # Eq. 6: the given prefix is copied from the input, so only positions >= t carry the prediction.
    full = torch.where(predicted.unsqueeze(-1), emb.float(), x_t.float())
    if cfg.emb_loss == "mse":
        per = ((full - x0).pow(2).mean(-1) * weight).sum(1)
    else:
        with torch.no_grad():
            target_img = teacher.decode_embeddings(x0, clamp=cfg.perceptual_clamp)
        pred_img = teacher.decode_embeddings(full, clamp=cfg.perceptual_clamp)
        per = lpips_model(pred_img.float(), target_img.float()).flatten()
    emb_loss = (per * lam).mean()
    return {"ce": ce, "emb": emb_loss, "loss": cfg.ce_weight * ce + cfg.emb_weight * emb_loss}


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------
@dataclass
class DistState:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistState:
    """torchrun sets WORLD_SIZE/RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistState()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    state = DistState(dist.get_rank(), dist.get_world_size())
    if state.rank == 0:
        print(f"distill: data-parallel, {state.world} processes ({dist.get_backend()})", file=sys.stderr, flush=True)
    return state


def effective_lr(cfg: DistillConfig) -> float:
    return cfg.lr * cfg.batch_size / 256 if cfg.lr_per_256 else cfg.lr


def lr_factor(cfg: DistillConfig, step: int, total: int) -> float:
    """The learning rate of ``step`` (0-based) as a share of the configured one: linear warmup, then constant or a
    half cosine that reaches 0 at the last of ``total`` steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return 1.0


def _rng_state() -> dict:
    """Every RNG state as tensors and plain values (numpy's key array as a tensor), so that checkpoints load
    with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class EMA:
    def __init__(self, model: nn.Module):
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)


def _check_finite(step: int, losses: dict) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise DistillError(f"non-finite loss at step {step}: loss term '{name}' = {value.item()}; "
                               f"the last good checkpoint is kept")


def _diagnose_gradients(step, student, losses, cfg) -> str:
    """Which loss term produces the non-finite gradient (re-running backward term by term)."""
    bad = []
    for name, w in (("ce", cfg.ce_weight), ("emb", cfg.emb_weight)):
        student.zero_grad(set_to_none=True)
        (w * losses[name]).backward(retain_graph=True)
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in student.parameters()):
            bad.append(name)
    return ", ".join(bad) or "unknown"


def attention_kernel(device_type: str):
    """The scaled-dot-product-attention kernel of a training step: PyTorch's math kernel on the CPU, the default
    choice elsewhere. At the tiny default's size (64 sequences of 65 tokens, 4 heads of 32) the CPU flash kernel's
    backward took 27 ms per layer under bf16 autocast, 42% of a step; the math kernel (two matmuls and a softmax,
    differentiated by autograd) makes the whole step 1.57x faster (0.139 s instead of 0.218 s). On a GPU the fused
    kernels are the fast ones."""
    if device_type != "cpu":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def optimisation_step(model: nn.Module, student: nn.Module, teacher: Teacher, cfg: DistillConfig, batch, opt,
                      lpips_model, use_amp: bool, step: int) -> tuple[dict, torch.Tensor]:
    """One update of the student on one (per-process) batch ``(labels, tokens, noise, t_idx)``: the losses under
    bf16 autocast (``use_amp``) and their gradients, accumulated over micro-batches of ``cfg.micro_batch_size``
    (each weighted by its share of the batch: the losses are means over samples, so the update is the whole
    batch's), gradient clipping and the optimiser step. ``model`` is the student or its DDP wrapper, which
    all-reduces the gradients once, after the last micro-batch. Raises (naming the loss term) on a non-finite loss
    or gradient, before the weights change. Returns the batch's losses and the gradient norm."""
    n, device_type = len(batch[0]), batch[2].device.type
    micro = cfg.micro_batch_size or n
    starts = range(0, n, micro)
    opt.zero_grad(set_to_none=True)
    losses = {}
    for start in starts:
        part = [x[start:start + micro] for x in batch]
        share = len(part[0]) / n
        last = start == starts[-1]
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()
        with sync, attention_kernel(device_type):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_amp):
                micro_losses = distill_losses(model, teacher, cfg, *part, lpips_model)
            _check_finite(step, micro_losses)
            (micro_losses["loss"] * share).backward()
        for k, v in micro_losses.items():
            losses[k] = losses.get(k, 0.0) + v.detach() * share
    grad_norm = nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    if not torch.isfinite(grad_norm):
        part = [x[:micro] for x in batch]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_amp):
            culprit = _diagnose_gradients(step, student, distill_losses(student, teacher, cfg, *part, lpips_model), cfg)
        raise DistillError(f"non-finite gradient at step {step} (from loss term(s): {culprit}); "
                           f"the last good checkpoint is kept")
    opt.step()
    return losses, grad_norm


def new_student(teacher: Teacher, seed: int, overrides: dict | None = None) -> nn.Module:
    """The student initialised from the teacher, its new layers (noise-token input, noise/data embedding,
    embedding head) drawn from ``seed``. Not from the global RNG as it happens to be: torch seeds that
    randomly at start-up, so two runs of the same config would distill different students."""
    from dd.families.loading import student_from_teacher

    torch.manual_seed(seed)
    return student_from_teacher(teacher, **(overrides or {}))


def distill(cfg: DistillConfig, teacher: Teacher, student: nn.Module, pairs: PairSet, out_dir: Path, *,
            device: str | torch.device = "cpu", logger: JsonlLogger | None = None, resume: bool = True,
            eval_fn=None, eval_every: int = 0, progress: bool = True) -> dict:
    """Train ``student`` and write ``out_dir/last.pt`` (atomic); returns the final checkpoint dict."""
    from tqdm import tqdm

    device = torch.device(device)
    dist_state = init_distributed(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.pt"
    if dist_state.main:     # a job killed inside an atomic checkpoint write leaves its (large) temporary file
        for own in (ckpt_path, out_dir / "student.pt"):
            remove_stale_temps(own)
    if cfg.batch_size % dist_state.world:
        raise DistillError(f"batch_size {cfg.batch_size} is not divisible by the {dist_state.world} processes")
    if cfg.micro_batch_size and (cfg.batch_size // dist_state.world) % cfg.micro_batch_size:
        raise DistillError(f"micro_batch_size {cfg.micro_batch_size} does not divide the per-process batch "
                           f"{cfg.batch_size // dist_state.world} (batch_size {cfg.batch_size} / {dist_state.world} processes)")

    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    steps_per_epoch = max(1, math.ceil(len(pairs) / cfg.batch_size))
    total = cfg.max_steps if cfg.max_steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    lr = effective_lr(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, total))
    ema = EMA(student)
    lpips_model = build_perceptual(cfg, device)
    step = 0
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck["config"] != asdict(cfg):
            raise DistillError(f"{ckpt_path}: checkpoint was written with a different distillation config; "
                               f"delete it or use a new output folder")
        student.load_state_dict(ck["model"])
        ema.shadow = {k: v.to(device) for k, v in ck["ema"].items()}
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        step = ck["step"]
        if dist_state.main:
            print(f"resumed from {ckpt_path} at step {step}/{total}")
    else:
        torch.manual_seed(cfg.seed)
    model = student
    if dist_state.world > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    def save(final=False):
        if not dist_state.main:
            return
        ck = {"config": asdict(cfg), "step": step, "total_steps": total, "model": student.state_dict(),
              "ema": ema.shadow, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
              "final": final}
        atomic_torch_save(ck, ckpt_path)

    local = cfg.batch_size // dist_state.world
    use_amp = cfg.amp and device.type == "cuda" or cfg.cpu_amp and device.type == "cpu"
    bar = tqdm(total=total, initial=step, desc="distill", disable=not (progress and dist_state.main))
    while step < total:
        t0 = time.perf_counter()
        idx = batch_indices(len(pairs), cfg.batch_size, step, cfg.seed)
        t_idx = batch_timesteps(cfg, cfg.batch_size, step)
        sl = slice(dist_state.rank * local, (dist_state.rank + 1) * local)
        labels, tokens, noise = (x.to(device) for x in pairs.get(idx[sl]))
        losses, grad_norm = optimisation_step(model, student, teacher, cfg, (labels, tokens, noise, t_idx[sl].to(device)),
                                              opt, lpips_model, use_amp, step)
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
        ema.update(student, decay)
        step += 1
        metrics = {k: v.detach().float() for k, v in losses.items()}
        if dist_state.world > 1:
            import torch.distributed as dist
            for v in metrics.values():
                dist.all_reduce(v)
                v /= dist_state.world
        metrics = {k: v.item() for k, v in metrics.items()}
        metrics.update(lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                       pairs_per_s=cfg.batch_size / (time.perf_counter() - t0))
        if logger and dist_state.main and (step % cfg.log_every == 0 or step == total or step == 1):
            logger.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
        if step % cfg.checkpoint_every == 0 or step == total:
            save(final=step == total)
        if eval_fn is not None and eval_every and dist_state.main and (step % eval_every == 0 or step == total):
            evaluation = eval_fn(ema_model(student, ema), step)
            if logger:
                logger.log_metrics(evaluation, step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    bar.close()
    return load_checkpoint(ckpt_path) if dist_state.main else {}


def load_checkpoint(path: Path) -> dict:
    return read_checkpoint(path)


def ema_model(student: nn.Module, ema: EMA) -> nn.Module:
    """A copy of the student carrying the EMA weights (for evaluation during training)."""
    import copy

    m = copy.deepcopy(student)
    m.load_state_dict(ema.shadow)
    return m.eval()


# --------------------------------------------------------------------------------------------------
# CLI: python -m dd distill
# --------------------------------------------------------------------------------------------------
def cpu_has_bf16() -> bool | None:
    """Whether /proc/cpuinfo lists a bf16 matrix instruction set among the CPU's flags (None where it is unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "flags" not in flags:
        return None
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def cpu_amp_wanted(choice: str | None, device: str) -> bool:
    """``--cpu-amp``: always, never (None) or auto. Auto takes bf16 only where the CPU has bf16 instructions: on an
    AVX2-only CPU (AMD EPYC Zen 3) a bf16 matrix product ran at 1.3 GFLOP/s against 62 in float32, and a tiny VAR
    step (LPIPS loss) took 26 s instead of 2.4 s, so the default's bf16 setting, measured on an AVX-512 BF16
    machine, would have turned its 15 minutes into hours."""
    if choice is None or device != "cpu":
        return choice == "always"
    if choice == "auto":
        return cpu_has_bf16() is True
    return True


def json_object(text: str) -> dict:
    """``--student-config``: a JSON object (field -> value), refused at parsing, before any model is loaded."""
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of student config fields, got {text!r}")
    return value


def add_arguments(parser) -> None:
    from dd.families.loading import add_teacher_arguments

    add_teacher_arguments(parser)
    d = DistillConfig()
    parser.add_argument("--pairs", type=Path, required=True, help="pair-set index (python -m dd index-shards)")
    parser.add_argument("--num-shards", type=int, default=None, help="train on the first N shards (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (last.pt, student.pt)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=d.timesteps, help="paper notation, first = 1")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    lr = parser.add_mutually_exclusive_group()
    lr.add_argument("--lr-per-256", dest="lr_per_256", action="store_true", default=True,
                    help="lr is per 256 samples of batch (VAR, default)")
    lr.add_argument("--fixed-lr", dest="lr_per_256", action="store_false", help="lr independent of batch (LlamaGen)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, default=d.epochs)
    steps.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule)
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip)
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="per-process micro-batch: gradients are accumulated (default: the whole per-process batch)")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay)
    parser.add_argument("--ema-warmup", action="store_true")
    parser.add_argument("--emb-loss", choices=EMB_LOSSES, default=d.emb_loss)
    parser.add_argument("--lpips-net", choices=["vgg", "alex", "squeeze"], default=d.lpips_net)
    parser.add_argument("--lpips-backbone", default=None, help="local torchvision backbone weights (else random)")
    parser.add_argument("--perceptual-classifier", default=None,
                        help="--emb-loss classifier: the digits classifier checkpoint whose features it compares")
    parser.add_argument("--no-perceptual-clamp", dest="perceptual_clamp", action="store_false",
                        help="perceptual losses compare the decoder's raw output, not images clamped to [-1, 1]")
    parser.add_argument("--ce-weight", type=float, default=d.ce_weight)
    parser.add_argument("--emb-weight", type=float, default=d.emb_weight)
    parser.add_argument("--lambda-t", type=float, nargs="+", default=None, help="loss weight per timestep")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--student-config", type=json_object, default={}, metavar="JSON",
                        help='student config fields to override, e.g. \'{"within_scale_attention": true}\' (VAR)')
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--cpu-amp", nargs="?", const="always", choices=("always", "auto"), default=None,
                        help="bf16 autocast on the CPU too: always, or (auto) only where the CPU has bf16 instructions "
                             "(AVX-512 BF16, AMX), which make it faster; elsewhere bf16 is emulated and many times slower")
    parser.add_argument("--metrics-jsonl", type=Path, default=None, help="default: OUT/metrics.jsonl")
    parser.add_argument("--eval-every", type=int, default=0, help="FID of 1-/2-step samples every N steps")
    parser.add_argument("--eval-reference", type=Path, help="reference sample set .npz for --eval-every")
    parser.add_argument("--eval-num", type=int, default=200)
    parser.add_argument("--eval-split-step", type=int, default=None,
                        help="--eval-every samples: the AR step from which tokens are the student's embeddings "
                             "(default: the last --timesteps entry), as dd sample --split-step")
    parser.add_argument("--classifier", type=Path, help="digits classifier (feature network for --eval-every)")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> DistillConfig:
    return DistillConfig(
        timesteps=list(args.timesteps), batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr, lr_per_256=args.lr_per_256,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, ema_warmup=args.ema_warmup, ce_weight=args.ce_weight, emb_weight=args.emb_weight,
        emb_loss=args.emb_loss, lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone,
        perceptual_classifier=args.perceptual_classifier, perceptual_clamp=args.perceptual_clamp,
        lambda_t=args.lambda_t, student_config=dict(args.student_config), epochs=args.epochs,
        max_steps=args.max_steps, seed=args.seed,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, amp=not args.no_amp,
        cpu_amp=cpu_amp_wanted(args.cpu_amp, args.device))


def make_fid_eval(teacher, cfg: DistillConfig, reference: Path, classifier: Path, num: int, seed: int,
                  split_step: int | None = None):
    """eval_fn for ``distill``: FID (digits-classifier features) of 1-step and 2-step samples, their tokens codes
    before ``split_step`` (default: the last distilled timestep) and embeddings from it on, as ``dd sample
    --split-step`` makes them."""
    split_step = split_step or cfg.timesteps[-1]
    import tempfile

    from dd.evaluation.metrics import evaluate_sample_set
    from dd.evaluation.sample_sets import write_sample_set
    from dd.method.sample import dd_sample

    C = teacher.codebook.shape[1]
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % teacher.num_classes
    noise = torch.randn(num, teacher.n_tokens, C, generator=g)
    paths = {"1step": [1]} | ({"2step": cfg.timesteps[:2]} if len(cfg.timesteps) > 1 else {})

    def eval_fn(model, step):
        out = {}
        for name, path in paths.items():
            with torch.no_grad():
                x, _ = dd_sample(model, teacher, labels, noise.to(teacher.codebook.device), path, split_step)
                images = teacher.decode_embeddings(x).cpu()
            with tempfile.TemporaryDirectory() as d:
                write_sample_set(Path(d) / "s.npz", images, labels)
                m = evaluate_sample_set(Path(d) / "s.npz", reference, feature_extractor="digits-classifier",
                                        weights_path=classifier, isc=False, kid=False, prc=False)
            out[f"eval/fid_{name}"] = m["fid"]
        return out

    return eval_fn


def main(args) -> int:
    import json

    from dd.families.loading import model_config, teacher_from_args

    cfg = config_from_args(args)  # validates before anything expensive
    if args.eval_every and not (args.eval_reference and args.classifier):
        raise SystemExit("distill: --eval-every needs --eval-reference and --classifier")
    if args.cpu_amp and args.device == "cpu" and cpu_has_bf16() is not True:
        if cfg.cpu_amp:
            print("distill: warning: --cpu-amp on a CPU without bf16 instructions (no avx512_bf16 / amx_bf16 in "
                  "/proc/cpuinfo): bf16 is emulated there and many times slower than float32", file=sys.stderr)
        else:
            print("distill: --cpu-amp auto: this CPU has no bf16 instructions (no avx512_bf16 / amx_bf16 in "
                  "/proc/cpuinfo), so the steps run in float32", file=sys.stderr)
    index = read_index(args.pairs)     # before the teacher is loaded: a missing or bad index fails fast
    if args.num_shards is not None and not 1 <= args.num_shards <= len(index["shards"]):
        raise DistillError(f"--num-shards {args.num_shards}: {args.pairs} lists {len(index['shards'])} shards")
    teacher, teacher_id = teacher_from_args(args)
    problem = timestep_problem(cfg.timesteps, teacher.n_steps)
    if problem:
        raise DistillError(f"--timesteps: {problem}")
    if args.eval_split_step is not None and not 1 <= args.eval_split_step <= teacher.n_steps:
        raise DistillError(f"--eval-split-step {args.eval_split_step}: the teacher has AR steps 1..{teacher.n_steps}")
    pairs = PairSet.from_index(args.pairs, teacher, teacher_id, args.num_shards)
    student = new_student(teacher, cfg.seed, cfg.student_config)
    ckpt = Path(args.out) / "last.pt"
    resume_step = load_checkpoint(ckpt)["step"] if ckpt.is_file() else None
    logger = JsonlLogger(args.metrics_jsonl or Path(args.out) / "metrics.jsonl", resume_step=resume_step)
    logger.log_params({"distill": asdict(cfg), "teacher_id": teacher_id, "pairs": len(pairs)})
    eval_fn = (make_fid_eval(teacher, cfg, args.eval_reference, args.classifier, args.eval_num, args.seed,
                             args.eval_split_step) if args.eval_every else None)
    try:
        ck = distill(cfg, teacher, student, pairs, args.out, device=args.device, logger=logger, eval_fn=eval_fn,
                     eval_every=args.eval_every, progress=not args.no_progress)
    finally:
        logger.close()
    if ck:
        from dd.io import atomic_torch_save

        atomic_torch_save({"family": teacher.family, "kind": "student", "teacher_id": teacher_id,
                           "student_config": model_config(student), "timesteps": cfg.timesteps,
                           "distill_config": asdict(cfg), "step": ck["step"], "ema": ck["ema"], "model": ck["model"]},
                          Path(args.out) / "student.pt")
        print(json.dumps({"student": str(Path(args.out) / "student.pt"), "steps": ck["step"]}))
    return 0
