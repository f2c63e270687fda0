"""MLflow tracking of pipeline jobs: several processes logging into one sqlite store at once lose and
duplicate nothing; a rerun of a job replaces its run instead of adding a second one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dd.pipeline.mlflow_store import MlflowStore  # mlflow is a hard dependency, imported, not skipped

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 4
RUNS_PER_PROCESS = 3
STEPS = 15


def write_job_files(folder: Path, job: str, value: float) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.json"
    metrics.write_text(json.dumps({"fid": value, "is": value + 1, "precision": 0.5, "recall": 0.25,
                                   "nested": {"kid": value / 10}}))
    curve = folder / "curve.jsonl"
    curve.write_text("\n".join(json.dumps({"step": s, "loss": value + s}) for s in range(STEPS)) + "\n")
    return {"job": job, "tags": {"stage": "test", "method": "dd"}, "params": {"value": value},
            "metrics_json": {"": str(metrics)}, "metrics_jsonl": str(curve)}


def track(store: Path, spec: dict, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dd", "track", "runs", "--store", str(store), "--mlflow-experiment", "test",
         "--experiment", "exp", "--spec", json.dumps(spec), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))


def child_runs(store_path: Path) -> dict:
    store = MlflowStore(store_path, "test")
    runs = store.client.search_runs([store.experiment_id()], filter_string="tags.`dd.role` = 'child'",
                                    max_results=1000)
    by_job: dict = {}
    for r in runs:
        by_job.setdefault(r.data.tags["dd.job"], []).append(r)
    return by_job


def test_parallel_jobs_log_every_run_exactly_once(tmp_path):
    store = tmp_path / "results" / "mlflow.db"
    procs, expected = [], {}
    for p in range(PROCESSES):
        runs = []
        for k in range(RUNS_PER_PROCESS):
            job = f"job-{p}-{k}"
            expected[job] = float(10 * p + k)
            runs.append(write_job_files(tmp_path / job, job, expected[job]))
        procs.append(track(store, {"runs": runs}, tmp_path / f"record-{p}.json"))
    for proc in procs:   # all started before any is awaited: they race on creating the store and the parent
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out

    by_job = child_runs(store)
    assert sorted(by_job) == sorted(expected)
    assert all(len(v) == 1 for v in by_job.values()), {j: len(v) for j, v in by_job.items()}
    mlflow_store = MlflowStore(store, "test")
    parents = mlflow_store.find_runs("exp")
    assert len(parents) == 1
    for job, [run] in by_job.items():
        m = run.data.metrics
        assert m["fid"] == expected[job] and m["is"] == expected[job] + 1
        assert m["nested.kid"] == pytest.approx(expected[job] / 10)
        assert {"precision", "recall", "loss"} <= set(m)
        history = mlflow_store.client.get_metric_history(run.info.run_id, "loss")
        assert [h.step for h in sorted(history, key=lambda h: h.step)] == list(range(STEPS))
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params["value"] == str(expected[job])


def test_a_rerun_replaces_the_run(tmp_path):
    store = tmp_path / "mlflow.db"
    for value in (1.0, 2.0):
        spec = {"runs": [write_job_files(tmp_path / "a", "sample/teacher", value)]}
        proc = track(store, spec, tmp_path / "record.json")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    [run] = child_runs(store)["sample/teacher"]
    assert run.data.metrics["fid"] == 2.0
    assert len(MlflowStore(store, "test").client.get_metric_history(run.info.run_id, "loss")) == STEPS
