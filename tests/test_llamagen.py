"""LlamaGen family: golden files, release manifests, KV-cached teacher, sampling filters, DD student,
training losses and checkpoint loading."""
import json
import math
from dataclasses import asdict

import pytest
import torch
from conftest import golden_dir

from dd.families.llamagen import golden as golden_llamagen
from dd.families.llamagen.checkpoints import _infer_gpt_config, _infer_vq_config, load_student, load_teacher
from dd.families.llamagen.gpt import GPT, GPTConfig, logits_to_probs, top_k_top_p_filter
from dd.families.llamagen.student import DDConfig, DDStudent
from dd.families.llamagen.teacher import LlamaGenTeacher
from dd.families.llamagen.tokenizer import VQConfig, VQModel
from dd.golden.cases import load_golden
from dd.io import ArtefactError
from dd.method.student import final_predict, final_sequence, perturb
from dd.method.teacher import SamplingConfig

# a tiny teacher: 16x16 images, 4x downsampling -> 4x4 grid = 16 tokens
TINY_VQ = VQConfig(codebook_size=64, codebook_dim=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                   norm_groups=8)
TINY_GPT = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10, multiple_of=64)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter: the release init zeroes the logits head, which would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            scale = 2.0 if name.endswith("output.weight") else 1.0
            p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        else:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def teacher() -> LlamaGenTeacher:
    torch.manual_seed(0)
    t = LlamaGenTeacher(VQModel(TINY_VQ), GPT(TINY_GPT))
    randomise(t.gpt, 1)
    return t.eval().requires_grad_(False)


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


# --------------------------------------------------------------------------------------------------
# golden files and manifests
# --------------------------------------------------------------------------------------------------
def test_every_golden_file_verifies():
    folder = golden_dir("llamagen")
    kinds = set()
    for path in sorted(folder.glob("*.pt")):
        blob = load_golden(path)
        kind = golden_llamagen.detect(blob)
        assert kind is not None, f"{path.name} not recognised"
        kinds.add(kind)
        results = golden_llamagen.verify(blob, path)
        bad = [r.line() for r in results if not r.ok]
        assert not bad, f"{path.name}: " + "; ".join(bad)
        assert len(results) >= 7, f"{path.name}: only {len(results)} cases checked"
    assert kinds == {"llamagen-vq", "llamagen-gpt", "llamagen-gpt-t2i", "llamagen-dd"}


def test_release_manifests_match_state_dict_keys_shapes_dtypes():
    folder = golden_dir("llamagen")
    manifests = sorted(folder.glob("manifest_*.json"))
    assert manifests
    for path in manifests:
        m = json.loads(path.read_text())
        model = golden_llamagen.model_from_manifest(m)
        assert all(p.is_meta for p in model.parameters())
        ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
        ref = golden_llamagen.manifest_entries(m)
        assert ours == ref, f"{path.name}: differs in {sorted(set(ours) ^ set(ref))[:5]}"
        # the text-to-image manifest ("entries") counts the null-caption buffer too (its README says so)
        counted = model.state_dict().values() if "entries" in m else model.parameters()
        assert sum(p.numel() for p in counted) == m["num_parameters"], path.name


def test_release_configs_are_inferred_from_weights():
    folder = golden_dir("llamagen")
    for path in sorted(folder.glob("manifest_*.json")):
        m = json.loads(path.read_text())
        model = golden_llamagen.model_from_manifest(m)
        sd = model.state_dict()
        if isinstance(model, VQModel):
            assert _infer_vq_config(sd) == model.config
        elif isinstance(model, GPT):
            assert _infer_gpt_config(sd, model.config.block_size) == model.config
        elif isinstance(model, DDStudent):  # what load_student infers from a released llamagen-*.pt
            cfg = model.config
            inferred = _infer_gpt_config(sd, cfg.block_size, DDConfig, codebook_dim=sd["tok_embeddings.weight"].shape[1])
            assert inferred == cfg, f"{path.name}: {inferred} != {cfg}"
        else:
            raise AssertionError(f"{path.name}: unexpected model {type(model).__name__}")


