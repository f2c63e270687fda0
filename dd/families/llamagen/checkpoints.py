"""Loading the released LlamaGen and LlamaGen-DD checkpoint files."""
from __future__ import annotations

import torch
from torch import nn

from dd.families.llamagen.gpt import GPT, GPT_PRESETS, GPTConfig
from dd.families.llamagen.student import DDConfig, DDStudent
from dd.families.llamagen.teacher import LlamaGenTeacher
from dd.families.llamagen.tokenizer import VQConfig, VQModel
from dd.io import ArtefactError, read_checkpoint


def _weights(ckpt: dict, prefer: tuple[str, ...]) -> dict:
    """The state dict nested in a checkpoint under the first key of ``prefer`` present, else ckpt."""
    for key in prefer:
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def _load_into(model: nn.Module, sd: dict, strict: bool, what: str) -> nn.Module:
    """Load onto a meta-built model (assign=True). Unexpected keys are ignored when not strict, as the
    original loaders do; missing keys always fail (they would stay unallocated)."""
    missing, unexpected = model.load_state_dict(sd, strict=strict, assign=True)
    if missing:
        raise ArtefactError(f"{what}: checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}")
    return model


def _infer_vq_config(sd: dict) -> VQConfig:
    """The tokenizer configuration of a state dict (GroupNorm groups cannot be seen: 32 assumed)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))
    mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
    dec_mult = tuple(sd[f"decoder.conv_blocks.{n_levels - 1 - i}.res.0.conv1.weight"].shape[0] // ch
                     for i in range(n_levels))
    n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.0.res."))
    V, C = sd["quantize.embedding.weight"].shape
    return VQConfig(codebook_size=V, codebook_dim=C, codebook_show_usage="quantize.codebook_used" in sd,
                    ch=ch, ch_mult=mult, decoder_ch_mult=dec_mult, num_res_blocks=n_res,
                    z_channels=sd["encoder.conv_out.weight"].shape[0])


def _infer_gpt_config(sd: dict, block_size: int, cls=GPTConfig, **extra) -> GPTConfig:
    """The GPT configuration of a state dict; n_head from LlamaGen's presets (by width)."""
    dim = sd["norm.weight"].shape[0]
    heads = {d: h for _, h, d in GPT_PRESETS.values()}
    if dim not in heads:
        raise ValueError(f"width {dim} is not a LlamaGen preset: pass the model configuration explicitly")
    n_head = heads[dim]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv = (qkv_rows // (dim // n_head) - n_head) // 2
    if "cls_embedding.cap_proj.fc1.weight" in sd:  # text-to-image: caption width and length
        T, caption_dim = sd["cls_embedding.uncond_embedding"].shape
        cond = dict(model_type="t2i", caption_dim=caption_dim, cls_token_num=T)
    else:
        cond = dict(num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1)
    cfg = cls(dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=None if n_kv == n_head else n_kv,
              vocab_size=sd["output.weight"].shape[0], block_size=block_size, **cond, **extra)
    if cfg.ffn_hidden != sd["layers.0.feed_forward.w1.weight"].shape[0]:
        raise ValueError("FFN width differs from the default rule: pass the model configuration explicitly")
    return cfg


def _config_of(ckpt: dict, cls, given):
    """``given`` (a config or a dict of its fields), else a ``config`` dict saved in the checkpoint
    by this project, else None."""
    if isinstance(given, dict):
        return cls(**given)
    if given is not None:
        return given
    if isinstance(ckpt.get("config"), dict):
        return cls(**ckpt["config"])
    return None


def load_tokenizer(path, config: VQConfig | dict | None = None) -> VQModel:
    """A tokenizer checkpoint: the released ``vq_ds16_c2i.pt`` (weights under ``model``, strict) or
    one of ours (``{"model": state_dict, "config": asdict(VQConfig)}``)."""
    ckpt = read_checkpoint(path)
    sd = _weights(ckpt, ("model", "state_dict"))
    cfg = _config_of(ckpt, VQConfig, config) or _infer_vq_config(sd)
    with torch.device("meta"):
        model = VQModel(cfg)
    return _load_into(model, sd, strict=True, what=str(path)).eval()


def load_gpt(path, config: GPTConfig | dict | None = None, image_size: int = 256, downsample: int = 16) -> GPT:
    """A GPT checkpoint: released ``c2i_*.pt`` (``model`` / ``module`` / ``state_dict`` / raw; loaded
    non-strictly, so a stray ``freqs_cis`` key is ignored) or one of ours (with a ``config``). Without a
    config, the grid is image_size / downsample and the widths come from the weights."""
    ckpt = read_checkpoint(path)
    sd = _weights(ckpt, ("model", "module", "state_dict"))
    cfg = _config_of(ckpt, GPTConfig, config) or _infer_gpt_config(sd, (image_size // downsample) ** 2)
    with torch.device("meta"):
        model = GPT(cfg)
    return _load_into(model, sd, strict=False, what=str(path)).eval()


def load_teacher(tokenizer_path, model_path, vq_config: VQConfig | dict | None = None,
                 gpt_config: GPTConfig | dict | None = None, image_size: int = 256) -> LlamaGenTeacher:
    """Teacher from a tokenizer file and a GPT file (see ``load_tokenizer`` / ``load_gpt``)."""
    tokenizer = load_tokenizer(tokenizer_path, vq_config)
    gpt = load_gpt(model_path, gpt_config, image_size, tokenizer.config.downsample_factor)
    return LlamaGenTeacher(tokenizer, gpt)


def load_student(path, config: DDConfig | dict | None = None, ema: bool = True, image_size: int = 256,
                 downsample: int = 16) -> DDStudent:
    """A DD student checkpoint: released ``llamagen-*.pt`` (weights under ``ema`` when ``ema``, else
    ``model`` / ``module`` / ``state_dict`` / raw; non-strict like the DD scripts) or one of ours."""
    ckpt = read_checkpoint(path)
    prefer = (("ema",) if ema else ()) + ("model", "module", "state_dict")
    sd = _weights(ckpt, prefer)
    cfg = _config_of(ckpt, DDConfig, config)
    if cfg is None:
        cfg = _infer_gpt_config(sd, (image_size // downsample) ** 2, DDConfig,
                                codebook_dim=sd["tok_embeddings.weight"].shape[1])
    with torch.device("meta"):
        model = DDStudent(cfg)
    return _load_into(model, sd, strict=False, what=str(path)).eval()
