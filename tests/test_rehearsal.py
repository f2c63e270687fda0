"""Rehearsals of the paper configurations (config/rehearsal/*.yaml): random-weight stand-ins in the released formats,
the rehearsal configs' faithfulness to the paper configs, and the CI-sized rehearsal of LlamaGen-B through Snakemake."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, golden_dir

from dd.pipeline import config as ddconfig
from dd.pipeline.random_weights import random_release

PAPER = ["var_d16", "llamagen_b", "llamagen_l", "released_dd"]
# what a rehearsal may change: counts, device, resources, weights, the MLflow experiment name
COUNTS = {"num_pairs", "shard_size", "chunk", "batch_size", "micro_batch_size", "epochs", "max_steps", "checkpoint_every", "num",
          "splits", "isc_splits", "kid_subsets"}


def leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node


@pytest.mark.parametrize("name", PAPER)
def test_rehearsal_keeps_every_setting_of_the_paper_config_but_the_counts(name):
    paper = ddconfig.load_config(REPO / "config" / f"{name}.yaml", base_dir=REPO)
    rehearsal = ddconfig.load_config(REPO / "config" / "rehearsal" / f"{name}.yaml", base_dir=REPO)
    assert paper["experiments"].keys() == rehearsal["experiments"].keys()
    a, b = dict(leaves(paper)), dict(leaves(rehearsal))
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    allowed = {k for k in changed if k.split(".")[-1] in COUNTS or ".resources." in k
               or k in ("device", "threads", "mlflow.experiment") or k.endswith(".teacher.weights")}
    assert changed == allowed, f"{name}: settings that differ beyond the counts: {sorted(changed - allowed)}"
    for exp in rehearsal["experiments"].values():
        assert exp["teacher"]["weights"] == "random"
        if "distill" in exp:  # data-parallel like the paper's multi-GPU job; two VAR-d16 or LlamaGen-L processes
            # exceed 24 GB
            assert exp["resources"]["distill"]["processes"] == (1 if name in ("var_d16", "llamagen_l") else 2)


def _released_entries(obj, prefix=""):
    """key -> (shape, dtype) of a released file's tensors, flattened through its nesting."""
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_released_entries(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (list(v.shape), str(v.dtype).removeprefix("torch."))
    return out


def _manifest_entries(m):
    from dd.families.llamagen.golden import manifest_entries

    return manifest_entries(m)


@pytest.mark.parametrize("family,manifest,release,nesting", [
    ("llamagen", "manifest_vq16.json", "llamagen_vq16", "model."),
    ("llamagen", "manifest_gpt_b.json", "llamagen_b", "model."),
    ("llamagen", "manifest_gpt_l.json", "llamagen_l", "model."),
    ("llamagen", "manifest_dd_b.json", "dd_llamagen_b", "ema."),
    ("var", "manifest_vqvae_ch160v4096z32.json", "vae_var", ""),
    ("var", "manifest_var_d16.json", "var_d16", ""),
    ("var", "manifest_var_d24.json", "var_d24", ""),
    ("var", "manifest_dd_d16.json", "dd_var_d16", "trainer.ema_parameters."),
])
def test_random_stand_ins_have_the_released_layout(family, manifest, release, nesting):
    m = json.loads((golden_dir(family) / manifest).read_text())
    with torch.device("meta"):  # shapes only: nothing allocated
        ours = _released_entries(random_release(release))
    ref = {nesting + k: v for k, v in _manifest_entries(m).items()}
    assert ours == ref, f"{release}: differs in {sorted(set(ours) ^ set(ref))[:5]}"


def test_random_statistic_inception_and_lpips_backbone_load(tmp_path):
    from dd.evaluation.reference import load_fid_statistics
    from dd.method.distill import DistillConfig, build_lpips
    from dd.pipeline.random_weights import write_random_release

    write_random_release("fid_imagenet256", tmp_path / "statistic.pth")
    stats = load_fid_statistics(tmp_path / "statistic.pth")
    assert stats.dim == 2048 and torch.linalg.eigvalsh(torch.from_numpy(stats.sigma)).min() > 0
    vgg = "https://download.pytorch.org/models/vgg16-397923af.pth"
    write_random_release(vgg, tmp_path / "vgg16.pth", seed=3)
    lpips = build_lpips(DistillConfig(emb_loss="lpips", lpips_backbone=str(tmp_path / "vgg16.pth")), "cpu")
    first = lpips.net.slice1[0].weight  # the backbone's first conv comes from the file
    assert torch.equal(first, torch.load(tmp_path / "vgg16.pth", weights_only=True)["features.0.weight"])
    with pytest.raises(ValueError, match="no random stand-in"):
        random_release("https://example.org/unknown.bin")


def test_ci_rehearsal_of_llamagen_b(tmp_path):
    """Every stage of config/rehearsal/llamagen_b.yaml (LlamaGen-B, 111M parameters, and its 72M-parameter VQ-16 at
    real size) through Snakemake on the CPU: random stand-ins, pair shards, distillation data-parallel on 2 gloo
    processes with a checkpoint, every sample set, evaluation with Inception-v3 against the FID statistic, tables,
    MLflow. The per-job benchmark files record time and peak memory."""
    work = tmp_path / "work"
    work.mkdir()
    # CI's time budget: one skip-n and one teacher-involved set (every method still runs); the documented command
    # runs the rehearsal config as it is
    config = yaml.safe_load((REPO / "config/rehearsal/llamagen_b.yaml").read_text())
    config["experiments"]["llamagen_b"]["sample"].update(skip=[156], dd_teacher_starts=[61])
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(REPO / "Snakefile"),
                        "--directory", str(work), "--configfile", str(tmp_path / "rehearsal.yaml")],
                       capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    results = work / "results" / "llamagen_b"
    import pandas as pd

    t1 = pd.read_csv(results / "tables" / "table1.csv")
    assert set(t1["method"]) == {"teacher", "skip-156", "onestep*", "dd"}, t1
    assert sorted(t1.loc[t1["method"] == "dd", "steps"]) == [1, 2]
    assert (t1["fid"] > 0).all(), t1
    t2 = pd.read_csv(results / "tables" / "table2.csv")
    assert "dd-teacher-61-81" in set(t2["method"]), t2
    assert len(list((results / "pairs").glob("shard_*.bin"))) == 2
    log = (results / "logs" / "distill" / "main.log").read_text()
    assert "data-parallel, 2 processes (gloo)" in log, log[-2000:]
    assert (results / "distill" / "main" / "last.pt").is_file()
    metrics = json.loads((results / "metrics" / "dd-1step.json").read_text())
    assert metrics["fid"] > 0 and set(metrics["not_computed"]) == {"kid", "prc"}
    assert len(list((results / "benchmarks").rglob("*.tsv"))) >= 20
    assert not list(Path(work, "resources").glob("checkpoints/*"))  # nothing downloaded
    # the paper config's declared job memory against what this rehearsal measured, scaled to the paper's counts
    r = subprocess.run([sys.executable, "-m", "dd", "check-resources", "--configfile", str(REPO / "config/llamagen_b.yaml"),
                        "--rehearsal", str(tmp_path / "rehearsal.yaml"), "--benchmarks", str(work / "results")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {line.split()[1] for line in r.stdout.splitlines()[1:]} == {"pairs", "distill", "sample", "evaluate"}


def _benchmarks(root: Path, rss: dict[str, float]) -> None:
    """Snakemake benchmark files with the given max_rss (MB) per stage pattern."""
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, mb in rss.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"1.0\t0:00:01\t{mb}\t1\t1\t1\t0\t0\t0\t1\n")


def test_resource_check_refuses_allocations_too_small_or_ten_times_too_large(tmp_path):
    from dd.pipeline.resources import MAX_OVER, check_resources

    config = yaml.safe_load((REPO / "config/llamagen_b.yaml").read_text())
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(config))
    bench = tmp_path / "results" / "llamagen_b" / "benchmarks"
    _benchmarks(bench, {"pairs/shard_00000.tsv": 1500, "pairs/shard_00001.tsv": 1400, "distill/main.tsv": 12000,
                        "samples/teacher.tsv": 2800, "metrics/teacher.tsv": 1100})
    rehearsal = REPO / "config/rehearsal/llamagen_b.yaml"
    checks = {c.stage: c for c in check_resources(tmp_path / "paper.yaml", rehearsal, tmp_path / "results")}
    assert all(c.problem is None for c in checks.values()), checks
    assert checks["pairs"].measured_mb == 1500                     # the peak over a stage's jobs
    # the sample set at the paper's count: 50k uint8 images of 256 px on top of what the rehearsal measured
    assert checks["sample"].need_mb > 2800 + 50_000 * 3 * 256 * 256 / 2 ** 20 - 1

    res = config["experiments"]["llamagen_b"]["resources"]
    res["sample"]["mem_mb"] = int(checks["sample"].need_mb) - 1    # would be killed for memory
    res["evaluate"]["mem_mb"] = int(checks["evaluate"].need_mb * (MAX_OVER + 1))   # asks for 11x
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(config))
    checks = {c.stage: c for c in check_resources(tmp_path / "paper.yaml", rehearsal, tmp_path / "results")}
    assert "killed for memory" in checks["sample"].problem
    assert "11.0x" in checks["evaluate"].problem
    assert checks["pairs"].problem is None and checks["distill"].problem is None


def test_gpu_measurement_needs_a_cuda_device_and_says_so():
    # --gpu-measure runs the real stages on CUDA; on a machine without one it stops before building any model
    r = subprocess.run([sys.executable, "-m", "dd", "check-resources", "--configfile", str(REPO / "config/llamagen_b.yaml"),
                        "--gpu-measure", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--gpu-measure needs a CUDA device" in r.stderr
    r = subprocess.run([sys.executable, "-m", "dd", "check-resources", "--configfile", str(REPO / "config/llamagen_b.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--rehearsal" in r.stderr and "--gpu-measure" in r.stderr