def test_golden_detect_ignores_foreign_blobs():
    assert golden_llamagen.detect({"config": {}, "state_dict": {}, "inputs": {}, "outputs": {}}) is None
    var_like = {"config": {"model_args": {"depth": 2}}, "state_dict": {"blocks.0.attn.mat_qkv.weight": 0}}
    assert golden_llamagen.detect(var_like) is None


# --------------------------------------------------------------------------------------------------
# teacher adapter
# --------------------------------------------------------------------------------------------------
def test_layout_and_round_trip(teacher):
    assert teacher.step_sizes == (1,) * 16 and teacher.n_tokens == 16
    assert teacher.image_size == 16 and teacher.num_classes == 10
    cb = teacher.codebook
    assert cb.shape == (64, 8)
    torch.testing.assert_close(cb.norm(dim=-1), torch.ones(64))  # l2-normalised rows
    x = images()
    idx = teacher.encode(x)
    assert idx.shape == (3, 16) and idx.dtype == torch.long
    torch.testing.assert_close(teacher.embed(idx), cb[idx])
    img = teacher.decode_indices(idx)
    assert img.shape == (3, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    # the indices decode exactly like the tokenizer's own lookup path
    torch.testing.assert_close(img, teacher.tokenizer.decode_code(idx, (3, 8, 4, 4)).clamp(-1, 1))
    # continuous vectors decode too, and gradients reach them
    emb = (cb[idx] + 0.1 * torch.randn(3, 16, 8)).requires_grad_(True)
    teacher.decode_embeddings(emb).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def _kv_probs(teacher, labels, idx, sampling, prefix: int = 0):
    """next_probs over a whole sequence; the first ``prefix`` tokens are appended up front."""
    state = teacher.begin(labels, sampling)
    for j in range(prefix):
        teacher.append(state, idx[:, j:j + 1])
    out = []
    for j in range(prefix, teacher.n_steps):
        p = teacher.next_probs(state)
        assert p.shape == (labels.shape[0], 1, 64)
        out.append(p[:, 0])
        teacher.append(state, idx[:, j:j + 1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(cfg_scale=3.0),
                                      SamplingConfig(cfg_scale=2.0, temperature=0.8, top_p=0.9)],
                         ids=["plain", "cfg", "cfg-T-topp"])
def test_kv_cached_probs_equal_teacher_forced(teacher, sampling):
    labels = torch.tensor([0, 3, 9])
    idx = teacher.sample(labels, sampling, torch.Generator().manual_seed(0))
    assert idx.shape == (3, 16)
    tf = teacher.teacher_forced_probs(idx, labels, sampling)
    kv = _kv_probs(teacher, labels, idx, sampling)
    torch.testing.assert_close(kv, tf, atol=1e-4, rtol=0)
    # a prefix appended up front (teacher-involved sampling) is prefilled in one pass, same numbers
    torch.testing.assert_close(_kv_probs(teacher, labels, idx, sampling, prefix=6), kv[:, 6:], atol=1e-4, rtol=0)


def test_token_probs_in_row_groups_equal_the_kv_cached_steps(teacher, monkeypatch):
    """teacher_nll_bits' token probabilities: teacher-forced passes over groups of rows (here 2 rows a pass, the
    budget cut to force several groups) give the KV-cached steps' numbers in one network call per group."""
    from dd.method.teacher import Teacher

    labels, sampling = torch.tensor([0, 3, 9, 4, 1]), SamplingConfig(cfg_scale=2.0, top_k=20)
    idx = teacher.sample(labels, sampling, torch.Generator().manual_seed(2))
    stepped = Teacher.token_probs(teacher, idx, labels, sampling)
    monkeypatch.setattr(LlamaGenTeacher, "FORCED_LOGITS_BUDGET", 2 * 16 * 64 * 2)
    calls = []
    handle = teacher.gpt.layers[0].register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    try:
        grouped = teacher.token_probs(idx, labels, sampling)
    finally:
        handle.remove()
    assert calls == [4, 4, 2]          # rows 2 + 2 + 1, each doubled by CFG
    torch.testing.assert_close(grouped, stepped, atol=1e-5, rtol=1e-4)


def test_prefix_prefill_is_one_pass_and_repeatable(teacher):
    labels, sampling = torch.tensor([1, 2]), SamplingConfig(cfg_scale=2.0)
    idx = teacher.sample(labels, sampling, torch.Generator().manual_seed(1))
    calls = []
    handle = teacher.gpt.layers[0].register_forward_hook(lambda m, a, o: calls.append(o.shape[1]))
    try:
        state = teacher.begin(labels, sampling)
        for j in range(5):
            teacher.append(state, idx[:, j:j + 1])
        p1 = teacher.next_probs(state)
        p2 = teacher.next_probs(state)  # nothing new appended: no network pass
        teacher.append(state, idx[:, 5:6])
        teacher.next_probs(state)
    finally:
        handle.remove()
    assert calls == [6, 1]  # class token + 5 tokens in one pass, then one position
    torch.testing.assert_close(p1, p2)
    assert state.step == 6


# --------------------------------------------------------------------------------------------------
# text-to-image GPT (caption positions, left padding, caption mask, null caption)
# --------------------------------------------------------------------------------------------------
T2I_GPT = GPTConfig(model_type="t2i", dim=32, n_layer=2, n_head=2, n_kv_head=1, vocab_size=32, block_size=16,
                    caption_dim=12, cls_token_num=120, multiple_of=32)


@pytest.fixture(scope="module")
def t2i_gpt() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(T2I_GPT)
    randomise(gpt, 2)
    return gpt.eval().requires_grad_(False)


def left_padded_captions(valid: list[int], dim: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    caption, mask = torch.zeros(len(valid), 120, dim), torch.zeros(len(valid), 120)
    for b, n in enumerate(valid):
        caption[b, 120 - n:] = torch.randn(n, dim, generator=g)
        mask[b, 120 - n:] = 1
    return caption, mask


def test_t2i_caption_padding_is_invisible(t2i_gpt):
    caption, mask = left_padded_captions([120, 7, 1], 12)
    idx = torch.randint(0, 32, (3, 15), generator=torch.Generator().manual_seed(1))
    logits = t2i_gpt(idx, caption, cond_mask=mask)
    assert logits.shape == (3, 16, 32)
    junk = caption + (1 - mask)[..., None] * torch.randn(caption.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(t2i_gpt(idx, junk, cond_mask=mask), logits, atol=1e-5, rtol=0)
    assert (t2i_gpt(idx, junk) - logits).abs().max() > 1e-2      # without the mask the padding is seen
    moved = caption.clone()
    moved[1, -1] += 1.0                                          # a valid position matters
    assert (t2i_gpt(idx, moved, cond_mask=mask)[1] - logits[1]).abs().max() > 1e-3


def _positions_run(model) -> list[int]:
    """Records the sequence length the first block is given, call by call."""
    lengths = []
    model.layers[0].register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    return lengths


def test_t2i_caption_padding_shared_by_a_batch_is_not_run_and_changes_nothing():
    torch.manual_seed(0)
    gpt = GPT(T2I_GPT)
    randomise(gpt, 2)
    gpt.eval().requires_grad_(False)
    run = _positions_run(gpt)
    caption, mask = left_padded_captions([7, 30, 120], 12)
    idx = torch.randint(0, 32, (3, 15), generator=torch.Generator().manual_seed(1))
    full = gpt(idx, caption, cond_mask=mask)                      # one row fills all 120 positions: nothing dropped
    short = gpt(idx[:2], caption[:2], cond_mask=mask[:2])         # rows of 7 and 30 valid positions: 90 dropped
    assert run == [120 + 15, 30 + 15]
    torch.testing.assert_close(short, full[:2], atol=1e-5, rtol=0)
    # the null caption of a trimmed batch (CFG's other half) is the null caption's last positions, as in full
    null = gpt(idx[:2], gpt.null_condition(caption[:2]), cond_mask=mask[:2])
    null_full = gpt(idx, gpt.null_condition(caption), cond_mask=mask)
    torch.testing.assert_close(null, null_full[:2], atol=1e-5, rtol=0)
    # training drops whole captions to the null caption: a trimmed batch takes the same null positions
    gpt.cls_embedding.drop_prob = 1.0
    gpt.train()
    for module in gpt.modules():                                  # dropout off, caption dropout on
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.testing.assert_close(gpt(idx[:2], caption[:2], cond_mask=mask[:2]), null, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths", [[120, 30], [7, 30]], ids=["full", "trimmed"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_t2i_kv_cached_generation_equals_teacher_forcing(t2i_gpt, cfg_scale, lengths):
    caption, mask = left_padded_captions(lengths, 12)
    sampling = SamplingConfig(cfg_scale=cfg_scale, top_k=8)
    tokens, logits = golden_llamagen._generate_t2i(t2i_gpt, caption, mask, sampling, seed=3)
    assert tokens.shape == (2, 16) and logits.shape == (2, 16, 32)
    cond = t2i_gpt(tokens[:, :-1], caption, cond_mask=mask)
    if cfg_scale > 1:
        uncond = t2i_gpt(tokens[:, :-1], t2i_gpt.null_condition(caption), cond_mask=mask)
        cond = uncond + (cond - uncond) * cfg_scale
    torch.testing.assert_close(logits, cond, atol=1e-4, rtol=0)


def test_t2i_config_and_condition_errors(t2i_gpt):
    with pytest.raises(ValueError, match="cls_token_num"):
        GPTConfig(model_type="t2i", cls_token_num=121)
    with pytest.raises(ValueError, match="model_type"):
        GPTConfig(model_type="t2v")
    with pytest.raises(ValueError, match="captions must be"):
        t2i_gpt(None, torch.zeros(1, 120, 5))
    with pytest.raises(ValueError, match="null caption"):
        t2i_gpt.null_condition(torch.zeros(1, 60, 12))
    with pytest.raises(ValueError, match="needs its prompt set"):    # a t2i student reads captions by prompt row
        DDStudent(DDConfig.from_gpt(T2I_GPT, 8))(torch.zeros(1, 16, 8), torch.zeros(1, dtype=torch.long),
                                                 torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="not a LlamaGen preset"):  # t2i inference at preset widths: manifest test
        _infer_gpt_config(t2i_gpt.state_dict(), 16)


def test_filtered_probabilities(teacher):
    labels = torch.tensor([4, 5])
    for sampling in (SamplingConfig(top_k=5), SamplingConfig(cfg_scale=2.0, top_p=0.5),
                     SamplingConfig(top_k=10, top_p=0.8, temperature=0.5)):
        state = teacher.begin(labels, sampling)
        for _ in range(3):
            p = teacher.next_probs(state)[:, 0]
            torch.testing.assert_close(p.sum(-1), torch.ones(2))
            if sampling.top_k:
                assert ((p > 0).sum(-1) <= sampling.top_k).all()
            # every kept token is at least as likely as every removed one
            logits = teacher.next_logits(state)
            for b in range(2):
                kept, removed = logits[b][p[b] > 0], logits[b][p[b] == 0]
                if removed.numel():
                    assert kept.min() >= removed.max()
            teacher.append(state, torch.multinomial(p, 1))


def test_filter_semantics_match_llamagen():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 0.0]])
    # top-k keeps ties with the k-th largest
    assert torch.isinf(top_k_top_p_filter(logits, top_k=1)).tolist() == [[False, True, False, True, True]]
    # k is clamped to the vocabulary
    assert not torch.isinf(top_k_top_p_filter(logits, top_k=50)).any()
    # top-p keeps the token that crosses the threshold (and always the top token)
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), -1)  # 0.665, 0.245, 0.090
    x = torch.log(p)[None]
    assert torch.isinf(top_k_top_p_filter(x, top_p=0.7)).tolist() == [[False, False, True]]
    assert torch.isinf(top_k_top_p_filter(x, top_p=0.5)).tolist() == [[False, True, True]]
    # temperature first, then filtering; the input is not modified in place
    before = logits.clone()
    probs = logits_to_probs(logits, temperature=0.5, top_k=2)
    assert torch.equal(logits, before)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0]]))


