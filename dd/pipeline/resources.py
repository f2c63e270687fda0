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
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from dd.pipeline.config import ConfigError, load_config, released_teachers

CUDA_HOST_MB = 3000          # host memory of the CUDA runtime in a GPU process (libraries, context): typical, not measured
MAX_OVER = 10
MB = 1 << 20
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
    if stage == "sample":
        return exp["sample"]["num"] * pixels / MB
    if stage == "evaluate":
        return exp["sample"]["num"] * (pixels + (2048 + 1008) * 4) / MB
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
            measured_per = measured / (rehearsal["resources"]["distill"]["processes"] or 1)
            processes = declared["processes"] or max(gpu, 1)
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
    parser.add_argument("--rehearsal", type=Path, required=True,
                        help="its rehearsal configuration (config/rehearsal/<name>.yaml), already run")
    parser.add_argument("--benchmarks", type=Path, default=Path("results"),
                        help="the rehearsal's results folder (results/<experiment>/benchmarks inside)")
    parser.add_argument("--gpu-estimate", action="store_true",
                        help="also estimate the distillation's memory per GPU at the configuration's batch (VAR-d16 and "
                             "LlamaGen-B experiments: their architectures are built with random weights here)")


def main(args) -> int:
    checks = check_resources(args.configfile, args.rehearsal, args.benchmarks)
    print(format_table(checks))
    if args.gpu_estimate:
        import json

        for name, exp in load_config(args.configfile)["experiments"].items():
            estimate = distill_gpu_estimate(exp["teacher"]["family"], exp) if "distill" in exp else None
            what = json.dumps(estimate) if estimate else "not estimated (only VAR-d16 and LlamaGen-B are built here)"
            print(f"{name}: distillation per GPU: {what}")
    bad = [c for c in checks if c.problem]
    for c in bad:
        print(f"check-resources: experiments.{c.experiment}.resources.{c.stage}.mem_mb {c.problem}")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# GPU memory of a distillation step at the paper's per-GPU batch (not measurable on a CPU machine directly)
# --------------------------------------------------------------------------------------------------
def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn()`` builds its graph (each storage once,
    parameters excluded: they are counted as model state). This is the per-batch memory of a training step that
    does not depend on the device; CUDA's bf16 autocast keeps some of them in half precision, so the figure is an
    upper bound for a GPU run."""
    seen: dict[tuple, int] = {}

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or t.requires_grad and t.is_leaf:
            return t
        key = (t.untyped_storage().data_ptr(), t.device.type)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def distill_gpu_estimate(family: str, exp: dict, probes: tuple[int, int] = (1, 2)) -> dict | None:
    """Per-GPU memory (GB) of the experiment's distillation at its real per-GPU batch: model states (student fp32
    weights, gradients, AdamW moments and EMA: 20 bytes per parameter; teacher, tokenizer and LPIPS network 4 bytes
    per parameter) plus the activations autograd keeps, measured at two small batches on the family's smallest real
    architecture with random weights (LlamaGen-B, VAR-d16) and scaled linearly to the per-GPU batch."""
    import torch

    from dd.bench import real_size_teacher
    from dd.families.loading import student_from_teacher
    from dd.method.distill import build_lpips, distill_losses
    from dd.method.settings import DistillConfig

    d, res = exp["distill"], exp["resources"]["distill"]
    gpus = max(int(res["gpu"] or 0), 1)
    bench = real_size_teacher(family)
    if not exp["teacher"]["name"].lower().endswith(bench.config.lower()):
        return None
    teacher = bench.teacher.eval().requires_grad_(False)
    student = student_from_teacher(teacher, **(d.get("student_config") or {})).train()
    cfg = DistillConfig(timesteps=list(d["timesteps"]), batch_size=probes[-1], emb_loss=d["emb_loss"], seed=0)
    lp = build_lpips(cfg, "cpu") if d["emb_loss"] == "lpips" else None
    V, C = teacher.codebook.shape
    g = torch.Generator().manual_seed(0)
    n = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0   # noqa: E731
    states = 20 * n(student) + 4 * (n(teacher) + (n(lp) if lp is not None else 0))
    per_gpu_batch = d["batch_size"] // gpus
    gb = 1e9
    out = {"architecture": bench.config, "per_gpu_batch": per_gpu_batch, "gpus": gpus,
           "model_states_gb": round(states / gb, 2)}
    # fp32, and under bf16 autocast as `dd distill` runs on CUDA (amp; CPU autocast stands in for CUDA's here)
    for precision in ("fp32", "bf16_autocast"):
        measured = {}
        for b in probes:
            labels = torch.randint(teacher.num_classes, (b,), generator=g)
            tokens = torch.randint(V, (b, teacher.n_tokens), generator=g)
            noise = torch.randn(b, teacher.n_tokens, C, generator=g)
            t_idx = torch.arange(b) % len(cfg.timesteps)      # every timestep of the set, the first one included
            with torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32"):
                measured[b] = saved_activation_bytes(
                    lambda: distill_losses(student, teacher, cfg, labels, tokens, noise, t_idx, lp)["loss"])
        per_sample = (measured[probes[1]] - measured[probes[0]]) / (probes[1] - probes[0])
        activations = measured[probes[0]] + per_sample * (per_gpu_batch - probes[0])
        out[precision] = {"activations_per_sample_gb": round(per_sample / gb, 3),
                          "activations_gb": round(activations / gb, 1),
                          "total_gb": round((states + activations) / gb, 1)}
    return out
