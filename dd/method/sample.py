"""Sampling: DD few-step (paper Alg. 3), teacher-involved DD (Alg. 4), the teacher, and the baselines.

Timesteps here are AR *steps* in the paper's notation: 1 is the first step. Every sampler returns
the final token embeddings [B, n, C] (continuous where the student's embedding head is used) and
the number of network forward passes it spent per image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dd.method.student import assemble, nearest_code_matmul, output_rows, perturb
from dd.method.teacher import SamplingConfig, Teacher, draw_tokens


@torch.no_grad()
def dd_step(student: nn.Module, teacher: Teacher, x: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor,
            step: int, split_step: int) -> torch.Tensor:
    """One DD jump from step ``step``: re-noise positions from that step on, predict the whole sequence
    (Eq. 6, then codes before ``split_step``, vectors after). Only the outputs that sequence uses are
    computed (``output_rows``): LlamaGen-B's logits head over 16384 codes is ~12 % of a forward."""
    B, n = x.shape[:2]
    begin, split = teacher.step_begin(step - 1), teacher.step_begin(split_step - 1)
    t = torch.full((B,), step - 1, device=x.device, dtype=torch.long)
    # step 1: the input is the noise itself and nothing is given
    x_t = noise if begin == 0 else perturb(x, noise, torch.full((B,), begin, device=x.device, dtype=torch.long))
    logits, emb = student(x_t, labels, t, rows=output_rows(begin, split, n))
    return assemble(logits, emb, x_t, begin, split, teacher.codebook)


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
        idx = nearest_code_matmul(x[:, :teacher.step_begin(start - 1)], teacher.codebook)
        for b, e in teacher.step_bounds[: start - 1]:
            teacher.append(state, idx[:, b:e])
    for _ in range(start - 1, second - 1):
        p = teacher.next_probs(state)
        B, S, V = p.shape
        teacher.append(state, draw_tokens(p.reshape(B * S, V), generator).view(B, S))
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