def test_cfg_needs_a_null_class():
    gpt = GPT(GPTConfig(**{**TINY_GPT.__dict__, "class_dropout_prob": 0.0}))
    assert gpt.cls_embedding.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="null-class"):
        LlamaGenTeacher(VQModel(TINY_VQ), gpt).begin(torch.tensor([0]), SamplingConfig(cfg_scale=2.0))


# --------------------------------------------------------------------------------------------------
# DD student
# --------------------------------------------------------------------------------------------------
def test_student_from_teacher_and_causality(teacher):
    torch.manual_seed(0)
    student = DDStudent.from_teacher(teacher).eval()
    assert student.config.codebook_dim == 8 and student.config.class_dropout_prob == 0.0
    t_sd, s_sd = teacher.gpt.state_dict(), student.state_dict()
    for k, v in t_sd.items():
        if k != "tok_embeddings.weight":
            torch.testing.assert_close(s_sd[k], v, msg=k)
    assert s_sd["tok_embeddings.weight"].shape == (64, 8) and not s_sd["tok_embeddings.bias"].any()
    assert set(s_sd) - set(t_sd) == {"tok_embeddings.bias", "final_layer_conti.scale_shift_table",
                                     "final_layer_conti.linear.weight", "final_layer_conti.linear.bias",
                                     "n_d_embed.weight"}
    randomise(student, 5)
    labels, noise = torch.tensor([2, 7]), torch.randn(2, 16, 8)
    x0 = teacher.embed(teacher.encode(images(2)))
    t = torch.tensor([0, 5])
    with torch.no_grad():
        x_t = perturb(x0, noise, t)
        logits, emb = student(x_t, labels, t)
        assert logits.shape == (2, 16, 64) and emb.shape == (2, 16, 8)
        # output i is computed at token i's own position: it sees input i but not input i+1
        x2 = x_t.clone()
        x2[:, 9] += 1.0
        logits2, emb2 = student(x2, labels, t)
        torch.testing.assert_close(logits2[:, :9], logits[:, :9])
        assert (emb2[:, 9] - emb[:, 9]).abs().max() > 1e-3
        # n/d index: the class token and the first t tokens are data
        assert student.noise_data_index(t, 16).sum(1).tolist() == [1, 6]
        tokens, fp = final_predict(logits, emb, x_t, t, teacher.codebook)
        seq = final_sequence(tokens, fp, teacher.codebook, 8)
        assert seq.shape == (2, 16, 8)
        torch.testing.assert_close(seq[1, :5], x0[1, :5])  # given tokens snap to their own codes
        assert teacher.decode_embeddings(seq).shape == (2, 3, 16, 16)


