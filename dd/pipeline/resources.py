"""Do the ``resources:`` a configuration declares fit what its jobs need? (host memory, ``mem_mb``)

What a job needs is measured, not guessed: the peak resident memory of the same job in a rehearsal of the
configuration at real model size (``config/rehearsal/<name>.yaml``; Snakemake's benchmark files), scaled to the
configuration's counts. A rehearsal on the CPU holds everything in host memory (weights, activations of its small
batches), so what it measures bounds the host share of a GPU job from above, except for what grows with the counts,
which its few samples and pairs do not show. Those terms, on the host:

* ``sample``: the sample set, kept as uint8 (3 bytes per pixel) until it is written (``dd.method.sample``);
* ``evaluate``: the same set read back, plus torch-fidelity's features of it (2048 + 1008 float32 per image);
* ``distill``: the pair records, memory-mapped, which an epoch touches entirely (12 + 2 bytes per token), per process;
* ``pairs``: nothing (records are streamed to disk chunk by chunk).

A GPU process also holds the CUDA runtime in host memory, which a CPU rehearsal cannot measure; ``CUDA_HOST_MB``
is added per process for a GPU job (a typical figure; state it as such). ``distill`` runs one process per GPU, the
rehearsal ``resources.distill.processes`` of them; the benchmark's figure covers all of its processes.

A declared ``mem_mb`` fails when it is below the need (the job would be killed for memory) or more than
``MAX_OVER`` times it (it asks ten times what it uses).

    python -m dd check-resources --configfile config/llamagen_b.yaml \
        --rehearsal config/rehearsal/llamagen_b.yaml --benchmarks results

GPU memory cannot be measured on a CPU machine; on a CUDA device, ``--gpu-measure`` runs each GPU stage's own code
at the configuration's batch sizes with its teacher architecture in random weights (``measure_gpu_stages``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from dd.pipeline.config import ConfigError, distill_processes, load_config, released_teachers

CUDA_HOST_MB = 3000          # host memory of the CUDA runtime in a GPU process (libraries, context): typical, not measured
MAX_OVER = 10
MB = 1 << 20
GPU_STAGES = ("pairs", "distill", "sample")
STAGE_BENCHMARKS = {"pairs": "pairs/shard_*.tsv", "distill": "distill/main.tsv", "sample": "samples/*.tsv",
                    "evaluate": "metrics/*.tsv"}


@dataclass
class StageCheck:
    experiment: str
    stage: str
    measured_mb: float        # peak of the rehearsal's jobs of this stage
    need_mb: float            # scaled to the configuration's counts
    declared_mb: int

    @property
    def ratio(self) -> float:
        return self.declared_mb / self.need_mb

    @property
    def problem(self) -> str | None:
        if self.declared_mb < self.need_mb:
            return f"declares {self.declared_mb} MB, needs {self.need_mb:.0f} MB: the job would be killed for memory"
        if self.ratio > MAX_OVER:
            return f"declares {self.declared_mb} MB, {self.ratio:.1f}x the {self.need_mb:.0f} MB it needs"
        return None


def peak_rss_mb(benchmarks: Path, pattern: str) -> float | None:
    """The largest ``max_rss`` (MB) over the benchmark files matching ``pattern``; None when there are none."""
    peaks = []
    for path in sorted(benchmarks.glob(pattern)):
        with open(path) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        peaks += [float(r["max_rss"]) for r in rows if r.get("max_rss") not in (None, "", "NA", "-")]
    return max(peaks) if peaks else None


def _count_terms_mb(exp: dict, stage: str, record_bytes: int) -> float:
    """Host memory that grows with the experiment's counts (see the module docstring), per process."""
    _, released = released_teachers()[exp["teacher"]["name"]]
    pixels = 3 * released.image_size ** 2
    num = max([exp["sample"]["num"], *exp["sample"].get("num_by_set", {}).values()])   # the largest set
    if stage == "sample":
        return num * pixels / MB
    if stage == "evaluate":
        return num * (pixels + (2048 + 1008) * 4) / MB
    if stage == "distill":
        return exp["pairs"]["num_pairs"] * record_bytes / MB
    return 0.0


