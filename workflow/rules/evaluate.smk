# Evaluation: one job per sample set, FID / IS / precision / recall / KID by torch-fidelity against the data
# (the digits with the digits classifier, or ImageNet-256 with Inception), and FID / KID against the teacher's
# own samples (the distillation gap).

localrules: track_samples


def evaluation_options(wildcards):
    ev, device, p = exp_config(wildcards)["evaluation"], DEVICE, P(wildcards)
    splits = p.sets[wildcards.set].splits   # parts of sample.num / evaluation.splits images, whatever the set's size
    opts = (f"--feature-extractor {ev['feature_extractor']} --device {device} --splits {splits}"
            f" --batch-size {ev['batch_size']}"
            f" --isc-splits {ev['isc_splits']} --kid-subsets {ev['kid_subsets']}")
    if p.attribute_scale or p.clip_model:   # text-to-image: against the eval prompts
        opts += (f" --prompts {shlex.quote(p.prompt_files['eval'])}"
                 f" --prompt-column {shlex.quote(p.prompt_columns['eval'])}")
    if p.attribute_scale:   # the digits: prompt_accuracy
        opts += f" --attribute-scale {p.attribute_scale}"
    if p.clip_model:
        opts += f" --clip-model {shlex.quote(p.clip_model)}"
    return opts


def evaluate_inputs(wildcards):
    inputs = {"samples": f"results/{wildcards.experiment}/samples/{wildcards.set}.npz",
              "reference": P(wildcards).reference, "weights": P(wildcards).feature_weights}
    if wildcards.set in vs_teacher_sets(wildcards):
        inputs["teacher"] = f"results/{wildcards.experiment}/samples/teacher.npz"
    if P(wildcards).attribute_scale:   # text-to-image digits: prompt_accuracy against the eval prompts
        inputs.update(prompts=P(wildcards).prompt_files["eval"], attribute_scale=P(wildcards).attribute_scale)
    if P(wildcards).clip_model:
        inputs["prompts"] = P(wildcards).prompt_files["eval"]
    return inputs


def vs_teacher_option(wildcards):
    # of the wildcards only: Snakemake records such params and reruns the job when they change
    teacher = evaluate_inputs(wildcards).get("teacher")
    return f"--vs-samples {teacher} --vs-key vs_teacher" if teacher else ""


rule evaluate:
    """Metrics against the data and, in the same process (one start-up and model load instead of a second job),
    FID / KID against the teacher's own samples (``vs_teacher`` in the JSON)."""
    input:
        unpack(evaluate_inputs),
    output:
        "results/{experiment}/metrics/{set}.json",
    params:
        options=evaluation_options,
        vs_teacher=vs_teacher_option,
    log:
        "results/{experiment}/logs/metrics/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/metrics/{set}.tsv"
    threads: stage_threads("evaluate")
    resources:
        gpu=stage_resource("evaluate", "gpu"),
        mem_mb=stage_resource("evaluate", "mem_mb"),
        runtime=stage_resource("evaluate", "runtime"),
    shell:
        "{PY} evaluate --samples {input.samples} --reference {input.reference} --weights {input.weights}"
        " {params.options} {params.vs_teacher} --out {output} > {log} 2>&1"


def image_statistics_options(wildcards):
    ev = exp_config(wildcards)["evaluation"]
    opts = (f"--images {shlex.quote(ev['reference_images'])} --feature-extractor {ev['feature_extractor']}"
            f" --device {DEVICE} --batch-size {ev['batch_size']}")
    return opts + (f" --limit {ev['reference_limit']}" if ev["reference_limit"] else "")


rule image_statistics:
    """evaluation.reference images: FID statistics of the user's folder of real images at the samples' size, once
    (the reference of every evaluate job)."""
    input:
        checked=user_input_check,
        weights=lambda wc: P(wc).feature_weights,
    output:
        "results/{experiment}/reference/images_{size}.npz",
    params:
        options=image_statistics_options,
    log:
        "results/{experiment}/logs/reference/images_{size}.log",
    benchmark:
        "results/{experiment}/benchmarks/reference/images_{size}.tsv"
    threads: stage_threads("evaluate")
    resources:
        gpu=stage_resource("evaluate", "gpu"),
        mem_mb=stage_resource("evaluate", "mem_mb"),
        runtime=stage_resource("evaluate", "runtime"),
    shell:
        "{PY} image-statistics --size {wildcards.size} --weights {input.weights}"
        " {params.options} --out {output} > {log} 2>&1"


def vs_teacher_sets(wildcards):
    if not exp_config(wildcards)["evaluation"]["vs_teacher"]:
        return []
    return [s for s in P(wildcards).sets if s != "teacher"]


def track_samples_inputs(wildcards):
    p = P(wildcards)
    return {"info": [p.out("samples", f"{s}.json") for s in p.sets],
            "metrics": [p.out("metrics", f"{s}.json") for s in p.sets]}


rule track_samples:
    """MLflow: a child run per sample set with its metrics, timing and sample grid."""
    input:
        unpack(track_samples_inputs),
    output:
        "results/{experiment}/mlflow/samples.json",
    params:
        track=lambda wc: track_cmd("samples", wc),
    log:
        "results/{experiment}/logs/mlflow/samples.log",
    benchmark:
        "results/{experiment}/benchmarks/mlflow/samples.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.track} --out {output} > {log} 2>&1"
