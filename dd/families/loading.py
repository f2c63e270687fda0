"""Building and loading teachers and students, for every family, through its ``Family`` adapter.

Everything downstream (pair generation, distillation, sampling, the pipeline) asks this module for a ``Teacher`` or
a student and never branches on the family itself.

Our own checkpoints are self-describing: ``{"family", "kind", "config", "model": state_dict}`` (students written
by ``dd distill`` also carry ``student_config``, ``timesteps``, ``teacher_id`` and the EMA weights). Released
checkpoints are read by the family's loaders (nesting and strictness as the originals).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from dd.families.base import config_from_dict
from dd.families.registry import FAMILIES, get_family
from dd.io import ArtefactError, atomic_torch_save, read_checkpoint, sha256_file
from dd.method.teacher import Teacher


def model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None) or getattr(model, "cfg")
    return asdict(cfg)


# ---------------------------------------------------------------------------------------------------
# Building from configuration (the tiny embedded-default models)
# ---------------------------------------------------------------------------------------------------
def build_tokenizer(family: str, arch: dict) -> nn.Module:
    f = get_family(family)
    return f.build_tokenizer(config_from_dict(f.tokenizer_config, dict(arch)))


def build_ar(family: str, arch: dict, tokenizer: nn.Module, image_size: int) -> nn.Module:
    """The AR transformer; vocabulary, code dimension and token layout come from the tokenizer (and the image
    size, where the family's token grid follows from it)."""
    f = get_family(family)
    layout = f.ar_fields(config_from_dict(f.tokenizer_config, model_config(tokenizer)), image_size)
    return f.build_ar(config_from_dict(f.ar_config, {**arch, **layout}))


def make_teacher(family: str, tokenizer: nn.Module, ar: nn.Module) -> Teacher:
    return get_family(family).make_teacher(tokenizer, ar)


def tiny_steps(tiny: dict) -> int:
    """AR steps of the tiny teacher a ``config/tiny/*.yaml`` describes."""
    f = get_family(tiny["family"])
    return f.steps_of(config_from_dict(f.tokenizer_config, dict(tiny["tokenizer"]["arch"])), tiny["image_size"])


def build_tiny_teacher(tiny: dict, **tokenizer_overrides) -> Teacher:
    """The (untrained) tiny teacher of a ``config/tiny/*.yaml``, weights from the global RNG; the tokenizer arch
    can be overridden (e.g. the released codebook size)."""
    family = tiny["family"]
    tok = build_tokenizer(family, {**tiny["tokenizer"]["arch"], **tokenizer_overrides})
    return make_teacher(family, tok, build_ar(family, tiny["teacher"]["arch"], tok, tiny["image_size"]))


# ---------------------------------------------------------------------------------------------------
# Our checkpoints
# ---------------------------------------------------------------------------------------------------
def save_model(path: Path, family: str, kind: str, model: nn.Module, **extra) -> None:
    atomic_torch_save({"family": family, "kind": kind, "config": model_config(model),
                       "model": model.state_dict(), **extra}, path)


def _load_state(model: nn.Module, sd: dict, path, strict=True) -> nn.Module:
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ArtefactError(f"{path}: weights do not fit the {type(model).__name__} architecture: {' '.join(first)}") from None
    return model


def load_tokenizer(path: Path) -> tuple[str, nn.Module]:
    ck = read_checkpoint(path, "tokenizer")
    if "family" not in ck:
        raise ArtefactError(f"{path}: not a dd tokenizer checkpoint (no 'family'); released files need a teacher spec")
    tok = build_tokenizer(ck["family"], ck["config"])
    return ck["family"], _load_state(tok, ck["model"], path).eval()


def load_ar(path: Path, tokenizer: nn.Module, family: str) -> nn.Module:
    ck = read_checkpoint(path, "ar")
    if ck.get("family") != family:
        raise ArtefactError(f"{path}: a {ck.get('family')!r} transformer cannot be paired with a {family!r} tokenizer")
    f = get_family(family)
    ar = f.build_ar(config_from_dict(f.ar_config, ck["config"]))
    want = f.ar_fields(config_from_dict(f.tokenizer_config, model_config(tokenizer)))
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"].items() if k in want}
    if got != want:
        raise ArtefactError(f"{path}: transformer expects codebook/layout {got}, but the tokenizer has {want}: "
                            f"the tokenizer does not match the teacher")
    return _load_state(ar, ck["model"], path).eval()


def file_id(path: Path) -> str:
    return sha256_file(path)[:16]


def load_teacher(spec: dict, device="cpu") -> tuple[Teacher, str]:
    """A frozen teacher and its id from a teacher spec: ``{family, tokenizer: path, model: path}`` for our
    checkpoints, plus ``released: true`` for the released files, and ``captions: path`` (caption features of a prompt
    set) for a text-to-image teacher."""
    family = spec["family"]
    f = get_family(family)
    tok_path, model_path = Path(spec["tokenizer"]), Path(spec["model"])
    for what, p in (("tokenizer", tok_path), ("model", model_path)):
        if not p.is_file():
            raise ArtefactError(f"teacher {what}: {p} not found")
    if spec.get("released"):
        teacher = f.load_released_teacher(tok_path, model_path)
    else:
        tok_family, tok = load_tokenizer(tok_path)
        if tok_family != family:
            raise ArtefactError(f"{tok_path}: a {tok_family!r} tokenizer, but the teacher family is {family!r}")
        teacher = make_teacher(family, tok, load_ar(model_path, tok, family))
    if spec.get("captions"):
        captions = Path(spec["captions"])
        if not captions.is_file():
            raise ArtefactError(f"teacher captions: {captions} not found")
        teacher = f.with_captions(teacher, captions)
    elif f.needs_captions(teacher):
        raise ArtefactError(f"{model_path}: a text-to-image teacher; give the caption features of its prompt set "
                            f"(--captions, written by python -m dd caption-features)")
    # the prompt set is what the labels stand for, not part of the teacher: a student distilled on one prompt set
    # samples another (the held-out evaluation prompts) with the same teacher id
    teacher_id = f"{family}:{file_id(tok_path)}:{file_id(model_path)}"
    return teacher.to(device).eval().requires_grad_(False), teacher_id


# ---------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------
class LoadedStudent(NamedTuple):
    model: nn.Module
    timesteps: list[int] | None   # the DD timesteps it was distilled with (None: not recorded in the file)


def student_from_teacher(teacher: Teacher, **overrides) -> nn.Module:
    """The family's DD student initialised from ``teacher``; ``overrides`` set fields of its student config
    (e.g. VAR's ``within_scale_attention``) that would otherwise follow the teacher or the release."""
    f = get_family(teacher.family)
    overrides = {**f.new_student_defaults, **overrides}
    unknown = set(overrides) - set(f.student_options)
    if unknown:
        raise ValueError(f"student config: {sorted(unknown)} cannot be set for a {f.name} student; allowed: "
                         f"{', '.join(f.student_options) or 'none'}")
    return f.student_from_teacher(teacher, **overrides)


def build_student(family: str, config: dict) -> nn.Module:
    f = get_family(family)
    return f.build_student(config_from_dict(f.student_config, dict(config)))


def load_student(path: Path, teacher: Teacher, *, ema: bool = True, teacher_id: str | None = None,
                 released: bool = False) -> LoadedStudent:
    """A student from a ``dd distill`` checkpoint (EMA weights by default) or a released DD file."""
    path = Path(path)
    timesteps = None
    if released:
        student = get_family(teacher.family).load_released_student(path, ema=ema)
    else:
        ck = read_checkpoint(path, "student")
        if ck.get("family") != teacher.family:
            raise ArtefactError(f"{path}: a {ck.get('family')!r} student cannot be used with a {teacher.family!r} teacher")
        if teacher_id is not None and ck.get("teacher_id") not in (None, teacher_id):
            raise ArtefactError(f"{path}: student was distilled from teacher {ck['teacher_id']!r}, not {teacher_id!r}")
        student = build_student(teacher.family, ck["student_config"])
        _load_state(student, ck["ema" if ema else "model"], path)
        timesteps = list(ck.get("timesteps") or []) or None
    student = get_family(teacher.family).bind_to_teacher(student, teacher)
    V, C = teacher.codebook.shape
    n_out = student(torch.zeros(1, teacher.n_tokens, C), torch.zeros(1, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long))
    if tuple(n_out[0].shape) != (1, teacher.n_tokens, V):
        raise ArtefactError(f"{path}: student predicts {tuple(n_out[0].shape)[1:]} (tokens, vocab) but the teacher has "
                            f"({teacher.n_tokens}, {V})")
    return LoadedStudent(student.eval(), timesteps)


# ---------------------------------------------------------------------------------------------------
# Command-line teacher arguments (shared by generate-pairs, distill, sample, bench)
# ---------------------------------------------------------------------------------------------------
def add_teacher_arguments(parser) -> None:
    g = parser.add_argument_group("teacher")
    g.add_argument("--family", required=True, choices=sorted(FAMILIES))
    g.add_argument("--tokenizer", type=Path, required=True, help="tokenizer checkpoint")
    g.add_argument("--model", type=Path, required=True, help="AR transformer checkpoint")
    g.add_argument("--released", action="store_true", help="the files are the released checkpoints")
    g.add_argument("--captions", type=Path, default=None,
                   help="text-to-image: caption features of the prompt set the labels index (python -m dd caption-features)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def teacher_from_args(args) -> tuple[Teacher, str]:
    torch.set_num_threads(max(1, args.threads))
    spec = {"family": args.family, "tokenizer": args.tokenizer, "model": args.model, "released": args.released,
            "captions": getattr(args, "captions", None)}
    return load_teacher(spec, args.device)