def pair_record_bytes(results: Path) -> int:
    """Bytes of one pair record, from the rehearsal's first shard manifest (the layout is the real run's)."""
    from dd.method.pairs import read_manifest, record_dtype

    shard = results / "pairs" / "shard_00000.bin"
    if not shard.with_suffix(".json").is_file():
        return 0
    cfg = read_manifest(shard)["config"]
    return record_dtype(cfg["n_tokens"], cfg["vocab_size"]).itemsize


def check_experiment(name: str, exp: dict, rehearsal: dict, benchmarks: Path) -> list[StageCheck]:
    """One StageCheck per stage the experiment runs and the rehearsal measured."""
    checks, record = [], pair_record_bytes(benchmarks.parent)
    for stage, pattern in STAGE_BENCHMARKS.items():
        if stage not in exp["resources"] or (stage in ("pairs", "distill") and "pairs" not in exp):
            continue
        measured = peak_rss_mb(benchmarks, pattern)
        if measured is None:
            raise ConfigError([(f"{benchmarks}", f"no benchmark files {pattern}: run the rehearsal first")],
                              str(benchmarks))
        declared = exp["resources"][stage]
        gpu = int(declared["gpu"] or 0)
        if stage == "distill":   # per process, then the configuration's processes
            measured_per = measured / distill_processes(rehearsal["resources"])
            processes = distill_processes(exp["resources"])
            need = processes * (measured_per + _count_terms_mb(exp, stage, record) + (CUDA_HOST_MB if gpu else 0))
        else:
            rehearsal_terms = _count_terms_mb(rehearsal, stage, record)
            need = measured - rehearsal_terms + _count_terms_mb(exp, stage, record) + (CUDA_HOST_MB if gpu else 0)
        checks.append(StageCheck(name, stage, measured, need, int(declared["mem_mb"])))
    return checks


def check_resources(config_path: Path, rehearsal_path: Path, benchmarks_root: Path) -> list[StageCheck]:
    """Every experiment of ``config_path`` against its namesake in the rehearsal configuration; the rehearsal's
    benchmark files are under ``benchmarks_root/<experiment>/benchmarks`` (or ``benchmarks_root`` itself when the
    configuration has one experiment)."""
    config, rehearsal = load_config(config_path), load_config(rehearsal_path)
    checks = []
    for name, exp in config["experiments"].items():
        if name not in rehearsal["experiments"]:
            raise ConfigError([(f"experiments.{name}", f"no experiment of that name in {rehearsal_path}")],
                              str(rehearsal_path))
        bench = benchmarks_root / name / "benchmarks"
        if not bench.is_dir() and len(config["experiments"]) == 1:
            bench = benchmarks_root
        checks += check_experiment(name, exp, rehearsal["experiments"][name], bench)
    return checks


def format_table(checks: list[StageCheck]) -> str:
    lines = [f"{'experiment':<24} {'stage':<9} {'rehearsal MB':>12} {'needs MB':>9} {'declared MB':>11} {'ratio':>6}  "
             "verdict"]
    for c in checks:
        lines.append(f"{c.experiment:<24} {c.stage:<9} {c.measured_mb:>12.0f} {c.need_mb:>9.0f} {c.declared_mb:>11} "
                     f"{c.ratio:>6.1f}  {c.problem or 'ok'}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--configfile", type=Path, required=True, help="the configuration whose resources to check")
    parser.add_argument("--rehearsal", type=Path, default=None,
                        help="its rehearsal configuration (config/rehearsal/<name>.yaml), already run: check the "
                             "declared host memory (mem_mb) against the rehearsal's measured peaks")
    parser.add_argument("--benchmarks", type=Path, default=Path("results"),
                        help="the rehearsal's results folder (results/<experiment>/benchmarks inside)")
    parser.add_argument("--gpu-measure", action="store_true",
                        help="on a CUDA device: run pair generation, a distillation step and sampling at the "
                             "configuration's batch sizes, with its teachers' architectures in random weights, and "
                             "report peak GPU memory and projected job runtimes")
    parser.add_argument("--stages", nargs="+", choices=GPU_STAGES, default=list(GPU_STAGES),
                        help="the stages --gpu-measure runs")
    parser.add_argument("--device", default="cuda", help="the CUDA device of --gpu-measure")
    parser.add_argument("--json", type=Path, default=None, help="write --gpu-measure's results here")