class PairMarginals:
    """Prop. 3.1's optimum, per class and position the empirical token distribution of the pair set, kept as the
    pairs' tokens grouped by class: drawing position j from class c's marginal is taking token j of a uniformly
    drawn pair of class c. Memory is that of the pairs' tokens; a dense [classes, n, V] table would not fit at
    real size (ImageNet LlamaGen: 1000 x 256 x 16384 frequencies, 31 GiB in float64). A class absent from the
    pairs falls back to all pairs."""

    def __init__(self, labels: np.ndarray, tokens: np.ndarray, num_classes: int):
        labels = np.asarray(labels)
        order = np.argsort(labels, kind="stable")
        self.tokens = torch.from_numpy(np.ascontiguousarray(np.asarray(tokens)[order]).astype(np.int64))
        counts = np.bincount(labels, minlength=num_classes)[:num_classes]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        absent = counts == 0
        self.start = torch.from_numpy(np.where(absent, 0, starts)).long()
        self.count = torch.from_numpy(np.where(absent, len(labels), counts)).long()

    def sample(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        labels = labels.cpu().long()
        B, n = labels.shape[0], self.tokens.shape[1]
        u = torch.rand(B, n, generator=generator, dtype=torch.float64)
        rows = self.start[labels, None] + (u * self.count[labels, None]).long().clamp_max(self.count[labels, None] - 1)
        return self.tokens[rows, torch.arange(n)[None, :]]                  # [B, n]: token j of row rows[b, j]


def onestep_star_table(labels: np.ndarray, tokens: np.ndarray, num_classes: int) -> PairMarginals:
    """The pair set's class-conditional per-position token distributions (``PairMarginals``)."""
    return PairMarginals(labels, tokens, num_classes)


@torch.no_grad()
def onestep_star_sample(marginals: PairMarginals, labels: torch.Tensor, generator=None) -> tuple[torch.Tensor, int]:
    """onestep*: every position drawn independently from its class-conditional frequencies. No network."""
    return marginals.sample(labels, generator), 1  # one draw from the (idealised) one-step model of Prop. 3.1


# --------------------------------------------------------------------------------------------------
# The distillation gap in bits: how likely the teacher finds a sample set's token sequences
# --------------------------------------------------------------------------------------------------
# A token the teacher's sampler cannot draw (removed by top-k / top-p) has probability 0. Its NLL is taken under
# the mixture (1 - NLL_SMOOTHING) p + NLL_SMOOTHING / V: at most log2(V / NLL_SMOOTHING) bits (26 bits at V = 64),
# while the NLL of a token the teacher can draw changes by a relative 1e-6 at most.
NLL_SMOOTHING = 1e-6


@torch.no_grad()
def teacher_nll_bits(teacher: Teacher, idx: torch.Tensor, labels: torch.Tensor,
                     sampling: SamplingConfig) -> torch.Tensor:
    """[B] mean negative log2-likelihood per token of each sequence idx [B, n] under the teacher's own sampling
    distribution (CFG and filtering included). The teacher's own samples give its entropy rate; sequences it would
    rarely produce (onestep*'s incoherent combinations) score higher."""
    p = teacher.token_probs(idx, labels, sampling).double()
    V = teacher.codebook.shape[0]
    return -torch.log2((1 - NLL_SMOOTHING) * p + NLL_SMOOTHING / V).mean(1)


# --------------------------------------------------------------------------------------------------
# CLI: python -m dd sample
# --------------------------------------------------------------------------------------------------
METHODS = ("teacher", "dd", "dd-teacher", "skip", "onestep")


DECODE_BATCH = 32     # images per tokenizer-decoder call in `dd sample`


def decode_in_batches(decode, emb: torch.Tensor, batch: int = DECODE_BATCH) -> torch.Tensor:
    """``decode(emb)`` a few images at a time: the tokenizer decoder holds ~200 MB of activations per 256-px image
    (measured on the CPU), and decoding a sample batch of 250 at once peaked at 60 GB on an H200."""
    return torch.cat([decode(part) for part in emb.split(batch)])


def add_arguments(parser) -> None:
    from pathlib import Path

    from dd.families.loading import add_teacher_arguments
    from dd.method.settings import SampleSettings

    d = SampleSettings()
    add_teacher_arguments(parser)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--num", type=int, required=True, help="images (labels cycle over the classes)")
    parser.add_argument("--out", type=Path, required=True, help="sample set .npz (.png grid and .json beside it)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cfg", type=float, default=d.cfg, help="teacher CFG scale (teacher, skip, dd-teacher)")
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--student", type=Path, help="student checkpoint (dd, dd-teacher)")
    parser.add_argument("--released-student", action="store_true", help="--student is a released DD checkpoint")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="DD timestep path, paper notation, from 1")
    parser.add_argument("--split-step", type=int, default=None,
                        help="steps before this use the logits head (default: the student's last trained timestep)")
    parser.add_argument("--start", type=int, help="dd-teacher: first step the teacher regenerates (paper's n)")
    parser.add_argument("--second", type=int, help="dd-teacher: the DD step after the teacher (paper's m)")
    parser.add_argument("--skip", type=int, help="skip baseline: number of final AR steps skipped")
    parser.add_argument("--pairs", type=Path, help="pair-set index (onestep* frequencies)")


