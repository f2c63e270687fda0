# What the user gives a run (prompt files, a folder of reference images, a local text-encoder snapshot): checked by
# one job per experiment that has any, before its downloads and its first stages (dd/pipeline/user_inputs.py). They
# are not checked when the config is read, so that a dry run shows a paper configuration's jobs on a machine without
# the user's data; the files that are missing are listed when the workflow starts.

localrules: check_user_inputs


def _missing_user_files():
    missing = [(key, path) for p in PLANS.values() for key, (_, path, _) in p.user_files.items()
               if not Path(path).exists()]
    if missing:
        print("Not found yet (the check_user_inputs job refuses the run until they exist):\n"
              + "\n".join(f"  {key}: {path}" for key, path in missing), file=sys.stderr)


_missing_user_files()


def user_input_check(wildcards):
    """The check's result, for the rules that must wait for it (nothing when the experiment has no user files)."""
    p = P(wildcards)
    return [p.out("inputs_checked.json")] if p.user_files else []


def all_user_input_checks(wildcards=None):
    return [p.out("inputs_checked.json") for p in PLANS.values() if p.user_files]


def user_inputs_args(wildcards):
    opts = []
    for key, (kind, path, column) in P(wildcards).user_files.items():
        if kind == "prompts":
            opts.append("--prompts " + shlex.quote(f"{key}={path}:{column}"))
        elif kind == "images":
            opts.append("--images " + shlex.quote(f"{key}={path}"))
        else:
            opts.append("--encoder-dir " + shlex.quote(f"{key}={path}"))
    return " ".join(opts)


rule check_user_inputs:
    """The experiment's user-given files exist and are well formed (prompt files row by row), before anything else
    of the experiment runs. The files that exist are inputs, so a changed prompt file is checked again."""
    input:
        lambda wc: [path for _, path, _ in P(wc).user_files.values() if Path(path).is_file()],
    output:
        "results/{experiment}/inputs_checked.json",
    params:
        args=user_inputs_args,
    log:
        "results/{experiment}/logs/check_user_inputs.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{PY} check-inputs {params.args} --out {output} > {log} 2>&1"
