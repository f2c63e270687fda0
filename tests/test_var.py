"""VAR family: golden files, release manifests, phi rule, KV-cached teacher, DD student, losses, loading."""
import json
import math

import pytest
import torch
from conftest import golden_dir

from dd.families.var.checkpoints import load_student, load_teacher
from dd.families.var.student import VARStudent
from dd.families.var.teacher import VARTeacher
from dd.families.var.transformer import VAR, VARConfig, cfg_strength, filter_logits
from dd.families.var.vqvae import VQVAE, VQVAEConfig, phi_index
from dd.golden.cases import load_golden
from dd.io import ArtefactError
from dd.method.student import final_predict, perturb
from dd.method.teacher import SamplingConfig

# --------------------------------------------------------------------------------------------------
# a tiny teacher (16x16 images, 4 scales) with weights randomised enough to make every path matter
# --------------------------------------------------------------------------------------------------
TINY_VAE = VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                       patch_nums=(1, 2, 3, 4))
TINY_VAR = VARConfig.from_depth(2, vocab_size=64, Cvae=8, num_classes=10, patch_nums=(1, 2, 3, 4), embed_dim=64,
                                num_heads=2)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (the release init makes the blocks near-identity)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("scale_mul_1H11"):
            p.copy_(math.log(4) + 0.3 * torch.randn(p.shape, generator=g))
        elif p.ndim >= 2 and "pos" not in name:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        else:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def teacher() -> VARTeacher:
    torch.manual_seed(0)
    t = VARTeacher(VQVAE(TINY_VAE), VAR(TINY_VAR))
    randomise(t.model, 1)
    return t.eval()


def digits(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def tf_guided_logits(teacher: VARTeacher, labels, idx, cfg_scale: float) -> torch.Tensor:
    """Teacher-forced (full sequence, masked) logits with VAR's per-scale CFG mix."""
    var = teacher.model
    x = teacher.tokenizer.quantize.idx_to_var_input(var.split_scales(idx))
    lc = var(labels, x)
    lu = var(torch.full_like(labels, teacher.num_classes), x)
    out = torch.empty_like(lc)
    for si, (b, e) in enumerate(var.begin_ends):
        t = cfg_strength(cfg_scale, si, teacher.n_steps)
        out[:, b:e] = (1 + t) * lc[:, b:e] - t * lu[:, b:e]
    return out


# --------------------------------------------------------------------------------------------------
# golden files and release manifests
# --------------------------------------------------------------------------------------------------
def test_every_golden_file_verifies():
    from dd.families.var import golden as golden_var

    folder = golden_dir("var")
    files = sorted(folder.glob("*.pt"))
    assert files, f"no golden files in {folder}"
    for path in files:
        blob = load_golden(path)
        assert golden_var.detect(blob) is not None, f"{path.name} not recognised"
        results = golden_var.verify(blob, path)
        failed = [r.line() for r in results if not r.ok]
        assert results and not failed, f"{path.name}:\n" + "\n".join(failed)


def test_release_manifests_match_state_dict_keys_shapes_dtypes():
    from dd.families.var.golden import model_from_manifest

    manifests = sorted(golden_dir("var").glob("manifest_*.json"))
    assert manifests
    for path in manifests:
        m = json.loads(path.read_text())
        model = model_from_manifest(m)
        ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
        ref = {e["key"]: (e["shape"], e["dtype"]) for e in m["state_dict"]}
        assert ours == ref, f"{path.name}: differing keys {sorted(set(ours) ^ set(ref))[:10]}"
        assert sum(p.numel() for p in model.parameters()) == m["num_parameters"]
        assert all(p.is_meta for p in model.parameters())


def test_release_configs_are_inferred_from_weights():
    """Loading a released VAR or VAR-DD file infers its configuration from the tensor shapes: the inferred config
    rebuilds exactly the released architecture of every manifest."""
    from dd.families.var.checkpoints import _infer_var_config
    from dd.families.var.golden import model_from_manifest
    from dd.families.var.student import VARStudent, VARStudentConfig
    from dd.families.var.transformer import VAR

    checked = 0
    for path in sorted(golden_dir("var").glob("manifest_*.json")):
        model = model_from_manifest(json.loads(path.read_text()))
        if isinstance(model, (VAR, VARStudent)):
            cls = VARStudentConfig if isinstance(model, VARStudent) else VARConfig
            inferred = _infer_var_config(model.state_dict(), cls)
            assert inferred == model.cfg, f"{path.name}: {inferred} != {model.cfg}"
            checked += 1
    assert checked >= 6  # var_d16/d20/d24 and their DD students


def test_golden_detect_ignores_foreign_blobs():
    from dd.families.var.golden import detect

    assert detect({"config": {"codebook_size": 16}, "inputs": {}, "outputs": {}}) is None


# --------------------------------------------------------------------------------------------------
# phi rule
# --------------------------------------------------------------------------------------------------
def test_phi_index_reproduces_release_and_tiny_tables_with_ties():
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(si, 5, 4) for si in range(5)] == [0, 1, 2, 2, 3]
    # other bank sizes use the 1/(2K) end points; one phi per scale maps scale i to phi i
    assert [phi_index(si, 6, 6) for si in range(6)] == list(range(6))


