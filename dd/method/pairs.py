"""Noise/data pair generation (paper Alg. 1) and the pair-shard file format.

For each pair we draw noise tokens eps_1..eps_n and a class label, run the teacher step by step and
map each step's noise tokens through the flow-matching map (``dd.method.flow.flow_map``) with the teacher's
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

A pair set is several shards (one pipeline job each). ``index-shards`` is the merge step: it checks that the shards
form one set (same teacher, same generation settings, equal sizes, consecutive indices, each ``.bin`` matching the
SHA-256 in its manifest) and writes an index listing them; ``PairSet.from_index`` reads the set back, so a
distillation never trains on a mix of pair sets or on a damaged shard, and does not re-hash the shards.

    python -m dd generate-pairs --family F --tokenizer T --model M --shard 0 --count 750 --out shard_00000.bin
    python -m dd index-shards --out index.json shard_*.bin
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
from dd.method.teacher import SamplingConfig, Teacher

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
    from dd.method.flow import flow_map

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


def _read_json(path: Path, error: type[Exception], what: str, missing: str) -> dict:
    """A JSON object from ``path``; ``error`` naming the file when it is missing (``missing`` says where it comes
    from) or is not a JSON object."""
    if not path.is_file():
        raise error(f"{path}: {what} not found ({missing})")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: corrupt {what} ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: corrupt {what} (not a JSON object)")
    return obj


def read_manifest(bin_path: Path) -> dict:
    mpath = manifest_path(bin_path)
    m = _read_json(mpath, ShardError, "shard manifest", f"expected beside {bin_path}")
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
# Reading a pair set: its shards, memory-mapped
# --------------------------------------------------------------------------------------------------
class PairSet:
    """All pairs of a list of shards, memory-mapped; noise is regenerated from the stored seeds."""

    def __init__(self, shard_paths, teacher: Teacher, teacher_id: str | None, verify: bool = True):
        self.records, self.manifests = [], []
        for p in shard_paths:
            rec, m = open_shard(Path(p), verify=verify, teacher_id=teacher_id)
            cfg = m["config"]
            if (cfg["n_tokens"], cfg["vocab_size"], cfg["codebook_dim"]) != (
                    teacher.n_tokens, *teacher.codebook.shape):
                raise ShardError(f"{p}: pairs have n={cfg['n_tokens']}, V={cfg['vocab_size']}, C={cfg['codebook_dim']}, "
                                   f"but the teacher has n={teacher.n_tokens}, V x C={tuple(teacher.codebook.shape)}")
            self.records.append(rec)
            self.manifests.append(m)
        if not self.records:
            raise ShardError("no pair shards given")
        self.offsets = np.cumsum([0] + [len(r) for r in self.records])
        self.n_tokens, self.dim = teacher.n_tokens, teacher.codebook.shape[1]
        self.num_classes = self.manifests[0]["config"]["num_classes"]

    @classmethod
    def from_index(cls, index_path: Path, teacher: Teacher, teacher_id: str | None,
                   num_shards: int | None = None) -> "PairSet":
        """The pair set an index describes (``index_shards``), or its first ``num_shards`` shards. The index job
        hashed every shard; here each shard is only checked against its manifest and the index (size, recorded
        SHA-256), so a distillation or sampling job does not re-hash the whole pair set."""
        index_path = Path(index_path)
        index = read_index(index_path)
        shards = index["shards"][:num_shards]
        if num_shards is not None and len(shards) < num_shards:
            raise ShardSetError(f"{index_path}: {num_shards} shards asked for, the index lists {len(shards)}")
        paths = []
        for s in shards:
            path = index_path.parent / Path(s["bin"]).name      # shards sit beside their index
            if read_manifest(path)["sha256"] != s["sha256"]:
                raise ShardSetError(f"{path}: its manifest does not match {index_path} (the shard was regenerated "
                                    "after the index was written); rerun index-shards")
            paths.append(path)
        return cls(paths, teacher, teacher_id, verify=False)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels [B], data token indices [B, n], noise [B, n, C]) for global pair indices."""
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        rows = [self.records[s][i - self.offsets[s]] for s, i in zip(shard, indices)]
        labels = torch.tensor([int(r["label"]) for r in rows])
        tokens = torch.from_numpy(np.stack([r["tokens"].astype(np.int64) for r in rows]))
        noise = pair_noise([int(r["seed"]) for r in rows], self.n_tokens, self.dim, self.num_classes)
        return labels, tokens, noise


# --------------------------------------------------------------------------------------------------
# The index of a pair set (the merge step after the per-shard jobs)
# --------------------------------------------------------------------------------------------------
class ShardSetError(ValueError):
    pass


