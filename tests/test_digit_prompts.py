"""Captions of the tiny text-to-image default (issue 13): attributes measured from pixels, per-class words, phrasings."""
import numpy as np
import pytest

from dd.evaluation import digit_prompts as dp


def bar(width: int = 1, shift_top: int = 0, height: int = 12, size: int = 16) -> np.ndarray:
    """A vertical stroke [1, 3, size, size] in [-1, 1]; its top moved right by shift_top pixels (a slant)."""
    img = -np.ones((size, size))
    top = (size - height) // 2
    for i, row in enumerate(range(top, top + height)):
        col = size // 2 + round(shift_top * (1 - i / (height - 1)))
        img[row, col:col + width] = 1.0
    return np.repeat(img[None, None], 3, axis=1)


def test_each_attribute_moves_with_what_it_names_and_not_with_the_others():
    base = dp.measure(bar())[0]
    bold = dp.measure(bar(width=3))[0]
    right = dp.measure(bar(shift_top=4))[0]
    left = dp.measure(bar(shift_top=-4))[0]
    small = dp.measure(bar(height=6))[0]
    stroke, slant, size = (dp.ATTRIBUTES.index(a) for a in ("stroke", "slant", "size"))
    assert bold[stroke] > 2 * base[stroke]
    assert right[slant] > 0.2 > abs(base[slant]) and left[slant] < -0.2
    assert small[size] < 0.6 * base[size]
    assert abs(right[size] - base[size]) < 0.15 * base[size]       # a slant is not a size change


def test_words_are_relative_to_the_class_and_captions_use_only_clear_attributes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, (300, 3)), rng.normal(5, 1, (300, 3))])
    labels = np.repeat([0, 1], 300)
    scale = dp.AttributeScale.fit(values, labels, num_classes=2)
    assert scale.median[1, 0] == pytest.approx(5, abs=0.3)          # class 1's own median
    words = dp.describe(np.array([[3.0, 3.0, 0.0], [3.0, 3.0, 0.0]]), np.array([0, 1]), scale)
    assert words[0] == {"stroke": "bold", "slant": "right"}          # high for class 0, middle size: omitted
    assert words[1] == {"stroke": "thin", "slant": "left", "size": "small"}   # the same values are low for class 1
    assert dp.satisfies(words[0], np.array([0.5, 0.1, 9.0]), 0, scale)
    assert not dp.satisfies(words[0], np.array([-0.5, 0.1, 0.0]), 0, scale)
    assert dp.AttributeScale.from_dict(scale.to_dict()).median.tolist() == scale.median.tolist()


def test_every_phrasing_names_the_digit_and_each_word_and_held_out_phrasings_differ():
    words = {"stroke": "bold", "slant": "right", "size": "small"}
    train = {dp.caption(7, words, i) for i in dp.phrasing_ids("train")}
    held = {dp.caption(7, words, i) for i in dp.phrasing_ids("eval")}
    assert len(train) == len(dp.PHRASINGS) - dp.HELD_OUT and len(held) == dp.HELD_OUT and not train & held
    for text in train | held:
        assert "7" in text or "seven" in text
        assert "bold" in text and "right" in text and "small" in text
    assert dp.caption(8, {"stroke": "bold", "slant": "left"}, 4).startswith("an eight")      # the article agrees
    assert dp.caption(8, {"stroke": "bold", "slant": "left"}, 0) == "a bold eight leaning left"
    assert dp.caption(1, {"stroke": "bold", "slant": "left"}, 4).startswith("a one")
    with pytest.raises(ValueError, match="at least 2 attributes"):
        dp.caption(3, {"stroke": "thin"}, 0)


def test_real_digits_get_captions_and_a_zoomed_digit_reads_as_larger():
    import torch

    from dd.evaluation.digits import load_digits_images

    images, labels = load_digits_images(size=16, split="train")
    values = dp.measure(images.numpy())
    scale = dp.AttributeScale.fit(values, labels.numpy())
    described = dp.describe(values, labels.numpy(), scale)
    captioned = sum(len(w) >= dp.MIN_ATTRIBUTES for w in described) / len(described)
    assert captioned > 0.3                                            # enough images to caption
    # zooming the central 12x12 to 16x16 makes every digit larger by the size attribute
    zoomed = torch.nn.functional.interpolate(images[:, :, 2:14, 2:14], size=(16, 16), mode="bilinear",
                                             align_corners=False)
    size = dp.ATTRIBUTES.index("size")
    grew = dp.measure(zoomed.numpy())[:, size] > values[:, size]
    assert grew.mean() > 0.95