def test_phi_sharing_modes_have_the_original_keys():
    for share, key in ((0, "quantize.quant_resi.3.weight"), (1, "quantize.quant_resi.qresi.weight"),
                       (3, "quantize.quant_resi.qresi_ls.2.weight")):
        with torch.device("meta"):
            vae = VQVAE(VQVAEConfig(share_quant_resi=share, patch_nums=(1, 2, 3, 4)))
        assert key in vae.state_dict()


# --------------------------------------------------------------------------------------------------
# teacher adapter
# --------------------------------------------------------------------------------------------------
def test_layout_and_round_trip(teacher):
    assert teacher.step_sizes == (1, 4, 9, 16) and teacher.n_tokens == 30 and teacher.image_size == 16
    assert tuple(teacher.codebook.shape) == (64, 8)
    idx = teacher.encode(digits())
    assert idx.shape == (2, 30) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < 64
    img = teacher.decode_indices(idx)
    assert img.shape == (2, 3, 16, 16) and img.abs().max() <= 1
    cont = teacher.decode_embeddings(torch.randn(2, 30, 8))   # continuous vectors decode too
    assert cont.shape == (2, 3, 16, 16) and cont.abs().max() <= 1
    assert teacher.decode_prefix(teacher.embed(idx)[:, :5]).shape == (2, 3, 16, 16)
    # decoding the codes equals the tokenizer's own index path
    vae = teacher.tokenizer
    torch.testing.assert_close(img, vae.idx_to_img(teacher.model.split_scales(idx)))


