"""Golden verification of the VAR family (``../shared/golden/var/README.md``).

Three kinds of golden file, recognised from their content:

* ``var-vqvae``: the multi-scale VQVAE (encoder, residual quantiser, decoder, VAR input helpers);
* ``var``: the VAR transformer (teacher-forced logits, CFG mix, the KV-cached greedy sampler);
* ``var-dd``: the DD student (forward, Eq. 6 final prediction, two-step sampling and decoding).

Every model is rebuilt from the file's ``config`` alone and loaded strictly. Files that decode images
find their VQVAE among the ``var-vqvae`` files of the same folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dd.families.var.student import VARStudent, VARStudentConfig
from dd.families.var.teacher import VARTeacher
from dd.families.var.transformer import VAR, VARConfig, cfg_strength
from dd.families.var.vqvae import VQVAE, VQVAEConfig, phi_index
from dd.golden.cases import (
    CaseResult,
    exact_case,
    float32_state_dict,
    float_case,
    load_golden,
)
from dd.method.student import final_predict, final_sequence, perturb
from dd.method.teacher import SamplingConfig

TOL = 1e-4
TOL_CFG = 2e-4   # CFG-mixed logits: the mix amplifies float noise by up to 1 + 2 cfg


# --------------------------------------------------------------------------------------------------
# recognising files
# --------------------------------------------------------------------------------------------------
def detect(blob: dict) -> str | None:
    cfg = blob.get("config", {})
    if not isinstance(cfg, dict):
        return None
    if {"z_channels", "v_patch_nums", "share_quant_resi"} <= set(cfg):
        return "var-vqvae"
    if {"n_d_embed_enable", "dd_patch_nums", "vae_patch_nums"} <= set(cfg):
        return "var-dd"
    if {"patch_nums", "attn_l2_norm", "begin_ends", "Cvae"} <= set(cfg):
        return "var"
    return None


def vqvae_config(cfg: dict) -> VQVAEConfig:
    return VQVAEConfig.from_dict(cfg)


def var_config(cfg: dict) -> VARConfig:
    # label dropout is a training-time option here, so the recorded (eval) behaviour needs nothing
    return VARConfig.from_dict(cfg)


def student_config(cfg: dict) -> VARStudentConfig:
    return VARStudentConfig.from_dict({**cfg, "patch_nums": cfg["vae_patch_nums"]})


def _build(model_cls, cfg, blob) -> torch.nn.Module:
    model = model_cls(cfg)
    model.load_state_dict(float32_state_dict(blob["state_dict"]), strict=True)
    return model.eval()


def _build_checking_buffers(model_cls, cfg, blob) -> tuple[torch.nn.Module, list[CaseResult]]:
    """Build, compare the buffers we construct (masks, level tables) with the recorded ones, load."""
    model = model_cls(cfg)
    sd = float32_state_dict(blob["state_dict"])
    res = [float_case(f"built buffer {name}", buf, sd[name], 0.0) if buf.is_floating_point()
           else exact_case(f"built buffer {name}", buf, sd[name])
           for name, buf in model.named_buffers() if name in sd and "ema_vocab_hit" not in name]
    model.load_state_dict(sd, strict=True)
    return model.eval(), res


def _table(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


def find_tokenizer(folder: Path, cfg: VARConfig, codebook: torch.Tensor | None = None) -> VQVAE:
    """The VQVAE of the golden folder that fits the transformer: same scales, codebook size and code
    dimension (and, when given, the same codebook values)."""
    for p in sorted(folder.glob("*.pt")):
        try:
            blob = load_golden(p)
        except Exception:  # noqa: BLE001 - other files in the folder are not our business
            continue
        if detect(blob) != "var-vqvae":
            continue
        vcfg = vqvae_config(blob["config"])
        if (vcfg.patch_nums, vcfg.vocab_size, vcfg.z_channels) != (tuple(cfg.patch_nums), cfg.vocab_size, cfg.Cvae):
            continue
        vae = _build(VQVAE, vcfg, blob)
        if codebook is None or torch.equal(vae.quantize.embedding.weight, codebook.float()):
            return vae
    raise FileNotFoundError(f"no VQVAE golden file in {folder} fits patch_nums {tuple(cfg.patch_nums)}, "
                            f"V={cfg.vocab_size}, Cvae={cfg.Cvae}")


# --------------------------------------------------------------------------------------------------
# per-kind checks
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def verify_vqvae(blob: dict) -> list[CaseResult]:
    cfg = vqvae_config(blob["config"])
    vae, res = _build_checking_buffers(VQVAE, cfg, blob)
    q = vae.quantize
    inp, out = blob["inputs"], blob["outputs"]
    if "phi_index_per_scale" in blob["config"] and cfg.share_quant_resi != 1:
        ours = [phi_index(si, q.n_scales, cfg.share_quant_resi or cfg.default_qresi_counts or q.n_scales)
                for si in range(q.n_scales)]
        res.append(exact_case("phi_index_per_scale", _table(ours), _table(blob["config"]["phi_index_per_scale"])))
    res.append(float_case("codebook", q.embedding.weight, out["codebook"], TOL))

    f = vae.img_to_f(inp["img"])
    res.append(float_case("f_BChw", f, out["f_BChw"], TOL))
    idx, fhats = q.f_to_idx(f, return_fhat=True)
    for si, (a, b) in enumerate(zip(idx, out["idx_Bl"], strict=True)):
        res.append(exact_case(f"idx_Bl[{si}]", a, b))
    for si, (a, b) in enumerate(zip(fhats, out["fhat_per_scale_from_img"], strict=True)):
        res.append(float_case(f"fhat_per_scale_from_img[{si}]", a, b, TOL))

    idx_in = inp["idx_Bl_for_decode"]
    fhat_idx = q.embed_to_fhat([q.codes_to_map(i) for i in idx_in])
    for si, (a, b) in enumerate(zip(fhat_idx, out["fhat_per_scale_from_idx"], strict=True)):
        res.append(float_case(f"fhat_per_scale_from_idx[{si}]", a, b, TOL))
    res.append(float_case("img_from_idx", vae.idx_to_img(idx_in), out["img_from_idx"], TOL))
    res.append(float_case("var_input", q.idx_to_var_input(idx_in), out["var_input"], TOL))

    for si, ref in enumerate(out["next_ar"]):
        f_hat, nxt = q.next_autoregressive_input(si, inp["next_ar_f_hat_in"][si], inp["next_ar_h_BChw"][si])
        res.append(float_case(f"next_ar[{si}].f_hat_out", f_hat, ref["f_hat_out"], TOL))
        res.append(float_case(f"next_ar[{si}].next_token_map", nxt, ref["next_token_map"], TOL))
    return res


@torch.no_grad()
def verify_var(blob: dict, folder: Path) -> list[CaseResult]:
    cfg = var_config(blob["config"])
    var, res = _build_checking_buffers(VAR, cfg, blob)
    inp, out = blob["inputs"], blob["outputs"]
    x = inp["x_BLCv_wo_first_l"]
    if "begin_ends" in blob["config"]:
        res.append(exact_case("begin_ends", _table(var.begin_ends), _table(blob["config"]["begin_ends"])))

    # teacher forcing, with the debug intermediates
    h, cond_BD = var.embed(inp["label_cond"], x)
    dbg = out["debug_cond"]
    res.append(float_case("debug_cond.x_BLC_before_blocks", h, dbg["x_BLC_before_blocks"], TOL))
    res.append(float_case("debug_cond.cond_BD", cond_BD, dbg["cond_BD"], TOL))
    cond = var.block_cond(cond_BD)
    for i, block in enumerate(var.blocks):
        h = block(h, cond, attn_bias=var.attn_bias_for_masking)
        res.append(float_case(f"debug_cond.block_outputs[{i}]", h, dbg["block_outputs"][i], TOL))
    logits_c = var(inp["label_cond"], x)
    logits_u = var(inp["label_uncond"], x)
    res.append(float_case("logits_cond", logits_c, out["logits_cond"], TOL))
    res.append(float_case("logits_uncond", logits_u, out["logits_uncond"], TOL))
    mixed = torch.empty_like(logits_c)
    for si, (b, e) in enumerate(var.begin_ends):
        t = cfg_strength(inp["cfg_teacher_forced"], si, len(var.patch_nums))
        mixed[:, b:e] = (1 + t) * logits_c[:, b:e] - t * logits_u[:, b:e]
    res.append(float_case("logits_cfg_mixed", mixed, out["logits_cfg_mixed"], TOL_CFG))

    # the KV-cached greedy sampler, through the teacher adapter (top_k=1 makes it deterministic)
    teacher = VARTeacher(find_tokenizer(folder, cfg), var).eval()
    state = teacher.begin(inp["ar_label"], SamplingConfig(cfg_scale=float(inp["ar_cfg"]), top_k=1))
    for si in range(teacher.n_steps):
        logits = teacher.next_logits(state)
        res.append(float_case(f"ar_guided_logits_per_scale[{si}]", logits, out["ar_guided_logits_per_scale"][si],
                              TOL_CFG))
        idx = teacher.next_probs(state).argmax(dim=-1)
        res.append(exact_case(f"ar_idx_per_scale[{si}]", idx, out["ar_idx_per_scale"][si]))
        teacher.append(state, idx)
    img = teacher.decode_indices(torch.cat(state.tokens, dim=1)).add(1).mul(0.5)
    res.append(float_case("ar_img_0_1", img, out["ar_img_0_1"], TOL))
    return res


@torch.no_grad()
def verify_dd(blob: dict, folder: Path) -> list[CaseResult]:
    cfg = student_config(blob["config"])
    student, res = _build_checking_buffers(VARStudent, cfg, blob)
    inp, out = blob["inputs"], blob["outputs"]
    vae = find_tokenizer(folder, cfg, inp.get("codebook_copy"))
    codebook = vae.quantize.embedding.weight
    conf = blob["config"]
    if "noise_mask" in conf:   # row t: 1 where perturb_data puts noise, i.e. from step t's first token on
        n = student.n_tokens
        ours = [[int(i >= student.step_begins[t]) for i in range(n)] for t in range(len(conf["noise_mask"]))]
        res.append(exact_case("noise_mask", _table(ours), _table(conf["noise_mask"])))
    if "lvl_1L" in conf:
        res.append(exact_case("lvl_1L", student.lvl_1L[0], _table(conf["lvl_1L"])))

    def begin_of(t: torch.Tensor) -> torch.Tensor:
        return torch.tensor(student.step_begins)[t]

    for ci, (case, ref) in enumerate(zip(inp["cases"], out["cases"], strict=True)):
        t = case["t"].long()
        name = f"cases[{ci}](t={int(t[0])})"
        begin = begin_of(t)
        x_t = perturb(case["x0_BLCv"], case["noise_BLCv"], begin)
        res.append(float_case(f"{name}.x_t_BLCv", x_t, ref["x_t_BLCv"], TOL))
        res.append(exact_case(f"{name}.n_d_index_per_position", student.data_flags(t),
                              ref["n_d_index_per_position"]))
        logits, emb = student(x_t, case["label_B"], t)
        res.append(float_case(f"{name}.forward_x_BLCv", emb, ref["forward_x_BLCv"], TOL))
        res.append(float_case(f"{name}.forward_logits_BLV", logits, ref["forward_logits_BLV"], TOL))
        tokens, fp_logits = final_predict(logits, emb, x_t, begin, codebook)
        res.append(float_case(f"{name}.final_predict_x_BLCv", tokens, ref["final_predict_x_BLCv"], TOL))
        res.append(float_case(f"{name}.final_predict_logits_BLV", fp_logits, ref["final_predict_logits_BLV"], TOL))
        if "debug" in ref:
            h, cond_BD, nd = student.embed_student(x_t, case["label_B"], t)
            res.append(float_case(f"{name}.debug.x_BLC_before_blocks", h, ref["debug"]["x_BLC_before_blocks"], TOL))
            cond = student.block_cond(cond_BD)
            for i, block in enumerate(student.blocks):
                h = block(h, cond, attn_bias=student.attn_bias_for_masking,
                          mid_residual=student.nd_for_block(i, nd))
                res.append(float_case(f"{name}.debug.block_outputs[{i}]", h, ref["debug"]["block_outputs"][i], TOL))

    # sample.py: t_list steps, each perturb -> final_predict -> final_sequence(split), then decode
    smp, smp_ref = inp["sampling"], out["sampling"]
    noise, labels = smp["noise_BLCv"], smp["label_B"]
    split_begin = student.step_begins[int(smp["loss_split_t"])]
    x = noise
    for k, (t_val, ref) in enumerate(zip(smp["t_list"], smp_ref["steps"], strict=True)):
        t = torch.full((labels.shape[0],), int(t_val), dtype=torch.long)
        name = f"sampling.steps[{k}](t={int(t_val)})"
        x = perturb(x, noise, begin_of(t))
        res.append(float_case(f"{name}.x_in", x, ref["x_in"], TOL))
        logits, emb = student(x, labels, t)
        tokens, fp_logits = final_predict(logits, emb, x, begin_of(t), codebook)
        res.append(float_case(f"{name}.final_predict_x_BLCv", tokens, ref["final_predict_x_BLCv"], TOL))
        res.append(float_case(f"{name}.final_predict_logits_BLV", fp_logits, ref["final_predict_logits_BLV"], TOL))
        x = final_sequence(tokens, fp_logits, codebook, split_begin)
        res.append(float_case(f"{name}.sequence_out", x, ref["sequence_out"], TOL))
    res.append(float_case("sampling.final_sequence", x, smp_ref["final_sequence"], TOL))
    img = vae.decode_tokens(x).add(1).mul(0.5)
    res.append(float_case("sampling.img_0_1", img, smp_ref["img_0_1"], TOL))
    return res


def verify(blob: dict, path: Path) -> list[CaseResult]:
    kind = detect(blob)
    folder = Path(path).parent
    if kind == "var-vqvae":
        return verify_vqvae(blob)
    if kind == "var":
        return verify_var(blob, folder)
    if kind == "var-dd":
        return verify_dd(blob, folder)
    raise ValueError(f"{path}: not a VAR-family golden file")


# --------------------------------------------------------------------------------------------------
# shape manifests of the released models
# --------------------------------------------------------------------------------------------------
def config_from_manifest(manifest: dict):
    """(model class, config) for a ``manifest_*.json`` (from its builder/constructor arguments)."""
    ca = manifest["constructor_args"]
    if "z_channels" in ca:
        d = {**ca, **ca.get("defaults_not_passed", {}), **manifest.get("derived", {})}
        return VQVAE, VQVAEConfig.from_dict(d)
    ba = manifest["builder_args"]
    d = {**ca, "vocab_size": ba["V"], "Cvae": ba["Cvae"], "patch_nums": ba["patch_nums"]}
    if ca.get("n_d_embed_enable") is not None:
        return VARStudent, VARStudentConfig.from_dict(d)
    return VAR, VARConfig.from_dict(d)


def model_from_manifest(manifest: dict) -> torch.nn.Module:
    """Our model at a manifest's configuration, on the meta device (no weight memory)."""
    cls, cfg = config_from_manifest(manifest)
    with torch.device("meta"):
        return cls(cfg)
