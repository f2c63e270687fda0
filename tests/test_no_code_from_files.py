"""No code runs from a checkpoint file: every command that reads one refuses a crafted pickle, names the file and the
refused type, and the crafted payload (creating a marker file) never runs. The released and golden formats still load.
"""
import argparse
import os

import numpy as np
import pytest
import torch
from conftest import REPO, golden_dir

from dd.__main__ import main as cli
from dd.evaluation.sample_sets import write_sample_set
from dd.io import ArtefactError, read_checkpoint

RELEASE = REPO / "releases" / "tiny"
TOK, AR = RELEASE / "tiny_llamagen_tokenizer.safetensors", RELEASE / "tiny_llamagen_ar.safetensors"
CLASSIFIER = RELEASE / "digits_classifier_16.safetensors"


class _RunsCode:
    """Unpickling this calls os.system: what an attacker would put in a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted(tmp_path):
    """(crafted checkpoint in torch's zip format, the same as a legacy pickle file, marker path)."""
    marker = tmp_path / "code-ran"
    payload = {"model": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)}, "kind": "student",
               "extra": _RunsCode(marker)}
    zip_file = tmp_path / "crafted.pt"
    torch.save(payload, zip_file)
    legacy = tmp_path / "crafted_legacy.pt"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    return zip_file, legacy, marker


def test_reader_refuses_both_formats_and_names_file_and_type(crafted):
    zip_file, legacy, marker = crafted
    with pytest.raises(ArtefactError, match="refers to posix.system") as e:
        read_checkpoint(zip_file)
    assert str(zip_file) in str(e.value)
    with pytest.raises(ArtefactError, match="refers to posix.system") as e:  # no zip to scan: found while unpickling
        read_checkpoint(legacy)
    assert str(legacy) in str(e.value)
    assert not marker.exists()