def check_kv_cache_equals_teacher_forced(teacher: VARTeacher, cfg_scale: float) -> None:
    labels = torch.tensor([3, 7])
    sampling = SamplingConfig(cfg_scale=cfg_scale)
    gen = torch.Generator().manual_seed(0)
    state = teacher.begin(labels, sampling)
    cached = []
    for _ in range(teacher.n_steps):
        p = teacher.next_probs(state)
        assert torch.equal(p, teacher.next_probs(state))      # asking twice runs nothing new
        cached.append(p)
        B, S, V = p.shape
        teacher.append(state, torch.multinomial(p.reshape(B * S, V), 1, generator=gen).view(B, S))
    idx = torch.cat(state.tokens, dim=1)
    with torch.no_grad():
        ref = tf_guided_logits(teacher, labels, idx, cfg_scale).softmax(-1)
    torch.testing.assert_close(torch.cat(cached, dim=1), ref, atol=1e-4, rtol=0)

    # a prefix appended up front is prefilled in one pass and gives the same probabilities
    for k in range(1, teacher.n_steps):
        state = teacher.begin(labels, sampling)
        for s in range(k):
            teacher.append(state, idx[:, slice(*teacher.step_bounds[s])])
        torch.testing.assert_close(teacher.next_probs(state), cached[k], atol=1e-5, rtol=0)
        if k + 1 < teacher.n_steps:
            teacher.append(state, idx[:, slice(*teacher.step_bounds[k])])
            torch.testing.assert_close(teacher.next_probs(state), cached[k + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg_scale", [0.0, 2.5])
def test_kv_cached_probs_equal_teacher_forced(teacher, cfg_scale):
    check_kv_cache_equals_teacher_forced(teacher, cfg_scale)


def test_kv_cache_with_other_options():
    """Shared AdaLN, plain (non-L2) attention, a 2x2 first scale, one phi per scale, cosine lookup."""
    torch.manual_seed(0)
    pns = (2, 3, 4)
    vae = VQVAE(VQVAEConfig(vocab_size=32, z_channels=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                            patch_nums=pns, share_quant_resi=0, using_znorm=True))
    var = VAR(VARConfig(vocab_size=32, Cvae=4, num_classes=8, depth=2, embed_dim=32, num_heads=4, shared_aln=True,
                        attn_l2_norm=False, patch_nums=pns))
    randomise(var, 2)
    teacher = VARTeacher(vae, var).eval()
    assert teacher.step_sizes == (4, 9, 16) and "shared_ada_lin.1.weight" in var.state_dict()
    check_kv_cache_equals_teacher_forced(teacher, 1.5)


def test_filtered_probabilities(teacher):
    labels = torch.tensor([1, 2])
    for sampling, most in ((SamplingConfig(cfg_scale=1.5, top_k=5), 5), (SamplingConfig(top_p=0.3), None),
                           (SamplingConfig(top_k=1, temperature=0.5), 1)):
        state = teacher.begin(labels, sampling)
        teacher.append(state, torch.zeros(2, 1, dtype=torch.long))
        p = teacher.next_probs(state)
        assert p.shape == (2, 4, 64)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4))
        if most is not None:
            assert ((p > 0).sum(-1) <= most).all()
        logits = teacher.next_logits(state) / sampling.temperature
        dropped = torch.isinf(filter_logits(logits, sampling.top_k, sampling.top_p))
        assert (p[dropped] == 0).all() and (p[~dropped] > 0).all()


def test_filter_semantics_match_var():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 2.0, 3.0]]])
    # top-k keeps ties with the k-th largest
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[[True, True, False, False, False]]]
    # top-p: ascending cumulative mass <= 1 - top_p is dropped, the largest always kept
    probs = logits.softmax(-1)[0, 0]
    keep = filter_logits(logits, top_p=0.5)[0, 0].isfinite()
    asc = probs.sort().values.cumsum(0)
    assert keep.sum() == (asc > 0.5).sum() and keep[4]
    assert filter_logits(logits, top_p=1e-6)[0, 0].isfinite().tolist() == [False, False, False, False, True]


