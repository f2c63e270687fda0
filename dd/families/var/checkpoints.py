"""Loading the released VAR and VAR-DD checkpoint files."""
from __future__ import annotations

from typing import Any

import torch

from dd.families.var.student import VARStudent, VARStudentConfig
from dd.families.var.teacher import VARTeacher
from dd.families.var.transformer import VAR, VARConfig
from dd.families.var.vqvae import RELEASED_PATCH_NUMS, VQVAE, VQVAEConfig
from dd.io import ArtefactError, read_checkpoint


def _unwrap(obj: Any, keys: list[tuple[str, ...]]) -> dict:
    """The first nested dict found along one of the key paths, or obj itself."""
    for path in keys:
        cur = obj
        for k in path:
            if not isinstance(cur, dict) or k not in cur:
                break
            cur = cur[k]
        else:
            return cur
    return obj


def _infer_var_config(sd: dict, cls=VARConfig, patch_nums=None, **kw) -> VARConfig:
    """Config of a checkpoint made by the release builder (width 64*depth), from its tensor shapes."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    C = sd["word_embed.weight"].shape[0]
    L = sd["pos_1LC"].shape[1] - (1 if cls is VARStudentConfig else 0)
    if patch_nums is None:
        patch_nums = RELEASED_PATCH_NUMS
        if sum(p * p for p in patch_nums) != L:
            raise ValueError(f"checkpoint has {L} token positions; pass its config (patch_nums) explicitly")
    return cls(vocab_size=sd["head.weight"].shape[0], Cvae=sd["word_embed.weight"].shape[1],
               num_classes=sd["class_emb.weight"].shape[0] - 1, depth=depth, embed_dim=C,
               num_heads=C // 64, drop_path_rate=0.1 * depth / 24,
               shared_aln="shared_ada_lin.1.weight" in sd,
               attn_l2_norm="blocks.0.attn.scale_mul_1H11" in sd, patch_nums=tuple(patch_nums), **kw)


def load_vqvae(path, config: VQVAEConfig | dict | None = None) -> VQVAE:
    """A VQVAE from a raw state_dict (the release format) or a dict with 'config' and 'state_dict'/'model'."""
    obj = read_checkpoint(path)
    if config is None:
        config = obj.get("config") if isinstance(obj, dict) and "config" in obj else VQVAEConfig()
    if isinstance(config, dict):
        config = VQVAEConfig.from_dict(config)
    sd = _unwrap(obj, [("state_dict",), ("model",)])
    model = VQVAE(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_var(path, config: VARConfig | dict | None = None, tokenizer: VQVAE | None = None) -> VAR:
    """VAR from a raw state_dict (release), a training checkpoint (['trainer']['var_wo_ddp']) or a dict
    with 'config' and 'state_dict'/'model'. Strict, as the original loads it."""
    obj = read_checkpoint(path)
    sd = _unwrap(obj, [("trainer", "var_wo_ddp"), ("state_dict",), ("model",)])
    if config is None and isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "depth" in obj["config"]:
        config = obj["config"]
    if isinstance(config, dict):
        config = VARConfig.from_dict(config)
    model = VAR(config or _infer_var_config(sd), tokenizer)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_teacher(tokenizer_path, model_path, tokenizer_config=None, model_config=None,
                 device: str | torch.device = "cpu") -> VARTeacher:
    """The frozen teacher from checkpoint files (defaults: the released 256-px configuration)."""
    tok = load_vqvae(tokenizer_path, tokenizer_config)
    var = load_var(model_path, model_config, tok)
    return VARTeacher(tok, var).to(device).eval().requires_grad_(False)


# buffers that the student constructs itself; a file's copies (present or not) are ignored
_STUDENT_BUILT_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


def load_student(path, config: VARStudentConfig | dict | None = None, ema: bool = True) -> VARStudent:
    """A DD student from a released DD file (['trainer']['ema_parameters'] or ['var_wo_ddp']) or a
    dd.method.distill checkpoint ('ema' / 'model'). Loads non-strictly, like the original sample.py: keys the student
    does not have are ignored; a key it lacks is an error (that layer would stay randomly initialised)."""
    obj = read_checkpoint(path)
    first, second = (("ema_parameters",), ("var_wo_ddp",)) if ema else (("var_wo_ddp",), ("ema_parameters",))
    sd = _unwrap(obj, [("trainer",) + first, ("trainer",) + second,
                       ("ema",) if ema else ("model",), ("model",), ("state_dict",)])
    sd = {k: v for k, v in sd.items() if not k.endswith(_STUDENT_BUILT_BUFFERS)}
    if isinstance(config, dict):
        config = VARStudentConfig.from_dict(config)
    student = VARStudent(config or _infer_var_config(sd, VARStudentConfig))
    missing, _unexpected = student.load_state_dict(sd, strict=False)
    built = {n for n, _ in student.named_buffers()}
    missing = [k for k in missing if k not in built]
    if missing:
        raise ArtefactError(f"{path}: checkpoint lacks {len(missing)} keys of the student, e.g. {missing[:5]}")
    return student.eval()
