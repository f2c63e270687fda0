"""``python -m dd track``: log finished pipeline jobs to MLflow (see ``dd.tracking_mlflow`` for the run layout).

The pipeline's jobs write their results to files (checkpoint reports, shard manifests, loss curves, sample-set
and metrics JSON, grids); a tracking job turns them into MLflow runs once they exist. Tracking runs as its own
Snakemake job, so a tracking failure never costs the outputs of the (possibly days-long) job it records, and a
rerun simply records again (a job's child run is replaced, never duplicated).

    python -m dd track runs    --experiment E --spec '{"runs": [{"job": ..., ...}]}' --out RECORD.json
    python -m dd track shards  --experiment E --index results/E/pairs/index.json --benchmarks DIR --out RECORD.json
    python -m dd track parent  --experiment E --params '{...}' --artifact FILE... --out RECORD.json

A run spec: ``job`` (name), ``tags``, ``params`` (dict, flattened), ``params_json`` (files whose flattened content
are params), ``metrics_json`` ({prefix: file}: numeric leaves become metrics ``prefix/name``), ``metrics_jsonl``
(a ``dd.tracking.JsonlLogger`` file: ``{"step": s, ...}`` lines become metric series, ``{"params": ...}`` lines
params), ``tags_from`` ({tag: [file, key]}: tags read from JSON files), ``benchmark`` (a Snakemake benchmark TSV: ``job/seconds``, ``job/max_rss_mb``) and ``artifacts``
(``[path, folder]`` pairs).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from dd.config import flatten
from dd.io import atomic_write_json


def _numeric_leaves(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in flatten(d).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def read_json(path) -> dict:
    """A JSON object from a file; for a log with several lines, the last line that is a JSON object."""
    text = Path(path).read_text()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ValueError(f"{path}: no JSON object found")


def read_jsonl(path) -> tuple[dict, list[tuple[int, dict]]]:
    """(params, [(step, metrics)]) of a JsonlLogger file; unreadable lines are skipped with a warning."""
    params, series = {}, []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"track: {path}:{n}: not JSON, skipped", file=sys.stderr)
            continue
        if "params" in row and isinstance(row["params"], dict):
            params.update(flatten(row["params"]))
        elif "step" in row:
            step = row.pop("step")
            series.append((int(step or 0), {k: v for k, v in row.items()}))
    return params, series


def read_benchmark(path) -> dict[str, float]:
    """Seconds and peak memory of a job from its Snakemake benchmark TSV (the last repeat)."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    if not rows:
        return {}
    out = {}
    for src, dst in (("s", "job/seconds"), ("max_rss", "job/max_rss_mb"), ("cpu_time", "job/cpu_seconds")):
        try:
            out[dst] = float(rows[-1][src])
        except (KeyError, ValueError, TypeError):
            pass
    return out


def log_run(store, experiment: str, spec: dict) -> dict:
    """Create (or replace) the child run of one job spec and log everything it names; return its record."""
    params: dict[str, Any] = dict(flatten(spec.get("params", {})))
    for path in spec.get("params_json", []):
        params.update(flatten(read_json(path)))
    metrics: dict[str, float] = {}
    for prefix, path in spec.get("metrics_json", {}).items():
        if Path(path).is_file():
            metrics.update(_numeric_leaves(read_json(path), f"{prefix}/" if prefix else ""))
    series: list = []
    if spec.get("metrics_jsonl"):
        jsonl_params, series = read_jsonl(spec["metrics_jsonl"])
        params.update(jsonl_params)
    if spec.get("benchmark"):
        metrics.update(read_benchmark(spec["benchmark"]))
    tags = dict(spec.get("tags", {}))
    for tag, (path, key) in spec.get("tags_from", {}).items():  # e.g. the steps a sample set actually took
        if Path(path).is_file():
            tags[tag] = read_json(path).get(key)
    run_id = store.child_run(experiment, spec["job"], tags=tags)
    n = store.log(run_id, params=params, metrics=metrics, series=series,
                  artifacts=[tuple(a) if isinstance(a, (list, tuple)) else (a, None) for a in spec.get("artifacts", [])])
    store.finish(run_id)
    return {"job": spec["job"], "run_id": run_id, "metrics_logged": n, "params_logged": len(params)}