# --------------------------------------------------------------------------------------------------
# DD student
# --------------------------------------------------------------------------------------------------
def test_student_from_teacher_and_mask(teacher):
    torch.manual_seed(0)
    student = VARStudent.from_teacher(teacher).eval()
    var = teacher.model
    assert student.L == var.L + 1 and student.step_begins == [0, 1, 5, 14, 30]
    torch.testing.assert_close(student.blocks[1].ffn.fc2.weight, var.blocks[1].ffn.fc2.weight, rtol=0, atol=0)
    torch.testing.assert_close(student.lvl_embed.weight[2:], var.lvl_embed.weight[1:], rtol=0, atol=0)
    torch.testing.assert_close(student.pos_1LC[:, 2:], var.pos_1LC[:, 1:], rtol=0, atol=0)
    randomise(student, 5)

    B, n, C = 2, teacher.n_tokens, 8
    x0, noise = torch.randn(B, n, C), torch.randn(B, n, C)
    labels, t = torch.tensor([3, 7]), torch.tensor([1, 2])
    begin = torch.tensor([student.step_begins[i] for i in t])
    x_t = perturb(x0, noise, begin)
    with torch.no_grad():
        logits, emb = student(x_t, labels, t)
        assert logits.shape == (B, n, 64) and emb.shape == (B, n, C)
        flags = student.data_flags(t)
        assert flags[:, 0].tolist() == [1, 1] and flags.sum(1).tolist() == [2, 6]
        # a token sees strictly coarser scales and itself: changing token 7 (scale 2) moves only
        # itself and the finer scale 3
        x2 = x_t.clone()
        x2[:, 7] += 1.0
        moved = (student(x2, labels, t)[1] - emb).abs().amax(dim=(0, 2)) > 0
        assert moved.nonzero().flatten().tolist() == [7] + list(range(14, 30))
        tokens, fp_logits = final_predict(logits, emb, x_t, begin, teacher.codebook)
        assert torch.equal(tokens[0, :1], x_t[0, :1]) and torch.isinf(fp_logits[1, :5]).sum() == 5 * 63


def test_within_scale_attention_option(teacher, tmp_path):
    """The paper's mask (App. B: a token sees its whole scale) as a student option: changing token 7 (scale 2,
    tokens 5..13) moves its whole scale and the finer ones; the option survives a distill checkpoint."""
    from dd.families.loading import build_student, model_config, student_from_teacher
    from dd.families.loading import load_student as load_any_student

    torch.manual_seed(0)
    student = student_from_teacher(teacher, within_scale_attention=True).eval()
    assert student.cfg.within_scale_attention
    released_mask = VARStudent.from_teacher(teacher).attn_bias_for_masking
    assert not torch.equal(student.attn_bias_for_masking, released_mask)
    randomise(student, 5)
    x, labels, t = torch.randn(2, teacher.n_tokens, 8), torch.tensor([3, 7]), torch.tensor([1, 2])
    with torch.no_grad():
        emb = student(x, labels, t)[1]
        x2 = x.clone()
        x2[:, 7] += 1.0
        moved = (student(x2, labels, t)[1] - emb).abs().amax(dim=(0, 2)) > 0
    assert moved.nonzero().flatten().tolist() == list(range(5, 30))
    with pytest.raises(ValueError, match="cannot be set for a var student"):
        student_from_teacher(teacher, depth=1)
    # new students default to the paper's mask; the released one on request
    assert student_from_teacher(teacher).cfg.within_scale_attention
    assert torch.equal(student_from_teacher(teacher, within_scale_attention=False).attn_bias_for_masking,
                       released_mask)
    # our checkpoint records the option; loading rebuilds the same mask (the buffer in the file is not trusted)
    sd = student.state_dict()
    sd["attn_bias_for_masking"] = released_mask
    torch.save({"family": "var", "kind": "student", "student_config": model_config(student), "ema": sd},
               tmp_path / "student.pt")
    loaded = load_any_student(tmp_path / "student.pt", teacher).model
    assert torch.equal(loaded.attn_bias_for_masking, student.attn_bias_for_masking)
    assert build_student("var", model_config(student)).cfg.within_scale_attention


def test_student_checkpoint_formats(teacher, tmp_path):
    student = VARStudent.from_teacher(teacher).eval()
    randomise(student, 7)
    sd = student.state_dict()
    released = {k: v for k, v in sd.items() if not k.endswith("attn_bias_for_masking")}   # buffers optional
    torch.save({"trainer": {"ema_parameters": released, "var_wo_ddp": {}}}, tmp_path / "dd.pth")
    torch.save({"config": {"lr": 1}, "model": {}, "ema": sd}, tmp_path / "distill.pt")
    x, labels, t = torch.randn(1, 30, 8), torch.tensor([4]), torch.tensor([2])
    with torch.no_grad():
        want = student(x, labels, t)
        for name in ("dd.pth", "distill.pt"):
            loaded = load_student(tmp_path / name, config=student.cfg)
            got = loaded(x, labels, t)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a file that lacks one of the student's weights would leave that layer random: refused, naming the key
    lacking = {k: v for k, v in released.items() if k != "head.weight"}
    torch.save({"trainer": {"ema_parameters": lacking}}, tmp_path / "lacking.pth")
    with pytest.raises(ArtefactError, match=r"lacking\.pth: checkpoint lacks 1 keys.*head\.weight"):
        load_student(tmp_path / "lacking.pth", config=student.cfg)


