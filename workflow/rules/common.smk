# Helpers shared by the rule files: the checked config, the experiment plans, and the arguments every rule passes
# to the dd command line.
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from dd.pipeline import config as ddconfig
from dd.pipeline.plan import plan
from dd.pipeline.snakemake_locks import record_owner
from dd.pipeline.track import ablation_figures, report_files

REPO = Path(workflow.basedir)

try:
    _checked = ddconfig.check_config(config, base_dir=REPO,
                                     source=", ".join(map(str, workflow.overwrite_configfiles)) or "config/config.yaml")
except ddconfig.ConfigError as e:
    raise WorkflowError(str(e))
config.clear()
config.update(_checked)

PLANS = {name: plan(name, exp, REPO) for name, exp in config["experiments"].items()}
DOWNLOADS = {path: name for p in PLANS.values() for path, name in p.downloads.items()}
DEVICE = config["device"]
MLFLOW = config["mlflow"]
PY = "python -m dd"  # the dd command line


def _alternatives(names):
    names = sorted(set(names))
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


wildcard_constraints:
    experiment=_alternatives(PLANS),
    shard=r"\d{5}",
    run=_alternatives(r for p in PLANS.values() for r in p.runs),
    set=_alternatives(s for p in PLANS.values() for s in p.sets),
    size=r"\d+",
    filename=_alternatives(Path(f).name for f in DOWNLOADS),
    family=_alternatives(config["tiny_teachers"]["configs"]),
    prompt_set="train|eval",
    pair_set="pairs|onestep_pairs",


def P(wildcards):
    return PLANS[wildcards.experiment]


def exp_config(wildcards):
    return config["experiments"][wildcards.experiment]


def stage_threads(stage):
    """threads of a stage's jobs: the experiment's `resources.<stage>.threads`, else the top-level `threads`."""
    return lambda wildcards: exp_config(wildcards)["resources"][stage]["threads"] or config["threads"]


def stage_resource(stage, key):
    """gpu / mem_mb / runtime of a stage's jobs, from the experiment's `resources.<stage>` (defaults filled)."""
    return lambda wildcards: exp_config(wildcards)["resources"][stage][key]


def teacher_inputs(wildcards, prompts="train"):
    """The teacher's files; a text-to-image teacher's caption features of the ``prompts`` set as well (train: pairs
    and distillation; eval: sampling)."""
    p = P(wildcards)
    inputs = {"tokenizer": p.tokenizer, "model": p.model}
    if p.captions:
        inputs["captions"] = p.captions[prompts]
    return inputs


def teacher_args(wildcards, threads, prompts="train"):
    p = P(wildcards)
    released = " --released" if p.released else ""
    captions = f" --captions {p.captions[prompts]}" if p.captions else ""
    return (f"--family {p.family} --tokenizer {shlex.quote(p.tokenizer)} --model {shlex.quote(p.model)}{released}"
            f"{captions} --device {DEVICE} --threads {threads}")


def sampling_args(section):
    """--cfg / --top-k / --top-p (/ --temperature) of a config section; None means the family's default."""
    args = [f"--cfg {section['cfg']}"]
    for key, flag in (("top_k", "--top-k"), ("top_p", "--top-p"), ("temperature", "--temperature")):
        if section.get(key) is not None:
            args.append(f"{flag} {section[key]}")
    return " ".join(args)


def track_cmd(what, wildcards):
    """`dd track WHAT` of an experiment: the record is built by the CLI from the checked experiment config."""
    return (f"{PY} track {what} --store {shlex.quote(MLFLOW['store'])} "
            f"--mlflow-experiment {shlex.quote(MLFLOW['experiment'])} --experiment {wildcards.experiment} "
            f"--experiment-config {shlex.quote(json.dumps(exp_config(wildcards)))}")


def experiment_targets(name):
    p = PLANS[name]
    tables, figures = report_files(p)
    out = tables + figures
    if MLFLOW["enabled"]:
        out.append(p.out("mlflow", "report.json"))
    return out