def test_student_checkpoint_formats(teacher, tmp_path):
    student = DDStudent.from_teacher(teacher)
    randomise(student, 6)
    x, labels, t = torch.randn(1, 16, 8), torch.tensor([3]), torch.tensor([4])
    ref = student.eval()(x, labels, t)
    # ours: self-describing
    torch.save({"model": student.state_dict(), "config": asdict(student.config)}, tmp_path / "ours.pt")
    # released format: weights under "ema" (what the DD scripts load with --ema), no config
    torch.save({"ema": student.state_dict(), "model": {}, "steps": 1}, tmp_path / "released.pt")
    for s in (load_student(tmp_path / "ours.pt"), load_student(tmp_path / "released.pt", config=student.config)):
        for a, b in zip(s(x, labels, t), ref):
            torch.testing.assert_close(a, b)
    with pytest.raises(ArtefactError, match=r"released\.pt: checkpoint lacks"):
        load_student(tmp_path / "released.pt", config=student.config, ema=False)  # "model" is empty


def test_load_teacher_from_release_style_files(teacher, tmp_path):
    sd = teacher.gpt.state_dict()
    # released GPT files: under "model", loaded non-strictly (a stray freqs_cis key is ignored)
    torch.save({"model": {**sd, "freqs_cis": teacher.gpt.freqs_cis}, "steps": 0}, tmp_path / "gpt.pt")
    torch.save({"model": teacher.tokenizer.state_dict()}, tmp_path / "vq.pt")
    loaded = load_teacher(tmp_path / "vq.pt", tmp_path / "gpt.pt", TINY_VQ.__dict__, TINY_GPT)
    labels, sampling = torch.tensor([1]), SamplingConfig(cfg_scale=2.0)
    state_a, state_b = teacher.begin(labels, sampling), loaded.begin(labels, sampling)
    torch.testing.assert_close(teacher.next_probs(state_a), loaded.next_probs(state_b))
    x = images(1)
    assert torch.equal(loaded.encode(x), teacher.encode(x))
    # ours carry their config
    torch.save({"model": teacher.tokenizer.state_dict(), "config": asdict(teacher.tokenizer.config)}, tmp_path / "vq_ours.pt")
    torch.save({"model": teacher.gpt.state_dict(), "config": asdict(teacher.gpt.config)}, tmp_path / "gpt_ours.pt")
    ours = load_teacher(tmp_path / "vq_ours.pt", tmp_path / "gpt_ours.pt")
    assert ours.gpt.config == TINY_GPT and ours.tokenizer.config == TINY_VQ
    # the tokenizer loads strictly (the usage buffer is required, as in the original)
    bad = dict(teacher.tokenizer.state_dict())
    bad.pop("quantize.codebook_used")
    torch.save({"model": bad}, tmp_path / "vq_bad.pt")
    with pytest.raises(RuntimeError, match="codebook_used"):
        load_teacher(tmp_path / "vq_bad.pt", tmp_path / "gpt.pt", TINY_VQ, TINY_GPT)