def shard_specs(index_path, benchmarks: str | None) -> list[dict]:
    index = read_json(index_path)
    specs = []
    for shard in index["shards"]:
        stem = Path(shard["bin"]).stem
        manifest = Path(shard["bin"]).with_suffix(".json")
        spec = {"job": f"pairs/{stem}", "tags": {"stage": "pairs", "teacher_id": index["teacher_id"]},
                "params_json": [str(manifest)] if manifest.is_file() else [],
                "params": {"bin": shard["bin"]},
                "metrics_json": {}, "artifacts": []}
        spec["metrics"] = {"pairs": shard["count"], "bytes": shard["bytes"]}
        if benchmarks:
            spec["benchmark"] = str(Path(benchmarks) / f"{stem}.tsv")
        specs.append(spec)
    return specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("runs", "shards", "parent"),
                        help="runs: child runs from a spec; shards: a child run per pair shard; parent: the "
                             "experiment's parent run")
    parser.add_argument("--store", default="results/mlflow.db", help="sqlite file of the MLflow store")
    parser.add_argument("--mlflow-experiment", default="distilled-decoding")
    parser.add_argument("--experiment", required=True, help="pipeline experiment (the parent run)")
    parser.add_argument("--spec", help="runs: JSON text or a file: {\"runs\": [run spec, ...]}")
    parser.add_argument("--index", help="shards: the pair index written by `dd pipeline index-shards`")
    parser.add_argument("--benchmarks", help="shards: folder of the shard jobs' benchmark TSVs")
    parser.add_argument("--params", help="parent: params as JSON text (flattened)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="parent: tags")
    parser.add_argument("--artifact", action="append", default=[], metavar="FILE[:FOLDER]",
                        help="parent: artifact files")
    parser.add_argument("--out", required=True, help="record of what was logged (JSON), the job's output")


def main(args: argparse.Namespace) -> int:
    from dd.tracking_mlflow import MlflowStore

    store = MlflowStore(args.store, args.mlflow_experiment)
    records = []
    if args.what == "runs":
        if not args.spec:
            raise SystemExit("track runs: --spec is required")
        # JSON text (what the rules pass) or the name of a file holding it
        text = args.spec if args.spec.lstrip().startswith("{") else Path(args.spec).read_text()
        for spec in json.loads(text)["runs"]:
            records.append(log_run(store, args.experiment, spec))
    elif args.what == "shards":
        if not args.index:
            raise SystemExit("track shards: --index is required")
        for spec in shard_specs(args.index, args.benchmarks):
            extra = spec.pop("metrics")
            record = log_run(store, args.experiment, spec)
            store.log(record["run_id"], metrics=extra)
            records.append(record)
    else:
        parent = store.parent_run(args.experiment)
        params = flatten(json.loads(args.params)) if args.params else {}
        tags = dict(t.split("=", 1) for t in args.tag)
        artifacts = [tuple(a.split(":", 1)) if ":" in a else (a, None) for a in args.artifact]
        store.log(parent, params=params, tags=tags, artifacts=artifacts)
        store.finish(parent)
        records.append({"job": "(parent)", "run_id": parent, "params_logged": len(params)})
    atomic_write_json(args.out, {"experiment": args.experiment, "store": str(store.db_path),
                                 "mlflow_experiment": args.mlflow_experiment, "runs": records})
    print(f"track {args.what}: {len(records)} run(s) logged for {args.experiment} in {store.db_path}")
    return 0


if __name__ == "__main__":  # also runnable as `python -m dd.track ...` without the dd dispatcher
    _parser = argparse.ArgumentParser(prog="python -m dd.track", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
