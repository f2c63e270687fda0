"""Bad pipeline configurations fail before any job, with a message that names the key and what is allowed."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dd.pipeline import config as ddconfig
from dd.pipeline import plan as ddplan

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
PAPER_CONFIGS = ["var_d16", "var_d20", "var_d24", "llamagen_b", "llamagen_l", "released_dd", "llamagen_t2i"]


def problems_of(config) -> str:
    with pytest.raises(ddconfig.ConfigError) as e:
        ddconfig.check_config(config, base_dir=REPO)
    return str(e.value)


def mutated(path: str, value):
    """The default config with the value at a dotted path (list items as [i]) replaced."""
    config = copy.deepcopy(DEFAULT)
    *parents, last = _split(path)
    node = config
    for p in parents:
        node = node[p]
    node[last] = value
    return config


def _split(path: str):
    out = []
    for part in path.split("."):
        if "[" in part:
            name, *idx = part.replace("]", "").split("[")
            out += [name, *map(int, idx)]
        else:
            out.append(part)
    return out


def leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def test_default_and_paper_configs_are_valid():
    ddconfig.check_config(copy.deepcopy(DEFAULT), base_dir=REPO)
    for name in PAPER_CONFIGS:
        checked = ddconfig.load_config(REPO / "config" / f"{name}.yaml", base_dir=REPO)
        for exp_name, exp in checked["experiments"].items():
            plan = ddplan.plan(exp_name, exp, REPO)
            if "distill" in exp:   # the config checks name the sets the plan makes
                assert list(plan.sets) == ddconfig.sample_set_names(exp["sample"], exp["distill"]["timesteps"])
            if "pairs" in exp and not exp["teacher"].get("released_student"):
                assert len(plan.shards) == exp["pairs"]["num_pairs"] // exp["pairs"]["shard_size"]


LEAVES = [(k, v) for k, v in leaves(DEFAULT)]


@pytest.mark.parametrize("key,value", LEAVES, ids=[k for k, _ in LEAVES])
def test_every_key_of_the_default_config_is_typed(key, value):
    """A value of the wrong type at any key of config/config.yaml is reported under that key."""
    wrong = {"not": "a scalar"} if not isinstance(value, dict) else "a string"
    message = problems_of(mutated(key, wrong))
    # list items are reported at the item or at the list itself
    reported = key.split("[")[0]
    assert reported in message, message


# (dotted key, bad value, words the message must contain): distinct kinds of mistakes
BAD_VALUES = [
    ("threads", 0, ["threads"]),                                                         # non-positive count
    ("device", "tpu", ["device", "cpu"]),                                                # unknown enum value
    ("experiments.tiny_var.pairs.num_pairs", -5, ["num_pairs"]),                         # negative count
    ("experiments.tiny_var.pairs.shard_size", 700, ["num_pairs", "shard"]),              # shards do not divide
    ("experiments.tiny_var.teacher.family", "diffusion", ["family", "var"]),             # unknown family
    ("experiments.tiny_var.teacher.name", "var_d99", ["name"]),                          # unknown teacher
    ("experiments.tiny_var.teacher.name", "llamagen_b", ["llamagen", "family"]),         # teacher of another family
    ("experiments.tiny_var.teacher.name", "tiny_llamagen", ["llamagen", "family"]),      # digits teacher of another family
    ("experiments.tiny_var.evaluation.splits", 3, ["splits"]),                           # parts do not divide the set
    ("experiments.tiny_var.distill.timesteps", [2, 3], ["timesteps"]),                   # not starting at step 1
    ("experiments.tiny_var.distill.timesteps", [1, 9], ["timesteps", "last step 6"]),    # beyond the last step
    ("experiments.tiny_var.distill.timesteps", [1, 3, 2], ["timesteps"]),                # not increasing
    ("experiments.tiny_var.distill.lr", 0, ["lr"]),                                      # zero learning rate
    ("experiments.tiny_var.distill.ema_decay", 1.5, ["ema_decay"]),                      # out of [0, 1)
    ("experiments.tiny_var.distill.emb_loss", "l1", ["emb_loss", "lpips"]),              # unknown loss
    ("experiments.tiny_var.sample.dd_steps", [3], ["dd_steps"]),                         # more steps than timesteps
    ("experiments.tiny_var.sample.skip", [6], ["skip"]),                                 # skips every step
    ("experiments.tiny_var.sample.dd_teacher_starts", [4], ["dd_teacher_starts"]),       # starts at/after m
    ("experiments.tiny_var.sample.split_step", 7, ["split_step", "1 to 6"]),             # beyond the last step
    ("experiments.tiny_var.evaluation.reference", "fid_imagenet256", ["reference"]),     # wrong reference
    ("experiments.tiny_var.ablations.pair_set_sizes", [800], ["pair_set_sizes"]),        # not whole shards
    ("experiments.tiny_var.ablations.timesteps", [[1, 4]], ["already distilled"]),       # duplicate run
    ("experiments.tiny_var.distill.micro_batch_size", 0, ["micro_batch_size"]),          # not positive
    ("experiments.tiny_var.distill.micro_batch_size", 7, ["micro_batch_size", "does not divide"]),  # uneven
    ("mlflow.enabled", "yes", ["mlflow.enabled"]),                                       # string for boolean
]


@pytest.mark.parametrize("key,value,words", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_values_name_the_key(key, value, words):
    message = problems_of(mutated(key, value))
    for w in words:
        assert w in message, f"{w!r} not in:\n{message}"


def test_unknown_keys_are_rejected():
    config = mutated("experiments.tiny_var.pairs.numpairs", 10)
    assert "numpairs" in problems_of(config)


def test_all_problems_are_reported_at_once():
    config = mutated("threads", -1)
    config["experiments"]["tiny_llamagen"]["sample"]["num"] = 0
    message = problems_of(config)
    assert "threads" in message and "experiments.tiny_llamagen.sample.num" in message


def test_gpu_resources_need_a_cuda_device():
    config = mutated("experiments.tiny_var.resources", {"pairs": {"gpu": 1}})
    assert "experiments.tiny_var.resources.pairs.gpu" in problems_of(config)


def test_missing_or_invalid_config_files(tmp_path):
    with pytest.raises(ddconfig.ConfigError, match="not found"):
        ddconfig.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [unclosed\n")
    with pytest.raises(ddconfig.ConfigError, match="not valid YAML"):
        ddconfig.load_config(bad)


@pytest.mark.skipif(not (REPO / "Snakefile").exists(), reason="no Snakefile")
def test_snakemake_dry_run_fails_before_any_job_naming_the_key(tmp_path):
    bad = mutated("experiments.tiny_var.distill.timesteps", [1, 9])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
                        "--configfile", str(path), "--directory", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "experiments.tiny_var.distill.timesteps" in out and "last step 6" in out, out[-3000:]
    assert "Job stats" not in out
    assert not (tmp_path / "work" / "results").exists()


def test_defaults_have_one_source_the_settings_dataclasses():
    """A key of pairs / distill / sample / evaluation that the stage's settings dataclass has carries no default in
    the schema, and a config that leaves it out gets the dataclass's value: the value the CLI uses."""
    from dataclasses import MISSING, fields

    schema = ddconfig.load_schema()
    config = copy.deepcopy(DEFAULT)
    exp = config["experiments"]["tiny_var"]
    expected = {}
    for section, cls in ddconfig.SECTION_SETTINGS.items():
        declared = schema["$defs"][section]["properties"]
        for f in fields(cls):
            if f.name not in declared or (section, f.name) in ddconfig.NO_DEFAULT:
                continue
            assert "default" not in declared[f.name], f"{section}.{f.name}: a second default in the schema"
            if f.name in ("timesteps", "batch_size") and section == "distill":
                continue                                   # required keys: the user gives them
            exp[section].pop(f.name, None)
            default = f.default_factory() if f.default is MISSING else f.default
            expected[(section, f.name)] = list(default) if isinstance(default, tuple) else default
    assert len(expected) >= 20
    checked = ddconfig.check_config(config, base_dir=REPO)["experiments"]["tiny_var"]
    assert {k: checked[k[0]][k[1]] for k in expected} == expected
    assert expected[("distill", "checkpoint_every")] == 1000 and expected[("sample", "batch_size")] == 250


