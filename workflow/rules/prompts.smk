# Text-to-image prompt sets: the prompt files (for the digits, written from the images' measured attributes) and
# their caption features, computed once per set by the text encoder and read by every job that needs them (pairs
# and distillation: train; sample sets: eval), so no other job holds the encoder.


rule digit_prompts:
    """Captions of the digits: training digits in the training phrasings, test digits in held-out phrasings, and
    the attribute scale that prompt_accuracy measures against."""
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
    inputs = {"prompts": p.prompt_files[wildcards.prompt_set]}
    if p.text_encoder:
        inputs["encoder"] = p.text_encoder
    return inputs


def caption_options(wildcards, input):
    pr = exp_config(wildcards)["prompts"]
    opts = [f"--column {shlex.quote(pr['column'])}", f"--encoder {pr['encoder']}", f"--device {DEVICE}"]
    if "encoder" in input.keys():
        opts.append(f"--encoder-weights {input.encoder}")
    if pr["encoder_dir"]:
        opts.append(f"--encoder-dir {shlex.quote(str(pr['encoder_dir']))}")
    return " ".join(opts)


rule caption_features:
    input:
        unpack(caption_inputs),
    output:
        "results/{experiment}/captions/{prompt_set}.npz",
    params:
        options=caption_options,
    log:
        "results/{experiment}/logs/prompts/caption_features_{prompt_set}.log",
    benchmark:
        "results/{experiment}/benchmarks/prompts/caption_features_{prompt_set}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{PY} caption-features --prompts {input.prompts:q} {params.options} --out {output} > {log} 2>&1"
