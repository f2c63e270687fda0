"""The family adapter: everything the method and the pipeline need to know about one teacher family.

A family (VAR, LlamaGen, ...) is a sub-package of ``dd.families`` with its tokenizer, AR transformer, DD student,
``Teacher`` adapter, released-checkpoint loaders and golden checks, plus one ``Family`` object that exposes them
through the interface below. ``dd.families.registry`` lists the families; nothing outside a family's package
knows which families exist or branches on a family's name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from dd.io import ArtefactError
from dd.method.teacher import SamplingConfig, Teacher


@dataclass(frozen=True)
class Release:
    """A released file on the Hugging Face Hub (a teacher, tokenizer, DD student or evaluation statistic)."""

    name: str          # short name used on the command line and in the pipeline config
    repo: str          # Hugging Face repository id
    path: str          # file path inside the repository
    description: str = ""
    nesting: str = ""  # where the state dict sits inside the file, as the original loaders read it
    sha256: str | None = None  # pinned digest; None where none is published (the lock file records it)
    revision: str = "main"     # branch or commit; the lock file records the commit a first download resolved

    @property
    def filename(self) -> str:
        return Path(self.path).name

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/{self.revision}/{self.path}"


@dataclass(frozen=True)
class ReleasedTeacher:
    steps: int         # AR steps of the released model
    tokenizer: str     # release names (``Family.releases``, or files shipped in releases/tiny/)
    model: str
    image_size: int = 256
    domain: str = "imagenet"    # what it generates: "imagenet" (FID against ImageNet) or "digits" (the default's)
    original_format: bool = True  # the original code's files (the family's loaders); False: our own checkpoints
    text_encoder: str | None = None  # text-to-image: the release name of the encoder its caption features come from


@dataclass(frozen=True)
class ReleasedStudent:
    """A released DD student and how its release samples with it, in the original scripts' 0-based notation (the
    README commands of microsoft/distilled_decoding; ``../shared/golden/*/README.md``)."""

    teacher: str                # name of its released teacher
    t_list: tuple[int, ...]     # the sampling script's t_list: the AR steps (0-based) a DD step starts from
    split_t: int                # loss_split_t (VAR) / split_t (LlamaGen): the first step (0-based) whose tokens are
                                # decoded from the embedding head; earlier ones are the codes of the logits' argmax

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The DD timesteps it was distilled with, paper notation (1 is the first step)."""
        return tuple(t + 1 for t in self.t_list)

    @property
    def split_step(self) -> int:
        """``python -m dd sample --split-step`` (paper notation) that reproduces the release's split."""
        return self.split_t + 1


def config_from_dict(cls, d: dict):
    """A config dataclass from a dict, refusing unknown keys (our own checkpoints and configs are exact)."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ArtefactError(f"unknown {cls.__name__} keys {sorted(unknown)}; allowed: {sorted(names)}")
    return cls(**d)


class Family(ABC):
    """One teacher family. Subclasses set the class attributes and implement the methods."""

    name: str
    # the family's default filtering (its released FID settings); CFG is set by the DD configuration
    default_top_k: int
    default_top_p: float
    tokenizer_config: type   # config dataclasses of the tokenizer, the AR transformer and the DD student
    ar_config: type
    student_config: type
    released_teachers: dict[str, ReleasedTeacher] = {}
    released_students: dict[str, ReleasedStudent] = {}
    # student config fields a DD configuration may set (distill.student_config); the others follow the teacher
    student_options: tuple[str, ...] = ()
    # their values for students distilled here when the configuration leaves them out (released students keep the
    # values their releases were trained with)
    new_student_defaults: dict = {}
    releases: tuple[Release, ...] = ()
    # ``python -m dd bench``: the tiny teacher's DD-1 latency target (fraction of its step count), how many AR
    # steps of the real-size teacher the pair-generation row times, and the released codebook (a tokenizer
    # arch override for the tiny-net stress case)
    latency_target: float | None = None
    real_pair_steps: int = 8
    real_codebook: dict = {}

    # --- the token layout ---------------------------------------------------------------------------------------
    @abstractmethod
    def ar_fields(self, tokenizer, image_size: int | None = None) -> dict:
        """The AR transformer's config fields that the tokenizer config determines (vocabulary, code dimension,
        scales) and, where the family's token grid follows from the image size, that size (e.g. block_size).
        Building merges them into the configured arch; loading checks a transformer against its tokenizer
        with them (``image_size`` None: only the fields the tokenizer alone determines)."""

    @abstractmethod
    def steps_of(self, tokenizer, image_size: int) -> int:
        """AR steps of a teacher with this tokenizer config at this image size."""

    # --- building from configuration -------------------------------------------------------------------------------
    @abstractmethod
    def build_tokenizer(self, config) -> nn.Module: ...

    @abstractmethod
    def build_ar(self, config) -> nn.Module: ...

    @abstractmethod
    def make_teacher(self, tokenizer: nn.Module, ar: nn.Module) -> Teacher: ...

    @abstractmethod
    def build_student(self, config) -> nn.Module: ...

    @abstractmethod
    def student_from_teacher(self, teacher: Teacher, **overrides) -> nn.Module:
        """The DD student initialised from the teacher (App. B); new layers from the global RNG. ``overrides``:
        fields of ``student_config`` that differ from what the teacher implies."""

    def bind_to_teacher(self, student: nn.Module, teacher: Teacher) -> nn.Module:
        """A loaded student given what its teacher's labels stand for, where that is not in its weights (a
        text-to-image teacher's prompt set); by default nothing."""
        return student

    def with_captions(self, teacher: Teacher, captions: Path) -> Teacher:
        """The teacher over the prompt set whose caption features ``captions`` holds (``python -m dd caption-features``):
        a text-to-image teacher's labels are that set's rows. Families without text conditioning refuse."""
        raise ArtefactError(f"--captions {captions}: a {self.name} teacher is not text-conditional and takes no captions")

    def needs_captions(self, teacher: Teacher) -> bool:
        """Whether ``teacher`` is text-to-image and so needs ``with_captions`` before it can run."""
        return False

    def random_release(self, name: str) -> dict | None:
        """The released file ``name`` (one of ``releases``) with seeded random weights (from the global RNG), as the
        object its file holds (same nesting, keys, shapes, dtypes): what ``weights: random`` writes in place of a
        download, so that every loader and stage runs at real size. None for a name this family does not release."""
        return None

    @abstractmethod
    def real_size_teacher(self) -> tuple[str, Teacher]:
        """(name, teacher) of the smallest released architecture with random weights (from the global RNG)."""

    def second_timestep(self, n_steps: int) -> int:
        """The second DD timestep the paper uses for a teacher of ``n_steps`` steps (scaled for other sizes)."""
        for released in self.released_students.values():
            if self.released_teachers[released.teacher].steps == n_steps:
                return released.timesteps[1]
        return n_steps // 2 + 1

    # --- released files ------------------------------------------------------------------------------------------
    @abstractmethod
    def load_released_teacher(self, tokenizer_path: Path, model_path: Path) -> Teacher: ...

    @abstractmethod
    def load_released_student(self, path: Path, ema: bool = True) -> nn.Module: ...

    # --- golden checks against the original code -----------------------------------------------------------------
    @abstractmethod
    def golden_kind(self, blob: dict) -> str | None:
        """Which of this family's golden formats ``blob`` is, or None if it is not one of them."""

    @abstractmethod
    def verify_golden(self, blob: dict, path: Path) -> list:
        """``dd.golden.CaseResult``s of one golden file of this family."""

    def default_sampling(self, cfg_scale: float = 2.0, **overrides) -> SamplingConfig:
        """The paper's pair-generation setting: CFG 2.0 and the family's default top-k / top-p."""
        return SamplingConfig(**{"cfg_scale": cfg_scale, "top_k": self.default_top_k, "top_p": self.default_top_p,
                                 **overrides})
