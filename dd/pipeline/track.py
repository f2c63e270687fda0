"""``python -m dd track``: log finished pipeline jobs to MLflow (see ``dd.pipeline.mlflow_store`` for the run layout).

The pipeline's jobs write their results to files (checkpoint reports, shard manifests, loss curves, sample-set
and metrics JSON, grids); a tracking job turns them into MLflow runs once they exist. Tracking runs as its own
Snakemake job, so a tracking failure never costs the outputs of the (possibly days-long) job it records, and a
rerun simply records again (a job's child run is replaced, never duplicated).

Every record is built here from the experiment's plan (``dd.pipeline.plan``) and the results layout; the rules
only say which stage to record:

    python -m dd track shards   --experiment E --experiment-config JSON --out RECORD.json
    python -m dd track distill  --experiment E --experiment-config JSON --run main --out RECORD.json
    python -m dd track samples  --experiment E --experiment-config JSON --out RECORD.json
    python -m dd track parent   --experiment E --experiment-config JSON --out RECORD.json

A run spec (``run_specs``): ``job`` (name), ``tags``, ``params`` (dict, flattened), ``params_json`` (files whose
flattened content are params), ``metrics`` (numbers), ``metrics_json`` ({prefix: file}: numeric leaves become
metrics ``prefix/name``), ``metrics_jsonl`` (a ``dd.io.JsonlLogger`` file: ``{"step": s, ...}`` lines become metric
series, ``{"params": ...}`` lines params), ``tags_from`` ({tag: [file, key]}: tags read from JSON files),
``benchmark`` (a Snakemake benchmark TSV: ``job/seconds``, ``job/max_rss_mb``) and ``artifacts`` (``[path,
folder]`` pairs).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from dd.io import atomic_write_json
from dd.pipeline.plan import Plan, plan


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON text (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


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
    metrics.update(spec.get("metrics", {}))
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


# ---------------------------------------------------------------------------------------------------------------
# What each stage records, from the plan and the results layout
# ---------------------------------------------------------------------------------------------------------------
def shard_specs(p: Plan) -> list[dict]:
    """A child run per pair shard: its manifest as params, its size, time and memory."""
    index = read_json(p.out("pairs", "index.json"))
    specs = []
    for shard in index["shards"]:
        stem = Path(shard["bin"]).stem
        manifest = Path(p.out("pairs", f"{stem}.json"))
        specs.append({"job": f"pairs/{stem}", "tags": {"stage": "pairs", "teacher_id": index["teacher_id"]},
                      "params_json": [str(manifest)] if manifest.is_file() else [],
                      "params": {"bin": shard["bin"]},
                      "metrics": {"pairs": shard["count"], "bytes": shard["bytes"]},
                      "benchmark": p.out("benchmarks", "pairs", f"{stem}.tsv")})
    return specs


def distill_specs(p: Plan, exp: dict, run_name: str) -> list[dict]:
    """The child run of one distillation: its loss curve and periodic FID, settings, time and memory."""
    run = p.runs[run_name]
    return [{"job": f"distill/{run.name}",
             "tags": {"stage": "distill", "family": p.family, "teacher": p.teacher_label,
                      "timesteps": " ".join(map(str, run.timesteps)), "ablation": run.ablation or "main"},
             "params": {**exp["distill"], "timesteps": run.timesteps, "max_steps": run.max_steps,
                        "epochs": run.epochs, "eval_every": run.eval_every, "num_pairs": run.pairs,
                        "num_shards": len(run.shards)},
             "metrics_jsonl": p.out("distill", run.name, "metrics.jsonl"),
             "benchmark": p.out("benchmarks", "distill", f"{run.name}.tsv")}]


# the paper tables' columns, logged under the same names (so that MLflow's runs table and charts read as the tables)
TABLE_METRICS = ("fid", "fid_std", "is", "is_std", "precision", "precision_std", "recall", "recall_std",
                 "teacher_nll_bits", "teacher_nll_bits_std", "seconds_per_image", "speedup", "fid_vs_teacher",
                 "fid_vs_teacher_std")


def _table_metrics(p: Plan) -> dict[str, dict[str, float]]:
    """set -> its row of the paper tables (dd.pipeline.report), numeric columns only; {} before the sets exist."""
    from dd.pipeline.report import collect_rows

    try:
        rows = collect_rows(p.out(), list(p.sets), p.teacher_label)
    except FileNotFoundError:
        return {}
    out = {}
    for row in rows.to_dict("records"):
        out[row["set"]] = {k: float(row[k]) for k in TABLE_METRICS
                           if isinstance(row[k], (int, float)) and not math.isnan(float(row[k]))}
    return out


def sample_specs(p: Plan) -> list[dict]:
    """A child run per sample set: its metrics (also under the paper tables' column names), timing, settings and
    sample grid."""
    specs = []
    table = _table_metrics(p)
    for name, s in p.sets.items():
        info = p.out("samples", f"{name}.json")
        specs.append({"job": f"sample/{name}",
                      "tags": {"stage": "sample", "family": p.family, "teacher": p.teacher_label, "method": s.method,
                               "set": name},
                      "tags_from": {"steps": [info, "steps"]},
                      "params_json": [info],
                      "metrics_json": {"": p.out("metrics", f"{name}.json"), "sample": info},
                      "metrics": table.get(name, {}),
                      "benchmark": p.out("benchmarks", "samples", f"{name}.tsv"),
                      "artifacts": [[p.out("samples", f"{name}.png"), "grids"]]})
    return specs


def report_files(p: Plan) -> tuple[list[str], list[str]]:
    """(tables, figures) of an experiment: what its parent run carries as artifacts."""
    tables = [p.out("tables", f"table{i}.{ext}") for i in (1, 2) for ext in ("csv", "md")]
    figures = [p.out("figures", "fig1_fid_vs_time.png")] + ablation_figures(p)
    if p.prompt_files:       # text-to-image: samples beside their prompts
        figures.append(p.out("figures", "prompt_grid.png"))
    return tables, figures


def ablation_figures(p: Plan) -> list[str]:
    kinds = {r.ablation for r in p.runs.values()}
    return ([p.out("figures", "fig6_fid_vs_progress_timesteps.png")] if "timesteps" in kinds else []) + \
           ([p.out("figures", "fig7_fid_vs_progress_pair_sets.png")] if "pairs" in kinds else [])


KINDS = ("shards", "distill", "samples", "parent", "runs", "relocate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=KINDS, help="the stage to record (parent: the experiment's parent run; "
                        "runs: the run specs given with --spec; relocate: re-root a moved store's artifact locations "
                        "to the mlartifacts folder beside --store)")
    parser.add_argument("--store", default="results/mlflow.db", help="sqlite file of the MLflow store")
    parser.add_argument("--mlflow-experiment", default="distilled-decoding")
    parser.add_argument("--experiment", help="pipeline experiment (the parent run); all kinds but relocate")
    parser.add_argument("--experiment-config",
                        help="the experiment's checked config as JSON text (what the Snakefile validated)")
    parser.add_argument("--spec", help="runs: JSON text or a file: {\"runs\": [run spec, ...]}")
    parser.add_argument("--run", help="distill: the distillation run (main, timesteps-1-2, pairs-750, ...)")
    parser.add_argument("--out", help="record of what was logged (JSON), the job's output; all kinds but relocate")


def run_specs(what: str, p: Plan, exp: dict, run: str | None = None) -> list[dict]:
    if what == "shards":
        return shard_specs(p)
    if what == "distill":
        if run not in p.runs:
            raise SystemExit(f"track distill: --run {run!r} is not a distillation of {p.name}: {', '.join(p.runs)}")
        return distill_specs(p, exp, run)
    return sample_specs(p)


def main(args: argparse.Namespace) -> int:
    from dd.pipeline.mlflow_store import MlflowStore, relocate

    if args.what == "relocate":
        changed = relocate(args.store)
        for name, old, new in changed:
            print(f"track relocate: experiment {name!r}: {old} -> {new}")
        print(f"track relocate: {len(changed)} experiment(s) re-rooted in {args.store}")
        return 0
    if not (args.experiment and args.out):
        raise SystemExit(f"track {args.what}: needs --experiment and --out")
    if (args.what == "runs") != (args.spec is not None) or (args.what != "runs") != bool(args.experiment_config):
        raise SystemExit("track: 'runs' takes --spec; every other kind takes --experiment-config")
    store = MlflowStore(args.store, args.mlflow_experiment)
    records = []
    if args.what == "runs":  # JSON text or the name of a file holding it
        text = args.spec if args.spec.lstrip().startswith("{") else Path(args.spec).read_text()
        specs = json.loads(text)["runs"]
    else:
        exp = json.loads(args.experiment_config)
        p = plan(args.experiment, exp)
        specs = [] if args.what == "parent" else run_specs(args.what, p, exp, args.run)
    for spec in specs:
        records.append(log_run(store, args.experiment, spec))
    if args.what == "parent":
        parent = store.parent_run(args.experiment)
        tables, figures = report_files(p)
        artifacts = [(f, "tables") for f in tables] + [(f, "figures") for f in figures]
        params = flatten(exp)
        store.log(parent, params=params, tags={"family": p.family, "teacher": p.teacher_label}, artifacts=artifacts)
        store.finish(parent)
        records.append({"job": "(parent)", "run_id": parent, "params_logged": len(params)})
    atomic_write_json(args.out, {"experiment": args.experiment, "store": str(store.db_path),
                                 "mlflow_experiment": args.mlflow_experiment, "runs": records})
    print(f"track {args.what}: {len(records)} run(s) logged for {args.experiment} in {store.db_path}")
    return 0
