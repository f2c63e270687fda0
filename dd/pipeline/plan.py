"""The experiment plan: everything the rules of one validated experiment need.

``plan(name, experiment)`` turns a checked experiment (``dd.pipeline.config``) into the teacher files, shard names,
distillation runs (main + ablations) and sample sets with their ``dd sample`` arguments. Output paths follow one
layout, ``results/<experiment>/...``; downloads go to ``resources/checkpoints/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dd.pipeline.config import released_students, released_teachers
from dd.pipeline.download import DIGITS_CLASSIFIER

CHECKPOINTS = "resources/checkpoints"
DIGITS_DIR = "results/digits"


@dataclass
class SampleSet:
    name: str  # file stem under results/<experiment>/samples/
    method: str  # dd sample --method
    args: list[str]  # extra dd sample arguments
    student_run: str | None = None  # distillation run whose student it needs
    needs_pairs: bool = False  # onestep*: the pair shards
    tables: tuple[int, ...] = (1,)
    num: int = 0  # images (sample.num, or its sample.num_by_set entry)
    splits: int = 1  # evaluation parts, each of sample.num / evaluation.splits images


@dataclass
class DistillRun:
    name: str  # folder under results/<experiment>/distill/
    timesteps: list[int]
    shards: list[str]
    max_steps: int | None
    epochs: float | None
    eval_every: int
    ablation: str | None = None  # "timesteps" (Fig. 6) / "pairs" (Fig. 7) / None (the main run)
    pairs: int = 0
    eval_split_step: int | None = None  # its periodic FID's split (sample.split_step; None: its last timestep)


@dataclass
class Plan:
    name: str
    family: str
    teacher_name: str  # a released teacher (the tables' teacher column)
    teacher_label: str  # the tables' teacher column
    steps: int  # the teacher's AR steps
    image_size: int
    tokenizer: str
    model: str
    released: bool  # the teacher files are in the original code's format
    student_file: str | None  # released DD student, else None
    shards: list[str]
    runs: dict[str, DistillRun]
    sets: dict[str, SampleSet]
    reference: str
    feature_weights: str
    lpips_backbone: str | None = None  # local LPIPS backbone weights (emb_loss lpips), else a random backbone
    # text-to-image: the prompt files ("train": pairs and distillation, "eval": sample sets) and their caption
    # features, the encoder's weights (tiny) and, for the digits captions, the attribute scale of prompt_accuracy
    prompt_files: dict[str, str] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    text_encoder: str | None = None
    attribute_scale: str | None = None
    prompt_columns: dict[str, str] = field(default_factory=dict)   # each prompt file's column of prompts
    clip_model: str | None = None            # evaluation.clip_model: CLIP score against the eval prompts
    # what the user gives (checked by the check_user_inputs job, not when the config is read): config key ->
    # ("prompts", file, column) / ("images", folder, "") / ("encoder", folder, "")
    user_files: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # text-to-image onestep*: its own pair set on the evaluation prompts (results/<name>/onestep_pairs/)
    onestep_shards: list[str] = field(default_factory=list)
    downloads: dict[str, str] = field(default_factory=dict)  # file under resources/checkpoints (or resources/random
                                                             # with weights: random) -> registry name/URL

    def out(self, *parts: str) -> str:
        return "/".join(("results", self.name) + parts)

    def pair_shards(self, pair_set: str) -> list[str]:
        """The shards of a pair set: "pairs" (distillation; class-conditional onestep*) or "onestep_pairs"."""
        return self.onestep_shards if pair_set == "onestep_pairs" else self.shards

    @property
    def onestep_pair_set(self) -> str:
        return "onestep_pairs" if self.onestep_shards else "pairs"


RANDOM_WEIGHTS = "resources/random"  # stand-ins with random weights (teacher.weights: random)


def download_path(name_or_url: str, random: bool = False) -> str:
    from dd.pipeline.download import resolve

    return f"{RANDOM_WEIGHTS if random else CHECKPOINTS}/{resolve(name_or_url).filename}"


def plan(name: str, exp: dict, base_dir: Path | None = None) -> Plan:
    """Everything the rules of one (validated) experiment need."""
    teacher = exp["teacher"]
    family, tname = teacher["family"], teacher["name"]
    downloads: dict[str, str] = {}
    random = teacher.get("weights", "released") == "random"

    def fetch(name_or_url: str) -> str:
        path = download_path(name_or_url, random)
        downloads[path] = name_or_url
        return path

    _, released = released_teachers()[tname]
    steps, image_size = released.steps, released.image_size
    tokenizer, model = fetch(released.tokenizer), fetch(released.model)
    student_file = fetch(teacher["released_student"]) if "released_student" in teacher else None

    sample = exp["sample"]
    shards: list[str] = []
    if student_file is None or sample["onestep"]:  # only these need pairs
        pairs = exp["pairs"]
        n_shards = pairs["num_pairs"] // pairs["shard_size"]
        shards = [f"results/{name}/pairs/shard_{i:05d}.bin" for i in range(n_shards)]

    distill = exp.get("distill")
    ts = list(distill["timesteps"] if distill else released_students()[teacher["released_student"]].timesteps)
    runs: dict[str, DistillRun] = {}
    if student_file is None:
        eval_split = sample["split_step"]   # the periodic FID splits where the sample sets do
        runs["main"] = DistillRun("main", ts, shards, distill["max_steps"], distill["epochs"], distill["eval_every"],
                                  pairs=pairs["num_pairs"], eval_split_step=eval_split)
        ab = exp["ablations"]
        for abl in ab["timesteps"]:
            run = "timesteps-" + "-".join(map(str, abl))
            runs[run] = DistillRun(run, list(abl), shards, ab["max_steps"], None, ab["eval_every"], "timesteps",
                                   pairs=pairs["num_pairs"], eval_split_step=eval_split)
        for size in ab["pair_set_sizes"]:
            run = f"pairs-{size}"
            runs[run] = DistillRun(run, ts, shards[: size // pairs["shard_size"]], ab["max_steps"], None,
                                   ab["eval_every"], "pairs", pairs=size, eval_split_step=eval_split)

    sets: dict[str, SampleSet] = {}
    if sample["teacher"]:
        sets["teacher"] = SampleSet("teacher", "teacher", [], tables=(1, 2))
    for n in sorted(sample["skip"]):
        sets[f"skip-{n}"] = SampleSet(f"skip-{n}", "skip", ["--skip", str(n)])
    onestep_shards: list[str] = []
    if sample["onestep"]:
        sets["onestep"] = SampleSet("onestep", "onestep", [], needs_pairs=True)
        if sample["onestep_pairs"]:   # text-to-image: pairs on the evaluation prompts
            onestep_shards = [f"results/{name}/onestep_pairs/shard_{i:05d}.bin"
                              for i in range(sample["onestep_pairs"] // exp["pairs"]["shard_size"])]
    student_run = None if student_file else "main"
    # where the student hands over from logits to embeddings: sample.split_step, else a released student's release
    # split (its sampling script's) and a distilled student's last trained timestep
    default_split = released_students()[teacher["released_student"]].split_step if student_file else ts[-1]
    split = (["--released-student"] if student_file else []) + ["--split-step",
                                                                 str(sample["split_step"] or default_split)]
    for k in sorted(sample["dd_steps"]):
        sets[f"dd-{k}step"] = SampleSet(f"dd-{k}step", "dd", ["--steps", *map(str, ts[:k]), *split], student_run)
    for n in sorted(sample["dd_teacher_starts"]):
        set_name = f"dd-teacher-{n}-{ts[1]}"
        sets[set_name] = SampleSet(set_name, "dd-teacher", ["--start", str(n), "--second", str(ts[1]), *split],
                                   student_run, tables=(2,))

    ev = exp["evaluation"]
    part = sample["num"] // ev["splits"]   # every set is evaluated in parts of this size: comparable FIDs
    for s in sets.values():
        s.num = sample["num_by_set"].get(s.name, sample["num"])
        s.splits = s.num // part
    user_files: dict[str, tuple[str, str, str]] = {}
    if ev["reference"] == "digits":
        reference = f"{DIGITS_DIR}/reference_{image_size}.npz"
        weights = fetch(DIGITS_CLASSIFIER)     # the shipped feature network of the digits (releases/tiny/)
    elif ev["reference"] == "images":          # FID statistics of the user's folder, computed once by a job
        reference = f"results/{name}/reference/images_{image_size}.npz"
        weights = fetch(ev["feature_weights_url"])
        user_files[f"experiments.{name}.evaluation.reference_images"] = ("images", ev["reference_images"], "")
    else:
        reference = fetch(ev["reference"])
        weights = fetch(ev["feature_weights_url"])
    lpips_backbone = None
    if student_file is None and distill["emb_loss"] == "lpips" and distill["lpips_backbone_url"]:
        lpips_backbone = fetch(distill["lpips_backbone_url"])
    prompt_files, captions, text_encoder, attribute_scale, prompt_columns = {}, {}, None, None, {}
    if "prompts" in exp:
        pr = exp["prompts"]
        if pr["source"] == "digits":
            prompt_files = {split: f"results/{name}/prompts/prompts_{split}.tsv" for split in ("train", "eval")}
            attribute_scale = f"results/{name}/prompts/attribute_scale.json"
        else:
            prompt_files = {"train": pr["train"], "eval": pr["eval"] or fetch(pr["eval_download"])}
        prompt_columns = {"train": pr["column"], "eval": pr["eval_column"] or pr["column"]}
        for split in ("train", "eval"):
            if pr[split]:
                user_files[f"experiments.{name}.prompts.{split}"] = ("prompts", pr[split], prompt_columns[split])
        captions = {split: f"results/{name}/captions/{split}.npz" for split in ("train", "eval")}
        if pr["encoder"] == "tiny":
            text_encoder = fetch(released.text_encoder)
        else:
            user_files[f"experiments.{name}.prompts.encoder_dir"] = ("encoder", pr["encoder_dir"], "")
    return Plan(name=name, family=family, teacher_name=tname, teacher_label=tname, steps=steps,
                image_size=image_size, tokenizer=tokenizer, model=model, released=released.original_format,
                student_file=student_file, shards=shards, runs=runs, sets=sets, reference=reference,
                feature_weights=weights, lpips_backbone=lpips_backbone, downloads=downloads,
                prompt_files=prompt_files, captions=captions, text_encoder=text_encoder, attribute_scale=attribute_scale,
                prompt_columns=prompt_columns, clip_model=ev["clip_model"], user_files=user_files,
                onestep_shards=onestep_shards)
