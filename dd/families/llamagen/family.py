"""The LlamaGen family adapter (``dd.families.base.Family``): raster-order tokens, one per AR step."""
from __future__ import annotations

from pathlib import Path

from dd.families.base import Family, Release, ReleasedStudent, ReleasedTeacher
from dd.families.llamagen.gpt import GPT, T2I_XL, GPTConfig, gpt_preset
from dd.families.llamagen.student import DDConfig, DDStudent
from dd.families.llamagen.teacher import LlamaGenT2ITeacher, LlamaGenTeacher
from dd.families.llamagen.tokenizer import VQConfig, VQModel, vq_16
from dd.io import ArtefactError

_LLAMAGEN, _DD = "FoundationVision/LlamaGen", "microsoft/distilled_decoding"
_LLAMAGEN_T2I = "peizesun/llamagen_t2i"  # where LlamaGen's README links its text-to-image checkpoints
_GPT_NESTING = 'ckpt["model"] (original falls back to "module", then "state_dict"); loaded non-strictly'


class LlamaGenFamily(Family):
    name = "llamagen"
    default_top_k, default_top_p = 0, 1.0        # LlamaGen's FID setting: no filtering
    tokenizer_config, ar_config, student_config = VQConfig, GPTConfig, DDConfig
    released_teachers = {
        **{f"llamagen_{s}": ReleasedTeacher(256, "llamagen_vq16", f"llamagen_{s}") for s in "bl"},
        # text-to-image (stage 1, 256 px): the caption features are FLAN-T5-XL's, from a local snapshot (prompts.encoder_dir)
        "llamagen_t2i_xl": ReleasedTeacher(256, "llamagen_t2i_vq16", "llamagen_t2i_xl", domain="coco",
                                           text_encoder="flan-t5-xl"),
        # the embedded default's teacher, shipped in releases/tiny/ (trained by `snakemake tiny_teachers`)
        "tiny_llamagen": ReleasedTeacher(64, "tiny_llamagen_tokenizer", "tiny_llamagen_ar", image_size=16,
                                         domain="digits", original_format=False),
        # text-to-image (issue 13): captions of the digits, the same tokenizer, the tiny T5 encoder it was trained with
        "tiny_llamagen_t2i": ReleasedTeacher(64, "tiny_llamagen_tokenizer", "tiny_llamagen_t2i_ar", image_size=16,
                                             domain="digits", original_format=False, text_encoder="tiny_t5_encoder"),
    }
    # the DD README commands: t_list "0,80" for both, split_t 80 for B and 130 for L
    released_students = {"dd_llamagen_b": ReleasedStudent("llamagen_b", (0, 80), 80),
                         "dd_llamagen_l": ReleasedStudent("llamagen_l", (0, 80), 130)}
    releases = (
        Release("llamagen_vq16", _LLAMAGEN, "vq_ds16_c2i.pt",
                "LlamaGen VQ tokenizer, downsample 16, codebook 16384x8",
                'ckpt["model"]; strict load, includes the unused buffer quantize.codebook_used'),
        Release("llamagen_b", _LLAMAGEN, "c2i_B_256.pt", "LlamaGen GPT-B class-conditional teacher, ImageNet 256",
                _GPT_NESTING),
        Release("llamagen_l", _LLAMAGEN, "c2i_L_256.pt", "LlamaGen GPT-L class-conditional teacher, ImageNet 256",
                _GPT_NESTING),
        Release("llamagen_t2i_vq16", _LLAMAGEN_T2I, "vq_ds16_t2i.pt",
                "LlamaGen VQ tokenizer of the text-to-image models (same class and shapes as vq_ds16_c2i.pt)",
                'ckpt["model"]; strict load'),
        Release("llamagen_t2i_xl", _LLAMAGEN_T2I, "t2i_XL_stage1_256.pt",
                "LlamaGen GPT-XL text-to-image teacher, stage 1, 256 px (FLAN-T5-XL captions, 120 positions)",
                _GPT_NESTING),
        *(Release(f"dd_llamagen_{size.lower()}", _DD, f"LlamaGen-DD/llamagen-{size}.pt",
                  f"DD student distilled from LlamaGen GPT-{size}",
                  'ckpt["ema"] (all README commands pass --ema); loaded non-strictly; the codebook is not stored, '
                  "it is the l2-normalised tokenizer codebook") for size in "BL"),
    )
    latency_target = 0.90
    real_pair_steps = 32
    real_codebook = {"codebook_size": 16384, "codebook_dim": 8}

    # the token grid is the image size over the tokenizer's downsampling; the GPT's block_size is its area
    @staticmethod
    def grid(tokenizer: VQConfig, image_size: int) -> int:
        return image_size // tokenizer.downsample_factor

    def ar_fields(self, tokenizer: VQConfig, image_size: int | None = None) -> dict:
        fields = {"vocab_size": tokenizer.codebook_size}
        if image_size is not None:
            fields["block_size"] = self.grid(tokenizer, image_size) ** 2
        return fields

    def steps_of(self, tokenizer: VQConfig, image_size: int) -> int:
        return self.grid(tokenizer, image_size) ** 2

    def build_tokenizer(self, config: VQConfig) -> VQModel:
        return VQModel(config)

    def build_ar(self, config: GPTConfig) -> GPT:
        return GPT(config)

    def make_teacher(self, tokenizer: VQModel, ar: GPT) -> LlamaGenTeacher:
        return LlamaGenTeacher(tokenizer, ar)

    def build_student(self, config: DDConfig) -> DDStudent:
        return DDStudent(config)

    def student_from_teacher(self, teacher: LlamaGenTeacher, **overrides) -> DDStudent:
        return DDStudent.from_teacher(teacher, **overrides)

    def bind_to_teacher(self, student: DDStudent, teacher: LlamaGenTeacher) -> DDStudent:
        if student.config.text_conditional and isinstance(teacher, LlamaGenT2ITeacher):
            student.bind_prompts(teacher.captions, teacher.caption_mask)
        return student

    def with_captions(self, teacher: LlamaGenTeacher, captions: Path) -> LlamaGenT2ITeacher:
        from dd.families.llamagen.text_encoder import read_caption_features

        if not teacher.gpt.config.text_conditional:
            raise ArtefactError(f"--captions {captions}: this LlamaGen teacher is class-conditional and takes no captions")
        features, mask = read_caption_features(captions)
        want = (teacher.gpt.config.cls_token_num, teacher.gpt.config.caption_dim)
        if tuple(features.shape[1:]) != want:
            raise ArtefactError(f"--captions {captions}: features of shape {tuple(features.shape[1:])} (positions, "
                                f"dim) but the teacher reads {want}: encoded by another text encoder?")
        return LlamaGenT2ITeacher(teacher.tokenizer, teacher.gpt, features, mask)

    def needs_captions(self, teacher: LlamaGenTeacher) -> bool:
        return teacher.gpt.config.text_conditional and not isinstance(teacher, LlamaGenT2ITeacher)

    def random_release(self, name: str) -> dict | None:
        if name in ("llamagen_vq16", "llamagen_t2i_vq16"):   # one class and configuration, other weights
            return {"model": VQModel(vq_16()).state_dict()}
        if name in ("llamagen_b", "llamagen_l"):
            return {"model": GPT(gpt_preset(name[-1].upper())).state_dict()}
        if name == "llamagen_t2i_xl":
            return {"model": GPT(gpt_preset("XL", **T2I_XL)).state_dict()}
        if name in ("dd_llamagen_b", "dd_llamagen_l"):
            gpt = gpt_preset(name[-1].upper())
            return {"ema": DDStudent(DDConfig.from_gpt(gpt, vq_16().codebook_dim)).state_dict()}
        return None

    def real_size_teacher(self) -> tuple[str, LlamaGenTeacher]:
        ar = GPT(gpt_preset("B"))
        return "B", LlamaGenTeacher(VQModel(vq_16()), ar)

    def load_released_teacher(self, tokenizer_path: Path, model_path: Path) -> LlamaGenTeacher:
        from dd.families.llamagen.checkpoints import load_teacher

        return load_teacher(tokenizer_path, model_path)

    def load_released_student(self, path: Path, ema: bool = True) -> DDStudent:
        from dd.families.llamagen.checkpoints import load_student

        return load_student(path, ema=ema)

    def golden_kind(self, blob: dict) -> str | None:
        from dd.families.llamagen.golden import detect

        return detect(blob)

    def verify_golden(self, blob: dict, path: Path) -> list:
        from dd.families.llamagen.golden import verify

        return verify(blob, path)


FAMILY = LlamaGenFamily()