def main(args) -> int:
    import json

    if not (args.rehearsal or args.gpu_measure):
        raise SystemExit("check-resources: give --rehearsal (host memory) or --gpu-measure (GPU memory, on CUDA)")
    device = torch.device(args.device)
    if args.gpu_measure and (device.type != "cuda" or not torch.cuda.is_available()):
        raise SystemExit(f"check-resources: --gpu-measure needs a CUDA device, got --device {args.device} "
                         f"(CUDA available: {torch.cuda.is_available()})")
    checks = []
    if args.rehearsal:
        checks = check_resources(args.configfile, args.rehearsal, args.benchmarks)
        print(format_table(checks))
    measured = {}
    if args.gpu_measure:
        for name, exp in load_config(args.configfile)["experiments"].items():
            measured[name] = measure_gpu_stages(exp, device, stages=args.stages)
            what = json.dumps(measured[name]) if measured[name] else "not measured (not a released architecture)"
            print(f"{name}: measured on the GPU: {what}", flush=True)
    if args.json and measured:
        from dd.io import atomic_write_json

        atomic_write_json(args.json, measured)
    bad = [c for c in checks if c.problem]
    for c in bad:
        print(f"check-resources: experiments.{c.experiment}.resources.{c.stage}.mem_mb {c.problem}")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# GPU memory and time of each GPU stage, measured on a CUDA device at the configuration's batch sizes
