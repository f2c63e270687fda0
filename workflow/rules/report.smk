# Tables (paper Tables 1 and 2), figures (Fig. 1: FID vs time per image; Fig. 6 / Fig. 7: FID during
# distillation for several intermediate timesteps / pair-set sizes) and the experiment's MLflow parent run.

localrules: track_report


rule tables:
    input:
        unpack(track_samples_inputs),
    output:
        table1=report("results/{experiment}/tables/table1.csv", caption="../report/table1.rst",
                      category="Tables", subcategory="{experiment}"),
        table1_md="results/{experiment}/tables/table1.md",
        table2=report("results/{experiment}/tables/table2.csv", caption="../report/table2.rst",
                      category="Tables", subcategory="{experiment}"),
        table2_md="results/{experiment}/tables/table2.md",
    params:
        sets=lambda wc: " ".join(P(wc).sets),
        table2=lambda wc: " ".join(n for n, s in P(wc).sets.items() if 2 in s.tables),
        teacher=lambda wc: P(wc).teacher_label,
    log:
        "results/{experiment}/logs/report/tables.log",
    benchmark:
        "results/{experiment}/benchmarks/report/tables.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} report tables --dir results/{wildcards.experiment} --teacher {params.teacher}"
        " --sets {params.sets} --table2-sets {params.table2} > {log} 2>&1"


rule fig1_fid_vs_time:
    input:
        "results/{experiment}/tables/table1.csv",
        "results/{experiment}/tables/table2.csv",
    output:
        report("results/{experiment}/figures/fig1_fid_vs_time.png", caption="../report/fig1.rst",
               category="Figures", subcategory="{experiment}"),
    log:
        "results/{experiment}/logs/report/fig1.log",
    benchmark:
        "results/{experiment}/benchmarks/report/fig1.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} report fig1 --tables {input} --title {wildcards.experiment} --out {output} > {log} 2>&1"


def prompt_grid_sets(wildcards):
    """The teacher's and the DD students' sample sets (text-to-image experiments)."""
    return {n: f"results/{wildcards.experiment}/samples/{n}.npz" for n, s in P(wildcards).sets.items()
            if s.method in ("teacher", "dd")}


rule prompt_grid:
    """Text-to-image: the first samples of the teacher and the DD sets beside their (evaluation) prompts."""
    input:
        unpack(prompt_grid_sets),
        prompts=lambda wc: P(wc).prompt_files["eval"],
    output:
        report("results/{experiment}/figures/prompt_grid.png", caption="../report/prompt_grid.rst",
               category="Figures", subcategory="{experiment}"),
    params:
        sets=lambda wc: " ".join(f"{n}={f}" for n, f in prompt_grid_sets(wc).items()),
        column=lambda wc: shlex.quote(P(wc).prompt_columns["eval"]),
    log:
        "results/{experiment}/logs/report/prompt_grid.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} report prompt-grid --sets {params.sets} --prompts {input.prompts:q} --column {params.column}"
        " --out {output} > {log} 2>&1"


def curve_args(kind):
    """label=metrics.jsonl pairs of the main run and the ablation runs of one kind."""

    def get(wildcards):
        p = P(wildcards)
        runs = [r for r in p.runs.values() if r.ablation in (None, kind)]
        if kind == "timesteps":
            label = lambda r: "timesteps " + ",".join(map(str, r.timesteps))
        else:
            label = lambda r: f"{r.pairs} pairs"
        return {label(r): p.out("distill", r.name, "metrics.jsonl") for r in runs}

    return get


rule fig6_timesteps:
    """Ablation (paper Fig. 6): FID during distillation for several intermediate timesteps."""
    input:
        lambda wc: list(curve_args("timesteps")(wc).values()),
    output:
        report("results/{experiment}/figures/fig6_fid_vs_progress_timesteps.png", caption="../report/fig6.rst",
               category="Figures", subcategory="{experiment}"),
    params:
        curves=lambda wc: " ".join(f"{k.replace(' ', '_')}={v}" for k, v in curve_args("timesteps")(wc).items()),
    log:
        "results/{experiment}/logs/report/fig6.log",
    benchmark:
        "results/{experiment}/benchmarks/report/fig6.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} report curves {params.curves} --title '{wildcards.experiment}: intermediate timestep'"
        " --out {output} > {log} 2>&1"


rule fig7_pair_set_sizes:
    """Ablation (paper Fig. 7): FID during distillation for several pair-set sizes."""
    input:
        lambda wc: list(curve_args("pairs")(wc).values()),
    output:
        report("results/{experiment}/figures/fig7_fid_vs_progress_pair_sets.png", caption="../report/fig7.rst",
               category="Figures", subcategory="{experiment}"),
    params:
        curves=lambda wc: " ".join(f"{k.replace(' ', '_')}={v}" for k, v in curve_args("pairs")(wc).items()),
    log:
        "results/{experiment}/logs/report/fig7.log",
    benchmark:
        "results/{experiment}/benchmarks/report/fig7.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} report curves {params.curves} --title '{wildcards.experiment}: pair-set size'"
        " --out {output} > {log} 2>&1"


def track_report_inputs(wildcards):
    p = P(wildcards)
    tables, figures = report_files(p)
    inputs = {"tables": tables, "figures": figures,
              "runs": [p.out("mlflow", "samples.json")] + [p.out("mlflow", f"distill-{r}.json") for r in p.runs]}
    if p.shards:
        inputs["runs"].append(p.out("mlflow", "pairs.json"))
    return inputs


rule track_report:
    """MLflow: the experiment's parent run gets the config as params and the tables and figures as artifacts."""
    input:
        unpack(track_report_inputs),
    output:
        "results/{experiment}/mlflow/report.json",
    params:
        track=lambda wc: track_cmd("parent", wc),
    log:
        "results/{experiment}/logs/mlflow/report.log",
    benchmark:
        "results/{experiment}/benchmarks/mlflow/report.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.track} --out {output} > {log} 2>&1"
