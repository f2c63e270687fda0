"""Pipeline configuration: loading, validation with messages that name the key, and defaults.

The Snakefile hands its ``config`` to ``check_config`` (once, at parse time); tests and tools call
``load_config(path)``. Both

1. check the config against ``workflow/schemas/config.schema.yaml`` (types and ranges of every value) and
   report *all* violations at once, each naming the key (``experiments.tiny_var.pairs.num_pairs``) and what is
   allowed there;
2. fill in the defaults: a key of the ``pairs`` / ``distill`` / ``sample`` / ``evaluation`` sections that the
   stage's settings dataclass has takes the dataclass default (``dd.method.settings``,
   ``dd.evaluation.settings``: the same defaults the command line uses); every other key the schema's;
3. check what a JSON schema cannot: names that must fit together (a released teacher of the stated family, a
   released student of that teacher), timesteps that start at the first AR step and stay inside the teacher's
   steps, shard counts that divide, sample sets that need a distilled timestep that does not exist, files that
   must exist.

``dd.pipeline.plan`` then turns one validated experiment into everything the rules need.
"""
from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from dd.evaluation.settings import EvaluationSettings
from dd.families.base import ReleasedStudent, ReleasedTeacher
from dd.families.registry import FAMILIES, get_family
from dd.method.settings import DistillConfig, PairSettings, SampleSettings, timestep_problem

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"

# the settings dataclass of each experiment section: the source of its keys' defaults
SECTION_SETTINGS = {"pairs": PairSettings, "distill": DistillConfig, "sample": SampleSettings,
                    "evaluation": EvaluationSettings}
# the training length is the user's choice: exactly one of them, no default (checked below)
NO_DEFAULT = {("distill", "epochs"), ("distill", "max_steps")}


