"""The one place that knows which classes make up each model family.

Everything downstream (pair generation, distillation, sampling, the pipeline) asks this module for
a ``Teacher`` or a student and never branches on the family itself.

Our own checkpoints are self-describing: ``{"family", "kind", "config", "model": state_dict}``.
Released checkpoints are read by the family loaders (nesting and strictness as the originals).
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from dd.io import atomic_torch_save, sha256_file
from dd.teacher import SamplingConfig, Teacher


@dataclass(frozen=True)
class Family:
    name: str
    module: str
    tokenizer: str
    tokenizer_config: str
    ar: str
    ar_config: str
    teacher: str
    student: str
    # the family's default filtering (the released FID settings); CFG is set by the DD configuration
    default_top_k: int
    default_top_p: float

    def cls(self, attr: str):
        return getattr(importlib.import_module(self.module), getattr(self, attr))

    @property
    def lib(self):
        return importlib.import_module(self.module)


FAMILIES = {
    "llamagen": Family("llamagen", "dd.models.llamagen", "VQModel", "VQConfig", "GPT", "GPTConfig",
                       "LlamaGenTeacher", "DDStudent", default_top_k=0, default_top_p=1.0),
    "var": Family("var", "dd.models.var", "VQVAE", "VQVAEConfig", "VAR", "VARConfig",
                  "VARTeacher", "VARStudent", default_top_k=900, default_top_p=0.96),
}


class ArtefactError(ValueError):
    """A checkpoint that is missing, corrupt, or does not belong with the others."""


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ArtefactError(f"unknown teacher family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def default_sampling(family: str, cfg_scale: float = 2.0, **overrides) -> SamplingConfig:
    """The paper's pair-generation setting: CFG 2.0 and the family's default top-k / top-p."""
    f = get_family(family)
    return SamplingConfig(**{"cfg_scale": cfg_scale, "top_k": f.default_top_k, "top_p": f.default_top_p, **overrides})


def model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None) or getattr(model, "cfg")
    return asdict(cfg)


def _config(cls, d: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ArtefactError(f"unknown {cls.__name__} keys {sorted(unknown)}; allowed: {sorted(names)}")
    return cls(**d)


# ---------------------------------------------------------------------------------------------------
# Building from configuration (the tiny embedded-default models)
# ---------------------------------------------------------------------------------------------------
def build_tokenizer(family: str, arch: dict) -> nn.Module:
    f = get_family(family)
    return f.cls("tokenizer")(_config(f.cls("tokenizer_config"), dict(arch)))


def build_ar(family: str, arch: dict, tokenizer: nn.Module) -> nn.Module:
    """The AR transformer; vocabulary, code dimension and token layout come from the tokenizer."""
    f = get_family(family)
    tcfg = model_config(tokenizer)
    arch = dict(arch)
    if family == "llamagen":
        grid = arch.pop("image_size") // (2 ** (len(tcfg["ch_mult"]) - 1))
        arch.update(vocab_size=tcfg["codebook_size"], block_size=grid * grid)
        return f.cls("ar")(_config(f.cls("ar_config"), arch))
    arch.update(vocab_size=tcfg["vocab_size"], Cvae=tcfg["z_channels"], patch_nums=tuple(tcfg["patch_nums"]))
    return f.cls("ar")(_config(f.cls("ar_config"), arch))


def make_teacher(family: str, tokenizer: nn.Module, ar: nn.Module) -> Teacher:
    return get_family(family).cls("teacher")(tokenizer, ar)


# ---------------------------------------------------------------------------------------------------
# Our checkpoints
# ---------------------------------------------------------------------------------------------------
def save_model(path: Path, family: str, kind: str, model: nn.Module, **extra) -> None:
    atomic_torch_save({"family": family, "kind": kind, "config": model_config(model),
                       "model": model.state_dict(), **extra}, path)


def read_checkpoint(path: Path, kind: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
        raise ArtefactError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); truncated or corrupt") from None
    if kind is not None and isinstance(ck, dict) and "kind" in ck and ck["kind"] != kind:
        raise ArtefactError(f"{path}: is a {ck['kind']} checkpoint, expected a {kind} checkpoint")
    return ck


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
    ar = f.cls("ar")(_config(f.cls("ar_config"), ck["config"]))
    _check_pairing(path, family, model_config(tokenizer), ck["config"])
    return _load_state(ar, ck["model"], path).eval()


def _check_pairing(path, family: str, tcfg: dict, acfg: dict) -> None:
    if family == "llamagen":
        want = (tcfg["codebook_size"],)
        got = (acfg["vocab_size"],)
    else:
        want = (tcfg["vocab_size"], tcfg["z_channels"], tuple(tcfg["patch_nums"]))
        got = (acfg["vocab_size"], acfg["Cvae"], tuple(acfg["patch_nums"]))
    if want != got:
        raise ArtefactError(f"{path}: transformer expects codebook/layout {got}, but the tokenizer has {want}: "
                            f"the tokenizer does not match the teacher")


def file_id(path: Path) -> str:
    return sha256_file(path)[:16]


def load_teacher(spec: dict, device="cpu") -> tuple[Teacher, str]:
    """A frozen teacher and its id from a teacher spec:
    ``{family, tokenizer: path, model: path}`` for our checkpoints, plus ``released: true`` (and
    optional ``tokenizer_config`` / ``model_config`` dicts) for the released files."""
    family = spec["family"]
    f = get_family(family)
    tok_path, model_path = Path(spec["tokenizer"]), Path(spec["model"])
    for what, p in (("tokenizer", tok_path), ("model", model_path)):
        if not p.is_file():
            raise ArtefactError(f"teacher {what}: {p} not found")
    if spec.get("released"):
        teacher = f.lib.load_teacher(tok_path, model_path, spec.get("tokenizer_config"), spec.get("model_config"))
    else:
        tok_family, tok = load_tokenizer(tok_path)
        if tok_family != family:
            raise ArtefactError(f"{tok_path}: a {tok_family!r} tokenizer, but the teacher family is {family!r}")
        teacher = make_teacher(family, tok, load_ar(model_path, tok, family))
    teacher_id = f"{family}:{file_id(tok_path)}:{file_id(model_path)}"
    return teacher.to(device).eval().requires_grad_(False), teacher_id


# ---------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------
def student_from_teacher(teacher: Teacher) -> nn.Module:
    return get_family(teacher.family).cls("student").from_teacher(teacher)


def build_student(family: str, config: dict) -> nn.Module:
    f = get_family(family)
    cfg_cls = f.lib.DDConfig if family == "llamagen" else f.lib.VARStudentConfig
    return f.cls("student")(_config(cfg_cls, dict(config)))


def load_student(path: Path, teacher: Teacher, *, ema: bool = True, teacher_id: str | None = None,
                 released: bool = False) -> nn.Module:
    """A student from a ``dd distill`` checkpoint (EMA weights by default) or a released DD file."""
    path = Path(path)
    if released:
        lib = get_family(teacher.family).lib
        out = lib.load_student(path, ema=ema)
        student = out[0] if isinstance(out, tuple) else out
    else:
        ck = read_checkpoint(path)
        if ck.get("family") != teacher.family:
            raise ArtefactError(f"{path}: a {ck.get('family')!r} student cannot be used with a {teacher.family!r} teacher")
        if teacher_id is not None and ck.get("teacher_id") not in (None, teacher_id):
            raise ArtefactError(f"{path}: student was distilled from teacher {ck['teacher_id']!r}, not {teacher_id!r}")
        student = build_student(teacher.family, ck["student_config"])
        _load_state(student, ck["ema" if ema else "model"], path)
    V, C = teacher.codebook.shape
    n_out = student(torch.zeros(1, teacher.n_tokens, C), torch.zeros(1, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long))
    if tuple(n_out[0].shape) != (1, teacher.n_tokens, V):
        raise ArtefactError(f"{path}: student predicts {tuple(n_out[0].shape)[1:]} (tokens, vocab) but the teacher has "
                            f"({teacher.n_tokens}, {V})")
    return student.eval()


# ---------------------------------------------------------------------------------------------------
# Command-line teacher arguments (shared by generate-pairs, distill, sample, bench)
# ---------------------------------------------------------------------------------------------------
def add_teacher_arguments(parser) -> None:
    g = parser.add_argument_group("teacher")
    g.add_argument("--family", required=True, choices=sorted(FAMILIES))
    g.add_argument("--tokenizer", type=Path, required=True, help="tokenizer checkpoint")
    g.add_argument("--model", type=Path, required=True, help="AR transformer checkpoint")
    g.add_argument("--released", action="store_true", help="the files are the released checkpoints")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def teacher_from_args(args) -> tuple[Teacher, str]:
    torch.set_num_threads(max(1, args.threads))
    spec = {"family": args.family, "tokenizer": args.tokenizer, "model": args.model, "released": args.released}
    return load_teacher(spec, args.device)
