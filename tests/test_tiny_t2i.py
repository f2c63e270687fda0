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
