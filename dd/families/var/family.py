"""The VAR family adapter (``dd.families.base.Family``): next-scale prediction, one whole scale per AR step."""
from __future__ import annotations

from pathlib import Path

from dd.families.base import Family, Release, ReleasedStudent, ReleasedTeacher
from dd.families.var.student import VARStudent, VARStudentConfig
from dd.families.var.teacher import VARTeacher
from dd.families.var.transformer import VAR, VARConfig
from dd.families.var.vqvae import VQVAE, VQVAEConfig

_VAR, _DD = "FoundationVision/var", "microsoft/distilled_decoding"


class VARFamily(Family):
    name = "var"
    default_top_k, default_top_p = 900, 0.96     # VAR's FID setting
    tokenizer_config, ar_config, student_config = VQVAEConfig, VARConfig, VARStudentConfig
    released_teachers = {
        **{f"var_d{d}": ReleasedTeacher(10, "vae_var", f"var_d{d}") for d in (16, 20, 24)},
        # the embedded default's teacher, shipped in releases/tiny/ (trained by `snakemake tiny_teachers`)
        "tiny_var": ReleasedTeacher(6, "tiny_var_tokenizer", "tiny_var_ar", image_size=16,
                                         domain="digits", original_format=False),
    }
    student_options = ("within_scale_attention",)
    # The paper's mask (App. B) for new students. Measured on the tiny VAR default (same pairs, 750 steps, 2000
    # samples in 4 parts), paper vs released mask: DD 1-step FID 32.68 +- 0.85 vs 33.23 +- 0.89, DD 2-step
    # 31.77 +- 0.83 vs 33.76 +- 0.87, pre-trained-1/2/3-4 27.3 / 29.3 / 28.4 vs 28.4 / 30.3 / 30.1, recall 0.39 / 0.41
    # vs 0.39 / 0.40, teacher NLL 12.78 / 11.92 vs 12.75 / 11.81 bits: lower FID in every row, none beyond 2
    # standard errors (DD 2-step: 1.7).
    new_student_defaults = {"within_scale_attention": True}
    # the DD README commands: d16 t_list "0,5" with loss_split_t 5; d20 and d24 "0,4" with loss_split_t 4
    released_students = {"dd_var_d16": ReleasedStudent("var_d16", (0, 5), 5),
                         "dd_var_d20": ReleasedStudent("var_d20", (0, 4), 4),
                         "dd_var_d24": ReleasedStudent("var_d24", (0, 4), 4)}
    releases = (
        Release("vae_var", _VAR, "vae_ch160v4096z32.pth", "VAR multi-scale VQVAE, codebook 4096x32",
                "raw state dict; strict load"),
        *(Release(f"var_d{d}", _VAR, f"var_d{d}.pth", f"VAR depth-{d} teacher, ImageNet 256",
                  "raw state dict; strict load") for d in (16, 20, 24)),
        *(Release(f"dd_var_d{d}", _DD, f"VAR-DD/var-d{d}.pth", f"DD student distilled from VAR-d{d}",
                  'ckpt["trainer"]["ema_parameters"] (EMA, the default) or ckpt["trainer"]["var_wo_ddp"]; '
                  "loaded non-strictly") for d in (16, 20, 24)),
    )
    latency_target = 0.70
    real_pair_steps = 8
    real_codebook = {"vocab_size": 4096, "z_channels": 32}

    # the tokens are the tokenizer's scales (patch_nums); the image size follows from them
    def ar_fields(self, tokenizer: VQVAEConfig, image_size: int | None = None) -> dict:
        return {"vocab_size": tokenizer.vocab_size, "Cvae": tokenizer.z_channels,
                "patch_nums": tuple(tokenizer.patch_nums)}

    def steps_of(self, tokenizer: VQVAEConfig, image_size: int) -> int:
        return len(tokenizer.patch_nums)

    def build_tokenizer(self, config: VQVAEConfig) -> VQVAE:
        return VQVAE(config)

    def build_ar(self, config: VARConfig) -> VAR:
        return VAR(config)

    def make_teacher(self, tokenizer: VQVAE, ar: VAR) -> VARTeacher:
        return VARTeacher(tokenizer, ar)

    def build_student(self, config: VARStudentConfig) -> VARStudent:
        return VARStudent(config)

    def student_from_teacher(self, teacher: VARTeacher, **overrides) -> VARStudent:
        return VARStudent.from_teacher(teacher, **overrides)

    def random_release(self, name: str) -> dict | None:
        # the released VAR files are raw state dicts; the DD files a training state (see checkpoints.load_student)
        if name == "vae_var":
            return VQVAE(VQVAEConfig()).state_dict()
        depths = {f"var_d{d}": d for d in (16, 20, 24)}
        if name in depths:
            return VAR(VARConfig.from_depth(depths[name])).state_dict()
        if name.startswith("dd_") and name[3:] in depths:
            cfg = VARStudentConfig.from_teacher_config(VARConfig.from_depth(depths[name[3:]]))
            return {"trainer": {"ema_parameters": VARStudent(cfg).state_dict()}}
        return None

    def real_size_teacher(self) -> tuple[str, VARTeacher]:
        ar = VAR(VARConfig.from_depth(16))
        return "d16", VARTeacher(VQVAE(VQVAEConfig()), ar)

    def load_released_teacher(self, tokenizer_path: Path, model_path: Path) -> VARTeacher:
        from dd.families.var.checkpoints import load_teacher

        return load_teacher(tokenizer_path, model_path)

    def load_released_student(self, path: Path, ema: bool = True) -> VARStudent:
        from dd.families.var.checkpoints import load_student

        return load_student(path, ema=ema)

    def golden_kind(self, blob: dict) -> str | None:
        from dd.families.var.golden import detect

        return detect(blob)

    def verify_golden(self, blob: dict, path: Path) -> list:
        from dd.families.var.golden import verify

        return verify(blob, path)


FAMILY = VARFamily()