def index_shards(bins: list[Path], verify: bool = True) -> dict:
    """Check that the shards form one pair set and return the index (see the module docstring)."""
    if not bins:
        raise ShardSetError("no shards given")
    shards, reference, ref_path = [], None, None
    for path in sorted(map(Path, bins)):
        m = check_shard(path, verify=verify)          # manifest, size and SHA-256 of each shard
        cfg = dict(m["config"])
        shard_index = cfg.pop("shard")
        if reference is None:
            reference, ref_path = cfg, path
        elif cfg != reference:
            diff = sorted(k for k in set(cfg) | set(reference) if cfg.get(k) != reference.get(k))
            raise ShardSetError(f"{path} does not belong with {ref_path}: they differ in {', '.join(diff)} "
                                f"({', '.join(f'{k}: {cfg.get(k)!r} vs {reference.get(k)!r}' for k in diff)})")
        shards.append({"bin": str(path), "shard": shard_index, "count": m["count"], "bytes": path.stat().st_size,
                       "sha256": m["sha256"]})
    indices = sorted(s["shard"] for s in shards)
    if len(set(indices)) != len(indices):
        raise ShardSetError(f"shard index given twice among {indices}")
    return {"teacher_id": reference["teacher_id"], "num_pairs": sum(s["count"] for s in shards),
            "num_shards": len(shards), "config": reference,
            "shards": sorted(shards, key=lambda s: s["shard"])}


def read_index(path: Path) -> dict:
    path = Path(path)
    index = _read_json(path, ShardSetError, "pair-set index", "written by python -m dd index-shards")
    if not isinstance(index.get("shards"), list):
        raise ShardSetError(f"{path}: not a pair-set index (expected a JSON object with a 'shards' list)")
    return index


# --------------------------------------------------------------------------------------------------
# CLI: python -m dd generate-pairs / index-shards
# --------------------------------------------------------------------------------------------------
def add_arguments_for(name: str, parser) -> None:
    if name == "index-shards":
        parser.add_argument("bins", nargs="+", type=Path, help="shard .bin files (manifests beside them)")
        parser.add_argument("--out", type=Path, required=True, help="index JSON to write")
        parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of each shard")
        return
    from dd.families.loading import add_teacher_arguments
    from dd.method.settings import PairSettings

    d = PairSettings()
    add_teacher_arguments(parser)
    parser.add_argument("--shard", type=int, required=True, help="shard index (pairs shard*count .. shard*count+count-1)")
    parser.add_argument("--count", type=int, required=True, help="pairs in this shard")
    parser.add_argument("--seed", type=int, default=d.seed, help="base seed of the whole pair set")
    parser.add_argument("--out", type=Path, required=True, help="shard file NAME.bin (NAME.json is written beside it)")
    parser.add_argument("--chunk", type=int, default=d.chunk, help="pairs per batch and per committed chunk")
    parser.add_argument("--cfg", type=float, default=d.cfg, help="classifier-free guidance scale (paper: 2.0)")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="default: the family's released FID setting")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="default: the family's released FID setting")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--nfe", type=int, default=d.nfe, help="flow-map solver function evaluations")
    parser.add_argument("--order", type=int, default=d.order, help="multistep DPM-Solver++ order")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    if args.command == "index-shards":
        index = index_shards(args.bins, verify=not args.no_verify)
        atomic_write_json(args.out, index)
        print(f"{args.out}: {index['num_shards']} shards, {index['num_pairs']} pairs of teacher {index['teacher_id']}")
        return 0
    from dd.families.loading import teacher_from_args
    from dd.families.registry import get_family

    for name in ("count", "chunk", "nfe"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"generate-pairs: --{name} must be positive, got {getattr(args, name)}")
    if args.shard < 0:
        raise SystemExit(f"generate-pairs: --shard must be >= 0, got {args.shard}")
    if args.out.suffix != ".bin":
        raise SystemExit(f"generate-pairs: --out must name a .bin file, got {args.out}")
    over = {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p)) if v is not None}
    sampling = get_family(args.family).default_sampling(args.cfg, temperature=args.temperature, **over)
    teacher, teacher_id = teacher_from_args(args)
    V, C = teacher.codebook.shape
    spec = ShardSpec(teacher_id=teacher_id, n_tokens=teacher.n_tokens, codebook_dim=C, vocab_size=V,
                     num_classes=teacher.num_classes, shard=args.shard, count=args.count, base_seed=args.seed,
                     chunk=args.chunk, nfe=args.nfe, order=args.order, sampling=asdict(sampling))
    m = generate_shard(teacher, spec, args.out, device=args.device, progress=not args.no_progress)
    print(json.dumps({"shard": str(args.out), "count": m["count"], "sha256": m["sha256"], "teacher_id": teacher_id}))
    return 0
