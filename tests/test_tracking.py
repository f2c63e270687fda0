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


def _store_with_artifacts(results: Path) -> tuple[MlflowStore, dict]:
    """A store under results/ with a parent and a child run carrying a table and a grid, as the pipeline logs them."""
    (results / "tables").mkdir(parents=True)
    (results / "tables" / "table1.csv").write_text("teacher,method,steps,fid\nt,dd,1,3.5\n")
    (results / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    store = MlflowStore(results / "mlflow.db", "browse")
    parent = store.parent_run("exp")
    store.log(parent, artifacts=[(results / "tables" / "table1.csv", "tables")])
    store.finish(parent)
    child = store.child_run("exp", "sample/dd-1step", tags={"method": "dd"})
    store.log(child, metrics={"fid": 3.5, "fid_std": 0.2}, artifacts=[(results / "grid.png", "grids")])
    store.finish(child)
    return store, {parent: "tables/table1.csv", child: "grids/grid.png"}


def test_experiment_opens_on_its_runs(tmp_path):
    store, _ = _store_with_artifacts(tmp_path / "results")
    exp = store.client.get_experiment(store.experiment_id())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_moved_results_folder_browses_after_relocate(tmp_path):
    import shutil

    from mlflow.tracking import MlflowClient

    _, files = _store_with_artifacts(tmp_path / "cluster" / "results")
    shutil.move(tmp_path / "cluster" / "results", tmp_path / "laptop-results")
    db = tmp_path / "laptop-results" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id, path = next(iter(files.items()))
    with pytest.raises(Exception):  # the store still points at the folder it was written in
        client.download_artifacts(run_id, path, str(tmp_path / "before"))
    r = subprocess.run([sys.executable, "-m", "dd", "track", "relocate", "--store", str(db)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 experiment(s) re-rooted" in r.stdout, r.stdout + r.stderr
    for run_id, path in files.items():
        got = Path(client.download_artifacts(run_id, path, str(tmp_path / "after" / run_id)))
        assert got.read_bytes() == (tmp_path / "laptop-results" / "mlartifacts").joinpath(
            *Path(client.get_run(run_id).info.artifact_uri.split("mlartifacts/", 1)[1]).parts, path).read_bytes()
    again = subprocess.run([sys.executable, "-m", "dd", "track", "relocate", "--store", str(db)],
                           capture_output=True, text=True, timeout=120)
    assert "0 experiment(s) re-rooted" in again.stdout  # idempotent


def test_mlflow_server_serves_runs_and_artifacts(tmp_path):
    """What a person looks for in `mlflow ui`, through the server's REST API: the experiment (model-training kind),
    its parent and child runs, a sample grid and the tables as artifacts."""
    import socket
    import time
    import urllib.request

    store, files = _store_with_artifacts(tmp_path / "results")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", store.tracking_uri, "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def get(path: str) -> dict:
        with urllib.request.urlopen(base + path, timeout=10) as resp:
            return json.loads(resp.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                exp = get("/experiments/get-by-name?experiment_name=browse")["experiment"]
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        req = urllib.request.Request(base + "/runs/search", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode())
        with urllib.request.urlopen(req, timeout=10) as resp:
            runs = json.loads(resp.read())["runs"]
        roles = sorted({t["key"]: t["value"] for t in r["data"]["tags"]}["dd.role"] for r in runs)
        assert roles == ["child", "parent"]
        for run_id, path in files.items():
            folder = path.split("/")[0]
            listed = get(f"/artifacts/list?run_id={run_id}&path={folder}")["files"]
            assert [f["path"] for f in listed] == [path]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