# --------------------------------------------------------------------------------------------------
# training losses and loading
# --------------------------------------------------------------------------------------------------
def test_tokenizer_training_loss_decreases():
    torch.manual_seed(0)
    vae = VQVAE(TINY_VAE).train()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    images = digits(8)
    losses = []
    for _ in range(30):
        loss, stats = vae.training_loss(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(stats) >= {"l1", "l2", "vq", "codebook_usage"} and all(map(math.isfinite, losses))
    assert losses[-1] < 0.75 * losses[0]  # a clear decrease (0.70x measured), not any decrease
    assert vae.encoder.conv_in.weight.grad is not None and vae.quantize.embedding.weight.grad is not None


def test_var_training_loss_and_label_dropout(teacher):
    var = VAR(TINY_VAR, teacher.tokenizer)
    idx = teacher.encode(digits(4))
    labels = torch.tensor([0, 1, 2, 3])
    var.eval()
    assert torch.equal(var.drop_labels(labels), labels)                     # never in eval mode
    var.train()
    torch.manual_seed(0)
    dropped = torch.stack([var.drop_labels(torch.zeros(1000, dtype=torch.long)) for _ in range(2)])
    assert 0.05 < (dropped == TINY_VAR.num_classes).float().mean() < 0.15
    loss = var.training_loss(idx, labels)
    assert loss.ndim == 0 and abs(loss.item() - math.log(64)) < 0.5   # near-uniform at initialisation
    loss.backward()
    assert var.head.weight.grad is not None and teacher.tokenizer.quantize.embedding.weight.grad is None


def test_load_teacher_from_release_style_files(teacher, tmp_path):
    torch.save(teacher.tokenizer.state_dict(), tmp_path / "vae.pth")
    torch.save(teacher.model.state_dict(), tmp_path / "var.pth")
    loaded = load_teacher(tmp_path / "vae.pth", tmp_path / "var.pth", TINY_VAE, TINY_VAR)
    assert not any(p.requires_grad for p in loaded.parameters())
    idx = teacher.encode(digits())
    assert torch.equal(loaded.encode(digits()), idx)
    with torch.no_grad():
        torch.testing.assert_close(tf_guided_logits(loaded, torch.tensor([1, 2]), idx, 1.0),
                                   tf_guided_logits(teacher, torch.tensor([1, 2]), idx, 1.0), rtol=0, atol=0)


def test_vqvae_accepts_usage_buffer_of_other_scale_count():
    vae = VQVAE(TINY_VAE)
    sd = vae.state_dict()
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(10, 64)
    vae.load_state_dict(sd, strict=True)
    assert vae.quantize.ema_vocab_hit_SV.shape == (4, 64)


@pytest.mark.parametrize("config", [TINY_VAE, TINY_VAR], ids=["vqvae", "var"])
def test_config_survives_the_json_of_a_checkpoint(config):
    """Configs travel as JSON in checkpoints (tuples become lists): read back, they must equal the original."""
    from dataclasses import asdict

    from dd.families.base import config_from_dict
    from dd.families.var.student import VARStudentConfig

    back = config_from_dict(type(config), json.loads(json.dumps(asdict(config))))
    assert back == config
    if isinstance(config, VARConfig):
        student = VARStudentConfig(**{k: v for k, v in asdict(config).items()})
        assert config_from_dict(VARStudentConfig, json.loads(json.dumps(asdict(student)))) == student