# --------------------------------------------------------------------------------------------------
def _cuda_stage(device, fn, repeats: int = 1) -> dict:
    """Peak GPU memory (GB, allocated by tensors and reserved by the caching allocator) and the median seconds of
    ``repeats`` timed calls of ``fn``, after one untimed call."""
    import time

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    gb = 1e9
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / gb, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / gb, 2),
            "seconds": round(sorted(times)[len(times) // 2], 4)}


def random_weight_teacher(name: str, workdir: Path):
    """The released teacher ``name``'s architecture with random weights, through the released files' loader (the
    stand-ins of ``python -m dd random-weights``); None for a teacher not in the original formats (the digits)."""
    from dd.families.registry import get_family
    from dd.pipeline.random_weights import write_random_release

    family, released = released_teachers()[name]
    if not released.original_format:
        return None
    tok, model = workdir / f"{name}.tokenizer.pt", workdir / f"{name}.model.pt"
    write_random_release(released.tokenizer, tok)
    write_random_release(released.model, model)
    return get_family(family).load_released_teacher(tok, model)


def measure_gpu_stages(exp: dict, device, stages=GPU_STAGES, distill_repeats: int = 3) -> dict | None:
    """Run each GPU stage's real work once or a few times on ``device`` at the experiment's real batch sizes,
    with the experiment's teacher architecture in random weights, and report its peak GPU memory and time,
    projected to the job's runtime (minutes) next to the declared one:

    * ``pairs``: one chunk of ``pairs.chunk`` pairs through ``flow_trajectory`` (teacher + flow map, float32, as
      ``generate-pairs`` runs it); a shard job writes ``shard_size`` pairs;
    * ``distill``: ``optimisation_step`` + EMA (``dd distill``'s step: bf16 autocast, the configured loss and
      micro-batches, AdamW) at the per-GPU batch ``batch_size / gpus``; a run takes ``epochs * num_pairs /
      batch_size`` steps (one GPU alone: the all-reduce of several is not measured);
    * ``sample``: one batch of ``sample.batch_size`` for the teacher (its slowest method), DD 1-step and 2-step,
      each decoded and scored by ``teacher_nll_bits`` as ``dd sample`` does; a job writes ``sample.num`` images.

    LPIPS's backbone is randomly initialised (same architecture and size as the released one). None when the
    experiment's teacher is not a released architecture."""
    import tempfile

    from dd.families.loading import student_from_teacher
    from dd.families.registry import get_family
    from dd.method.distill import EMA, build_perceptual, new_student, optimisation_step
    from dd.method.pairs import flow_trajectory
    from dd.method.sample import dd_sample, decode_in_batches, teacher_nll_bits, teacher_sample
    from dd.method.settings import DistillConfig
    from dd.method.student import nearest_code_matmul

    family = exp["teacher"]["family"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = random_weight_teacher(exp["teacher"]["name"], Path(tmp))
    if teacher is None:
        return None
    fam = get_family(family)
    teacher = teacher.to(device).eval().requires_grad_(False)
    V, C = teacher.codebook.shape
    n, res = teacher.n_tokens, exp["resources"]
    g = torch.Generator(device=device).manual_seed(0)
    out = {"teacher": exp["teacher"]["name"], "device": torch.cuda.get_device_name(device)}

    def runtime(stage: str, minutes: float) -> dict:
        return {"projected_runtime_min": round(minutes, 1), "declared_runtime_min": res[stage].get("runtime")}

    p = exp.get("pairs")
    if p and "pairs" in stages:
        sampling = fam.default_sampling(p["cfg"])
        labels = torch.arange(p["chunk"], device=device) % teacher.num_classes
        noise = torch.randn(p["chunk"], n, C, device=device, generator=g)
        with torch.no_grad():
            r = _cuda_stage(device, lambda: flow_trajectory(teacher, labels, noise, sampling, p["nfe"], p["order"]))
        out["pairs"] = {"batch": p["chunk"], **r, **runtime("pairs", r["seconds"] / p["chunk"] * p["shard_size"] / 60)}

    if p and "distill" in exp and "distill" in stages:
        d = exp["distill"]
        gpus = distill_processes(res)
        b = d["batch_size"] // gpus
        cfg = DistillConfig(timesteps=list(d["timesteps"]), batch_size=b, micro_batch_size=d["micro_batch_size"],
                            emb_loss=d["emb_loss"], seed=0)
        student = new_student(teacher, d["seed"], d["student_config"]).to(device).train()   # as dd distill builds it
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=tuple(cfg.betas))
        ema, lp = EMA(student), build_perceptual(cfg, device)
        batch = (torch.arange(b, device=device) % teacher.num_classes, torch.randint(V, (b, n), device=device, generator=g),
                 torch.randn(b, n, C, device=device, generator=g), torch.arange(b, device=device) % len(cfg.timesteps))

        def step():
            optimisation_step(student, student, teacher, cfg, batch, opt, lp, True, 0)
            ema.update(student, 0.9999)

        r = _cuda_stage(device, step, distill_repeats)
        steps = d["max_steps"] or d["epochs"] * p["num_pairs"] / d["batch_size"]
        out["distill"] = {"per_gpu_batch": b, "micro_batch": cfg.micro_batch_size or b, "gpus": gpus,
                          "emb_loss": d["emb_loss"], **r,
                          **runtime("distill", r["seconds"] * steps / 60)}
        del student, opt, ema, lp, batch

    if "sample" in exp and "sample" in stages:
        s = exp["sample"]
        sampling = fam.default_sampling(s["cfg"])
        student = student_from_teacher(teacher).to(device).eval().requires_grad_(False)
        labels = torch.arange(s["batch_size"], device=device) % teacher.num_classes
        noise = torch.randn(s["batch_size"], n, C, device=device, generator=g)
        second = fam.second_timestep(teacher.n_steps)

        def scored(emb):
            decode_in_batches(teacher.decode_embeddings, emb)
            teacher_nll_bits(teacher, nearest_code_matmul(emb, teacher.codebook), labels, sampling)

        methods = {"teacher": lambda: scored(teacher_sample(teacher, labels, sampling, g)[0]),
                   "dd_1step": lambda: scored(dd_sample(student, teacher, labels, noise, [1], second)[0]),
                   "dd_2step": lambda: scored(dd_sample(student, teacher, labels, noise, [1, second], second)[0])}
        out["sample"] = {"batch": s["batch_size"]}
        for name, fn in methods.items():
            with torch.no_grad():
                r = _cuda_stage(device, fn)
            out["sample"][name] = {**r, **runtime("sample", r["seconds"] / s["batch_size"] * s["num"] / 60)}
    return out
