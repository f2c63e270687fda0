"""Golden verification of the LlamaGen family (tokenizer, GPT, DD student) against recorded reference data.

The golden files (``shared/golden/llamagen/*.pt``, described by the README there) hold the original
model's configuration, random weights, inputs and outputs. Everything here is rebuilt from ``config``
alone, loaded strictly and re-run; the DD checks go through ``dd.method.student`` (Eq. 6 / final sequence).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dd.families.llamagen.gpt import GPT, GPTConfig, cfg_mix, logits_to_probs, top_k_top_p_filter
from dd.families.llamagen.student import DDConfig, DDStudent
from dd.families.llamagen.teacher import LlamaGenTeacher
from dd.families.llamagen.tokenizer import VQConfig, VQModel
from dd.golden.cases import (
    CaseResult,
    exact_case,
    float32_state_dict,
    float_case,
    load_golden,
)
from dd.method import student as dd_student
from dd.method.teacher import SamplingConfig

TOL = 1e-4
TOL_CFG = 2e-4  # CFG-mixed logits: |values| up to ~32 after the x cfg amplification

KIND_VQ, KIND_GPT, KIND_GPT_T2I, KIND_DD = "llamagen-vq", "llamagen-gpt", "llamagen-gpt-t2i", "llamagen-dd"


# ----------------------------------------------------------------------------------------------------
# recognising files and rebuilding models from their config
# ----------------------------------------------------------------------------------------------------

def detect(blob: dict) -> str | None:
    """Kind of a loaded golden file, from its config and state-dict keys (never the file name)."""
    cfg, sd = blob.get("config"), blob.get("state_dict")
    if not isinstance(cfg, dict) or not isinstance(sd, dict) or not isinstance(cfg.get("model_args"), dict):
        return None
    args = cfg["model_args"]
    if "codebook_embed_dim" in args and "encoder.conv_blocks.0.res.0.conv1.weight" in sd:
        return KIND_VQ
    if "layers.0.attention.wqkv.weight" in sd and "vocab_size" in args:
        if "n_d_embed.weight" in sd:
            return KIND_DD
        return KIND_GPT_T2I if "cls_embedding.cap_proj.fc1.weight" in sd else KIND_GPT
    return None


def vq_config_from_golden(cfg: dict) -> VQConfig:
    return VQConfig.from_model_args(cfg["model_args"], ch=cfg["encoder_decoder_ch"],
                                    num_res_blocks=cfg.get("num_res_blocks", 2),
                                    norm_groups=cfg.get("groupnorm_groups", 32),
                                    norm_eps=cfg.get("groupnorm_eps", 1e-6))


def _model_args(cfg: dict) -> dict:
    # the recorded model_args leave out the ModelArgs defaults; those are listed beside them
    return {**cfg.get("model_args_defaults_used", {}), **cfg["model_args"]}


def build_from_golden(blob: dict) -> torch.nn.Module:
    """Our model at the golden file's configuration, its weights loaded strictly, in eval mode."""
    kind, cfg = detect(blob), blob["config"]
    if kind == KIND_VQ:
        model = VQModel(vq_config_from_golden(cfg))
    elif kind in (KIND_GPT, KIND_GPT_T2I):
        model = GPT(GPTConfig.from_model_args(_model_args(cfg)))
    elif kind == KIND_DD:
        model = DDStudent(DDConfig.from_model_args(_model_args(cfg)))
    else:
        raise ValueError("not a LlamaGen-family golden file")
    model.load_state_dict(float32_state_dict(blob["state_dict"]), strict=True)
    return model.eval()


def find_tokenizer(folder: Path) -> VQModel | None:
    """The tokenizer golden file beside the others, found by content."""
    for p in sorted(folder.glob("*.pt")):
        try:
            blob = load_golden(p)
        except Exception:
            continue
        if detect(blob) == KIND_VQ:
            return build_from_golden(blob)
    return None


def _norm_groups_of(manifest: dict, default: int = 32) -> int:
    for d in manifest.get("constructor_args", {}).values():
        for key in ("norm_groups", "groupnorm_groups"):
            if isinstance(d, dict) and key in d:
                return int(d[key])
    m = re.search(r"GroupNorm\((\d+) groups", str(manifest.get("derived", {}).get("groupnorm", "")))
    return int(m.group(1)) if m else default