def test_student_config_options_are_checked_per_family():
    message = problems_of(mutated("experiments.tiny_var.distill.student_config", {"depth": 1}))
    assert "experiments.tiny_var.distill.student_config.depth: not an option of the var student" in message
    message = problems_of(mutated("experiments.tiny_llamagen.distill.student_config", {"within_scale_attention": True}))
    assert "tiny_llamagen.distill.student_config.within_scale_attention: not an option of the llamagen" in message
    message = problems_of(mutated("experiments.tiny_var.distill.student_config", {"within_scale_attention": "yes"}))
    assert "within_scale_attention" in message and "boolean" in message
    ok = ddconfig.check_config(mutated("experiments.tiny_var.distill.student_config",
                                       {"within_scale_attention": True}), base_dir=REPO)
    assert ok["experiments"]["tiny_var"]["distill"]["student_config"] == {"within_scale_attention": True}


T2I = yaml.safe_load((REPO / "config" / "t2i_tiny.yaml").read_text())


def test_text_to_image_config_plans_prompt_sets_and_caption_jobs():
    checked = ddconfig.check_config(copy.deepcopy(T2I), base_dir=REPO)
    exp = checked["experiments"]["tiny_t2i"]
    plan = ddplan.plan("tiny_t2i", exp, REPO)
    assert plan.prompt_files == {"train": "results/tiny_t2i/prompts/prompts_train.tsv",
                                 "eval": "results/tiny_t2i/prompts/prompts_eval.tsv"}
    assert set(plan.captions) == {"train", "eval"} and plan.attribute_scale.endswith("attribute_scale.json")
    assert plan.text_encoder.endswith("tiny_t5_encoder.safetensors") and plan.text_encoder in plan.downloads
    assert {"teacher", "onestep", "dd-1step", "dd-2step"} <= set(plan.sets)
    # onestep*'s own pair set on the evaluation prompts
    assert plan.onestep_pair_set == "onestep_pairs" and len(plan.onestep_shards) == 5
    assert plan.pair_shards("pairs") == plan.shards and not set(plan.shards) & set(plan.onestep_shards)


