# Teacher acquisition: every teacher, tokenizer, DD student and weight file is a released file, obtained by the
# `download` rule (the Hugging Face Hub for the paper's models; releases/tiny/ in this checkout for the embedded
# default's digits teachers and classifier), verified against its SHA-256. `snakemake tiny_teachers` retrains the
# shipped digits files from config/tiny/*.yaml into results/tiny_teachers/release/.

localrules: download


rule digits_reference:
    """The digits (train split) at the teachers' resolution: the FID reference of the digits teachers."""
    priority: max(map(experiment_chain_priority, PLANS), default=10)   # read by the distillations' periodic FID
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


rule download:
    """A released file (registry name or pinned URL) into resources/checkpoints/, verified against its SHA-256; after
    the check of the user's files, when an experiment has any (multi-GB downloads wait for it)."""
    priority: download_priority
    input:
        all_user_input_checks,
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


rule random_weights:
    """teacher.weights: random (the rehearsal configs): a released file's stand-in with seeded random weights, in the
    released format, under resources/random/ (nothing is downloaded)."""
    output:
        "resources/random/{filename}",
    params:
        name=lambda wc: DOWNLOADS[f"resources/random/{wc.filename}"],
    log:
        "resources/logs/random_{filename}.log",
    benchmark:
        "resources/benchmarks/random_{filename}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "{PY} random-weights {params.name:q} --out {output:q} > {log} 2>&1"


# ---------------------------------------------------------------------------------------------------------------
# snakemake tiny_teachers: retrain the shipped digits files (not part of the default run)
# ---------------------------------------------------------------------------------------------------------------
TINY = "results/tiny_teachers"
# The teachers' reports (share of samples the classifier reads as their class) use the shipped classifier, the fixed
# feature network of every FID, not the one retrained beside them: a teacher retrained on another machine than the
# classifier was then gets the same report, so its release file can still be reproduced bit for bit there. Read in
# place (a job's output would make its teachers retrain whenever resources/ is rebuilt), the commands check it against
# releases/tiny/lock.json before training (dd.pipeline.download.check_shipped_file), as the download rule checks its copy.
SHIPPED_CLASSIFIER = str(SHIPPED_DIR / f"{DIGITS_CLASSIFIER}.safetensors")   # the download rule's source


def tiny_config(wildcards):
    return str(ddconfig.resolve_path(config["tiny_teachers"]["configs"][wildcards.family], REPO))


rule tiny_teachers:
    """The release files (and lock.json) of the digits classifier and every family's tiny teacher."""
    input:
        f"{TINY}/release/lock.json",
        f"{TINY}/release/feature_validation.json",


rule train_classifier:
    """The digits classifier: feature network of FID / IS / precision / recall on the digits."""
    input:
        config=lambda wc: str(ddconfig.resolve_path(config["tiny_teachers"]["classifier"], REPO)),
    output:
        f"{TINY}/digits_classifier_16.pt",
    log:
        f"{TINY}/logs/train_classifier.log",
    benchmark:
        f"{TINY}/benchmarks/train_classifier.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "{PY} train-classifier --config {input.config:q} --out {output} --threads {threads} > {log} 2>&1"


rule train_tokenizer:
    input:
        config=tiny_config,
    output:
        checkpoint=f"{TINY}/{{family}}/tokenizer.pt",
        report=f"{TINY}/{{family}}/tokenizer.json",
        grid=f"{TINY}/{{family}}/tokenizer.png",
    log:
        f"{TINY}/logs/{{family}}/train_tokenizer.log",
    benchmark:
        f"{TINY}/benchmarks/{{family}}/train_tokenizer.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=600,
    shell:
        "{PY} train-tokenizer --config {input.config:q} --out {output.checkpoint} --threads {threads}"
        " > {output.report} 2> {log}"


rule train_teacher:
    input:
        config=tiny_config,
        tokenizer=f"{TINY}/{{family}}/tokenizer.pt",
        classifier=ancient(SHIPPED_CLASSIFIER),   # publishing a release must not retrain its teachers
    output:
        checkpoint=f"{TINY}/{{family}}/ar.pt",
        report=f"{TINY}/{{family}}/ar.json",
        grid=f"{TINY}/{{family}}/ar.png",
    log:
        f"{TINY}/logs/{{family}}/train_teacher.log",
    benchmark:
        f"{TINY}/benchmarks/{{family}}/train_teacher.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=1200,
    shell:
        "{PY} train-teacher --config {input.config:q} --tokenizer {input.tokenizer} --classifier {input.classifier}"
        " --out {output.checkpoint} --threads {threads} > {output.report} 2> {log}"


rule train_t2i_teacher:
    """The text-to-image teacher on captioned digits, with the tiny T5 encoder it is trained with (issue 13)."""
    input:
        config=lambda wc: str(ddconfig.resolve_path(config["tiny_teachers"]["t2i"], REPO)),
        classifier=ancient(SHIPPED_CLASSIFIER),   # publishing a release must not retrain its teachers
    output:
        checkpoint=f"{TINY}/llamagen_t2i/ar.pt",
        encoder=f"{TINY}/llamagen_t2i/ar_text_encoder.pt",
        grid=f"{TINY}/llamagen_t2i/ar.png",
    log:
        f"{TINY}/logs/llamagen_t2i/train_teacher.log",
    benchmark:
        f"{TINY}/benchmarks/llamagen_t2i/train_teacher.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=1200,
    shell:
        "{PY} train-t2i-teacher --config {input.config:q} --classifier {input.classifier} --out {output.checkpoint}"
        " > {log} 2>&1"


rule release_tiny:
    """Safetensors release files (float16 where no sample changes) and their lock file."""
    input:
        classifier=f"{TINY}/digits_classifier_16.pt",
        tokenizers=expand(f"{TINY}/{{family}}/tokenizer.pt", family=sorted(config["tiny_teachers"]["configs"])),
        teachers=expand(f"{TINY}/{{family}}/ar.pt", family=sorted(config["tiny_teachers"]["configs"])),
        t2i=f"{TINY}/llamagen_t2i/ar.pt",
        t2i_encoder=f"{TINY}/llamagen_t2i/ar_text_encoder.pt",
    output:
        f"{TINY}/release/lock.json",
    params:
        teachers=lambda wc: " ".join(f"--teacher {f}={TINY}/{f}/tokenizer.pt,{TINY}/{f}/ar.pt"
                                     for f in sorted(config["tiny_teachers"]["configs"])),
    log:
        f"{TINY}/logs/release_tiny.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "{PY} release-tiny --classifier {input.classifier} {params.teachers}"
        " --t2i-teacher {input.t2i},{input.t2i_encoder} --out {TINY}/release > {log} 2>&1"


rule validate_features:
    """Does FID with the classifier rank what people see? (floor, corruption curves)"""
    input:
        f"{TINY}/digits_classifier_16.pt",
    output:
        f"{TINY}/release/feature_validation.json",
    log:
        f"{TINY}/logs/validate_features.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "{PY} validate-features --weights {input} --out {output} > {log} 2>&1"