def manifest_model_args(manifest: dict) -> dict:
    """The ``ModelArgs`` of a manifest: nested under ``constructor_args.ModelArgs`` (c2i, VQ, DD
    manifests) or ``constructor_args`` itself (the text-to-image manifest)."""
    ctor = manifest["constructor_args"]
    return ctor["ModelArgs"] if isinstance(ctor.get("ModelArgs"), dict) else ctor


def manifest_entries(manifest: dict) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, dtype) of the released state dict: a ``state_dict`` list of {key, shape, dtype}
    or an ``entries`` mapping key -> {shape, dtype} (the text-to-image manifest)."""
    if "state_dict" in manifest:
        return {e["key"]: (list(e["shape"]), e["dtype"]) for e in manifest["state_dict"]}
    return {k: (list(e["shape"]), e["dtype"]) for k, e in manifest["entries"].items()}


def model_from_manifest(manifest: dict) -> torch.nn.Module:
    """Our model at a ``manifest_*.json`` configuration, on the meta device (no weights allocated)."""
    ctor = manifest["constructor_args"]
    args = manifest_model_args(manifest)
    with torch.device("meta"):
        if "codebook_embed_dim" in args:
            hard = next((d for k, d in ctor.items() if k != "ModelArgs" and isinstance(d, dict) and "ch" in d), {})
            cfg = VQConfig.from_model_args(args, ch=hard.get("ch", 128), num_res_blocks=hard.get("num_res_blocks", 2),
                                           norm_groups=_norm_groups_of(manifest))
            return VQModel(cfg)
        if "codebook_dim" in args or "codebook_dim" in manifest.get("builder_args", {}):
            return DDStudent(DDConfig.from_model_args({**manifest.get("builder_args", {}), **args}))
        return GPT(GPTConfig.from_model_args(args))


# ----------------------------------------------------------------------------------------------------
# per-kind verification
# ----------------------------------------------------------------------------------------------------

class _Recorder:
    """Forward hooks that keep the debug intermediates the golden files record."""

    def __init__(self, model):
        self.out: dict = {"block_outputs": []}
        self.handles = [model.layers[0].register_forward_pre_hook(self._before_blocks),
                        model.norm.register_forward_hook(self._keep("final_norm_out"))]
        self.handles += [layer.register_forward_hook(self._block) for layer in model.layers]
        if hasattr(model, "final_layer_conti"):
            self.handles.append(model.final_layer_conti.register_forward_hook(
                self._keep("final_layer_conti_out_with_cls")))

    def _before_blocks(self, module, args):
        self.out["x_before_blocks"] = args[0]

    def _block(self, module, args, output):
        self.out["block_outputs"].append(output)

    def _keep(self, name):
        def hook(module, args, output):
            self.out[name] = output
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _debug_cases(prefix: str, ours: dict, ref: dict) -> list[CaseResult]:
    res = []
    for key, value in ref.items():
        if key == "block_outputs":
            res += [float_case(f"{prefix}.block_outputs[{i}]", o, r)
                    for i, (o, r) in enumerate(zip(ours[key], value))]
            if len(ours[key]) != len(value):
                res.append(CaseResult(f"{prefix}.block_outputs count", abs(len(ours[key]) - len(value)), 0, exact=True))
        else:
            res.append(float_case(f"{prefix}.{key}", ours[key], value))
    return res


@torch.no_grad()
def verify_vq(blob: dict) -> list[CaseResult]:
    vq: VQModel = build_from_golden(blob)
    i, o = blob["inputs"], blob["outputs"]
    img = i["img"]
    enc = vq.encoder(img)
    latent = vq.quant_conv(enc)
    quant, indices, _ = vq.quantize(latent)
    codebook = vq.quantize.codebook()
    z = torch.nn.functional.normalize(latent.permute(0, 2, 3, 1), dim=-1)
    d = (z.reshape(-1, 1, z.shape[-1]) - codebook).pow(2).sum(-1).sort(-1).values
    qz = list(i["qzshape"])
    B, C, H, W = qz
    res = [
        float_case("encoder_out", enc, o["encoder_out"]),
        float_case("latent", latent, o["latent"]),
        float_case("latent_l2norm_bhwc", z, o["latent_l2norm_bhwc"]),
        float_case("quant", quant, o["quant"]),
        exact_case("indices", indices, o["indices"]),
        exact_case("encode() indices [B, n]", vq.encode(img)[1].reshape(-1), o["indices"]),
        float_case("codebook_raw", vq.quantize.embedding.weight, o["codebook_raw"]),
        float_case("codebook_l2norm", codebook, o["codebook_l2norm"]),
        float_case("dec_from_quant", vq.decode(quant), o["dec_from_quant"]),
        float_case("forward_dec", vq(img), o["forward_dec"]),
        float_case("get_codebook_entry_chw", vq.quantize.lookup(i["idx_for_decode"], qz), o["get_codebook_entry_chw"]),
        float_case("get_codebook_entry_flat", vq.quantize.lookup(i["idx_for_decode"]), o["get_codebook_entry_flat"]),
        float_case("get_codebook_entry_bhwc", vq.quantize.lookup(i["idx_for_decode"], (B, H, W, C), channel_first=False),
                   o["get_codebook_entry_bhwc"]),
        float_case("img_from_idx", vq.decode_code(i["idx_for_decode"], qz), o["img_from_idx"]),
        float_case("img_from_rand_idx", vq.decode_code(i["rand_codes"], qz), o["img_from_rand_idx"]),
        float_case("vq_sqdist_gaps", d[:, 1] - d[:, 0], o["vq_sqdist_gaps"]),
    ]
    return res


def _generate(teacher: LlamaGenTeacher, labels, sampling: SamplingConfig, seed: int):
    """Ancestral sampling through the teacher adapter, keeping the guided logits of every step."""
    gen = torch.Generator().manual_seed(seed)
    state = teacher.begin(labels, sampling)
    logits_seen = []
    for _ in range(teacher.n_steps):
        logits = teacher.next_logits(state)
        logits_seen.append(logits)
        probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        teacher.append(state, torch.multinomial(probs, 1, generator=gen))
    return torch.cat(state.tokens, 1), torch.stack(logits_seen, 1)


@torch.no_grad()
def verify_gpt(blob: dict, path: Path) -> list[CaseResult]:
    cfg, i, o = blob["config"], blob["inputs"], blob["outputs"]
    gpt: GPT = build_from_golden(blob)
    idx, cond, null = i["idx"], i["label_cond"], i["label_null"]
    res = [float_case("freqs_cis", gpt.freqs_cis, o["freqs_cis"])]

    for name, labels in (("cond", cond), ("uncond", null)):
        rec = _Recorder(gpt)
        logits = gpt(idx, labels)
        rec.close()
        res.append(float_case(f"logits_{name}", logits, o[f"logits_{name}"]))
        res += _debug_cases(f"debug_{name}", rec.out, o[f"debug_{name}"])
    scale = cfg.get("cfg_scale", cfg["generate_call"]["cfg_scale"])
    res.append(float_case("logits_cfg", cfg_mix(gpt(idx, cond), gpt(idx, null), scale), o["logits_cfg"], TOL_CFG))
    n_short = o["logits_15tok_input_pos"].shape[1] - 1
    res.append(float_case("logits_15tok_input_pos", gpt(idx[:, :n_short], cond), o["logits_15tok_input_pos"]))

    # KV cache: class token, then one token per call
    cache = gpt.new_cache()
    kv_logits = [gpt(None, cond, cache=cache)[:, -1]]
    kv = i["kv_tokens"]
    for j in range(kv.shape[1]):
        kv_logits.append(gpt(kv[:, j:j + 1], cache=cache)[:, -1])
    res.append(float_case("kv_logits_first3", torch.stack(kv_logits, 1), o["kv_logits_first3"]))
    res.append(float_case("tf_logits_first3", gpt(idx, cond)[:, :kv.shape[1] + 1], o["tf_logits_first3"]))

    for c in o["filter_cases"]:
        tag = f"filter(top_k={c['top_k']}, top_p={c['top_p']}, T={c['temperature']})"
        x = i["filter_logits"]
        res.append(float_case(f"{tag} probs", logits_to_probs(x, c["temperature"], c["top_k"], c["top_p"]), c["probs"]))
        res.append(float_case(f"{tag} filtered_logits",
                              top_k_top_p_filter(x / max(c["temperature"], 1e-5), c["top_k"], c["top_p"]),
                              c["filtered_logits"]))

    tokenizer = find_tokenizer(path.parent)
    if tokenizer is None:
        return res + [CaseResult("generate (tokenizer golden file not found beside this file)", float("inf"), TOL)]
    teacher = LlamaGenTeacher(tokenizer, gpt)
    for suffix, call, tol in (("", cfg["generate_call"], TOL_CFG), ("_nocfg", cfg["generate_call_nocfg"], TOL)):
        sampling = SamplingConfig(cfg_scale=call["cfg_scale"], top_k=call["top_k"], top_p=call["top_p"],
                                  temperature=call["temperature"])
        labels = torch.tensor(call["cond"])
        tokens, logits = _generate(teacher, labels, sampling, call.get("torch_manual_seed", 0))
        res.append(exact_case(f"gen{suffix}_idx", tokens, o[f"gen{suffix}_idx"]))
        key = "gen_guided_logits" if suffix == "" else "gen_nocfg_logits"
        res.append(float_case(key, logits, o[key], tol))
        if suffix == "":
            res.append(float_case("gen_img", tokenizer.decode_code(tokens, (tokens.shape[0], tokenizer.config.codebook_dim,
                                                                             gpt.config.grid, gpt.config.grid)),
                                  o["gen_img"]))
    return res


def _generate_t2i(gpt: GPT, caption, emb_mask, sampling: SamplingConfig, seed: int):
    """LlamaGen's generate() for a text-to-image GPT with the KV cache: CFG doubles the batch with the
    null caption under the same caption mask. Returns (tokens [B, n], guided logits [B, n, V])."""
    gen = torch.Generator().manual_seed(seed)
    guided = sampling.cfg_scale > 1.0
    cond = torch.cat([caption, gpt.null_condition(caption)]) if guided else caption
    mask = torch.cat([emb_mask, emb_mask]) if guided else emb_mask
    cache = gpt.new_cache()
    logits = gpt(None, cond, cache=cache, cond_mask=mask)[:, -1]
    tokens, seen = [], []
    for step in range(gpt.config.block_size):
        if step:
            last = tokens[-1]
            logits = gpt(torch.cat([last, last]) if guided else last, cache=cache)[:, -1]
        if guided:
            logits = cfg_mix(*logits.chunk(2), sampling.cfg_scale)
        seen.append(logits)
        probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        tokens.append(torch.multinomial(probs, 1, generator=gen))
    return torch.cat(tokens, 1), torch.stack(seen, 1)


@torch.no_grad()
def verify_gpt_t2i(blob: dict) -> list[CaseResult]:
    """Text-to-image GPT (README section 5): teacher-forced logits for the caption and for the null
    caption under the caption mask, their CFG mix, and KV-cached generation with and without CFG."""
    cfg, i, o = blob["config"], blob["inputs"], blob["outputs"]
    gpt: GPT = build_from_golden(blob)
    caption, emb_mask, idx = i["caption"], i["emb_mask"], i["idx"]
    cond = gpt(idx[:, :-1], caption, cond_mask=emb_mask)
    uncond = gpt(idx[:, :-1], gpt.null_condition(caption), cond_mask=emb_mask)
    res = [float_case("logits_cond", cond, o["logits_cond"]),
           float_case("logits_uncond", uncond, o["logits_uncond"]),
           float_case("logits_cfg", cfg_mix(cond, uncond, cfg["cfg_scale"]), o["logits_cfg"], TOL_CFG)]
    for prefix, call, logits_key, tol in (("gen", cfg["generate_call"], "gen_guided_logits", TOL_CFG),
                                          ("gen_nocfg", cfg["generate_call_nocfg"], "gen_nocfg_logits", TOL)):
        sampling = SamplingConfig(cfg_scale=call["cfg_scale"], top_k=call.get("top_k", 0),
                                  top_p=call.get("top_p", 1.0), temperature=call.get("temperature", 1.0))
        tokens, logits = _generate_t2i(gpt, caption, emb_mask, sampling, call.get("torch_manual_seed", 0))
        res.append(exact_case(f"{prefix}_idx", tokens, o[f"{prefix}_idx"]))
        res.append(float_case(logits_key, logits, o[logits_key], tol))
    return res


def _dd_step(model: DDStudent, codebook, x0, noise, labels, t, split_ts):
    """One DD evaluation at step t (a [B] long tensor): everything the golden cases record."""
    x_t = dd_student.perturb(x0, noise, t)
    logits, emb = model(x_t, labels, t)
    tokens, fp_logits = dd_student.final_predict(logits, emb, x_t, t, codebook)
    return {
        "x_t": x_t, "gt_idx": dd_student.nearest_code(x_t, codebook),
        "noise_mask_BL": ~dd_student.data_mask(x0.shape[1], t),
        "n_d_index_B_Lp1": model.noise_data_index(t, x0.shape[1]),
        "forward_tokens": emb, "forward_logits": logits,
        "final_predict_tokens": tokens, "final_predict_logits": fp_logits,
        "final_x_BLC": {f"split_{s}": dd_student.final_sequence(tokens, fp_logits, codebook, s) for s in split_ts},
    }


@torch.no_grad()
def verify_dd(blob: dict, path: Path) -> list[CaseResult]:
    i, o = blob["inputs"], blob["outputs"]
    model: DDStudent = build_from_golden(blob)
    codebook = i["codebook"]
    exact_keys = {"gt_idx", "noise_mask_BL", "n_d_index_B_Lp1"}
    res = [float_case("freqs_cis", model.freqs_cis, o["freqs_cis"])]
    for case in o["cases"]:
        ci, co = case["inputs"], case["outputs"]
        t = ci["t"].long()
        tag = f"t={t.tolist()}"
        rec = _Recorder(model)
        ours = _dd_step(model, codebook, ci["x0_BLC"], ci["noise_BLC"], ci["label_B"], t, ci["split_ts"])
        rec.close()
        for key, ref in co.items():
            if key == "debug":
                res += _debug_cases(f"{tag} debug", rec.out, ref)
            elif key == "final_x_BLC":
                res += [float_case(f"{tag} final_x_BLC.{k}", ours[key][k], v) for k, v in ref.items()]
            elif key in exact_keys:
                res.append(exact_case(f"{tag} {key}", ours[key], ref))
            else:
                res.append(float_case(f"{tag} {key}", ours[key], ref))

    # the few-step sampling loop of eval_fewstep.py: re-noise from step t with the same initial noise
    s, cfg = o["sampling"], blob["config"]["sampling"]
    labels, noise = torch.tensor(cfg["label_B"]), i["noise_BLC"]
    x = noise
    for k, step in enumerate(s["steps"]):
        t = torch.full((noise.shape[0],), int(step["t"]), dtype=torch.long)
        ours = _dd_step(model, codebook, x, noise, labels, t, [cfg["split_t"]])
        ours["x_out"] = ours["final_x_BLC"][f"split_{cfg['split_t']}"]
        x = ours["x_out"]
        for key in ("x_t", "gt_idx", "final_predict_tokens", "final_predict_logits", "x_out"):
            case = exact_case if key in exact_keys else float_case
            res.append(case(f"sampling step {k} (t={step['t']}) {key}", ours[key], step[key]))
    res.append(float_case("sampling final_x_BLC", x, s["final_x_BLC"]))

    tokenizer = find_tokenizer(path.parent)
    if tokenizer is None:
        return res + [CaseResult("sampling.decoded (tokenizer golden file not found beside this file)", float("inf"), TOL)]
    res.append(float_case("tokenizer codebook == inputs.codebook", tokenizer.quantize.codebook(), codebook))
    B, n, C = x.shape
    g = model.config.grid
    decoded = tokenizer.decode(x.reshape(B, g, g, C).permute(0, 3, 1, 2))
    res.append(float_case("sampling decoded", decoded, s["decoded"]))
    res.append(float_case("sampling img_0_1", (decoded + 1) / 2, s["img_0_1"]))
    with torch.device("meta"):  # only the tokenizer side of the adapter is exercised here
        gpt = GPT(GPTConfig(**{f: getattr(model.config, f) for f in (
            "dim", "n_layer", "n_head", "vocab_size", "num_classes", "block_size")}))
    teacher = LlamaGenTeacher(tokenizer, gpt)
    res.append(float_case("teacher.decode_embeddings (clamped)", teacher.decode_embeddings(x), s["decoded"].clamp(-1, 1)))
    return res


def verify(blob: dict, path: Path) -> list[CaseResult]:
    kind = detect(blob)
    if kind == KIND_VQ:
        return verify_vq(blob)
    if kind == KIND_GPT:
        return verify_gpt(blob, Path(path))
    if kind == KIND_GPT_T2I:
        return verify_gpt_t2i(blob)
    if kind == KIND_DD:
        return verify_dd(blob, Path(path))
    raise ValueError(f"{path}: not a LlamaGen-family golden file")
