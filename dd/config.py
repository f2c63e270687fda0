"""Pipeline configuration: loading, validation with messages that name the key, and the experiment plan.

The Snakefile hands its ``config`` to ``check_config``; tests and tools call ``load_config(path)``. Both

1. check the config against ``workflow/schemas/config.schema.yaml`` (types and ranges of every value) and
   report *all* violations at once, each naming the key (``experiments.tiny_var.pairs.num_pairs``) and what is
   allowed there;
2. fill in the schema's defaults;
3. check what a JSON schema cannot: names that must fit together (a released teacher of the stated family, a
   released student of that teacher), timesteps that start at the first AR step and stay inside the teacher's
   steps, shard counts that divide, sample sets that need a distilled timestep that does not exist, files that
   must exist.

``plan(name, experiment)`` then turns one validated experiment into everything the rules need: the teacher
files, shard names, distillation runs (main + ablations) and sample sets with their ``dd sample`` arguments.
Output paths follow one layout, ``results/<experiment>/...``; downloads go to ``resources/checkpoints/``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"
CHECKPOINTS = "resources/checkpoints"
DIGITS_DIR = "results/digits"


class ConfigError(ValueError):
    """One or more problems in a pipeline configuration; ``problems`` lists (key, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        lines = [f"  {key}: {message}" for key, message in problems]
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid {source} ({len(problems)} {noun}):\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Released teachers and students: what the config may name, and what each name implies
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleasedTeacher:
    family: str
    steps: int  # AR steps of the released model at 256x256
    tokenizer: str  # dd.download registry names
    model: str


RELEASED_TEACHERS = {
    **{f"var_d{d}": ReleasedTeacher("var", 10, "vae_var", f"var_d{d}") for d in (16, 20, 24)},
    **{f"llamagen_{s}": ReleasedTeacher("llamagen", 256, "llamagen_vq16", f"llamagen_{s}") for s in ("b", "l")},
}
# released DD student -> (its teacher, the timesteps it was distilled with)
RELEASED_STUDENTS = {
    **{f"dd_var_d{d}": (f"var_d{d}", [1, 6]) for d in (16, 20, 24)},
    **{f"dd_llamagen_{s}": (f"llamagen_{s}", [1, 81]) for s in ("b", "l")},
}


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


def tiny_teacher_steps(tiny_cfg: dict) -> int:
    """AR steps of a tiny teacher from its config: VAR = number of scales, LlamaGen = tokens of the grid."""
    arch = tiny_cfg["tokenizer"]["arch"]
    if tiny_cfg["family"] == "var":
        return len(arch["patch_nums"])
    grid = tiny_cfg["image_size"] // 2 ** (len(arch["ch_mult"]) - 1)
    return grid * grid


def _check_timesteps(key: str, timesteps: list, steps: int, problems: list) -> bool:
    allowed = f"allowed: strictly increasing integers from 1 to {steps} (the teacher's AR steps), starting at 1"
    if not timesteps or timesteps[0] != 1:
        problems.append((key, f"{timesteps} must start at 1, the first AR step; {allowed}"))
        return False
    if any(b <= a for a, b in zip(timesteps, timesteps[1:])):
        problems.append((key, f"{timesteps} is not strictly increasing; {allowed}"))
        return False
    if timesteps[-1] > steps:
        problems.append((key, f"{timesteps} goes beyond the teacher's last step {steps}; {allowed}"))
        return False
    return True


def experiment_problems(name: str, exp: dict, base_dir: Path | None = None) -> list[tuple[str, str]]:
    """Checks of one (schema-valid, defaults-filled) experiment that the schema cannot express."""
    problems: list[tuple[str, str]] = []
    k = f"experiments.{name}"
    teacher = exp["teacher"]
    family, tname = teacher["family"], teacher["name"]
    steps = None

    if tname == "tiny":
        if "tiny_config" not in teacher:
            problems.append((f"{k}.teacher.tiny_config", "required when teacher.name is tiny "
                             "(e.g. config/tiny/var.yaml)"))
        else:
            path = resolve_path(teacher["tiny_config"], base_dir)
            if not path.is_file():
                problems.append((f"{k}.teacher.tiny_config", f"file not found: {teacher['tiny_config']}"))
            else:
                try:
                    tiny = yaml.safe_load(path.read_text())
                    if tiny.get("family") != family:
                        problems.append((f"{k}.teacher.tiny_config", f"{teacher['tiny_config']} describes a "
                                         f"{tiny.get('family')!r} teacher but teacher.family is {family!r}"))
                    steps = tiny_teacher_steps(tiny)
                except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
                    problems.append((f"{k}.teacher.tiny_config", f"{teacher['tiny_config']} is not a tiny teacher "
                                     f"config ({type(e).__name__}: {e})"))
        if "released_student" in teacher:
            problems.append((f"{k}.teacher.released_student", "only released teachers have released DD students; "
                             "remove it or name a released teacher"))
    else:
        released = RELEASED_TEACHERS[tname]
        steps = released.steps
        if released.family != family:
            problems.append((f"{k}.teacher.name", f"{tname!r} is a {released.family} teacher but teacher.family is "
                             f"{family!r}; {family} teachers: "
                             + ", ".join(n for n, r in RELEASED_TEACHERS.items() if r.family == family)))
        if "tiny_config" in teacher:
            problems.append((f"{k}.teacher.tiny_config", f"only for teacher.name tiny, not {tname!r}"))
        if "released_student" in teacher:
            student_teacher, student_steps = RELEASED_STUDENTS[teacher["released_student"]]
            if student_teacher != tname:
                problems.append((f"{k}.teacher.released_student", f"{teacher['released_student']!r} was distilled "
                                 f"from {student_teacher!r}, not from {tname!r}"))
            elif "distill" in exp and exp["distill"]["timesteps"] != student_steps:
                problems.append((f"{k}.distill.timesteps", f"{exp['distill']['timesteps']} differs from the "
                                 f"timesteps {student_steps} that {teacher['released_student']} was distilled with"))

    released_student = teacher.get("released_student")
    sample = exp["sample"]
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
        ts = RELEASED_STUDENTS[released_student][1]
        ts_ok = True
    else:
        ts = distill["timesteps"]
        ts_ok = steps is not None and _check_timesteps(f"{k}.distill.timesteps", ts, steps, problems)
        if released_student is None and (distill["epochs"] is None) == (distill["max_steps"] is None):
            problems.append((f"{k}.distill", "set exactly one of epochs and max_steps (the training length)"))
        if distill["emb_loss"] == "lpips" and distill["lpips_backbone_url"] is None and tname != "tiny":
            problems.append((f"{k}.distill.lpips_backbone_url", "LPIPS on a released teacher needs the backbone "
                             "weights: give their pinned https URL (or use emb_loss: mse)"))

    # sample sets
    if steps is not None:
        for i, n in enumerate(sample["skip"]):
            if n >= steps:
                problems.append((f"{k}.sample.skip[{i}]", f"skip-{n} leaves no step of the teacher's {steps}; "
                                 f"allowed: 1 to {steps - 1}"))
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

    # evaluation
    ev = exp["evaluation"]
    if ev["reference"] == "digits":
        if tname != "tiny":
            problems.append((f"{k}.evaluation.reference", f"digits is the reference of tiny teachers; {tname} "
                             "generates ImageNet images: use fid_imagenet256"))
        if ev["feature_extractor"] != "digits-classifier":
            problems.append((f"{k}.evaluation.feature_extractor", "the digits reference is measured with the "
                             "digits-classifier"))
    else:
        if tname == "tiny":
            problems.append((f"{k}.evaluation.reference", "a tiny teacher generates digits: use reference digits"))
        if ev["feature_extractor"] != "inception-v3-compat":
            problems.append((f"{k}.evaluation.feature_extractor", "fid_imagenet256 holds Inception statistics: "
                             "use inception-v3-compat"))
        if ev["feature_weights_url"] is None:
            problems.append((f"{k}.evaluation.feature_weights_url", "inception-v3-compat needs its weights: give "
                             "their pinned https URL (nothing is downloaded at run time)"))
    for what in ("isc_splits",):
        if sample["num"] < ev[what]:
            problems.append((f"{k}.sample.num", f"{sample['num']} samples cannot be split into "
                             f"evaluation.{what} = {ev[what]} parts"))

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
    return problems


def check_config(config: dict, base_dir: Path | None = None, source: str = "config") -> dict:
    """Validate (schema, then semantics) and return a defaults-filled copy; raise ``ConfigError`` listing all
    problems, each with the key it concerns."""
    schema = load_schema()
    problems = schema_problems(config, schema)
    if problems:
        raise ConfigError(problems, source)
    filled = fill_defaults(copy.deepcopy(config), schema)
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


# ---------------------------------------------------------------------------------------------------------------
# The experiment plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SampleSet:
    name: str  # file stem under results/<experiment>/samples/
    method: str  # dd sample --method
    args: list[str]  # extra dd sample arguments
    student_run: str | None = None  # distillation run whose student it needs
    needs_pairs: bool = False  # onestep*: the pair shards
    tables: tuple[int, ...] = (1,)


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


@dataclass
class Plan:
    name: str
    family: str
    teacher_name: str  # tiny or a released name
    teacher_label: str  # the tables' teacher column
    steps: int  # the teacher's AR steps
    image_size: int
    tokenizer: str
    model: str
    released: bool
    student_file: str | None  # released DD student, else None
    shards: list[str]
    runs: dict[str, DistillRun]
    sets: dict[str, SampleSet]
    reference: str
    feature_weights: str
    downloads: dict[str, str] = field(default_factory=dict)  # file under resources/checkpoints -> registry name/URL

    def out(self, *parts: str) -> str:
        return "/".join(("results", self.name) + parts)


def download_path(name_or_url: str) -> str:
    from dd.download import resolve

    return f"{CHECKPOINTS}/{resolve(name_or_url).filename}"


def plan(name: str, exp: dict, base_dir: Path | None = None) -> Plan:
    """Everything the rules of one (validated) experiment need."""
    teacher = exp["teacher"]
    family, tname = teacher["family"], teacher["name"]
    downloads: dict[str, str] = {}

    def fetch(name_or_url: str) -> str:
        path = download_path(name_or_url)
        downloads[path] = name_or_url
        return path

    if tname == "tiny":
        tiny_path = resolve_path(teacher["tiny_config"], base_dir)
        tiny = yaml.safe_load(tiny_path.read_text())
        steps, image_size = tiny_teacher_steps(tiny), tiny["image_size"]
        tokenizer, model = f"results/{name}/teacher/tokenizer.pt", f"results/{name}/teacher/ar.pt"
        label = f"{family}-tiny"
    else:
        released = RELEASED_TEACHERS[tname]
        steps, image_size = released.steps, 256
        tokenizer, model = fetch(released.tokenizer), fetch(released.model)
        label = tname
    student_file = fetch(teacher["released_student"]) if "released_student" in teacher else None

    sample = exp["sample"]
    shards: list[str] = []
    if student_file is None or sample["onestep"]:  # only these need pairs
        pairs = exp["pairs"]
        n_shards = pairs["num_pairs"] // pairs["shard_size"]
        shards = [f"results/{name}/pairs/shard_{i:05d}.bin" for i in range(n_shards)]

    distill = exp.get("distill")
    ts = list(distill["timesteps"] if distill else RELEASED_STUDENTS[teacher["released_student"]][1])
    runs: dict[str, DistillRun] = {}
    if student_file is None:
        runs["main"] = DistillRun("main", ts, shards, distill["max_steps"], distill["epochs"], distill["eval_every"],
                                  pairs=pairs["num_pairs"])
        ab = exp["ablations"]
        for abl in ab["timesteps"]:
            run = "timesteps-" + "-".join(map(str, abl))
            runs[run] = DistillRun(run, list(abl), shards, ab["max_steps"], None, ab["eval_every"], "timesteps",
                                   pairs=pairs["num_pairs"])
        for size in ab["pair_set_sizes"]:
            run = f"pairs-{size}"
            runs[run] = DistillRun(run, ts, shards[: size // pairs["shard_size"]], ab["max_steps"], None,
                                   ab["eval_every"], "pairs", pairs=size)

    sets: dict[str, SampleSet] = {}
    if sample["teacher"]:
        sets["teacher"] = SampleSet("teacher", "teacher", [], tables=(1, 2))
    for n in sorted(sample["skip"]):
        sets[f"skip-{n}"] = SampleSet(f"skip-{n}", "skip", ["--skip", str(n)])
    if sample["onestep"]:
        sets["onestep"] = SampleSet("onestep", "onestep", [], needs_pairs=True)
    student_run = None if student_file else "main"
    for k in sorted(sample["dd_steps"]):
        sets[f"dd-{k}step"] = SampleSet(f"dd-{k}step", "dd", ["--steps", *map(str, ts[:k])], student_run)
    for n in sorted(sample["dd_teacher_starts"]):
        set_name = f"dd-teacher-{n}-{ts[1]}"
        sets[set_name] = SampleSet(set_name, "dd-teacher", ["--start", str(n), "--second", str(ts[1])], student_run,
                                   tables=(2,))

    ev = exp["evaluation"]
    if ev["reference"] == "digits":
        reference = f"{DIGITS_DIR}/reference_{image_size}.npz"
        weights = f"{DIGITS_DIR}/classifier_{image_size}.pt"
    else:
        reference = fetch(ev["reference"])
        weights = fetch(ev["feature_weights_url"])
    if student_file is None and distill["emb_loss"] == "lpips" and distill["lpips_backbone_url"]:
        fetch(distill["lpips_backbone_url"])
    return Plan(name=name, family=family, teacher_name=tname, teacher_label=label, steps=steps,
                image_size=image_size, tokenizer=tokenizer, model=model, released=tname != "tiny",
                student_file=student_file, shards=shards, runs=runs, sets=sets, reference=reference,
                feature_weights=weights, downloads=downloads)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON text (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out
