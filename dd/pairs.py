"""Noise/data pair generation (paper Alg. 1) and the pair-shard file format.

For each pair we draw noise tokens eps_1..eps_n and a class label, run the teacher step by step and
map each step's noise tokens through the flow-matching map (``dd.flow.flow_map``) with the teacher's
CFG-guided, filtered probabilities; the resulting data tokens condition the next step.

Shard format (one shard = ``NAME.bin`` + ``NAME.json``):

* ``NAME.bin``: fixed-size little-endian records ``(seed int64, label int32, tokens uint8|uint16[n])``.
  Noise is *not* stored: it is regenerated bit-exactly from the per-pair seed
  (``pair_noise``), so a pair costs 12 bytes plus 1 or 2 bytes per token.
* ``NAME.json``: the manifest (format version, teacher id, config and its hash, seeds, count, record
  layout, SHA-256 of the ``.bin``). It holds nothing run-specific (no time, no host), so two runs
  with the same inputs write byte-identical shards.

Writing streams chunk by chunk into ``NAME.bin.part`` with a progress file beside it; a killed job
resumes from the last committed chunk, and the final files appear atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dd.io import atomic_write_json, config_hash, fsync_dir, remove_stale_temps, sha256_file
from dd.teacher import SamplingConfig, Teacher

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Per-pair randomness
# --------------------------------------------------------------------------------------------------
def pair_seed(base_seed: int, index: int) -> int:
    """63-bit seed of pair ``index`` (global over all shards) of a run seeded with ``base_seed``."""
    digest = hashlib.blake2b(f"dd-pair:{base_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def pair_label_and_noise(seed: int, n_tokens: int, dim: int, num_classes: int) -> tuple[int, torch.Tensor]:
    """Class label and noise tokens [n_tokens, dim] (float32, CPU) of one pair, from its seed alone."""
    g = torch.Generator().manual_seed(seed)
    label = int(torch.randint(num_classes, (1,), generator=g))
    noise = torch.randn(n_tokens, dim, generator=g)
    return label, noise


def pair_noise(seeds, n_tokens: int, dim: int, num_classes: int) -> torch.Tensor:
    """Regenerate the noise [B, n_tokens, dim] of stored pairs from their seeds."""
    return torch.stack([pair_label_and_noise(int(s), n_tokens, dim, num_classes)[1] for s in seeds])


# --------------------------------------------------------------------------------------------------
# Alg. 1: the deterministic AR trajectory of a batch of noise sequences
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def flow_trajectory(teacher: Teacher, labels: torch.Tensor, noise: torch.Tensor, sampling: SamplingConfig,
                    nfe: int = 10, order: int = 3, n_steps: int | None = None) -> torch.Tensor:
    """Data token indices [B, n] that the noise tokens [B, n, C] map to under the teacher (only the
    tokens of the first ``n_steps`` AR steps if given, as ``Teacher.sample``)."""
    from dd.flow import flow_map

    state = teacher.begin(labels, sampling)
    codebook = teacher.codebook
    for begin, end in teacher.step_bounds[:n_steps]:
        probs = teacher.next_probs(state)
        idx = flow_map(noise[:, begin:end].to(codebook), probs, codebook, nfe=nfe, order=order)
        teacher.append(state, idx)
    return torch.cat(state.tokens, dim=1)


# --------------------------------------------------------------------------------------------------
# Shard layout
# --------------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 8:
        return np.dtype("u1")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    raise ValueError(f"codebook of {vocab_size} entries does not fit the 16-bit token format")


def record_dtype(n_tokens: int, vocab_size: int) -> np.dtype:
    return np.dtype([("seed", "<i8"), ("label", "<i4"), ("tokens", token_dtype(vocab_size), (n_tokens,))])


def manifest_path(bin_path: Path) -> Path:
    return Path(bin_path).with_suffix(".json")


@dataclass(frozen=True)
class ShardSpec:
    """Everything that determines a shard's bytes (and nothing else)."""

    teacher_id: str
    n_tokens: int
    codebook_dim: int
    vocab_size: int
    num_classes: int
    shard: int
    count: int
    base_seed: int
    chunk: int
    nfe: int
    order: int
    sampling: dict

    @property
    def first_index(self) -> int:
        return self.shard * self.count

    def to_manifest(self, sha256: str) -> dict:
        rec = record_dtype(self.n_tokens, self.vocab_size)
        return {
            "format_version": FORMAT_VERSION,
            "config": asdict(self),
            "config_hash": config_hash(asdict(self)),
            "teacher_id": self.teacher_id,
            "count": self.count,
            "seeds": {"rule": "pair_seed(base_seed, shard*count + i)", "base_seed": self.base_seed,
                      "first_index": self.first_index},
            "record": {"bytes": rec.itemsize, "token_dtype": token_dtype(self.vocab_size).str,
                       "fields": ["seed <i8", "label <i4", f"tokens {token_dtype(self.vocab_size).str}[{self.n_tokens}]"]},
            "sha256": sha256,
        }