# --------------------------------------------------------------------------------------------------
# training losses of the tiny models
# --------------------------------------------------------------------------------------------------
def test_tokenizer_training_loss_decreases():
    torch.manual_seed(0)
    vq = VQModel(TINY_VQ).train()
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    x = images(4)
    losses = []
    for _ in range(15):
        loss, stats = vq.training_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(stats) >= {"loss", "rec_mse", "codebook", "commit", "codebook_usage"}
    assert all(isinstance(v, float) for v in stats.values())
    assert losses[-1] < 0.7 * losses[0]
    assert vq.encoder.conv_in.weight.grad is not None and vq.quantize.embedding.weight.grad is not None
    assert stats["codebook_usage"] > 0  # the usage log is written in training mode


def test_gpt_training_loss_and_label_dropout():
    torch.manual_seed(0)
    gpt = GPT(TINY_GPT).train()
    idx, labels = torch.randint(0, 64, (200, 16)), torch.randint(0, 10, (200,))
    loss = gpt.training_loss(idx, labels)
    # the release init zeroes the logits head: a uniform prediction to start with
    assert abs(loss.item() - math.log(64)) < 1e-4
    seen = []
    h = gpt.cls_embedding.embedding_table.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    try:
        gpt.training_loss(idx, labels)
        gpt.eval()
        gpt.training_loss(idx, labels)
    finally:
        h.remove()
    dropped = seen[0] == 10
    assert 0 < dropped.float().mean() < 0.3           # ~class_dropout_prob in training
    assert torch.equal(seen[-1], labels)              # never in eval
    opt = torch.optim.Adam(gpt.parameters(), lr=3e-3)
    gpt.train()
    first = None
    for _ in range(20):
        loss = gpt.training_loss(idx[:2], labels[:2])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_student_config_from_gpt():
    cfg = DDConfig.from_gpt(TINY_GPT, 8)
    shared = {f: getattr(TINY_GPT, f) for f in ("dim", "n_layer", "n_head", "n_kv_head", "vocab_size", "num_classes",
                                               "block_size", "multiple_of", "rope_base", "norm_eps")}
    assert {f: getattr(cfg, f) for f in shared} == shared and cfg.codebook_dim == 8
    assert (cfg.token_dropout_p, cfg.resid_dropout_p, cfg.ffn_dropout_p, cfg.drop_path_rate, cfg.class_dropout_prob) \
        == (0, 0, 0, 0, 0)


