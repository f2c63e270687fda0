# Distilled Decoding pipeline: teachers -> pair shards -> distillation -> sample sets -> evaluation -> tables/figures.
#
#   snakemake --cores 2                                          the embedded default (tiny teachers, digits, CPU)
#   snakemake --cores 8 --profile profiles/workstation --configfile config/var_d16.yaml
#   snakemake --profile profiles/slurm --configfile config/var_d16.yaml
#   snakemake --report report.html                               HTML report of the tables and figures
#
# Every job calls the `dd` command line (python -m dd ...); the config is validated before any job runs
# (workflow/schemas/config.schema.yaml for types and ranges, dd/config.py for the rest). Outputs go to
# results/<experiment>/..., downloads to resources/. See docs/pipeline.md.
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("8.0")

REPO = Path(workflow.basedir)
sys.path.insert(0, str(REPO))
# jobs run `python -m dd` from the working directory, which need not be the checkout
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

from dd import config as ddconfig
from dd import snakemake_locks

# A run killed with SIGKILL leaves its directory locks behind; clear them when their owner is provably gone, so that
# `snakemake --cores 2 --rerun-incomplete` resumes without a manual `--unlock` (see dd/snakemake_locks.py).
_stale = snakemake_locks.clear_stale_locks(".snakemake")
if _stale:
    print(f"Removed stale Snakemake locks of killed run(s) {', '.join(_stale)}", file=sys.stderr)


onstart:
    snakemake_locks.record_owner(".snakemake")


# The embedded default, unless the command line names config files (then only those: a paper configuration
# replaces the default experiments instead of being merged into them).
if not workflow.overwrite_configfiles:
    configfile: str(REPO / "config" / "config.yaml")

try:
    _checked = ddconfig.check_config(config, base_dir=REPO,
                                     source=", ".join(map(str, workflow.overwrite_configfiles)) or "config/config.yaml")
except ddconfig.ConfigError as e:
    raise WorkflowError(str(e))
config.clear()
config.update(_checked)
validate(config, "workflow/schemas/config.schema.yaml")

PLANS = {name: ddconfig.plan(name, exp, REPO) for name, exp in config["experiments"].items()}
DOWNLOADS = {path: name for p in PLANS.values() for path, name in p.downloads.items()}
DEVICE = config["device"]
MLFLOW = config["mlflow"]
PY = "python -m dd"  # the dd command line

report: "workflow/report/workflow.rst"


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


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the rule files
# ---------------------------------------------------------------------------------------------------------------
def P(wildcards):
    return PLANS[wildcards.experiment]


def exp_config(wildcards):
    return config["experiments"][wildcards.experiment]


def _stage(wildcards, stage):
    return exp_config(wildcards)["resources"].get(stage, {})


def stage_threads(stage):
    """threads of a stage's jobs: the experiment's `resources.<stage>.threads`, else the top-level `threads`."""
    return lambda wildcards: _stage(wildcards, stage).get("threads") or config["threads"]


def stage_resource(stage, key):
    """gpu / mem_mb / runtime of a stage's jobs, from the experiment's `resources.<stage>` (schema defaults)."""
    return lambda wildcards: _stage(wildcards, stage).get(key, {"gpu": 0, "mem_mb": 2000, "runtime": 60}[key])


def teacher_inputs(wildcards):
    p = P(wildcards)
    return {"tokenizer": p.tokenizer, "model": p.model}


def teacher_args(wildcards, threads):
    p = P(wildcards)
    released = " --released" if p.released else ""
    return (f"--family {p.family} --tokenizer {shlex.quote(p.tokenizer)} --model {shlex.quote(p.model)}{released} "
            f"--device {DEVICE} --threads {threads}")


def sampling_args(section):
    """--cfg / --top-k / --top-p (/ --temperature) of a config section; None means the family's default."""
    args = [f"--cfg {section['cfg']}"]
    for key, flag in (("top_k", "--top-k"), ("top_p", "--top-p"), ("temperature", "--temperature")):
        if section.get(key) is not None:
            args.append(f"{flag} {section[key]}")
    return " ".join(args)


def track_cmd(what, wildcards):
    return (f"{PY} track {what} --store {shlex.quote(MLFLOW['store'])} "
            f"--mlflow-experiment {shlex.quote(MLFLOW['experiment'])} --experiment {wildcards.experiment}")


include: "workflow/rules/teachers.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


def experiment_targets(name):
    p = PLANS[name]
    out = [p.out("tables", f"table{i}.{ext}") for i in (1, 2) for ext in ("csv", "md")]
    out.append(p.out("figures", "fig1_fid_vs_time.png"))
    out += ablation_targets(name)
    if MLFLOW["enabled"]:
        out.append(p.out("mlflow", "report.json"))
    return out


def ablation_targets(name):
    p = PLANS[name]
    kinds = {r.ablation for r in p.runs.values()}
    out = []
    if "timesteps" in kinds:
        out.append(p.out("figures", "fig6_fid_vs_progress_timesteps.png"))
    if "pairs" in kinds:
        out.append(p.out("figures", "fig7_fid_vs_progress_pair_sets.png"))
    return out


rule all:
    default_target: True
    input:
        [t for name in PLANS for t in experiment_targets(name)],


rule ablations:
    """Fig. 6 (intermediate timesteps) and Fig. 7 (pair-set sizes) of every experiment that configures them."""
    input:
        [t for name in PLANS for t in ablation_targets(name)],


rule pair_sets:
    """Only the pair shards (and their index) of every experiment."""
    input:
        [PLANS[name].out("pairs", "index.json") for name in PLANS],