class ShardError(ValueError):
    pass


def read_manifest(bin_path: Path) -> dict:
    mpath = manifest_path(bin_path)
    if not mpath.is_file():
        raise ShardError(f"{mpath}: missing shard manifest (expected beside {bin_path})")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{mpath}: corrupt manifest ({e})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{mpath}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}")
    return m


def check_shard(bin_path: Path, *, verify: bool = True, teacher_id: str | None = None) -> dict:
    """The manifest of a finished shard, after checking the data against it (size, SHA-256 unless
    ``verify=False``, and the teacher when ``teacher_id`` is given); ShardError naming the file otherwise."""
    bin_path = Path(bin_path)
    m = read_manifest(bin_path)
    cfg = m["config"]
    rec = record_dtype(cfg["n_tokens"], cfg["vocab_size"])
    expected = m["count"] * rec.itemsize
    if not bin_path.is_file():
        raise ShardError(f"{bin_path}: missing shard data (its manifest {manifest_path(bin_path)} exists)")
    size = bin_path.stat().st_size
    if size != expected:
        raise ShardError(f"{bin_path}: {size} bytes, expected {expected} ({m['count']} records of {rec.itemsize} bytes): truncated or corrupt")
    if verify:
        actual = sha256_file(bin_path)
        if actual != m["sha256"]:
            raise ShardError(f"{bin_path}: SHA-256 {actual} does not match the manifest's {m['sha256']}: corrupt shard")
    if teacher_id is not None and m["teacher_id"] != teacher_id:
        raise ShardError(f"{bin_path}: pairs were generated by teacher {m['teacher_id']!r}, "
                         f"but this run uses teacher {teacher_id!r}")
    return m


def open_shard(bin_path: Path, *, verify: bool = True, teacher_id: str | None = None) -> tuple[np.ndarray, dict]:
    """Memory-map a finished shard after checking it against its manifest (``check_shard``)."""
    m = check_shard(bin_path, verify=verify, teacher_id=teacher_id)
    cfg = m["config"]
    rec = record_dtype(cfg["n_tokens"], cfg["vocab_size"])
    return np.memmap(bin_path, dtype=rec, mode="r", shape=(m["count"],)), m


# --------------------------------------------------------------------------------------------------
# Resumable, streaming shard writer
# --------------------------------------------------------------------------------------------------
def _progress_path(bin_path: Path) -> Path:
    return Path(str(bin_path) + ".part.json")


def _part_path(bin_path: Path) -> Path:
    return Path(str(bin_path) + ".part")


def _committed_records(bin_path: Path, spec_hash: str, rec_bytes: int) -> int:
    """How many records of a previous, interrupted run can be kept (0 if none or incompatible)."""
    part, prog = _part_path(bin_path), _progress_path(bin_path)
    if not (part.is_file() and prog.is_file()):
        return 0
    try:
        p = json.loads(prog.read_text())
    except (json.JSONDecodeError, OSError):
        return 0
    if p.get("config_hash") != spec_hash:
        return 0
    committed = int(p.get("committed", 0))
    if part.stat().st_size < committed * rec_bytes:
        return 0
    return committed


