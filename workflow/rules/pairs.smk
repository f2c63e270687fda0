# Pair generation (paper Alg. 1): one job per shard, then an index that checks the shards form one pair set.
# A killed shard job resumes from its last committed chunk when Snakemake reruns it (the partial data lives in
# NAME.bin.part beside the output, which Snakemake does not delete).

localrules: track_shards


def shard_paths(wildcards):
    return P(wildcards).pair_shards(wildcards.pair_set)


def pair_prompts(wildcards):
    """Text-to-image: the main pairs are on the train prompts, onestep*'s pairs on the evaluation prompts."""
    return "eval" if wildcards.pair_set == "onestep_pairs" else "train"


rule generate_pairs:
    wildcard_constraints:
        pair_set="pairs",
    priority: chain_priority   # the distillation waits for these shards: before onestep*'s pairs and the sample sets
    input:
        unpack(lambda wc: teacher_inputs(wc, pair_prompts(wc))),
    output:
        bin="results/{experiment}/{pair_set}/shard_{shard}.bin",
        manifest="results/{experiment}/{pair_set}/shard_{shard}.json",
    params:
        teacher=lambda wc, threads: teacher_args(wc, threads, pair_prompts(wc)),
        shard_index=lambda wc: int(wc.shard),
        shard_size=lambda wc: exp_config(wc)["pairs"]["shard_size"],
        # onestep*'s pair set: other noise than the main pairs'
        seed=lambda wc: exp_config(wc)["pairs"]["seed"] + (wc.pair_set == "onestep_pairs"),
        chunk=lambda wc: exp_config(wc)["pairs"]["chunk"],
        solver=lambda wc: f"--nfe {exp_config(wc)['pairs']['nfe']} --order {exp_config(wc)['pairs']['order']}",
        sampling=lambda wc: sampling_args(exp_config(wc)["pairs"]),
    log:
        "results/{experiment}/logs/{pair_set}/shard_{shard}.log",
    benchmark:
        "results/{experiment}/benchmarks/{pair_set}/shard_{shard}.tsv"
    threads: stage_threads("pairs")
    resources:
        gpu=stage_resource("pairs", "gpu"),
        mem_mb=stage_resource("pairs", "mem_mb"),
        runtime=stage_resource("pairs", "runtime"),
    shell:
        "{PY} generate-pairs {params.teacher} --shard {params.shard_index} --count {params.shard_size}"
        " --seed {params.seed} --chunk {params.chunk} {params.solver} {params.sampling} --out {output.bin}"
        " --no-progress > {log} 2>&1"


use rule generate_pairs as generate_onestep_pairs with:
    wildcard_constraints:
        pair_set="onestep_pairs",
    priority: 0


rule shard_index:
    """Merge step: check that all shards belong to one pair set (teacher, settings, sizes, checksums)."""
    priority: chain_priority
    input:
        shard_paths,
    output:
        "results/{experiment}/{pair_set}/index.json",
    log:
        "results/{experiment}/logs/{pair_set}/index.log",
    benchmark:
        "results/{experiment}/benchmarks/{pair_set}/index.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        "{PY} index-shards --out {output} {input} > {log} 2>&1"


rule track_shards:
    """MLflow: a child run per pair shard (its manifest and the job's time and memory)."""
    input:
        "results/{experiment}/pairs/index.json",
    output:
        "results/{experiment}/mlflow/pairs.json",
    params:
        track=lambda wc: track_cmd("shards", wc),
    log:
        "results/{experiment}/logs/mlflow/pairs.log",
    benchmark:
        "results/{experiment}/benchmarks/mlflow/pairs.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        "{params.track} --out {output} > {log} 2>&1"
