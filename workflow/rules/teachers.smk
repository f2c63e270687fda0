# Teacher acquisition: train the tiny tokenizer/teacher (and the digits classifier that plays Inception's part)
# for the embedded default, or download the released files (teachers, DD students, FID statistic, weights).

localrules: download, track_teacher


rule train_classifier:
    """The digits classifier: feature network of FID / IS / precision / recall on the digits."""
    output:
        "results/digits/classifier_{size}.pt",
    log:
        "results/digits/logs/train_classifier_{size}.log",
    benchmark:
        "results/digits/benchmarks/train_classifier_{size}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "{PY} train-classifier --out {output} --image-size {wildcards.size} --threads {threads} > {log} 2>&1"


rule digits_reference:
    """The digits (train split) at the teachers' resolution: the FID reference of the tiny teachers."""
    output:
        "results/digits/reference_{size}.npz",
    log:
        "results/digits/logs/digits_reference_{size}.log",
    benchmark:
        "results/digits/benchmarks/digits_reference_{size}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} digits-reference --size {wildcards.size} --out {output} > {log} 2>&1"


def tiny_config(wildcards):
    return str(ddconfig.resolve_path(exp_config(wildcards)["teacher"]["tiny_config"], REPO))


rule train_tokenizer:
    input:
        config=tiny_config,
    output:
        checkpoint="results/{experiment}/teacher/tokenizer.pt",
        report="results/{experiment}/teacher/tokenizer.json",
        grid="results/{experiment}/teacher/tokenizer.png",
    log:
        "results/{experiment}/logs/teacher/train_tokenizer.log",
    benchmark:
        "results/{experiment}/benchmarks/teacher/train_tokenizer.tsv"
    threads: stage_threads("train")
    resources:
        mem_mb=stage_resource("train", "mem_mb"),
        runtime=stage_resource("train", "runtime"),
    shell:
        "{PY} train-tokenizer --config {input.config} --out {output.checkpoint} --threads {threads}"
        " > {output.report} 2> {log}"


rule train_teacher:
    input:
        config=tiny_config,
        tokenizer="results/{experiment}/teacher/tokenizer.pt",
        classifier=lambda wc: f"results/digits/classifier_{P(wc).image_size}.pt",
    output:
        checkpoint="results/{experiment}/teacher/ar.pt",
        report="results/{experiment}/teacher/ar.json",
        grid="results/{experiment}/teacher/ar.png",
    log:
        "results/{experiment}/logs/teacher/train_teacher.log",
    benchmark:
        "results/{experiment}/benchmarks/teacher/train_teacher.tsv"
    threads: stage_threads("train")
    resources:
        mem_mb=stage_resource("train", "mem_mb"),
        runtime=stage_resource("train", "runtime"),
    shell:
        "{PY} train-teacher --config {input.config} --tokenizer {input.tokenizer} --classifier {input.classifier}"
        " --out {output.checkpoint} --threads {threads} > {output.report} 2> {log}"


rule download:
    """A released file (registry name or pinned URL) into resources/checkpoints/, verified against the lock file."""
    output:
        "resources/checkpoints/{filename}",
    params:
        name=lambda wc: DOWNLOADS[f"resources/checkpoints/{wc.filename}"],
    log:
        "resources/logs/download_{filename}.log",
    benchmark:
        "resources/benchmarks/download_{filename}.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=240,
    shell:
        "{PY} download {params.name:q} --dest resources/checkpoints --lock resources/downloads.lock.json"
        " --no-progress > {log} 2>&1"


rule track_teacher:
    """MLflow: a child run per trained tiny model (its training report and sample grid)."""
    input:
        tokenizer="results/{experiment}/teacher/tokenizer.json",
        teacher="results/{experiment}/teacher/ar.json",
    output:
        "results/{experiment}/mlflow/teacher.json",
    params:
        track=lambda wc: track_cmd("teacher", wc),
    log:
        "results/{experiment}/logs/mlflow/teacher.log",
    benchmark:
        "results/{experiment}/benchmarks/mlflow/teacher.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.track} --out {output} > {log} 2>&1"
