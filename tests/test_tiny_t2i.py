"""The tiny text-to-image teacher's training at a reduced size (issue 13): it runs, reports prompt accuracy with the
shipped classifier, and its file rebuilds the same model."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is a dependency of the text-to-image pipeline")

REPO = Path(__file__).resolve().parents[1]


def test_reduced_t2i_teacher_trains_reports_prompt_accuracy_and_reloads(tmp_path):
    import yaml

    from dd.families.llamagen.gpt import GPT, GPTConfig
    from dd.families.llamagen.tiny_t2i import RELEASES, train_t2i_teacher
    from dd.io import read_checkpoint

    cfg = yaml.safe_load((REPO / "config/tiny/llamagen_t2i.yaml").read_text())
    cfg["arch"].update(dim=32, n_layer=1, n_head=2, multiple_of=32)
    cfg["train"].update(epochs=1)
    cfg["encoder"].update(steps=30)
    out = tmp_path / "t2i.pt"
    report = train_t2i_teacher(cfg, out, RELEASES / "digits_classifier_16.safetensors", log=lambda *_: None)
    assert report["captions"] == 4 * report["captioned_images"] and report["eval_prompts"] > 100
    assert 0.0 <= report["prompt_accuracy"] <= report["digit_accuracy"] <= 1.0   # the digit is part of the prompt
    ck = read_checkpoint(out)
    gpt = GPT(GPTConfig(**ck["config"])).eval()
    gpt.load_state_dict(ck["model"])
    assert gpt.config.text_conditional and gpt.config.cls_token_num == 120
    assert (out.with_suffix(".png")).is_file()
    assert torch.isfinite(torch.tensor(report["ce"]))
    # the pretrained text encoder is written beside the teacher and reloads as the caption-features encoder
    from dd.families.llamagen.text_encoder import encode_captions, tiny_t5
    from dd.families.llamagen.tiny_t2i import encoder_path

    trained = encode_captions(["a bold seven leaning right"], *tiny_t5(weights=encoder_path(out)))[0]
    random = encode_captions(["a bold seven leaning right"], *tiny_t5())[0]
    assert trained.shape == random.shape and not (trained == random).all()
    assert 0.0 <= report["encoder_digit_accuracy_per_position"] <= 1.0


def test_attribute_augment_captions_each_redrawn_digit_by_what_it_shows():
    """train.attribute_augment: a redrawn digit is trained under a caption of the words measured on it; one that
    shows fewer than two clear attributes keeps its image and caption; p = 0 changes nothing."""
    import numpy as np

    from dd.evaluation import digit_prompts as dp
    from dd.evaluation.digits import load_digits_images
    from dd.families.llamagen.text_encoder import encode_captions, tiny_t5
    from dd.families.llamagen.tiny_t2i import RELEASES, AttributeAugment

    images, labels = load_digits_images(16, "train")
    scale = dp.AttributeScale.fit(dp.measure(images.numpy()), labels.numpy())
    t5_tok, t5 = tiny_t5(weights=RELEASES / "tiny_t5_encoder.safetensors")
    settings = {"max_shift": 1, "seed": 0}
    ids = torch.arange(0, 640, 10)
    original = [dp.caption(int(labels[i]), {"stroke": "thin", "size": "large"}, 0) for i in ids]
    f, m = encode_captions(original, t5_tok, t5)
    cond, mask = torch.from_numpy(f.astype(np.float32)), torch.from_numpy(m)
    never = AttributeAugment({"p": 0.0, "zoom": 0.08, "shear": 0.12}, 16, labels, scale, t5_tok, t5, settings)
    x, c, cm = never(images[ids], ids, cond, mask)
    assert torch.equal(x, images[ids]) and torch.equal(c, cond) and torch.equal(cm, mask)

    always = AttributeAugment({"p": 1.0, "zoom": 0.08, "shear": 0.12}, 16, labels, scale, t5_tok, t5, settings)
    x, c, cm = always(images[ids], ids, cond, mask)
    key_of = {i: key for key, i in always.row.items()}
    redrawn = 0
    for j, i in enumerate(ids.tolist()):
        if torch.equal(x[j], images[i]):
            assert torch.equal(c[j], cond[j])
            continue
        redrawn += 1
        row = next(r for r in range(len(always.feats)) if torch.equal(always.feats[r], c[j]))
        digit, words, phrasing = key_of[row]
        shown = dp.describe(dp.measure(x[j:j + 1].numpy()), labels[i:i + 1].numpy(), scale)[0]
        assert digit == int(labels[i]) and dict(words) == shown and phrasing in dp.phrasing_ids("train")
        assert torch.equal(cm[j], always.masks[row])
    assert redrawn > len(ids) // 2, redrawn
    with pytest.raises(ValueError, match="attribute_augment: unknown keys"):
        AttributeAugment({"p": 0.5, "zoom": 0.1, "shear": 0.1, "rotate": 5}, 16, labels, scale, t5_tok, t5, settings)