def _check_args(args) -> None:
    def need(*names):
        missing = [n for n in names if getattr(args, n.replace("-", "_")) is None]
        if missing:
            raise SystemExit(f"sample --method {args.method}: missing --{', --'.join(missing)}")

    if args.num <= 0 or args.batch_size <= 0:
        raise SystemExit("sample: --num and --batch-size must be positive")
    if args.method in ("dd", "dd-teacher"):
        need("student")
        if args.released_student and args.split_step is None:  # the file does not record it
            from dd.families.registry import FAMILIES

            splits = ", ".join(f"{name} {r.split_step}" for f in FAMILIES.values()
                               for name, r in f.released_students.items())
            raise SystemExit("sample: a released DD student needs --split-step, the split of its release's sampling "
                             f"script ({splits})")
    if args.method == "dd-teacher":
        need("start", "second")
    if args.method == "skip":
        need("skip")
    if args.method == "onestep":
        need("pairs")


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(args) -> int:
    import json
    import time
    from pathlib import Path

    from dd.evaluation.digits import save_grid_png, to_uint8
    from dd.evaluation.sample_sets import write_sample_set
    from dd.families.loading import load_student, teacher_from_args
    from dd.families.registry import get_family
    from dd.io import atomic_write_json
    from dd.method.settings import timestep_problem

    _check_args(args)
    teacher, teacher_id = teacher_from_args(args)
    device = teacher.codebook.device
    over = {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p)) if v is not None}
    sampling = get_family(args.family).default_sampling(args.cfg, temperature=args.temperature, **over)
    ar_params = _n_params(teacher) - _n_params(teacher.tokenizer)
    student = split = table = None
    if args.method in ("dd", "dd-teacher"):
        student, trained = load_student(args.student, teacher, released=args.released_student,
                                        teacher_id=None if args.released_student else teacher_id)
        student = student.to(device)
        split = args.split_step or (trained[-1] if trained else args.steps[-1])
        if not 1 <= split <= teacher.n_steps:
            raise SystemExit(f"sample: --split-step {split} outside the teacher's steps 1..{teacher.n_steps}")
        problem = timestep_problem(args.steps, teacher.n_steps)
        if problem:
            raise SystemExit(f"sample: --steps {problem}")
        if trained and not set(args.steps) <= set(trained):
            raise SystemExit(f"sample: --steps {args.steps} are not all trained timesteps {trained}")
    if args.method == "onestep":
        from dd.method.pairs import PairSet

        ps = PairSet.from_index(args.pairs, teacher, teacher_id)
        recs = np.concatenate([np.asarray(r) for r in ps.records])
        table = onestep_star_table(recs["label"], recs["tokens"], teacher.num_classes)
    C = teacher.codebook.shape[1]

    def run_batch(labels, g):
        """(images, network passes, parameters, the final token vectors [B, n, C]; None for skip-n, whose images
        lack the skipped tokens)."""
        if args.method == "teacher":
            emb, steps = teacher_sample(teacher, labels, sampling, g)
            return decode_in_batches(teacher.decode_embeddings, emb), steps, ar_params, emb
        if args.method == "skip":
            emb, steps = skip_sample(teacher, labels, args.skip, sampling, g)
            return decode_in_batches(teacher.decode_prefix, emb), steps, ar_params, None
        if args.method == "onestep":
            idx, steps = onestep_star_sample(table, labels, g)
            emb = teacher.embed(idx.to(device))
            return decode_in_batches(teacher.decode_embeddings, emb), steps, 0, emb
        noise = torch.randn(len(labels), teacher.n_tokens, C, generator=g).to(device)
        if args.method == "dd":
            x, steps = dd_sample(student, teacher, labels, noise, args.steps, split)
            return decode_in_batches(teacher.decode_embeddings, x), steps, _n_params(student), x
        x, steps = dd_teacher_sample(student, teacher, labels, noise, args.start, args.second, split, sampling, g)
        return decode_in_batches(teacher.decode_embeddings, x), steps, _n_params(student) + ar_params, x

    all_labels = torch.arange(args.num) % teacher.num_classes
    g = torch.Generator().manual_seed(args.seed)
    run_batch(all_labels[: args.batch_size].to(device), torch.Generator().manual_seed(args.seed + 1))  # warm-up
    # The set is kept as the uint8 it is stored as, filled batch by batch: 3 bytes per pixel (50k images at 256 px:
    # 9.8 GB), not float32 batches and their concatenation (79 GB at that size, beyond the sample job's allocation).
    res = teacher.image_size
    images, nll, elapsed = torch.empty(args.num, 3, res, res, dtype=torch.uint8), [], 0.0
    for b in range(0, args.num, args.batch_size):
        labels = all_labels[b: b + args.batch_size].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            img, steps, params, seq = run_batch(labels, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        images[b: b + len(labels)] = to_uint8(img.cpu())
        if seq is not None:   # outside the timed region: the distillation-gap metric, not part of sampling
            nll.append(teacher_nll_bits(teacher, nearest_code_matmul(seq, teacher.codebook), labels, sampling).cpu())
    write_sample_set(args.out, images, all_labels, teacher_nll_bits=torch.cat(nll) if nll else None)
    # a row per class; with a prompt set (hundreds of labels) the first 100 samples in order instead
    # (the report's prompt grid shows them beside their prompts)
    by_class = teacher.num_classes <= 100
    save_grid_png(images if by_class else images[:100], all_labels if by_class else None,
                  Path(args.out).with_suffix(".png"), nrow=10)
    meta = {"method": args.method, "steps": steps, "seconds_per_image": elapsed / args.num,
            "batch_size": args.batch_size, "params": params, "num": args.num, "teacher_id": teacher_id,
            "family": args.family, "seed": args.seed, "sampling": sampling.__dict__,
            "dd_steps": args.steps if args.method == "dd" else None, "split_step": split,
            "start": args.start, "second": args.second, "skip": args.skip, "device": str(device),
            "threads": torch.get_num_threads()}
    atomic_write_json(Path(args.out).with_suffix(".json"), meta)
    print(json.dumps(meta))
    return 0
