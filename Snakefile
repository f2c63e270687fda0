# Distilled Decoding pipeline: teachers -> pair shards -> distillation -> sample sets -> evaluation -> tables/figures.
#
#   snakemake --cores 2                                          the embedded default (tiny teachers, digits, CPU)
#   snakemake --cores 8 --profile profiles/workstation --configfile config/var_d16.yaml
#   snakemake --profile profiles/slurm --configfile config/var_d16.yaml
#   snakemake --report report.html                               HTML report of the tables and figures
#
# Every job calls the `dd` command line (python -m dd ...), installed with the project (`pip install -e .`). The
# config is checked once, here, before any job runs (workflow/schemas/config.schema.yaml for types and ranges,
# dd/pipeline/config.py for the rest, defaults filled). Outputs go to results/<experiment>/..., downloads to
# resources/. Rule helpers are in workflow/rules/common.smk.
from snakemake.utils import min_version

min_version("8.0")


# The embedded default, unless the command line names config files (then only those: a paper configuration
# replaces the default experiments instead of being merged into them).
if not workflow.overwrite_configfiles:
    configfile: workflow.basedir + "/config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/teachers.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


onstart:
    # lets `python -m dd clear-stale-locks` tell a killed run's locks from a live run's
    record_owner(".snakemake")


rule all:
    default_target: True
    input:
        [t for name in PLANS for t in experiment_targets(name)],


rule ablations:
    """Fig. 6 (intermediate timesteps) and Fig. 7 (pair-set sizes) of every experiment that configures them."""
    input:
        [f for name in PLANS for f in ablation_figures(PLANS[name])],


rule pair_sets:
    """Only the pair shards (and their index) of every experiment."""
    input:
        [PLANS[name].out("pairs", "index.json") for name in PLANS],
