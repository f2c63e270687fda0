"""Small pipeline steps that belong to no model: the digits reference set and the index of a pair set.

    python -m dd digits-reference --size 16 --out results/digits/reference_16.npz
    python -m dd index-shards --out results/E/pairs/index.json results/E/pairs/shard_*.bin

``index-shards`` is the merge step after the per-shard jobs: it checks that the shards form one pair set (same
teacher, same generation settings, equal sizes, consecutive indices, each ``.bin`` matching the SHA-256 in its
manifest) and writes an index listing them, so a distillation never trains on a mix of pair sets or on a
damaged shard.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dd.io import atomic_write_json
from dd.pairs import ShardError, check_shard


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


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "digits-reference":
        parser.add_argument("--size", type=int, default=16, help="image size (the digits are upsampled)")
        parser.add_argument("--split", default="train", choices=("train", "test", "all"))
        parser.add_argument("--out", type=Path, required=True, help=".npz sample set to write")
    else:
        parser.add_argument("bins", nargs="+", type=Path, help="shard .bin files (manifests beside them)")
        parser.add_argument("--out", type=Path, required=True, help="index JSON to write")
        parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of each shard")


def main(args: argparse.Namespace) -> int:
    if args.command == "digits-reference":
        from dd.evaluate import write_digits_reference

        write_digits_reference(args.out, size=args.size, split=args.split)
        print(f"wrote {args.out}")
        return 0
    try:
        index = index_shards(args.bins, verify=not args.no_verify)
    except (ShardSetError, ShardError, KeyError) as e:
        print(f"python -m dd index-shards: error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, index)
    print(f"{args.out}: {index['num_shards']} shards, {index['num_pairs']} pairs of teacher {index['teacher_id']}")
    return 0


if __name__ == "__main__":  # `python -m dd.pipeline digits-reference|index-shards ...` without the dispatcher
    if len(sys.argv) < 2 or sys.argv[1] not in ("digits-reference", "index-shards"):
        print("usage: python -m dd.pipeline {digits-reference,index-shards} ...", file=sys.stderr)
        sys.exit(2)
    _parser = argparse.ArgumentParser(prog=f"python -m dd.pipeline {sys.argv[1]}")
    add_arguments_for(sys.argv[1], _parser)
    _args = _parser.parse_args(sys.argv[2:])
    _args.command = sys.argv[1]
    sys.exit(main(_args))