@pytest.mark.parametrize("config", [TINY_VQ, TINY_GPT, DDConfig.from_gpt(TINY_GPT, 8), T2I_GPT],
                         ids=["vq", "gpt", "dd", "gpt-t2i"])
def test_config_survives_the_json_of_a_checkpoint(config):
    """Checkpoints (safetensors metadata, our .pt files) store configs as JSON, where tuples become lists: the
    config read back must equal the original, or comparisons such as ch_mult == dec_ch_mult would silently differ."""
    from dd.families.base import config_from_dict

    back = config_from_dict(type(config), json.loads(json.dumps(asdict(config))))
    assert back == config and hash(repr(back)) == hash(repr(config))


def test_verify_golden_exit_status(tmp_path, capsys):
    """`python -m dd verify-golden` exits 0 on the recorded files and 1 when one recorded output is off by 1e-3."""
    import shutil

    from dd.__main__ import main as cli

    folder = golden_dir("llamagen")
    shutil.copy(folder / "vq_tiny.pt", tmp_path / "vq_tiny.pt")  # generation decodes through the tokenizer beside it
    blob = load_golden(folder / "gpt_tiny.pt")
    torch.save(blob, tmp_path / "gpt_tiny.pt")
    assert cli(["verify-golden", str(tmp_path / "gpt_tiny.pt")]) == 0
    blob["outputs"]["logits_cond"][0, 3, 5] += 1e-3
    torch.save(blob, tmp_path / "gpt_tiny.pt")
    capsys.readouterr()
    assert cli(["verify-golden", str(tmp_path / "gpt_tiny.pt")]) == 1
    failed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("FAIL ")]
    assert len(failed) == 1 and failed[0].startswith("FAIL logits_cond:"), failed