class ConfigError(ValueError):
    """One or more problems in a pipeline configuration; ``problems`` lists (key, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        lines = [f"  {key}: {message}" for key, message in problems]
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid {source} ({len(problems)} {noun}):\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Released teachers and students: what the config may name, and what each name implies (each family lists its own)
# ---------------------------------------------------------------------------------------------------------------
def released_teachers() -> dict[str, tuple[str, ReleasedTeacher]]:
    """Released teacher name -> (its family, what the family says of it)."""
    return {name: (f.name, r) for f in FAMILIES.values() for name, r in f.released_teachers.items()}


def released_students() -> dict[str, ReleasedStudent]:
    return {name: r for f in FAMILIES.values() for name, r in f.released_students.items()}


# ---------------------------------------------------------------------------------------------------------------
# Schema: friendly messages and defaults
# ---------------------------------------------------------------------------------------------------------------


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _allowed(error) -> str:
    """What the schema allows at the failing key, in words."""
    s = error.schema
    v = error.validator
    if v == "enum":
        return f"allowed values: {', '.join(map(json.dumps, s['enum']))}"
    if v == "type":
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        rng = []
        for bound, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
            if bound in s:
                rng.append(f"{word} {s[bound]}")
        extra = f" {' and '.join(rng)}" if rng else ""
        if "enum" in s:
            extra += f" (one of {', '.join(map(json.dumps, s['enum']))})"
        return f"expected {' or '.join(types)}{extra}"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        parts = []
        for bound, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
            if bound in s:
                parts.append(f"{word} {s[bound]}")
        return f"allowed range: {' and '.join(parts)}"
    if v == "additionalProperties" and "properties" in s:
        return f"allowed keys: {', '.join(sorted(s['properties']))}"
    if v == "required":
        return f"required keys: {', '.join(s['required'])}"
    if v == "pattern":
        return f"must match the pattern {s['pattern']}"
    if v in ("minItems", "maxItems", "minProperties", "uniqueItems", "minLength", "maxLength"):
        return f"{v} = {s[v]}"
    return ""


def schema_problems(config: Any, schema: dict | None = None) -> list[tuple[str, str]]:
    """Every schema violation of ``config`` as (key, message naming what is allowed)."""
    import jsonschema

    schema = schema or load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict) and "properties" in error.schema:
            for extra in sorted(set(error.instance) - set(error.schema["properties"])):
                problems.append((_key(path + [extra]), f"unknown key; {_allowed(error)}"))
            continue
        if error.validator == "propertyNames":
            problems.append((_key(path + [error.instance]), f"invalid name {error.instance!r}: "
                             "letters, digits and _ starting with a letter, at most 64 characters"))
            continue
        allowed = _allowed(error)
        problems.append((_key(path), error.message + (f"; {allowed}" if allowed else "")))
    return problems


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $refs are supported, got {ref}")
        node = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def fill_section_defaults(exp: dict, schema: dict) -> dict:
    """Fill the keys of an experiment's sections that the schema declares without a default from the stage's
    settings dataclass (in place)."""
    for section, cls in SECTION_SETTINGS.items():
        if section not in exp:
            continue
        declared = _resolve(schema["$defs"]["experiment"]["properties"][section], schema)["properties"]
        for f in fields(cls):
            if f.name in declared and f.name not in exp[section] and (section, f.name) not in NO_DEFAULT:
                default = f.default_factory() if callable(f.default_factory) else f.default
                exp[section][f.name] = list(default) if isinstance(default, tuple) else default
    return exp


def fill_defaults(instance: Any, schema: dict, root: dict | None = None) -> Any:
    """Fill missing keys with the schema's ``default`` values, recursively (in place; returns ``instance``)."""
    root = root or schema
    schema = _resolve(schema, root)
    if not isinstance(instance, dict):
        return instance
    props = schema.get("properties", {})
    for key, sub in props.items():
        sub = _resolve(sub, root)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            fill_defaults(instance[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in props:
                fill_defaults(value, extra, root)
    return instance


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks
# ---------------------------------------------------------------------------------------------------------------


def resolve_path(path: str | Path, base_dir: Path | None = None) -> Path:
    """A config path: absolute as given; relative to the working directory if it exists there, else to the repo."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(base_dir or REPO) / p


def _check_timesteps(key: str, timesteps: list, steps: int, problems: list) -> bool:
    problem = timestep_problem(timesteps, steps)
    if problem:
        problems.append((key, problem))
    return problem is None


def sample_set_names(sample: dict, timesteps: list[int]) -> list[str]:
    """The sample sets of an experiment's sample section, by the file stems ``dd.pipeline.plan`` gives them."""
    names = ["teacher"] if sample["teacher"] else []
    names += [f"skip-{n}" for n in sorted(sample["skip"])] + (["onestep"] if sample["onestep"] else [])
    names += [f"dd-{k}step" for k in sorted(sample["dd_steps"])]
    if len(timesteps) > 1:
        names += [f"dd-teacher-{n}-{timesteps[1]}" for n in sorted(sample["dd_teacher_starts"])]
    return names


def experiment_problems(name: str, exp: dict, base_dir: Path | None = None) -> list[tuple[str, str]]:
    """Checks of one (schema-valid, defaults-filled) experiment that the schema cannot express."""
    problems: list[tuple[str, str]] = []
    k = f"experiments.{name}"
    teacher = exp["teacher"]
    family, tname = teacher["family"], teacher["name"]
    released_family, released = released_teachers()[tname]
    steps = released.steps
    if released_family != family:
        problems.append((f"{k}.teacher.name", f"{tname!r} is a {released_family} teacher but teacher.family is "
                         f"{family!r}; {family} teachers: " + ", ".join(get_family(family).released_teachers)))
    if teacher["weights"] == "random" and released.domain == "digits":
        problems.append((f"{k}.teacher.weights", f"random weights stand in for downloaded files; {tname} is shipped "
                         "in releases/tiny/: use weights: released"))
    if "released_student" in teacher:
        student = released_students()[teacher["released_student"]]
        if student.teacher != tname:
            problems.append((f"{k}.teacher.released_student", f"{teacher['released_student']!r} was distilled "
                             f"from {student.teacher!r}, not from {tname!r}"))
        elif "distill" in exp and exp["distill"]["timesteps"] != list(student.timesteps):
            problems.append((f"{k}.distill.timesteps", f"{exp['distill']['timesteps']} differs from the "
                             f"timesteps {list(student.timesteps)} that {teacher['released_student']} was distilled "
                             "with"))

    sample = exp["sample"]
    text_to_image = released.text_encoder is not None
    if text_to_image != ("prompts" in exp):
        problems.append((f"{k}.prompts", f"{tname} is a text-to-image teacher: give its prompt sets" if text_to_image
                         else f"{tname} is class-conditional: prompts apply to text-to-image teachers only"))
    elif text_to_image:
        prompts = exp["prompts"]
        if prompts["source"] == "digits" and released.domain != "digits":
            problems.append((f"{k}.prompts.source", "digits captions go with the digits teachers; give prompt files "
                             "(source: files, train, eval)"))
        if prompts["source"] == "files":   # whether the files exist: the check_user_inputs job (user_files)
            if not prompts["train"]:
                problems.append((f"{k}.prompts.train", "source: files needs the prompt file of the pairs"))
            if bool(prompts["eval"]) == bool(prompts["eval_download"]):
                problems.append((f"{k}.prompts.eval", "source: files needs the prompt file of the sample sets: "
                                 "eval (a file) or eval_download (a pinned download), one of them"))
        elif prompts["train"] or prompts["eval"] or prompts["eval_download"]:
            problems.append((f"{k}.prompts.source", "prompt files are read with source: files"))
        if (prompts["encoder"] == "flan-t5-xl") != (prompts["encoder_dir"] is not None):
            problems.append((f"{k}.prompts.encoder_dir", "flan-t5-xl is read from a local snapshot folder "
                             "(encoder_dir), and only flan-t5-xl"))
        wanted = "tiny" if released.domain == "digits" else "flan-t5-xl"
        if prompts["encoder"] != wanted:
            problems.append((f"{k}.prompts.encoder", f"{tname} reads the caption features of {wanted}"))
        if sample["onestep"] and not sample["onestep_pairs"]:
            # onestep* needs the teacher's token marginals per prompt of the eval set: pairs on those prompts
            problems.append((f"{k}.sample.onestep_pairs", "text-to-image onestep* needs its own pair set on the "
                             "evaluation prompts (its per-prompt marginals): give its size"))
        elif sample["onestep_pairs"] and "pairs" in exp and sample["onestep_pairs"] % exp["pairs"]["shard_size"]:
            problems.append((f"{k}.sample.onestep_pairs", f"{sample['onestep_pairs']} is not a multiple of "
                             f"pairs.shard_size {exp['pairs']['shard_size']}"))
    if sample["onestep_pairs"] and not (text_to_image and sample["onestep"]):
        problems.append((f"{k}.sample.onestep_pairs", "only text-to-image onestep* has its own pair set (the "
                         "class-conditional onestep* reads the main pairs)"))
    released_student = teacher.get("released_student")
    for section in ("pairs", "distill"):
        needed = released_student is None or (section == "pairs" and sample["onestep"])
        if needed and section not in exp:
            why = "onestep* is computed from the pairs" if released_student else "the student is distilled"
            problems.append((f"{k}.{section}", f"missing section: required because {why}"))
    if problems:
        return problems

    # pairs: equal shards
    if "pairs" in exp:
        pairs = exp["pairs"]
        if pairs["num_pairs"] % pairs["shard_size"]:
            problems.append((f"{k}.pairs.num_pairs", f"{pairs['num_pairs']} pairs do not split into shards of "
                             f"{pairs['shard_size']} (pairs.shard_size): the shard count must be whole; use a "
                             f"multiple of {pairs['shard_size']}"))

    # distillation
    distill = exp.get("distill")
    if distill is None:  # a released student: its own timesteps
        ts = list(released_students()[released_student].timesteps)
        ts_ok = True
    else:
        ts = distill["timesteps"]
        ts_ok = steps is not None and _check_timesteps(f"{k}.distill.timesteps", ts, steps, problems)
        if released_student is None and (distill["epochs"] is None) == (distill["max_steps"] is None):
            problems.append((f"{k}.distill", "set exactly one of epochs and max_steps (the training length)"))
        allowed = get_family(family).student_options
        for key in sorted(set(distill["student_config"]) - set(allowed)):
            problems.append((f"{k}.distill.student_config.{key}", f"not an option of the {family} student; allowed: "
                             f"{', '.join(allowed) or 'none'}"))
        if distill["emb_loss"] == "lpips" and distill["lpips_backbone_url"] is None and released.domain != "digits":
            problems.append((f"{k}.distill.lpips_backbone_url", "LPIPS on a released teacher needs the backbone "
                             "weights: give their pinned https URL (or use emb_loss: mse)"))

    # sample sets
    if steps is not None:
        for i, n in enumerate(sample["skip"]):
            if n >= steps:
                problems.append((f"{k}.sample.skip[{i}]", f"skip-{n} leaves no step of the teacher's {steps}; "
                                 f"allowed: 1 to {steps - 1}"))
        if sample["split_step"] is not None and not 1 <= sample["split_step"] <= steps:
            problems.append((f"{k}.sample.split_step", f"{sample['split_step']} is not a step of the teacher; "
                             f"allowed: 1 to {steps}"))
    for i, n in enumerate(sample["dd_steps"]):
        if n > len(ts):
            problems.append((f"{k}.sample.dd_steps[{i}]", f"a {n}-step DD set needs {n} distilled timesteps, "
                             f"distill.timesteps has {len(ts)}; allowed: 1 to {len(ts)}"))
    if sample["dd_teacher_starts"]:
        if len(ts) < 2:
            problems.append((f"{k}.sample.dd_teacher_starts", "teacher-involved sets (pre-trained-n-m) need a "
                             "second distilled timestep m; distill.timesteps has one"))
        elif ts_ok:
            for i, n in enumerate(sample["dd_teacher_starts"]):
                if not 1 <= n < ts[1]:
                    problems.append((f"{k}.sample.dd_teacher_starts[{i}]", f"pre-trained-{n}-{ts[1]} must start "
                                     f"before the second timestep {ts[1]}; allowed: 1 to {ts[1] - 1}"))
    if not sample["teacher"] and exp["evaluation"]["vs_teacher"]:
        problems.append((f"{k}.evaluation.vs_teacher", "FID against the teacher's samples needs sample.teacher: true"))
    if not sample["teacher"] and (sample["skip"] or sample["dd_teacher_starts"]):
        problems.append((f"{k}.sample.teacher", "the speedup columns need the teacher row: set sample.teacher: true"))

    if distill is not None and distill["emb_loss"] == "classifier" and exp["evaluation"]["reference"] != "digits":
        problems.append((f"{k}.distill.emb_loss", "the classifier perceptual loss uses the digits classifier: "
                         "only for the digits teachers (reference digits)"))

    # evaluation
    ev = exp["evaluation"]
    if ev["reference"] == "digits":
        if released.domain != "digits":
            problems.append((f"{k}.evaluation.reference", f"digits is the reference of the digits teachers; {tname} "
                             f"generates {released.domain} images"))
        if ev["feature_extractor"] != "digits-classifier":
            problems.append((f"{k}.evaluation.feature_extractor", "the digits reference is measured with the "
                             "digits-classifier"))
    else:
        if released.domain == "digits":
            problems.append((f"{k}.evaluation.reference", f"{tname} generates digits: use reference digits"))
        elif ev["reference"] == "fid_imagenet256" and released.domain != "imagenet":
            problems.append((f"{k}.evaluation.reference", f"{tname} generates {released.domain} images, not "
                             "ImageNet: use reference images (a folder of real images, reference_images)"))
        if ev["feature_extractor"] != "inception-v3-compat":
            problems.append((f"{k}.evaluation.feature_extractor", f"{ev['reference']} is measured with Inception "
                             "features: use inception-v3-compat"))
        if ev["feature_weights_url"] is None:
            problems.append((f"{k}.evaluation.feature_weights_url", "inception-v3-compat needs its weights: give "
                             "their pinned https URL (nothing is downloaded at run time)"))
    if (ev["reference"] == "images") != (ev["reference_images"] is not None):
        problems.append((f"{k}.evaluation.reference_images", "reference images needs the folder of real images "
                         "(reference_images), and only it"))
    if ev["clip_model"] and "prompts" not in exp:
        problems.append((f"{k}.evaluation.clip_model", "CLIP score measures text-to-image samples against their "
                         "prompts: only with a prompts section"))
    if sample["num"] % ev["splits"]:
        problems.append((f"{k}.sample.num", f"{sample['num']} samples do not split into evaluation.splits = "
                         f"{ev['splits']} equal parts; use a multiple of {ev['splits']}"))
    elif sample["num"] // ev["splits"] < ev["isc_splits"]:
        problems.append((f"{k}.sample.num", f"{sample['num'] // ev['splits']} samples per evaluation part cannot be "
                         f"split into evaluation.isc_splits = {ev['isc_splits']} parts"))
    else:
        part = sample["num"] // ev["splits"]
        names = sample_set_names(sample, ts)
        for set_name, num in sorted(sample["num_by_set"].items()):
            key = f"{k}.sample.num_by_set.{set_name}"
            if set_name not in names:
                problems.append((key, f"no sample set {set_name!r} in this experiment; its sets: {', '.join(names)}"))
            elif num % part:
                problems.append((key, f"{num} images do not make whole evaluation parts of sample.num / "
                                 f"evaluation.splits = {part}; use a multiple of {part}"))

    # ablations
    ab = exp["ablations"]
    seen = {tuple(ts)}
    for i, abl in enumerate(ab["timesteps"]):
        key = f"{k}.ablations.timesteps[{i}]"
        if steps is not None and _check_timesteps(key, abl, steps, problems):
            if tuple(abl) in seen:
                problems.append((key, f"{abl} is already distilled (distill.timesteps or an earlier entry)"))
            seen.add(tuple(abl))
    for i, size in enumerate(ab["pair_set_sizes"]):
        key = f"{k}.ablations.pair_set_sizes[{i}]"
        pairs = exp.get("pairs", {"shard_size": 1, "num_pairs": 0})
        if size % pairs["shard_size"] or size >= pairs["num_pairs"]:
            problems.append((key, f"{size} pairs: must be a multiple of pairs.shard_size ({pairs['shard_size']}) "
                             f"and smaller than pairs.num_pairs ({pairs['num_pairs']}), the main run's set"))
    if (ab["timesteps"] or ab["pair_set_sizes"]) and "released_student" in teacher:
        problems.append((f"{k}.ablations", "ablations distil students; a released_student experiment skips "
                         "distillation"))
    # the periodic FID during distillation is measured with the digits classifier
    if ev["reference"] != "digits":
        if distill is not None and distill["eval_every"]:
            problems.append((f"{k}.distill.eval_every", "periodic FID during distillation uses the digits classifier; "
                             "with reference fid_imagenet256 set it to 0"))
        if ab["timesteps"] or ab["pair_set_sizes"]:
            problems.append((f"{k}.ablations", "the ablation curves (Fig. 6/7) come from the periodic FID, which "
                             "needs reference digits; leave timesteps and pair_set_sizes empty"))
    return problems


def distill_processes(resources: dict) -> int:
    """Processes of an experiment's distillation job: ``resources.distill.processes``, else one per GPU (at least
    one). The workflow's launcher reads the same, with the GPU count Snakemake resolved."""
    res = resources["distill"]
    return res.get("processes") or max(int(res.get("gpu") or 0), 1)


def distill_batch_problems(name: str, exp: dict) -> list[tuple[str, str]]:
    """The global batch splits evenly over the distillation's processes, and each share into micro-batches."""
    d, processes = exp["distill"], distill_processes(exp["resources"])
    if d["batch_size"] % processes:
        return [(f"experiments.{name}.distill.batch_size", f"{d['batch_size']} does not split evenly over the "
                 f"{processes} distillation processes")]
    micro, share = d.get("micro_batch_size"), d["batch_size"] // processes
    if micro and share % micro:
        return [(f"experiments.{name}.distill.micro_batch_size", f"{micro} does not divide the per-process batch "
                 f"{share} (batch_size {d['batch_size']} / {processes} processes)")]
    return []


def config_problems(config: dict, base_dir: Path | None = None) -> list[tuple[str, str]]:
    problems = []
    gpus = 0
    for name, exp in config["experiments"].items():
        problems += experiment_problems(name, exp, base_dir)
        for stage, res in exp.get("resources", {}).items():
            gpus = max(gpus, res.get("gpu", 0))
            if res.get("gpu", 0) > 0 and config["device"] != "cuda":
                problems.append((f"experiments.{name}.resources.{stage}.gpu", f"{res['gpu']} GPUs requested but "
                                 f"device is {config['device']!r}; set device: cuda or gpu: 0"))
            processes = res.get("processes")
            if processes is not None and stage != "distill":
                problems.append((f"experiments.{name}.resources.{stage}.processes", "only the distill stage runs "
                                 "data-parallel processes"))
            elif processes is not None and res.get("gpu", 0) > 0 and processes != res["gpu"]:
                problems.append((f"experiments.{name}.resources.{stage}.processes", f"{processes} processes for "
                                 f"{res['gpu']} GPUs: torchrun starts one process per GPU"))
        if "distill" in exp and "distill" in exp.get("resources", {}):
            problems += distill_batch_problems(name, exp)
    return problems


def check_config(config: dict, base_dir: Path | None = None, source: str = "config") -> dict:
    """Validate (schema, then semantics) and return a defaults-filled copy; raise ``ConfigError`` listing all
    problems, each with the key it concerns."""
    schema = load_schema()
    problems = schema_problems(config, schema)
    if problems:
        raise ConfigError(problems, source)
    filled = fill_defaults(copy.deepcopy(config), schema)
    for exp in filled["experiments"].values():
        fill_section_defaults(exp, schema)
    problems = config_problems(filled, base_dir)
    if problems:
        raise ConfigError(problems, source)
    return filled


def load_config(path: str | Path, base_dir: Path | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("(file)", f"{path} not found")], str(path))
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([("(file)", f"not valid YAML: {e}")], str(path)) from None
    return check_config(config if config is not None else {}, base_dir, source=str(path))