def generate_shard(teacher: Teacher, spec: ShardSpec, bin_path: Path, *, device: str | torch.device = "cpu",
                   progress: bool = True, log=print) -> dict:
    """Write one shard (resuming an interrupted run); returns its manifest."""
    from tqdm import tqdm

    bin_path = Path(bin_path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    sampling = SamplingConfig(**spec.sampling)
    rec = record_dtype(spec.n_tokens, spec.vocab_size)
    spec_hash = config_hash(asdict(spec))
    C = spec.codebook_dim
    if teacher.n_tokens != spec.n_tokens or teacher.codebook.shape[1] != C or teacher.codebook.shape[0] != spec.vocab_size:
        raise ShardError(f"shard spec (n={spec.n_tokens}, V={spec.vocab_size}, C={C}) does not match the teacher "
                         f"(n={teacher.n_tokens}, V x C={tuple(teacher.codebook.shape)})")

    part, prog = _part_path(bin_path), _progress_path(bin_path)
    # a job killed inside an atomic write (e.g. of the progress file) leaves its temporary file behind
    for own in (bin_path, manifest_path(bin_path), part, prog):
        remove_stale_temps(own)
    done = _committed_records(bin_path, spec_hash, rec.itemsize)
    if done:
        log(f"resuming {bin_path.name}: {done}/{spec.count} pairs already committed")
    with open(part, "r+b" if done else "wb") as f:
        f.truncate(done * rec.itemsize)  # drop a chunk that was being written when the job died
        f.seek(done * rec.itemsize)
        bar = tqdm(total=spec.count, initial=done, desc=f"pairs {bin_path.name}", unit="pair",
                   disable=not progress, file=sys.stderr)
        for start in range(done, spec.count, spec.chunk):
            stop = min(start + spec.chunk, spec.count)
            seeds = [pair_seed(spec.base_seed, spec.first_index + i) for i in range(start, stop)]
            drawn = [pair_label_and_noise(s, spec.n_tokens, C, spec.num_classes) for s in seeds]
            labels = torch.tensor([d[0] for d in drawn], device=device)
            noise = torch.stack([d[1] for d in drawn]).to(device)
            tokens = flow_trajectory(teacher, labels, noise, sampling, spec.nfe, spec.order).cpu().numpy()
            out = np.empty(stop - start, dtype=rec)
            out["seed"], out["label"], out["tokens"] = seeds, labels.cpu().numpy(), tokens
            f.write(out.tobytes())
            f.flush()
            os.fsync(f.fileno())
            atomic_write_json(prog, {"config_hash": spec_hash, "committed": stop})
            bar.update(stop - start)
        bar.close()
    manifest = spec.to_manifest(sha256_file(part))
    # Manifest first, then the data: a reader needs both, and a rerun finds a complete .part to rename.
    atomic_write_json(manifest_path(bin_path), manifest)
    os.replace(part, bin_path)
    fsync_dir(bin_path.parent)
    prog.unlink(missing_ok=True)
    return manifest


# --------------------------------------------------------------------------------------------------
# CLI: python -m dd generate-pairs
# --------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    from dd.families import add_teacher_arguments

    add_teacher_arguments(parser)
    parser.add_argument("--shard", type=int, required=True, help="shard index (pairs shard*count .. shard*count+count-1)")
    parser.add_argument("--count", type=int, required=True, help="pairs in this shard")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the whole pair set")
    parser.add_argument("--out", type=Path, required=True, help="shard file NAME.bin (NAME.json is written beside it)")
    parser.add_argument("--chunk", type=int, default=32, help="pairs per batch and per committed chunk")
    parser.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale (paper: 2.0)")
    parser.add_argument("--top-k", type=int, default=None, help="default: the family's released FID setting")
    parser.add_argument("--top-p", type=float, default=None, help="default: the family's released FID setting")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--nfe", type=int, default=10, help="flow-map solver function evaluations")
    parser.add_argument("--order", type=int, default=3, help="multistep DPM-Solver++ order")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    from dd.families import default_sampling, teacher_from_args

    for name in ("count", "chunk", "nfe"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"generate-pairs: --{name} must be positive, got {getattr(args, name)}")
    if args.shard < 0:
        raise SystemExit(f"generate-pairs: --shard must be >= 0, got {args.shard}")
    if args.out.suffix != ".bin":
        raise SystemExit(f"generate-pairs: --out must name a .bin file, got {args.out}")
    over = {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p)) if v is not None}
    sampling = default_sampling(args.family, args.cfg, temperature=args.temperature, **over)
    teacher, teacher_id = teacher_from_args(args)
    V, C = teacher.codebook.shape
    spec = ShardSpec(teacher_id=teacher_id, n_tokens=teacher.n_tokens, codebook_dim=C, vocab_size=V,
                     num_classes=teacher.num_classes, shard=args.shard, count=args.count, base_seed=args.seed,
                     chunk=args.chunk, nfe=args.nfe, order=args.order, sampling=asdict(sampling))
    m = generate_shard(teacher, spec, args.out, device=args.device, progress=not args.no_progress)
    print(json.dumps({"shard": str(args.out), "count": m["count"], "sha256": m["sha256"], "teacher_id": teacher_id}))
    return 0
