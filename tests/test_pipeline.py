"""The whole workflow through Snakemake on a small configuration of the embedded default (both families).

One full run (A) checks the products: tables with the agreed columns and method names, figures, the MLflow
store (one run per job), and that nothing is written outside results/. A second run (B), started from a clean
folder, has its whole Snakemake process group SIGKILLed in the middle of pair generation and is rerun with
``--rerun-incomplete`` as a user would; its pair shards must be byte-identical to run A's (pair generation
starts from the same shipped teachers in B, so this also shows the default is bit-reproducible run to run).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TABLE_COLUMNS = ["teacher", "method", "steps", "fid", "fid_std", "is", "is_std", "precision", "precision_std", "recall",
                 "recall_std", "teacher_nll_bits", "teacher_nll_bits_std", "seconds_per_image", "speedup", "kid",
                 "fid_vs_teacher", "fid_vs_teacher_std", "classifier_accuracy", "params", "batch_size", "num", "set"]

pytestmark = pytest.mark.skipif(not (REPO / "Snakefile").exists(), reason="no Snakefile in this checkout")


def small_config(folder: Path) -> Path:
    """config/config.yaml shrunk: the shipped teachers, 2 shards of 24 pairs, 12 distillation steps, 40 samples."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for name, exp in config["experiments"].items():
        family = exp["teacher"]["family"]
        exp["pairs"].update(num_pairs=48, shard_size=24, chunk=8)
        exp["distill"].update(batch_size=16, max_steps=12, checkpoint_every=4, eval_every=6)
        exp["sample"].update(num=40, batch_size=20)
        exp["evaluation"].update(batch_size=20, splits=2)
        if family == "var":
            exp["ablations"] = {"timesteps": [[1, 2]], "pair_set_sizes": [24], "max_steps": 6, "eval_every": 3}
        else:
            exp["sample"].update(skip=[2, 8], dd_teacher_starts=[5])
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, configfile: Path, *extra: str, **kw) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(REPO / "Snakefile"),
           "--directory", str(workdir), *extra, "--configfile", str(configfile)]   # --configfile takes nargs
    # output to a file, not a pipe: an unread pipe would fill up and stall Snakemake
    log = open(workdir.with_name(workdir.name + f"-{time.monotonic_ns()}.log"), "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    proc.wait(timeout=timeout)
    out = output(proc)
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    configfile = small_config(folder)
    t0 = time.monotonic()
    out = finish(snakemake(folder / "a", configfile))
    print(f"\n[pipeline] small configuration, both families: {time.monotonic() - t0:.0f} s")
    return folder, configfile, out


def test_tables_figures_and_report(run_a):
    folder, _, _ = run_a
    results = folder / "a" / "results"
    for exp, family in (("tiny_var", "var"), ("tiny_llamagen", "llamagen")):
        t1 = pd.read_csv(results / exp / "tables" / "table1.csv")
        t2 = pd.read_csv(results / exp / "tables" / "table2.csv")
        for t in (t1, t2):
            assert list(t.columns) == TABLE_COLUMNS
            assert t[["fid", "fid_std", "is_std", "precision", "precision_std", "recall", "recall_std",
                      "seconds_per_image", "speedup"]].notna().all().all()
            assert (t["fid_std"] > 0).all()
            full = ~t["method"].str.startswith("skip-")     # skip-n images lack tokens: no teacher NLL
            assert t.loc[full, ["teacher_nll_bits", "teacher_nll_bits_std"]].notna().all().all()
            assert t.loc[~full, "teacher_nll_bits"].isna().all()
        methods = set(t1["method"])
        assert {"teacher", "onestep*", "dd"} <= methods
        assert any(m.startswith("skip-") for m in methods)
        assert sorted(t1.loc[t1["method"] == "dd", "steps"]) == [1, 2]
        assert set(t2["method"]) - {"teacher"} and all(m.startswith("dd-teacher-") for m in t2["method"]
                                                        if m != "teacher")
        teacher_row = t1[t1["method"] == "teacher"].iloc[0]
        assert teacher_row["speedup"] == pytest.approx(1.0)
        assert (results / exp / "tables" / "table1.md").read_text().count("|") > 20
        assert (results / exp / "figures" / "fig1_fid_vs_time.png").stat().st_size > 1000
    for fig in ("fig6_fid_vs_progress_timesteps.png", "fig7_fid_vs_progress_pair_sets.png"):
        assert (results / "tiny_var" / "figures" / fig).stat().st_size > 1000
    # nothing outside results/ (and Snakemake's own folder)
    assert {p.name for p in (folder / "a").iterdir()} <= {"results", "resources", ".snakemake"}


def test_mlflow_has_one_run_per_job(run_a):
    from dd.pipeline.mlflow_store import MlflowStore  # mlflow is a hard dependency: an import error fails the test

    folder, _, _ = run_a
    store = MlflowStore(folder / "a" / "results" / "mlflow.db", "distilled-decoding")
    for exp in ("tiny_var", "tiny_llamagen"):
        assert len(store.find_runs(exp)) == 1
        runs = store.client.search_runs([store.experiment_id()], max_results=1000,
                                        filter_string=f"tags.`dd.experiment` = '{exp}' and tags.`dd.role` = 'child'")
        jobs = [r.data.tags["dd.job"] for r in runs]
        assert len(jobs) == len(set(jobs)), sorted(jobs)
        assert "distill/main" in jobs
        assert any(j.startswith("pairs/shard_") for j in jobs)
        sample_runs = [r for r in runs if r.data.tags["dd.job"].startswith("sample/")]
        # metric names read as the paper tables' columns
        table_names = {"fid", "fid_std", "is", "is_std", "precision", "recall", "seconds_per_image", "speedup"}
        assert sample_runs and all(table_names <= set(r.data.metrics) for r in sample_runs), \
            sorted(sample_runs[0].data.metrics)
        distill = [r for r in runs if r.data.tags["dd.job"].startswith("distill/")]
        history = store.client.get_metric_history(distill[0].info.run_id, "train/loss")
        assert len(history) >= 2


def dry_run_jobs(dry_run_output: str):
    """(rule, wildcards, job block) of each job a `snakemake -n` output lists."""
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        wildcards = re.search(r"^\s+wildcards: (.+)$", block, re.M)
        if rule:
            yield rule.group(1), wildcards.group(1).strip() if wildcards else "", block


def scheduled_jobs(dry_run_output: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of each job a `snakemake -n` output lists."""
    return {(rule, wildcards) for rule, wildcards, _ in dry_run_jobs(dry_run_output)}


def job_priorities(dry_run_output: str) -> dict[tuple[str, str], float]:
    """(rule, wildcards) -> priority of each job a `snakemake -n` output lists with one."""
    out = {}
    for rule, wildcards, block in dry_run_jobs(dry_run_output):
        priority = re.search(r"^\s+priority: ([\d.]+)$", block, re.M)
        if priority:
            out[rule, wildcards] = float(priority.group(1))
    return out


def test_the_longest_distillation_and_its_pairs_start_first(tmp_path):
    # jobs of equal priority start in no fixed order: a default run that distilled tiny VAR before tiny LlamaGen's
    # pairs were made ran minutes longer. The experiment whose main distillation is longest (steps x batch) must
    # have its pair shards and distillation ahead of the other experiments', and main runs ahead of ablations.
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    length = {name: exp["distill"]["max_steps"] * exp["distill"]["batch_size"]
              for name, exp in config["experiments"].items()}
    longest, shortest = max(length, key=length.get), min(length, key=length.get)
    assert longest != shortest
    jobs = job_priorities(finish(snakemake(tmp_path / "w", REPO / "config" / "config.yaml", "-n")))
    distill = {w: v for (r, w), v in jobs.items() if r == "distill"}
    shards = {w: v for (r, w), v in jobs.items() if r == "generate_pairs"}
    assert min(v for w, v in shards.items() if f"={longest}," in w) > max(
        v for w, v in shards.items() if f"={shortest}," in w), shards
    main = {name: distill[f"experiment={name}, run=main"] for name in length}
    assert main[longest] > main[shortest], distill
    assert main[longest] > max(shards.values()), (distill, shards)   # a ready distillation before any shard
    ablations = [v for w, v in distill.items() if not w.endswith("run=main")]
    assert ablations and max(ablations) < main[shortest], distill
    # priorities do not pass to a job's inputs: the teacher files of the longest chain are fetched first as well
    downloads = {w.split("=", 1)[1]: v for (r, w), v in jobs.items() if r == "download"}
    teacher = {name: config["experiments"][name]["teacher"]["name"] for name in length}
    own = {name: [v for f, v in downloads.items() if f.startswith(teacher[name] + "_")] for name in length}
    assert own[longest] and own[shortest] and min(own[longest]) > max(own[shortest]), downloads
    assert jobs["digits_reference", "size=16"] >= main[longest] - 1, jobs   # the distillations' periodic FID


def test_a_changed_setting_reruns_the_jobs_it_feeds(run_a):
    # Snakemake reruns a job when its recorded params change, and it records only params that are functions of the
    # wildcards: a setting passed through a function of `input` was once ignored, and a changed lr kept the old
    # student. Each setting here must reach its job's params, and an unchanged experiment must stay as it is.
    folder, configfile, _ = run_a
    config = yaml.safe_load(configfile.read_text())
    config["experiments"]["tiny_var"]["distill"]["lr"] *= 2
    config["experiments"]["tiny_llamagen"]["sample"]["num"] += config["experiments"]["tiny_llamagen"]["sample"][
        "batch_size"]
    changed = folder / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = scheduled_jobs(finish(snakemake(folder / "a", changed, "-n")))
    assert ("distill", "experiment=tiny_var, run=main") in jobs, sorted(jobs)
    assert ("sample", "experiment=tiny_llamagen, set=teacher") in jobs, sorted(jobs)
    assert ("evaluate", "experiment=tiny_llamagen, set=teacher") in jobs, sorted(jobs)
    assert not {j for j in jobs if j[0] == "distill" and "tiny_llamagen" in j[1]}, sorted(jobs)
    assert ("sample", "experiment=tiny_var, set=teacher") not in jobs, sorted(jobs)


def test_killed_snakemake_then_rerun_incomplete_gives_identical_shards(run_a):
    folder, configfile, _ = run_a
    workdir = folder / "b"
    proc = snakemake(workdir, configfile, "pair_sets")
    pairs = workdir / "results" / "tiny_var" / "pairs"
    # kill the whole process group while a shard is half written (some chunks committed to its .part file)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 0 for p in pairs.glob("shard_*.bin.part") if p.exists()):
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run ended before it could be killed:\n" + output(proc)[-4000:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = sorted(p.name for p in pairs.glob("shard_*.bin.part"))
    print(f"\n[pipeline] SIGKILLed the snakemake process group with partial shards {partial}")
    # the README's resume: clear the killed run's locks (its pid is gone), then rerun the incomplete jobs
    subprocess.run([sys.executable, "-m", "dd", "clear-stale-locks", "--directory", str(workdir)], check=True)
    out = finish(snakemake(workdir, configfile, "pair_sets", "--rerun-incomplete"))
    print(f"\n[pipeline] rerun after SIGKILL: {out.count('Finished jobid')} jobs")
    for exp in ("tiny_var", "tiny_llamagen"):
        a = sorted((folder / "a" / "results" / exp / "pairs").glob("shard_*.bin"))
        b = sorted((workdir / "results" / exp / "pairs").glob("shard_*.bin"))
        assert [p.name for p in a] == [p.name for p in b] and a
        for pa, pb in zip(a, b):
            assert pa.read_bytes() == pb.read_bytes(), f"{exp}/{pa.name} differs between runs"
        assert not list((workdir / "results" / exp / "pairs").glob("*.part*"))


def test_text_to_image_pipeline_small(tmp_path):
    """config/t2i_tiny.yaml shrunk, through Snakemake: prompt sets and their caption features (one job each), pairs
    and distillation on the train prompts, sample sets on the eval prompts, tables with prompt_accuracy after
    classifier_accuracy, and the prompt grid."""
    config = yaml.safe_load((REPO / "config" / "t2i_tiny.yaml").read_text())
    exp = config["experiments"]["tiny_t2i"]
    exp["pairs"].update(num_pairs=32, shard_size=16, chunk=8)
    exp["distill"].update(batch_size=8, max_steps=6, checkpoint_every=3)
    exp["sample"].update(num=24, batch_size=12, skip=[8], onestep_pairs=32)
    exp["evaluation"].update(batch_size=12, splits=2)
    config["mlflow"]["enabled"] = False
    configfile = tmp_path / "t2i.yaml"
    configfile.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    finish(snakemake(tmp_path / "w", configfile))
    print(f"\n[pipeline] small text-to-image configuration: {time.monotonic() - t0:.0f} s")
    results = tmp_path / "w" / "results" / "tiny_t2i"
    at = TABLE_COLUMNS.index("classifier_accuracy") + 1
    columns = TABLE_COLUMNS[:at] + ["prompt_accuracy", "prompt_accuracy_std"] + TABLE_COLUMNS[at:]
    t1 = pd.read_csv(results / "tables" / "table1.csv")
    assert list(t1.columns) == columns
    assert set(t1["method"]) == {"teacher", "skip-8", "onestep*", "dd"}
    # onestep*'s pair set is on the evaluation prompts: its labels are rows of the 258 eval prompts
    index = json.loads((results / "onestep_pairs" / "index.json").read_text())
    assert index["num_pairs"] == 32 and index["config"]["num_classes"] == 258, index
    assert t1["prompt_accuracy"].between(0, 1).all() and t1["prompt_accuracy_std"].notna().all()
    assert list(pd.read_csv(results / "tables" / "table2.csv")["method"]) == ["teacher", "dd-teacher-11-21"]
    for split, rows in (("train", 1064), ("eval", 258)):
        assert (results / "captions" / f"{split}.npz").is_file()
        assert len((results / "prompts" / f"prompts_{split}.tsv").read_text().splitlines()) == rows + 1
    assert (results / "figures" / "prompt_grid.png").stat().st_size > 1000
