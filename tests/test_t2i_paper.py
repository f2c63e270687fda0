"""The paper's text-to-image configuration (config/llamagen_t2i.yaml) and what it adds: the released GPT-XL t2i
teacher's registry entries, the user-file check that runs before any download, FID statistics of a folder of real
images, and CLIP score (torchmetrics) against each sample's prompt."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, golden_dir

from dd.evaluation.digits import load_digits_images, to_uint8
from dd.evaluation.sample_sets import write_sample_set
from dd.pipeline import config as ddconfig
from dd.pipeline import plan as ddplan

CLASSIFIER = REPO / "releases" / "tiny" / "digits_classifier_16.safetensors"


def digits_uint8(n: int, split: str = "test") -> np.ndarray:
    return to_uint8(load_digits_images(size=16, split=split)[0][:n]).numpy()


def run_dd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dd", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


# ------------------------------------------------------------------------------------------------ the paper config

def test_paper_config_plans_user_files_downloads_and_clip_score():
    checked = ddconfig.load_config(REPO / "config" / "llamagen_t2i.yaml", base_dir=REPO)
    exp = checked["experiments"]["llamagen_t2i"]
    p = ddplan.plan("llamagen_t2i", exp, REPO)
    assert p.prompt_files == {"train": "data/laion_coco_prompts.csv", "eval": "resources/checkpoints/coco_captions.csv"}
    assert p.prompt_columns == {"train": "top_caption", "eval": "Prompt"}
    assert p.downloads["resources/checkpoints/coco_captions.csv"] == "coco_captions"
    assert {"resources/checkpoints/t2i_XL_stage1_256.pt", "resources/checkpoints/vq_ds16_t2i.pt"} <= set(p.downloads)
    assert p.reference == "results/llamagen_t2i/reference/images_256.npz" and p.clip_model
    assert {k: v[0] for k, v in p.user_files.items()} == {
        "experiments.llamagen_t2i.prompts.train": "prompts", "experiments.llamagen_t2i.prompts.encoder_dir": "encoder",
        "experiments.llamagen_t2i.evaluation.reference_images": "images"}
    assert len(p.shards) == 1200 and "onestep" not in p.sets


def test_released_t2i_teacher_has_the_manifest_shapes():
    manifest = json.loads((golden_dir("llamagen") / "manifest_gpt_t2i_xl.json").read_text())
    from dd.families.registry import get_family

    with torch.device("meta"):
        sd = get_family("llamagen").random_release("llamagen_t2i_xl")["model"]
    assert {k: list(v.shape) for k, v in sd.items()} == {k: e["shape"] for k, e in manifest["entries"].items()}
    assert sum(v.numel() for v in sd.values()) == manifest["num_parameters"]


def test_a_real_run_without_the_users_files_stops_at_the_check_before_any_download(tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-s", str(REPO / "Snakefile"),
                        "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "llamagen_t2i.yaml")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    log = (tmp_path / "results/llamagen_t2i/logs/check_user_inputs.log").read_text()
    assert "experiments.llamagen_t2i.prompts.encoder_dir: data/flan-t5-xl: not a Hugging Face model snapshot" in log
    assert not (tmp_path / "resources" / "checkpoints").exists() or not any((tmp_path / "resources/checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------ check-inputs

def test_check_inputs_names_the_key_and_row_of_a_bad_prompt_file(tmp_path):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("top_caption,url\na dog on a beach,x\n\"a cat, asleep\",y\n")
    bad.write_text("top_caption\na dog\n   \n")
    (tmp_path / "imgs").mkdir()
    r = run_dd("check-inputs", "--prompts", f"exp.prompts.train={bad}:top_caption", "--out", tmp_path / "ok.json")
    assert r.returncode == 2 and "exp.prompts.train" in r.stderr and "row 3: empty prompt" in r.stderr
    r = run_dd("check-inputs", "--prompts", f"exp.prompts.train={good}:caption", "--out", tmp_path / "ok.json")
    assert r.returncode == 2 and "no column 'caption'" in r.stderr
    r = run_dd("check-inputs", "--prompts", f"k={good}:top_caption", "--images", f"exp.ev={tmp_path / 'imgs'}",
               "--out", tmp_path / "ok.json")
    assert r.returncode == 2 and "exp.ev" in r.stderr and "no image files" in r.stderr
    assert not (tmp_path / "ok.json").exists()
    digit = digits_uint8(1)[0].transpose(1, 2, 0)
    from PIL import Image

    Image.fromarray(digit).save(tmp_path / "imgs" / "a.png")
    r = run_dd("check-inputs", "--prompts", f"k={good}:top_caption", "--images", f"exp.ev={tmp_path / 'imgs'}",
               "--out", tmp_path / "ok.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ok.json").read_text()) == {
        "k": {"file": str(good), "column": "top_caption", "rows": 2},
        "exp.ev": {"folder": str(tmp_path / "imgs"), "images": 1}}


# ------------------------------------------------------------------------------------------------ image statistics

def _write_digit_folder(folder: Path, n: int) -> np.ndarray:
    from PIL import Image

    images = digits_uint8(n)
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    return images


def test_folder_statistics_equal_those_of_the_same_images_as_a_sample_set(tmp_path):
    """FID of a sample set against the statistics of a folder holding the same images (PNG, same size) is 0; against
    another set of digits it is not."""
    from dd.evaluation.metrics import evaluate_sample_set

    images = _write_digit_folder(tmp_path / "real", 60)
    r = run_dd("image-statistics", "--images", tmp_path / "real", "--size", 16, "--feature-extractor",
               "digits-classifier", "--weights", CLASSIFIER, "--device", "cpu", "--out", tmp_path / "stats.npz")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "stats.npz") as z:
        assert int(z["num_images"]) == 60 and z["sigma"].shape == (z["mu"].shape[0],) * 2
    write_sample_set(tmp_path / "same.npz", images)
    kw = dict(feature_extractor="digits-classifier", weights_path=CLASSIFIER, isc=False, kid=False, prc=False,
              device="cpu")
    same = evaluate_sample_set(tmp_path / "same.npz", tmp_path / "stats.npz", **kw)["fid"]
    others = digits_uint8(60, "train")
    write_sample_set(tmp_path / "other.npz", others)
    other = evaluate_sample_set(tmp_path / "other.npz", tmp_path / "stats.npz", **kw)["fid"]
    assert abs(same) < 1e-3 and other > 1.0


def test_image_statistics_refuses_an_unreadable_image_by_name(tmp_path):
    _write_digit_folder(tmp_path / "real", 3)
    (tmp_path / "real" / "broken.jpg").write_bytes(b"not a jpeg")
    r = run_dd("image-statistics", "--images", tmp_path / "real", "--size", 16, "--feature-extractor",
               "digits-classifier", "--weights", CLASSIFIER, "--device", "cpu", "--out", tmp_path / "stats.npz")
    assert r.returncode == 2 and "broken.jpg: not a readable image" in r.stderr
    assert not (tmp_path / "stats.npz").exists()


# ------------------------------------------------------------------------------------------------ CLIP score

def _tiny_clip(folder: Path) -> Path:
    """A seeded random CLIP model with a character-level BPE vocabulary, saved like a Hugging Face snapshot."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True)
    chars = [chr(b) for b in range(33, 127)] + [chr(256 + b) for b in range(94)]  # GPT-2's byte alphabet, in part
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    model = CLIPModel(config)
    with torch.no_grad():   # a shared positive direction, so that scores are positive (CLIP score clamps at 0)
        for norm, proj in ((model.vision_model.post_layernorm, model.visual_projection),
                           (model.text_model.final_layer_norm, model.text_projection)):
            norm.bias.fill_(1.0)
            proj.weight[0].fill_(0.3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_is_torchmetrics_on_each_samples_own_prompt(tmp_path):
    from torchmetrics.functional.multimodal import clip_score

    from dd.evaluation.clip_score import clip_model_loader, clip_scores

    model_dir = _tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("Prompt\na bold seven\nhandwritten 3 with thin strokes\na one leaning left\n")
    images = digits_uint8(6)
    labels = np.array([2, 0, 1, 1, 2, 0])
    write_sample_set(tmp_path / "s.npz", images, labels=labels)
    ours = clip_scores(tmp_path / "s.npz", prompts, "Prompt", str(model_dir), splits=2, batch_size=2, device="cpu")
    text = ["a bold seven", "handwritten 3 with thin strokes", "a one leaning left"]
    # torchmetrics itself, one part of three samples at a time, with the prompts the labels name
    with torch.no_grad():
        parts = [float(clip_score(list(torch.from_numpy(images[i:i + 3])), [text[j] for j in labels[i:i + 3]],
                                  model_name_or_path=clip_model_loader(str(model_dir)))) for i in (0, 3)]
    assert 0 < min(parts) and max(parts) < 100, parts
    assert ours["clip_score"] == pytest.approx(np.mean(parts), abs=1e-4)
    assert ours["clip_score_std"] == pytest.approx(np.std(parts, ddof=1) / np.sqrt(2), abs=1e-4)
    shuffled = clip_scores(tmp_path / "s.npz", prompts, "Prompt", str(model_dir), splits=2, device="cpu")
    assert shuffled["clip_score"] == pytest.approx(ours["clip_score"], abs=1e-4)   # batching changes nothing
    write_sample_set(tmp_path / "t.npz", images, labels=(labels + 1) % 3)         # other prompts, other score
    assert clip_scores(tmp_path / "t.npz", prompts, "Prompt", str(model_dir), device="cpu")["clip_score"] != \
        pytest.approx(ours["clip_score"], abs=1e-3)

    # through dd evaluate (FID against the digits as well); a label outside the prompt file is refused first
    r = run_dd("evaluate", "--samples", tmp_path / "s.npz", "--weights", CLASSIFIER, "--prompts", prompts,
               "--prompt-column", "Prompt", "--clip-model", model_dir, "--splits", 2, "--no-isc", "--no-kid",
               "--no-prc", "--device", "cpu", "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["clip_score"] == pytest.approx(ours["clip_score"], abs=1e-4) and "fid" in metrics
    write_sample_set(tmp_path / "u.npz", images, labels=labels + 1)
    r = run_dd("evaluate", "--samples", tmp_path / "u.npz", "--weights", CLASSIFIER, "--prompts", prompts,
               "--prompt-column", "Prompt", "--clip-model", model_dir, "--device", "cpu")
    assert r.returncode == 2 and "labels must be rows 0..2" in r.stderr
