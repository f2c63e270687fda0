"""Caption features of the text-to-image model (issue 13): the tiny T5 encoder, LlamaGen's left-padded layout, storage."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is a dependency of the text-to-image pipeline")

from dd.families.llamagen.gpt import GPT, GPTConfig  # noqa: E402
from dd.families.llamagen.text_encoder import (  # noqa: E402
    TinyT5Config,
    encode_captions,
    read_caption_features,
    tiny_t5,
    write_caption_features,
)

PROMPTS = ["a bold seven leaning right", "handwritten 3 with thin strokes and a small size", "7"]


def test_features_are_left_padded_with_the_valid_count_and_deterministic():
    tok, enc = tiny_t5()
    feats, mask = encode_captions(PROMPTS, tok, enc)
    assert feats.shape == (3, 120, TinyT5Config().d_model) and feats.dtype == np.float16
    counts = [len(p.encode()) + 1 for p in PROMPTS]                 # bytes + end of sequence
    assert mask.sum(1).tolist() == counts
    for i, n in enumerate(counts):
        assert mask[i, 120 - n:].all() and not mask[i, :120 - n].any()
        assert np.abs(feats[i, :120 - n]).max() == 0 and np.abs(feats[i, 120 - n:]).max() > 0
    again, _ = encode_captions(PROMPTS, *tiny_t5())                  # the weights come from the seed alone
    assert np.array_equal(feats, again)
    other, _ = encode_captions(PROMPTS, *tiny_t5(TinyT5Config(seed=1)))
    assert not np.array_equal(feats, other)
    # a batch does not change a prompt's features (padding is masked in the encoder)
    alone, _ = encode_captions(PROMPTS[2:], tok, enc)
    np.testing.assert_allclose(alone[0].astype(np.float32), feats[2].astype(np.float32), atol=2e-3)


def test_an_over_long_caption_is_refused_not_truncated():
    tok, enc = tiny_t5()
    with pytest.raises(ValueError, match="caption 1 is 121 tokens, longer than 120"):
        encode_captions(["fine", "x" * 120], tok, enc)


def test_stored_features_drive_the_t2i_gpt_and_padding_is_invisible(tmp_path):
    tok, enc = tiny_t5()
    feats, mask = encode_captions(PROMPTS, tok, enc)
    path = tmp_path / "captions.npz"
    write_caption_features(path, feats, mask, PROMPTS, "tiny-t5")
    f, m = read_caption_features(path, PROMPTS)
    with pytest.raises(ValueError, match="other prompts"):
        read_caption_features(path, PROMPTS[::-1])
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(dim=32, n_layer=2, n_head=4, vocab_size=64, model_type="t2i", caption_dim=f.shape[-1],
                        cls_token_num=120, block_size=16)).eval()
    idx = torch.randint(64, (3, 15))
    logits = gpt(idx, f, cond_mask=m)
    garbage = f.clone()
    garbage[~m] = 5.0                                                # what sits in the padding does not matter
    torch.testing.assert_close(gpt(idx, garbage, cond_mask=m), logits)


def test_caption_features_command_encodes_a_prompt_file_and_refuses_a_bad_one(tmp_path, capsys):
    from dd.__main__ import main

    good = tmp_path / "prompts.tsv"
    good.write_text("prompt\tdigit\n" + "".join(f"{p}\t0\n" for p in PROMPTS))
    assert main(["caption-features", "--prompts", str(good), "--out", str(tmp_path / "c.npz")]) == 0
    feats, mask = read_caption_features(tmp_path / "c.npz", PROMPTS)
    assert feats.shape[0] == 3 and mask.sum().item() == sum(len(p) + 1 for p in PROMPTS)
    bad = tmp_path / "bad.tsv"
    bad.write_text("prompt\nfine\n\n  \n")
    assert main(["caption-features", "--prompts", str(bad), "--out", str(tmp_path / "d.npz")]) == 2
    assert f"{bad}: row 4: empty prompt" in capsys.readouterr().err
    assert not (tmp_path / "d.npz").exists()


def test_a_t2i_teacher_runs_the_pair_command_over_a_prompt_set_given_by_captions(tmp_path, capsys):
    """``--captions`` turns a text-to-image checkpoint into a teacher over that prompt set (labels = prompt rows):
    generate-pairs runs on it; without captions, or with captions for a class-conditional teacher, a clear error."""
    from dd.__main__ import main
    from dd.families.llamagen.gpt import GPT
    from dd.families.llamagen.tiny_t2i import RELEASES
    from dd.families.loading import load_teacher, save_model
    from dd.io import ArtefactError
    from dd.method.pairs import open_shard

    tok_file = RELEASES / "tiny_llamagen_tokenizer.safetensors"
    c2i_file = RELEASES / "tiny_llamagen_ar.safetensors"
    feats, mask = encode_captions(PROMPTS, *tiny_t5())
    captions = tmp_path / "captions.npz"
    write_caption_features(captions, feats, mask, PROMPTS, "tiny-t5")
    spec = {"family": "llamagen", "tokenizer": tok_file, "model": c2i_file, "released": True}
    c2i, _ = load_teacher(spec)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(dim=32, n_layer=1, n_head=2, multiple_of=32, vocab_size=c2i.gpt.config.vocab_size,
                        model_type="t2i", caption_dim=feats.shape[-1], cls_token_num=120,
                        block_size=c2i.gpt.config.block_size))
    t2i_file = tmp_path / "t2i.pt"
    save_model(t2i_file, "llamagen", "ar", gpt)
    tok_pt = tmp_path / "tok.pt"
    save_model(tok_pt, "llamagen", "tokenizer", c2i.tokenizer)
    ours = {"family": "llamagen", "tokenizer": tok_pt, "model": t2i_file}
    teacher, tid = load_teacher({**ours, "captions": captions})
    assert teacher.num_classes == len(PROMPTS)
    _, tid_other = load_teacher({**ours, "captions": captions})
    assert tid == tid_other
    with pytest.raises(ArtefactError, match="text-to-image teacher; give the caption features"):
        load_teacher(ours)
    with pytest.raises(ArtefactError, match="class-conditional and takes no captions"):
        load_teacher({**spec, "captions": captions})
    out = tmp_path / "shard_00000.bin"
    args = ["generate-pairs", "--family", "llamagen", "--tokenizer", str(tok_pt), "--model", str(t2i_file),
            "--captions", str(captions), "--shard", "0", "--count", "6", "--seed", "0", "--chunk", "3",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    records, _ = open_shard(out)
    assert sorted(set(records["label"].tolist())) == [0, 1, 2]          # prompt rows
    no_captions = args[:7] + args[9:]
    no_captions[no_captions.index(str(out))] = str(tmp_path / "other.bin")
    assert main(no_captions) == 2
    assert "give the caption features of its prompt set" in capsys.readouterr().err
