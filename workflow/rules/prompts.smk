# Text-to-image prompt sets: the prompt files (for the digits, written from the images' measured attributes) and
# their caption features, computed once per set by the text encoder and read by every job that needs them (pairs
# and distillation: train; sample sets: eval), so no other job holds the encoder.


rule digit_prompts:
    """Captions of the digits: training digits in the training phrasings, test digits in held-out phrasings, and
    the attribute scale that prompt_accuracy measures against."""
    priority: chain_priority   # the pairs wait for the captions of these prompts
    output:
        train="results/{experiment}/prompts/prompts_train.tsv",
        eval="results/{experiment}/prompts/prompts_eval.tsv",
        scale="results/{experiment}/prompts/attribute_scale.json",
    log:
        "results/{experiment}/logs/prompts/digit_prompts.log",
    benchmark:
        "results/{experiment}/benchmarks/prompts/digit_prompts.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} digit-prompts --out-dir results/{wildcards.experiment}/prompts > {log} 2>&1"


def caption_inputs(wildcards):
    p = P(wildcards)
    prompts = p.prompt_files[wildcards.prompt_set]
    # a user's file is an input once it exists (the check job refuses the run before then); others are made by rules
    user = {path for _, path, _ in p.user_files.values()}
    inputs = {"checked": user_input_check(wildcards)}
    if prompts not in user or Path(prompts).is_file():
        inputs["prompts"] = prompts
    if p.text_encoder:
        inputs["encoder"] = p.text_encoder
    return inputs


def caption_options(wildcards):
    # of the wildcards only: Snakemake records such params and reruns the job when they change
    pr, p, inputs = exp_config(wildcards)["prompts"], P(wildcards), caption_inputs(wildcards)
    opts = [f"--column {shlex.quote(p.prompt_columns[wildcards.prompt_set])}", f"--encoder {pr['encoder']}",
            f"--device {DEVICE}"]
    if "encoder" in inputs:
        opts.append(f"--encoder-weights {inputs['encoder']}")
    if pr["encoder_dir"]:
        opts.append(f"--encoder-dir {shlex.quote(str(pr['encoder_dir']))}")
    return " ".join(opts)


rule caption_features:
    priority: chain_priority
    input:
        unpack(caption_inputs),
    output:
        "results/{experiment}/captions/{prompt_set}.npz",
    params:
        prompts=lambda wc: P(wc).prompt_files[wc.prompt_set],
        options=caption_options,
    log:
        "results/{experiment}/logs/prompts/caption_features_{prompt_set}.log",
    benchmark:
        "results/{experiment}/benchmarks/prompts/caption_features_{prompt_set}.tsv"
    threads: stage_threads("captions")
    resources:
        gpu=stage_resource("captions", "gpu"),
        mem_mb=stage_resource("captions", "mem_mb"),
        runtime=stage_resource("captions", "runtime"),
    shell:
        "{PY} caption-features --prompts {params.prompts:q} {params.options} --out {output} > {log} 2>&1"
