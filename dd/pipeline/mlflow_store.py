"""MLflow tracking for the pipeline: a parent run per experiment, a child run per job, in an sqlite store.

Several pipeline jobs log at the same time (``snakemake --cores N``). Two things would go wrong with plain MLflow
calls: sqlite answers concurrent writers with "database is locked", and two jobs that both look for a run, find
none and create one, duplicate it (the very first jobs even race on creating the database tables). So every
access to the store happens under an exclusive ``fcntl`` lock on a file beside the database, and runs are found
by deterministic tags (``dd.experiment``, ``dd.job``, ``dd.role``), never remembered by id:

* the parent run of experiment E is the one active run tagged ``dd.role=parent, dd.experiment=E``;
* the child run of job J is the one active run tagged ``dd.role=child, dd.experiment=E, dd.job=J``, nested under
  the parent (``mlflow.parentRunId``) and named J. A job that runs again (a rerun after a failure or a config
  change) replaces its child run: the old one is deleted and a fresh one holds the new results, so the store
  has exactly one run per job, and never a mix of two attempts' metrics.

Artifacts go to ``<store folder>/mlartifacts/`` (for ``results/mlflow.db``: ``results/mlartifacts/``), so nothing
is written outside ``results/``. MLflow stores artifact locations as absolute URIs; a ``results/`` folder copied to
another place (a cluster run browsed on a laptop) is re-rooted in place by ``relocate``
(``python -m dd track relocate --store PATH/mlflow.db``). The experiment is tagged as a model-training experiment
(``mlflow.experimentKind``); MLflow 3.17's UI still opens on its global GenAI / Model-training switch (default GenAI),
so the README's address adds ``?workflowType=machine_learning`` to open the runs table.

Jobs do not log to MLflow while they run: they write files, and ``python -m dd track`` records them afterwards.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
# the experiment's kind as MLflow records it: model training (runs, charts), not GenAI (the 3.17 UI's first view follows
# its own GenAI / Model-training switch, see the module docstring)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
ARTIFACT_FOLDER = "mlartifacts"
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAMS_PER_BATCH = 100


def _quiet_mlflow() -> None:
    # alembic / mlflow announce table creation on every fresh store at INFO; keep job logs readable
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MlflowStore:
    """An sqlite MLflow store shared safely by many processes (see the module docstring)."""

    def __init__(self, db_path: str | os.PathLike = "results/mlflow.db", experiment: str = "distilled-decoding",
                 lock_timeout: float = 600.0):
        self.db_path = Path(db_path).absolute()
        self.experiment_name = experiment
        self.lock_path = self.db_path.with_name(self.db_path.name + ".lock")
        self.artifact_root = self.db_path.parent / ARTIFACT_FOLDER
        self.lock_timeout = lock_timeout
        self._client = None
        self._experiment_id: str | None = None
        self._depth = 0
        self._lock_file = None

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    # -- locking --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access to the store across processes (re-entrant within this object)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.close()
                    raise TimeoutError(f"could not lock the MLflow store {self.db_path} within {self.lock_timeout}s "
                                       f"(held through {self.lock_path})") from None
                time.sleep(0.05)
        self._depth, self._lock_file = 1, f
        try:
            yield
        finally:
            self._depth = 0
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    @property
    def client(self):
        """The MlflowClient; created (and the database initialised) under the lock."""
        if self._client is None:
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            with self.locked():
                client = MlflowClient(tracking_uri=self.tracking_uri)
                client.search_experiments(max_results=1)  # forces creation / migration of the tables now
                self._client = client
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            with self.locked():
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    self.artifact_root.mkdir(parents=True, exist_ok=True)
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_root.as_uri(),
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                else:
                    if exp.lifecycle_stage != "active":
                        self.client.restore_experiment(exp.experiment_id)
                    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # a store made before the tag
                        self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                    self._experiment_id = exp.experiment_id
        return self._experiment_id

    # -- runs -----------------------------------------------------------------------------------------------------
    def find_runs(self, experiment: str, job: str | None = None) -> list:
        """Active runs of an experiment: its parent (job None) or the child of ``job``."""
        from mlflow.entities import ViewType

        flt = f"tags.`dd.experiment` = '{_q(experiment)}'"
        flt += f" and tags.`dd.role` = 'child' and tags.`dd.job` = '{_q(job)}'" if job else " and tags.`dd.role` = 'parent'"
        with self.locked():
            return self.client.search_runs([self.experiment_id()], filter_string=flt,
                                           run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)

    def parent_run(self, experiment: str, tags: dict | None = None) -> str:
        """The run id of the experiment's parent run, created on first use."""
        with self.locked():
            runs = self.find_runs(experiment)
            if runs:
                return sorted(runs, key=lambda r: r.info.start_time)[0].info.run_id
            run = self.client.create_run(self.experiment_id(), run_name=experiment,
                                         tags={"dd.experiment": experiment, "dd.role": "parent", **_str(tags or {})})
            return run.info.run_id

    def child_run(self, experiment: str, job: str, tags: dict | None = None, replace: bool = True) -> str:
        """The run id of a job's child run: a fresh run (replacing an earlier attempt's), or with ``replace=False``
        the existing one."""
        with self.locked():
            parent = self.parent_run(experiment)
            existing = self.find_runs(experiment, job)
            if existing and not replace:
                return existing[0].info.run_id
            for run in existing:
                self.client.delete_run(run.info.run_id)
            run = self.client.create_run(
                self.experiment_id(), run_name=job,
                tags={"dd.experiment": experiment, "dd.job": job, "dd.role": "child", "mlflow.parentRunId": parent,
                      **_str(tags or {})})
            return run.info.run_id

    # -- logging --------------------------------------------------------------------------------------------------
    def log(self, run_id: str, *, params: dict | None = None, metrics: dict | None = None,
            series: Iterable[tuple[int | None, dict]] = (), tags: dict | None = None,
            artifacts: Iterable[tuple[str | os.PathLike, str | None]] = ()) -> int:
        """Log params, final metrics, step-wise metric series ``[(step, {name: value})]``, tags and artifact files
        ``[(path, artifact folder)]`` to a run; returns the number of metric values logged."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if _is_number(v)]
        for step, row in series:
            values += [Metric(k, float(v), now, int(step or 0)) for k, v in row.items() if _is_number(v)]
        param_list = [Param(_key(k), _param(v)) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        with self.locked():
            existing = self.client.get_run(run_id).data.params if param_list else {}
            # MLflow params are immutable: a value already logged (identical or not) is left as it is
            param_list = [p for p in param_list if p.key not in existing]
            for i in range(0, len(values), BATCH):
                self.client.log_batch(run_id, metrics=values[i:i + BATCH])
            for i in range(0, len(param_list), PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=param_list[i:i + PARAMS_PER_BATCH])
            for i in range(0, len(tag_list), PARAMS_PER_BATCH):
                self.client.log_batch(run_id, tags=tag_list[i:i + PARAMS_PER_BATCH])
            for path, folder in artifacts:
                if Path(path).is_file():
                    self.client.log_artifact(run_id, str(path), folder)
        return len(values)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        with self.locked():
            self.client.set_terminated(run_id, status)


def _q(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace("'", "\\'")


def _str(d: dict) -> dict:
    return {str(k): str(v) for k, v in d.items()}


def _key(k: str) -> str:
    # MLflow keys: alphanumerics, _ - . space / (and :); anything else becomes _
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in str(k))


def _param(v: Any) -> str:
    s = str(v)
    return s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def relocate(db_path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Re-root a store that was moved or copied: every experiment whose artifacts lived in an ``mlartifacts`` folder
    (this pipeline's layout) elsewhere now points at the ``mlartifacts`` folder beside ``db_path``, and so do its
    runs' artifact URIs. Returns (experiment, old root, new root) per experiment changed; idempotent."""
    import sqlite3
    import urllib.parse

    store = MlflowStore(db_path)
    if not store.db_path.is_file():
        raise FileNotFoundError(f"no MLflow store at {store.db_path}")
    new_root = store.artifact_root.as_uri()
    changed = []
    with store.locked():
        con = sqlite3.connect(store.db_path)
        try:
            with con:  # one transaction: all experiments and runs, or nothing
                rows = con.execute("SELECT experiment_id, name, artifact_location FROM experiments").fetchall()
                for exp_id, name, old_root in rows:
                    parsed = urllib.parse.urlparse(old_root or "")
                    if old_root == new_root or parsed.scheme != "file" or Path(parsed.path).name != ARTIFACT_FOLDER:
                        continue
                    con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                                (new_root, exp_id))
                    con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                                "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                                (new_root, len(old_root) + 1, exp_id, len(old_root), old_root))
                    changed.append((name, old_root, new_root))
        finally:
            con.close()
    return changed
