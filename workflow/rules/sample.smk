# Sampling: one job per sample set (teacher, skip-n, onestep*, DD k-step, DD with the teacher re-generating
# steps n..m-1). Each writes SET.npz (images, labels), SET.png (a grid, a row per class) and SET.json
# (method, network passes per image, steady-state seconds per image, batch size, #parameters).


def sample_set(wildcards):
    sets = P(wildcards).sets
    if wildcards.set not in sets:
        raise WorkflowError(f"experiment {wildcards.experiment} has no sample set {wildcards.set!r}; "
                            f"its sets: {', '.join(sets)}")
    return sets[wildcards.set]


def sample_inputs(wildcards):
    p, s = P(wildcards), sample_set(wildcards)
    inputs = teacher_inputs(wildcards, "eval")
    if s.student_run:
        inputs["student"] = p.out("distill", s.student_run, "student.pt")
    elif s.method in ("dd", "dd-teacher"):
        inputs["student"] = p.student_file
    if s.needs_pairs:
        pair_set = p.onestep_pair_set   # text-to-image: the pair set on the evaluation prompts
        inputs.update(index=p.out(pair_set, "index.json"), shards=p.pair_shards(pair_set))
    return inputs


def sample_options(wildcards):
    # of the wildcards only, so that Snakemake records them and a changed setting (e.g. sample.num) reruns the job
    s, c, inputs = sample_set(wildcards), exp_config(wildcards)["sample"], sample_inputs(wildcards)
    opts = [f"--method {s.method}", f"--num {s.num}", f"--batch-size {c['batch_size']}", f"--seed {c['seed']}",
            sampling_args(c), *s.args]
    if "student" in inputs:
        opts.append(f"--student {inputs['student']}")
    if s.needs_pairs:
        opts.append(f"--pairs {inputs['index']}")
    return " ".join(opts)


rule sample:
    input:
        unpack(sample_inputs),
    output:
        samples="results/{experiment}/samples/{set}.npz",
        info="results/{experiment}/samples/{set}.json",
        grid="results/{experiment}/samples/{set}.png",
    params:
        teacher=lambda wc, threads: teacher_args(wc, threads, "eval"),
        options=sample_options,
    log:
        "results/{experiment}/logs/samples/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/samples/{set}.tsv"
    threads: stage_threads("sample")
    resources:
        gpu=stage_resource("sample", "gpu"),
        mem_mb=stage_resource("sample", "mem_mb"),
        runtime=stage_resource("sample", "runtime"),
    shell:
        "{PY} sample {params.teacher} {params.options} --out {output.samples} > {log} 2>&1"
