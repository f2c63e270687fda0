"""The digits classifier and the torch-fidelity metrics computed through it."""
import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dd.__main__ import main as cli
from dd.evaluation.classifier import TrainConfig, classify, load_checkpoint, load_classifier, train_classifier
from dd.evaluation.digits import load_digits_images, to_uint8
from dd.evaluation.metrics import DIGITS_EXTRACTOR, DigitsFeatureExtractor, classifier_accuracy, evaluate_sample_set
from dd.evaluation.reference import write_digits_reference
from dd.evaluation.sample_sets import SampleSetError, load_sample_set, write_sample_set


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """One default training run shared by every test: (checkpoint path, held-out accuracy)."""
    path = tmp_path_factory.mktemp("classifier") / "digits_classifier.pt"
    _, heldout = train_classifier(path, log=None)
    return path, heldout


@pytest.fixture(scope="session")
def sets(tmp_path_factory):
    """Reference (train split) and sample sets built from the test split: real, noise, blurred, pixel-shuffled."""
    d = tmp_path_factory.mktemp("sets")
    write_digits_reference(d / "train.npz", split="train")
    x, y = load_digits_images(split="test")
    g = torch.Generator().manual_seed(0)
    write_sample_set(d / "real.npz", x, y)
    write_sample_set(d / "noise.npz", torch.rand(x.shape, generator=g) * 2 - 1, y)
    write_sample_set(d / "blur.npz", F.avg_pool2d(F.pad(x, (2,) * 4, mode="replicate"), 5, stride=1), y)
    shuffled = x.flatten(2)[:, :, torch.randperm(256, generator=g)].reshape(x.shape)
    write_sample_set(d / "shuffled.npz", shuffled, y)
    return d


@pytest.fixture(scope="session")
def metrics(classifier, sets):
    weights, _ = classifier
    return {  # 20 KID subsets instead of 100: KID's kernels dominate the run time otherwise
        name: evaluate_sample_set(sets / f"{name}.npz", sets / "train.npz", weights_path=weights, device="cpu",
                                  kid_subsets=20)
        for name in ("real", "noise", "blur", "shuffled")
    }


def test_classifier_reaches_95_percent_held_out(classifier):
    path, heldout = classifier
    print(f"held-out accuracy {heldout:.4f}")
    assert heldout >= 0.95
    ckpt = load_checkpoint(path)
    assert ckpt["heldout_accuracy"] == heldout and ckpt["config"]["image_size"] == 16
    # the reloaded model reproduces the recorded accuracy on the test split
    x, y = load_digits_images(split="test")
    model = load_classifier(path)
    assert (classify(model, x) == y).float().mean().item() == pytest.approx(heldout)
    # uint8 input gives the same predictions as [-1, 1] floats (up to rounding of a handful of pixels)
    assert (classify(model, to_uint8(x)) == classify(model, x)).float().mean() > 0.99


def test_training_is_seeded_and_deterministic():
    one = TrainConfig(epochs=1)
    a, _ = train_classifier(None, seed=5, train_config=one, log=None)
    b, _ = train_classifier(None, seed=5, train_config=one, log=None)
    c, _ = train_classifier(None, seed=6, train_config=one, log=None)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_extractor_is_registered_with_torch_fidelity(classifier):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS_EXTRACTOR] is DigitsFeatureExtractor
    fe = DigitsFeatureExtractor(DIGITS_EXTRACTOR, ["logits", "features"], feature_extractor_weights_path=classifier[0])
    logits, features = fe(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))  # resized to 16x16 inside
    assert logits.shape == (4, 10) and features.shape == (4, 64)
    with pytest.raises(ValueError, match="uint8"):
        fe(torch.zeros(4, 3, 16, 16))


def test_fid_separates_real_digits_from_corrupted_ones(metrics):
    fid = {name: m["fid"] for name, m in metrics.items()}
    print("FID vs train split:", {k: round(v, 2) for k, v in fid.items()})
    assert fid["real"] < 20
    assert fid["noise"] > 20 * fid["real"]
    assert fid["shuffled"] > 20 * fid["real"]
    assert fid["blur"] > 5 * fid["real"]
    kid = {name: m["kid_mean"] for name, m in metrics.items()}
    assert abs(kid["real"]) < 0.1 * min(kid["noise"], kid["blur"])


def test_inception_score_and_precision_recall(metrics):
    real, noise = metrics["real"], metrics["noise"]
    print("IS real", real["isc_mean"], "noise", noise["isc_mean"])
    assert real["isc_mean"] > 7 and real["isc_mean"] > 3 * noise["isc_mean"]
    for m in metrics.values():
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["precision"] < 0.1 and noise["recall"] < 0.1
    # KID's subset size was lowered to half the 359 test images (subsets of the whole set would all be equal)
    assert real["num_samples"] == 359 and real["settings"]["kid_subset_size"] == 179
    assert real["kid_std"] > 0


def test_classifier_accuracy_of_sample_sets(classifier, sets):
    weights, heldout = classifier
    assert classifier_accuracy(sets / "real.npz", weights) == pytest.approx(heldout, abs=0.01)
    assert classifier_accuracy(sets / "noise.npz", weights) < 0.3