def test_text_to_image_teacher_samples_the_golden_tokens_through_the_teacher_interface():
    # LlamaGenT2ITeacher: a label is a prompt's row; CFG pairs each caption with the null caption under its own mask.
    # The recorded generate() (cfg 4 / cfg 1, top_k 1) must come out of Teacher.sample, token for token, and the
    # one-pass teacher-forced probabilities must equal the KV-cached ones along the generated tokens.
    from conftest import golden_dir

    from dd.families.llamagen.golden import build_from_golden
    from dd.families.llamagen.teacher import LlamaGenT2ITeacher
    from dd.io import read_checkpoint

    folder = golden_dir("llamagen")
    blob = read_checkpoint(folder / "gpt_t2i_tiny.pt")
    vq = build_from_golden(read_checkpoint(folder / "vq_tiny.pt")).eval()
    gpt = build_from_golden(blob).eval()
    i, o, cfg = blob["inputs"], blob["outputs"], blob["config"]
    teacher = LlamaGenT2ITeacher(vq, gpt, i["caption"].float(), i["emb_mask"])
    assert teacher.num_classes == 3
    rows = torch.arange(3)
    for call, key in ((cfg["generate_call"], "gen_idx"), (cfg["generate_call_nocfg"], "gen_nocfg_idx")):
        sampling = SamplingConfig(cfg_scale=call["cfg_scale"], top_k=call.get("top_k", 0))
        tokens = teacher.sample(rows, sampling)
        assert torch.equal(tokens, o[key].long()), key
        forced = teacher.teacher_forced_probs(tokens, rows, sampling)
        state, cached = teacher.begin(rows, sampling), []
        for step in range(teacher.n_steps):
            cached.append(teacher.next_probs(state)[:, 0])
            teacher.append(state, tokens[:, step:step + 1])
        torch.testing.assert_close(forced, torch.stack(cached, 1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prompt rows must lie in 0..2"):
        teacher.sample(torch.tensor([3]), SamplingConfig(cfg_scale=1.0))


def _t2i_teacher(prompts: int = 3, seed: int = 0):
    """A random tiny text-to-image teacher over a prompt set of random left-padded captions."""
    from dd.families.llamagen.teacher import LlamaGenT2ITeacher

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(model_type="t2i", dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, caption_dim=12,
                        cls_token_num=120, multiple_of=64)).eval()
    with torch.no_grad():
        gpt.output.weight.normal_(0, 0.2)                       # not the zero init: distributions that differ
    lengths = torch.tensor([7, 30, 1, 120][:prompts])
    mask = torch.arange(120)[None, :] >= 120 - lengths[:, None]
    captions = torch.randn(prompts, 120, 12) * mask[..., None]
    return LlamaGenT2ITeacher(VQModel(TINY_VQ).eval(), gpt, captions, mask)


def test_text_to_image_student_reads_captions_by_prompt_row_and_ignores_their_padding():
    from dd.families.registry import get_family
    from dd.method.distill import DistillConfig, distill_losses
    from dd.method.sample import dd_sample

    teacher = _t2i_teacher()
    student = DDStudent.from_teacher(teacher).eval()
    assert torch.equal(student.cls_embedding.uncond_embedding, teacher.gpt.cls_embedding.uncond_embedding)
    torch.testing.assert_close(student.cls_embedding.cap_proj.fc1.weight, teacher.gpt.cls_embedding.cap_proj.fc1.weight)
    labels, C = torch.tensor([0, 1, 2, 1]), teacher.codebook.shape[1]
    x, t = torch.randn(4, 16, C), torch.tensor([0, 3, 8, 16])
    logits, emb = student(x, labels, t)
    assert logits.shape == (4, 16, 64) and emb.shape == (4, 16, C)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)          # another prompt, another output
    # what sits in a caption's padding changes nothing
    padded = student.captions.clone()
    padded[~student.caption_mask] = 3.0
    other = DDStudent.from_teacher(teacher).eval().bind_prompts(padded, student.caption_mask)
    other.load_state_dict(student.state_dict())
    torch.testing.assert_close(other(x, labels, t), (logits, emb))
    # sampling and a distillation step run through the family-agnostic method code
    tokens, steps = dd_sample(student, teacher, labels, torch.randn(4, 16, C), [1, 9], 9)
    assert tokens.shape == (4, 16, C) and steps == 2
    cfg = DistillConfig(timesteps=[1, 9], batch_size=4, emb_loss="mse")
    loss = distill_losses(student.train(), teacher, cfg, labels, torch.randint(64, (4, 16)), torch.randn(4, 16, C),
                          torch.tensor([0, 1, 0, 1]), None)["loss"]
    loss.backward()
    assert student.cls_embedding.cap_proj.fc1.weight.grad.abs().sum() > 0
    # caption padding that all rows of a batch share is not run, and changes nothing (row 3 fills all 120)
    teacher4 = _t2i_teacher(prompts=4)
    student4 = DDStudent.from_teacher(teacher4).eval()
    run = _positions_run(student4)
    rows = torch.tensor([0, 1, 2, 3])
    full = student4(x, rows, t)
    short = student4(x[:3], rows[:3], t[:3])
    assert run == [120 + 16, 30 + 16]
    torch.testing.assert_close(short, (full[0][:3], full[1][:3]), atol=1e-5, rtol=0)
    # a student rebuilt from its config (as load_student does) gets the prompts from its teacher
    rebuilt = get_family("llamagen").bind_to_teacher(DDStudent(student.config), teacher)
    rebuilt.load_state_dict(student.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x, labels, t), student.eval()(x, labels, t))