@pytest.mark.parametrize("change,key,words", [
    (lambda c: c["experiments"]["tiny_t2i"].pop("prompts"), "experiments.tiny_t2i.prompts", "give its prompt sets"),
    (lambda c: c["experiments"]["tiny_t2i"]["sample"].update(onestep_pairs=None),
     "experiments.tiny_t2i.sample.onestep_pairs", "its own pair set on the evaluation prompts"),
    (lambda c: c["experiments"]["tiny_t2i"]["sample"].update(onestep_pairs=1000),
     "experiments.tiny_t2i.sample.onestep_pairs", "not a multiple of pairs.shard_size 1500"),
    (lambda c: c["experiments"]["tiny_t2i"]["prompts"].update(source="files", train="nowhere.tsv"),
     "experiments.tiny_t2i.prompts.eval", "eval (a file) or eval_download (a pinned download), one of them"),
    (lambda c: c["experiments"]["tiny_t2i"]["prompts"].update(train="nowhere.tsv"),
     "experiments.tiny_t2i.prompts.source", "prompt files are read with source: files"),
    (lambda c: c["experiments"]["tiny_t2i"]["prompts"].update(encoder="flan-t5-xl"),
     "experiments.tiny_t2i.prompts.encoder_dir", "local snapshot folder"),
    (lambda c: c["experiments"]["tiny_t2i"]["prompts"].update(encoder="flan-t5-xl", encoder_dir="somewhere"),
     "experiments.tiny_t2i.prompts.encoder", "reads the caption features of tiny"),
    (lambda c: c["experiments"]["tiny_t2i"]["evaluation"].update(clip_model="openai/clip-vit-base-patch16",
                                                                  reference_images="x"),
     "experiments.tiny_t2i.evaluation.reference_images", "needs the folder of real images"),
])
def test_text_to_image_config_problems_name_the_key(change, key, words):
    config = copy.deepcopy(T2I)
    change(config)
    msg = problems_of(config)
    assert key in msg and words in msg


def test_prompts_are_refused_for_a_class_conditional_teacher():
    config = copy.deepcopy(DEFAULT)
    config["experiments"]["tiny_llamagen"]["prompts"] = {"source": "digits"}
    config["experiments"]["tiny_var"]["sample"]["onestep_pairs"] = 3000
    msg = problems_of(config)
    assert "experiments.tiny_llamagen.prompts" in msg and "text-to-image teachers only" in msg
    assert "experiments.tiny_var.sample.onestep_pairs" in msg and "only text-to-image onestep*" in msg