def test_prompt_sets_read_back_and_prompt_accuracy_can_fail(tmp_path):
    # real test digits generated "from" their own held-out prompts score about the classifier's accuracy
    # (here: the true labels, so 1.0 exactly: clear attributes lie beyond the median); shuffled prompts score low
    from dd.evaluation.digits import load_digits_images
    from dd.pipeline.prompt_files import read_prompts

    train, train_labels = load_digits_images(size=16, split="train")
    test, test_labels = load_digits_images(size=16, split="test")
    scale = dp.AttributeScale.fit(dp.measure(train.numpy()), train_labels.numpy())
    rows = {s: dp.prompt_rows(x.numpy(), y.numpy(), scale, s) for s, x, y in
            (("train", train, train_labels), ("eval", test, test_labels))}
    for split, rs in rows.items():
        dp.write_prompt_file(tmp_path / f"{split}.tsv", rs)
        back = read_prompts(tmp_path / f"{split}.tsv", "prompt", dp.PROMPT_COLUMNS[1:])
        assert [r["prompt"] for r in back] == [r["prompt"] for r in rs]
    held_out = {dp.PHRASINGS[i](7, {"stroke": "bold", "slant": "left"}) for i in dp.phrasing_ids("eval")}
    train_shapes = {dp.PHRASINGS[i](7, {"stroke": "bold", "slant": "left"}) for i in dp.phrasing_ids("train")}
    assert not held_out & train_shapes
    ev = rows["eval"]
    idx = np.array([int(r["image"]) for r in ev])
    images, labels = test.numpy()[idx], test_labels.numpy()[idx]
    own = dp.prompt_accuracy(images, labels, ev, scale)
    assert own.mean() == 1.0
    shuffled = [ev[i] for i in np.random.default_rng(0).permutation(len(ev))]
    assert dp.prompt_accuracy(images, labels, shuffled, scale).mean() < 0.2
    wrong_digit = dp.prompt_accuracy(images, (labels + 1) % 10, ev, scale)
    assert wrong_digit.mean() == 0.0


def test_digit_prompts_command_writes_both_prompt_sets_and_the_scale(tmp_path):
    import json

    from dd.__main__ import main
    from dd.pipeline.prompt_files import read_prompts

    assert main(["digit-prompts", "--out-dir", str(tmp_path)]) == 0
    train = read_prompts(tmp_path / "prompts_train.tsv", "prompt", dp.PROMPT_COLUMNS[1:])
    evaluation = read_prompts(tmp_path / "prompts_eval.tsv", "prompt", dp.PROMPT_COLUMNS[1:])
    assert len(train) > 500 and len(evaluation) > 100
    scale = dp.AttributeScale.from_dict(json.loads((tmp_path / "attribute_scale.json").read_text()))
    assert scale.median.shape == (10, 3)


def test_evaluate_reports_prompt_accuracy_of_samples_against_their_prompt_rows(tmp_path, capsys):
    """``dd evaluate --prompts``: the test digits, each labelled with the row of its own caption, match their prompts
    (up to the classifier's errors); the same images labelled with other rows do not."""
    import json

    from dd.__main__ import main
    from dd.evaluation.digits import load_digits_images
    from dd.evaluation.sample_sets import write_sample_set
    from dd.families.llamagen.tiny_t2i import RELEASES
    from dd.pipeline.prompt_files import read_prompts

    assert main(["digit-prompts", "--out-dir", str(tmp_path)]) == 0
    rows = read_prompts(tmp_path / "prompts_eval.tsv", "prompt", extra_columns=("image",))
    images, _ = load_digits_images(16, "test")
    shown = images[[int(r["image"]) for r in rows]]
    weights = RELEASES / "digits_classifier_16.safetensors"
    results = {}
    for name, labels in (("own", np.arange(len(rows))), ("shifted", (np.arange(len(rows)) + 7) % len(rows))):
        write_sample_set(tmp_path / f"{name}.npz", shown, labels)
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--samples", str(tmp_path / f"{name}.npz"), "--weights", str(weights),
                     "--no-isc", "--no-kid", "--no-prc", "--prompts", str(tmp_path / "prompts_eval.tsv"),
                     "--attribute-scale", str(tmp_path / "attribute_scale.json"), "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    own, shifted = results["own"], results["shifted"]
    assert own["prompt_accuracy"] >= 0.85 and own["classifier_accuracy"] >= own["prompt_accuracy"]
    assert shifted["prompt_accuracy"] < 0.3
    assert own["prompt_accuracy"] - shifted["prompt_accuracy"] > 4 * (own["prompt_accuracy_std"]
                                                                     + shifted["prompt_accuracy_std"])
    bad = ["evaluate", "--samples", str(tmp_path / "own.npz"), "--weights", str(weights), "--no-fid",
           "--prompts", str(tmp_path / "prompts_eval.tsv")]
    assert main(bad) == 2 and "--prompts goes with --attribute-scale" in capsys.readouterr().err


def test_prompt_grid_puts_each_sets_samples_beside_their_prompts(tmp_path, capsys):
    from PIL import Image

    from dd.__main__ import main
    from dd.evaluation.sample_sets import write_sample_set

    prompts = tmp_path / "p.tsv"
    prompts.write_text("prompt\n" + "".join(f"a bold {w} leaning right\n" for w in ("one", "two", "three")))
    rng = np.random.default_rng(0)
    for name in ("teacher", "dd-1step"):
        write_sample_set(tmp_path / f"{name}.npz", rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8),
                         np.array([0, 1, 2, 0, 1, 2]))
    out = tmp_path / "grid.png"
    sets = [f"{n}={tmp_path / n}.npz" for n in ("teacher", "dd-1step")]
    assert main(["report", "prompt-grid", "--sets", *sets, "--prompts", str(prompts), "--out", str(out)]) == 0
    w, h = Image.open(out).size
    assert h > 3 * 64 and w > 2 * 64                     # 3 prompt rows, 2 set columns of 4x images
    write_sample_set(tmp_path / "short.npz", rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8), np.array([0, 1]))
    assert main(["report", "prompt-grid", "--sets", f"x={tmp_path / 'short.npz'}", "--prompts", str(prompts),
                 "--out", str(tmp_path / "g2.png")]) == 2
    assert "no sample of prompt row 2" in capsys.readouterr().err