def test_digits_reference_at_the_samples_resolution(classifier, tmp_path):
    x, y = load_digits_images(size=32, split="test")
    write_sample_set(tmp_path / "s32.npz", x, y)
    m = evaluate_sample_set(tmp_path / "s32.npz", "digits", weights_path=classifier[0], isc=False, kid=False,
                            prc=False, device="cpu")
    assert m["reference"] == "digits@32x32" and m["num_reference"] == 1438
    assert m["fid"] < 20


def test_small_sets_are_refused_clearly(classifier, sets, tmp_path):
    x, y = load_digits_images(split="test")
    write_sample_set(tmp_path / "three.npz", x[:3], y[:3])
    with pytest.raises(ValueError, match="KID needs at least 4 images"):
        evaluate_sample_set(tmp_path / "three.npz", sets / "train.npz", weights_path=classifier[0], isc=False)
    with pytest.raises(ValueError, match="precision/recall"):
        evaluate_sample_set(tmp_path / "three.npz", sets / "train.npz", weights_path=classifier[0], isc=False,
                            kid=False)
    with pytest.raises(ValueError, match="IS with 10 splits"):
        evaluate_sample_set(tmp_path / "three.npz", sets / "train.npz", weights_path=classifier[0], prc=False)


def test_weights_are_never_downloaded(sets):
    with pytest.raises(ValueError, match="never downloads"):
        evaluate_sample_set(sets / "real.npz", sets / "train.npz", feature_extractor="inception-v3-compat")
    with pytest.raises(FileNotFoundError):
        evaluate_sample_set(sets / "real.npz", sets / "train.npz", weights_path=sets / "missing.pt")


def bad_files(d):
    x, y = load_digits_images(split="test")
    u = to_uint8(x).numpy()
    good = d / "good.npz"
    np.savez(good, images=u, labels=y.numpy())
    raw = good.read_bytes()
    (d / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.npz").write_bytes(b"not an archive at all" * 10)
    np.savez(d / "no_images.npz", pictures=u, labels=y.numpy())
    np.savez(d / "float_images.npz", images=x.numpy(), labels=y.numpy())
    np.savez(d / "nhwc.npz", images=u.transpose(0, 2, 3, 1), labels=y.numpy())
    np.savez(d / "short_labels.npz", images=u, labels=y.numpy()[:-1])
    np.savez(d / "float_labels.npz", images=u, labels=y.numpy().astype(np.float32))
    np.save(d / "single.npy", u)
    np.savez(d / "objects.npz", images=np.array([u, None], dtype=object))
    with zipfile.ZipFile(d / "crc.npz", "w") as z:  # a member whose bytes do not match its header
        z.writestr("images.npy", b"\x93NUMPY" + b"\x00" * 20)
    return {
        "truncated.npz": "not a readable .npz",
        "garbage.npz": "not a readable .npz",
        "no_images.npz": "missing key 'images'",
        "float_images.npz": "must be uint8",
        "nhwc.npz": "channels-last",
        "short_labels.npz": r"'labels' must have shape \[359\]",
        "float_labels.npz": "'labels' must be integers",
        "single.npy": "single .npy array",
        "objects.npz": "corrupt .npz member",
        "crc.npz": "corrupt .npz member",
        "missing.npz": "no such file",
    }


def test_bad_sample_files_give_clear_errors(tmp_path):
    for name, message in bad_files(tmp_path).items():
        with pytest.raises(SampleSetError, match=message) as e:
            load_sample_set(tmp_path / name)
        assert name in str(e.value)
    np.savez(tmp_path / "unlabelled.npz", images=np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(SampleSetError, match="missing key 'labels'"):
        load_sample_set(tmp_path / "unlabelled.npz", require_labels=True)
    np.savez(tmp_path / "label_11.npz", images=np.zeros((2, 3, 16, 16), np.uint8), labels=np.array([0, 11]))
    with pytest.raises(SampleSetError, match=r"label_11.npz: 'labels' must lie in \[0, 10\)"):
        load_sample_set(tmp_path / "label_11.npz", num_classes=10)


def test_cli_writes_metrics_json_and_rejects_bad_input(classifier, sets, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--samples", str(sets / "real.npz"), "--reference", "digits", "--weights",
            str(classifier[0]), "--device", "cpu", "--kid-subsets", "5", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    assert cli(args) == 0
    m = json.loads(out.read_text())
    for key in ("fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "classifier_accuracy"):
        assert np.isfinite(m[key]), key
    assert m["reference"] == "digits@16x16" and m["feature_extractor"] == DIGITS_EXTRACTOR
    assert any((tmp_path / "cache").iterdir())  # the cache went where it was told
    # a second run reads the cache and agrees
    assert cli(args) == 0 and json.loads(out.read_text())["fid"] == pytest.approx(m["fid"])

    bad_files(tmp_path)
    capsys.readouterr()
    assert cli(["evaluate", "--samples", str(tmp_path / "truncated.npz"), "--weights", str(classifier[0]),
                "--out", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "truncated.npz" in err and "not a readable .npz" in err
    assert not (tmp_path / "bad.json").exists()


def test_train_classifier_cli(tmp_path, capsys):
    out = tmp_path / "c.pt"
    assert cli(["train-classifier", "--out", str(out), "--epochs", "1", "--seed", "3"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert load_checkpoint(out)["train_config"]["epochs"] == 1