@pytest.mark.parametrize("split_step", [None, 2, 6])
def test_split_step_reaches_every_dd_sample_job(split_step):
    """sample.split_step sets where every DD and teacher-involved set hands over from logits to embeddings; null
    keeps the student's last distilled timestep."""
    config = mutated("experiments.tiny_var.sample.split_step", split_step)
    checked = ddconfig.check_config(config, base_dir=REPO)
    exp = checked["experiments"]["tiny_var"]
    plan = ddplan.plan("tiny_var", exp, REPO)
    expected = split_step or exp["distill"]["timesteps"][-1]
    dd_sets = [s for s in plan.sets.values() if s.method in ("dd", "dd-teacher")]
    assert len(dd_sets) >= 4
    for s in dd_sets:
        i = s.args.index("--split-step")
        assert s.args[i + 1] == str(expected), (s.name, s.args)
    # the periodic FID of every distillation run (the ablation figures') splits where the sample sets do
    assert {r.eval_split_step for r in plan.runs.values()} == {split_step}, plan.runs


@pytest.mark.parametrize("split_step", [None, 4])
def test_split_step_reaches_a_released_students_sample_jobs(split_step):
    """With a released DD student, null keeps the release's own split (its sampling script's); a set value replaces
    it in every DD and teacher-involved set, and no distillation run exists to take it."""
    config = yaml.safe_load((REPO / "config" / "released_dd.yaml").read_text())
    exp = config["experiments"]["released_dd_var_d16"]
    exp["sample"]["split_step"] = split_step
    exp = ddconfig.check_config(config, base_dir=REPO)["experiments"]["released_dd_var_d16"]
    plan = ddplan.plan("released_dd_var_d16", exp, REPO)
    expected = split_step or ddplan.released_students()["dd_var_d16"].split_step
    dd_sets = [s for s in plan.sets.values() if s.method in ("dd", "dd-teacher")]
    assert len(dd_sets) == 5 and not plan.runs
    for s in dd_sets:
        assert "--released-student" in s.args, s.args
        assert s.args[s.args.index("--split-step") + 1] == str(expected), (s.name, s.args)


def test_num_by_set_samples_a_set_at_its_own_size_in_parts_of_the_common_size(tmp_path):
    """sample.num_by_set: the set is drawn at its size and evaluated in more parts of the size every set uses (so its
    FID stays comparable); the sample and evaluate jobs get both."""
    config = copy.deepcopy(T2I)
    exp = config["experiments"]["tiny_t2i"]
    exp["sample"]["num_by_set"] = {"onestep": 4 * exp["sample"]["num"]}
    checked = ddconfig.check_config(copy.deepcopy(config), base_dir=REPO)["experiments"]["tiny_t2i"]
    plan = ddplan.plan("tiny_t2i", checked, REPO)
    splits, num = checked["evaluation"]["splits"], checked["sample"]["num"]
    assert (plan.sets["onestep"].num, plan.sets["onestep"].splits) == (4 * num, 4 * splits)
    assert {(s.num, s.splits) for name, s in plan.sets.items() if name != "onestep"} == {(num, splits)}
    path = tmp_path / "t2i.yaml"
    path.write_text(yaml.safe_dump(config))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "-s", str(REPO / "Snakefile"),
                        "--configfile", str(path), "--directory", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    shell = [line for line in out.splitlines() if " -m dd sample " in line or " -m dd evaluate " in line]
    onestep = [line for line in shell if "samples/onestep.npz" in line]
    teacher = [line for line in shell if "samples/teacher.npz --" in line or "--out results/tiny_t2i/samples/teacher" in line]
    assert any(f"--num {4 * num} " in line for line in onestep) and any(f"--splits {4 * splits} " in line
                                                                      for line in onestep), onestep
    assert any(f"--num {num} " in line for line in teacher), teacher
    # names a set that does not exist / sizes that do not make whole parts
    for bad, words in [({"onestep*": num}, "no sample set 'onestep*'"),
                       ({"onestep": num + 1}, f"use a multiple of {num // splits}")]:
        exp["sample"]["num_by_set"] = bad
        msg = problems_of(copy.deepcopy(config))
        assert "experiments.tiny_t2i.sample.num_by_set." in msg and words in msg, msg
