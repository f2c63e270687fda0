# Helpers shared by the rule files: the checked config, the experiment plans, and the arguments every rule passes
# to the dd command line.
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from dd.pipeline import config as ddconfig
from dd.pipeline.download import DIGITS_CLASSIFIER, SHIPPED_DIR
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


def distill_samples(name, run):
    """Training samples (steps x batch) of an experiment's distillation run: a measure of its length."""
    d, r = config["experiments"][name]["distill"], PLANS[name].runs[run]
    if r.max_steps is not None:
        return r.max_steps * d["batch_size"]
    return r.epochs * config["experiments"][name]["pairs"]["num_pairs"] * len(r.shards) / len(PLANS[name].shards)


# The experiments ranked by the length of their main distillation (0 = shortest). Jobs of equal priority start in
# no fixed order, and on 2 cores a run that distilled tiny VAR (5 min) before tiny LlamaGen's pairs were made
# finished minutes later than one that started tiny LlamaGen's 9-minute distillation first.
_LENGTHS = {name: distill_samples(name, "main") if "main" in p.runs else 0 for name, p in PLANS.items()}
CHAIN_RANK = {name: sorted(set(_LENGTHS.values())).index(n) for name, n in _LENGTHS.items()}


def experiment_chain_priority(name):
    """Priority of the jobs on an experiment's way to its main distillation: 10, plus its rank."""
    return 10 + CHAIN_RANK[name]


def chain_priority(wildcards):
    """Prompts, caption features, pair shards and their index: those of the longest distillation first."""
    return experiment_chain_priority(wildcards.experiment)


def download_priority(wildcards):
    """A released file: the priority of the longest chain that needs it. Priorities do not pass to a job's inputs,
    and a run that fetched tiny VAR's files first made its pairs before tiny LlamaGen's."""
    path = f"resources/checkpoints/{wildcards.filename}"
    return max((experiment_chain_priority(name) for name, p in PLANS.items() if path in p.downloads), default=0)


def distill_priority(wildcards):
    """The longest distillation first; an experiment's main run before its (shorter) ablation runs."""
    return chain_priority(wildcards) + (0.5 if wildcards.run == "main" else 0)


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