def test_allowlist_admits_exactly_what_released_files_hold(tmp_path):
    # LlamaGen's training scripts save their argparse Namespace as "args" beside the weights
    path = tmp_path / "c2i_like.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(gpt_model="GPT-B", image_size=256),
                "steps": 10}, path)
    ck = read_checkpoint(path)
    assert ck["args"].gpt_model == "GPT-B" and torch.equal(ck["model"]["w"], torch.ones(2))
    # a harmless but unlisted class is refused all the same: the list is explicit, not "whatever looks safe"
    torch.save({"model": {}, "when": np.float64(1.0)}, path)
    with pytest.raises(ArtefactError, match="numpy"):
        read_checkpoint(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A two-pair set from the shipped tiny LlamaGen teacher (what distill needs before it loads anything else)."""
    d = tmp_path_factory.mktemp("pairs")
    assert cli(f"generate-pairs --family llamagen --tokenizer {TOK} --model {AR} --shard 0 --count 2 --chunk 2 "
               f"--out {d}/shard_00000.bin --no-progress".split()) == 0
    assert cli(f"index-shards --out {d}/index.json {d}/shard_00000.bin".split()) == 0
    return d / "index.json"


def _resume_dir(tmp_path, zip_file):
    d = tmp_path / "resume"
    d.mkdir()
    (d / "last.pt").write_bytes(zip_file.read_bytes())  # a crafted "interrupted run" to resume from
    return d


def _samples(tmp_path):
    path = tmp_path / "samples.npz"
    write_sample_set(path, np.zeros((4, 3, 16, 16), np.uint8), np.arange(4))
    return path


# each command that reads checkpoints, with the crafted file in one checkpoint position ({evil})
COMMANDS = {
    "generate-pairs tokenizer": "generate-pairs --family llamagen --tokenizer {evil} --model {ar} --shard 0 --count 2 "
                                "--out {tmp}/s.bin --no-progress",
    "generate-pairs model": "generate-pairs --family llamagen --tokenizer {tok} --model {evil} --shard 0 --count 2 "
                            "--out {tmp}/s.bin --no-progress",
    "released tokenizer": "generate-pairs --family llamagen --released --tokenizer {evil} --model {ar} --shard 0 "
                          "--count 2 --out {tmp}/s.bin --no-progress",
    "released VAR model": "generate-pairs --family var --released --tokenizer {evil} --model {evil} --shard 0 "
                          "--count 2 --out {tmp}/s.bin --no-progress",
    "sample student": "sample --family llamagen --tokenizer {tok} --model {ar} --method dd --num 2 --student {evil} "
                      "--steps 1 --out {tmp}/o.npz",
    "sample released student": "sample --family llamagen --tokenizer {tok} --model {ar} --method dd --num 2 "
                               "--student {evil} --released-student --split-step 1 --steps 1 --out {tmp}/o.npz",
    "distill teacher": "distill --family llamagen --tokenizer {tok} --model {evil} --pairs {pairs} --out {tmp}/d",
    "distill resume": "distill --family llamagen --tokenizer {tok} --model {ar} --pairs {pairs} --out {resume}",
    "train-teacher tokenizer": "train-teacher --config " + str(REPO / "config/tiny/llamagen.yaml") +
                               " --out {tmp}/t.pt --tokenizer {evil}",
    "release-tiny classifier": "release-tiny --classifier {evil} --out {tmp}/rel",
    "evaluate weights": "evaluate --samples {samples} --weights {evil} --no-isc --no-kid --out {tmp}/m.json",
    "verify-golden": "verify-golden {evil}",
    "bench teacher": "bench --quick --family llamagen --tokenizer {evil} --model {ar}",
}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_checkpoint_reading_command_refuses_crafted_files(name, crafted, pairs, tmp_path, capsys):
    zip_file, _, marker = crafted
    argv = COMMANDS[name].format(evil=zip_file, tok=TOK, ar=AR, tmp=tmp_path, samples=_samples(tmp_path), pairs=pairs,
                                 resume=_resume_dir(tmp_path, zip_file)).split()
    try:
        rc = cli(argv)
        err = capsys.readouterr().err
    except ArtefactError as e:  # commands that report through an exception of their own (verify-golden, bench)
        rc, err = 2, str(e)
    assert not marker.exists(), f"{name}: code from the file ran"
    assert rc != 0, f"{name}: accepted a crafted checkpoint"
    assert (str(zip_file) in err or "last.pt" in err) and "posix.system" in err, f"{name}: error does not name file and type: {err[-800:]}"


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_golden_files_still_load(family):
    pts = sorted(golden_dir(family).glob("*.pt"))
    assert pts
    for p in pts:
        ck = read_checkpoint(p)
        assert {"config", "state_dict", "inputs", "outputs"} <= set(ck), p.name


# ---------------------------------------------------------------------------------------------------------------------
# config values reach shell commands only quoted
# ---------------------------------------------------------------------------------------------------------------------
def test_config_values_in_shell_commands_run_nothing(tmp_path):
    """Strings a user puts in the config (MLflow store and experiment, tiny-teacher config paths) that would run a
    command if a rule pasted them into its shell line unquoted: every shell command of a dry run is executed with the
    dd CLI replaced by `true`, and the injected command never runs."""
    import subprocess
    import sys

    import yaml

    work = tmp_path / "work"
    work.mkdir()
    evil = "x$(touch INJECTED)"
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["mlflow"] = {"store": f"results/{evil}.db", "experiment": evil}
    configs = {}
    for family in ("llamagen", "var"):
        path = work / f"{evil}-{family}.yaml"
        path.write_text((REPO / "config" / "tiny" / f"{family}.yaml").read_text())
        configs[family] = str(path)
    classifier = work / f"{evil}-classifier.yaml"
    classifier.write_text((REPO / "config" / "tiny" / "classifier.yaml").read_text())
    config["tiny_teachers"] = {"configs": configs, "classifier": str(classifier)}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))

    commands = []
    for target in ("all", "tiny_teachers"):
        r = subprocess.run([sys.executable, "-m", "snakemake", target, "-n", "-p", "--cores", "1",
                            "-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", str(configfile)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        commands += [line.split("Shell command:", 1)[1] for line in (r.stdout + r.stderr).splitlines()
                     if "Shell command:" in line]
    reached = [c for c in commands if "INJECTED" in c]
    assert len(reached) >= 10, "the injected values should reach many shell commands"
    for command in reached:
        subprocess.run(["bash", "-c", command.replace("python -m dd", "true")], cwd=work, capture_output=True,
                       timeout=60)
    assert not (work / "INJECTED").exists(), "a config value ran as a shell command"
