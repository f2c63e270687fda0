# Distillation (paper Alg. 2): the main run of each experiment and the ablation runs of Fig. 6 / Fig. 7.
# A job with several GPUs runs data-parallel through torchrun. A killed job resumes from DIR/last.pt (written
# atomically by `dd distill`); the loss curve is kept in DIR/train_metrics.jsonl, which Snakemake never deletes,
# and copied to the declared output once training has finished.

localrules: track_distill


def distill_run(wildcards):
    return P(wildcards).runs[wildcards.run]


def distill_inputs(wildcards):
    p, run = P(wildcards), distill_run(wildcards)
    d = exp_config(wildcards)["distill"]
    inputs = {**teacher_inputs(wildcards), "index": p.out("pairs", "index.json"), "shards": run.shards}
    if run.eval_every or d["emb_loss"] == "classifier":
        inputs.update(reference=p.reference, classifier=p.feature_weights)
    if p.lpips_backbone:
        inputs["lpips_backbone"] = p.lpips_backbone
    return inputs


def distill_options(wildcards):
    # a function of the wildcards only, not of `input`: Snakemake records (and compares on the next run) only such
    # params, so a changed setting reruns the job (with `input` a changed lr or max_steps kept the old student)
    run, d = distill_run(wildcards), exp_config(wildcards)["distill"]
    inputs = distill_inputs(wildcards)
    opts = [f"--num-shards {len(run.shards)}", f"--timesteps {' '.join(map(str, run.timesteps))}",
            f"--batch-size {d['batch_size']}",
            f"--lr {d['lr']}", "--lr-per-256" if d["lr_per_256"] else "--fixed-lr",
            f"--max-steps {run.max_steps}" if run.max_steps is not None else f"--epochs {run.epochs}",
            f"--ema-decay {d['ema_decay']}", f"--emb-loss {d['emb_loss']}", f"--ce-weight {d['ce_weight']}",
            f"--emb-weight {d['emb_weight']}", f"--checkpoint-every {d['checkpoint_every']}", f"--seed {d['seed']}"]
    if d["ema_warmup"]:
        opts.append("--ema-warmup")
    if d["student_config"]:
        opts.append(f"--student-config {shlex.quote(json.dumps(d['student_config'], sort_keys=True))}")
    if d["micro_batch_size"]:
        opts.append(f"--micro-batch-size {d['micro_batch_size']}")
    if not d["perceptual_clamp"]:
        opts.append("--no-perceptual-clamp")
    if d["lr_schedule"] != "constant":
        opts.append(f"--lr-schedule {d['lr_schedule']}")
    if d["cpu_amp"]:   # true: always; auto: where the CPU has bf16 instructions (decided by dd distill)
        opts.append("--cpu-amp auto" if d["cpu_amp"] == "auto" else "--cpu-amp")
    if d["emb_loss"] == "classifier":   # the perceptual loss on the digits classifier's features
        opts.append(f"--perceptual-classifier {inputs['classifier']}")
    if "lpips_backbone" in inputs:
        opts.append(f"--lpips-backbone {inputs['lpips_backbone']}")
    if run.eval_every:
        opts.append(f"--eval-every {run.eval_every} --eval-reference {inputs['reference']} "
                    f"--classifier {inputs['classifier']}")
        if run.eval_split_step:
            opts.append(f"--eval-split-step {run.eval_split_step}")
    return " ".join(opts)


def distill_launcher(wildcards, resources):
    processes = exp_config(wildcards)["resources"]["distill"]["processes"] or resources.gpu
    if processes > 1:  # one process per GPU (NCCL), or CPU processes on gloo (the rehearsals)
        return f"torchrun --standalone --nproc_per_node={processes} -m dd"
    return PY


rule distill:
    priority: distill_priority   # the longest jobs and most of the run's critical path: first when ready
    input:
        unpack(distill_inputs),
    output:
        student="results/{experiment}/distill/{run}/student.pt",
        metrics="results/{experiment}/distill/{run}/metrics.jsonl",
    params:
        launcher=distill_launcher,
        teacher=lambda wc, threads: teacher_args(wc, threads),
        options=distill_options,
        dir=lambda wc: f"results/{wc.experiment}/distill/{wc.run}",
    log:
        "results/{experiment}/logs/distill/{run}.log",
    benchmark:
        "results/{experiment}/benchmarks/distill/{run}.tsv"
    threads: stage_threads("distill")
    resources:
        gpu=stage_resource("distill", "gpu"),
        mem_mb=stage_resource("distill", "mem_mb"),
        runtime=stage_resource("distill", "runtime"),
    shell:
        "{params.launcher} distill {params.teacher} --pairs {input.index} --out {params.dir} {params.options}"
        " --metrics-jsonl {params.dir}/train_metrics.jsonl > {log} 2>&1"
        " && cp {params.dir}/train_metrics.jsonl {output.metrics}"


rule track_distill:
    """MLflow: a child run per distillation with its loss curve and periodic FID."""
    input:
        metrics="results/{experiment}/distill/{run}/metrics.jsonl",
    output:
        "results/{experiment}/mlflow/distill-{run}.json",
    params:
        track=lambda wc: track_cmd("distill", wc) + f" --run {wc.run}",
    log:
        "results/{experiment}/logs/mlflow/distill-{run}.log",
    benchmark:
        "results/{experiment}/benchmarks/mlflow/distill-{run}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.track} --out {output} > {log} 2>&1"
