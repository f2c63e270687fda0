"""FID against precomputed reference statistics, in the formats the paper configurations use: the DD release's torch
file ``{"m", "s"}`` (fid_imagenet256) and ADM's reference-batch ``.npz`` (``mu``, ``sigma``, images under ``arr_0``).
Run through torch-fidelity's Inception-v3 code path with weights from a local file (random weights in the released
file's layout: nothing is downloaded), and checked against FID computed from the reference images themselves."""
import numpy as np
import pytest
import torch

from dd.__main__ import main as cli
from dd.evaluation.metrics import evaluate_sample_set
from dd.evaluation.reference import FidStatistics, load_fid_statistics, load_reference
from dd.evaluation.sample_sets import SampleSetError, write_sample_set

INCEPTION = "inception-v3-compat"


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A local weights file for torch-fidelity's InceptionV3 (its state-dict layout, seeded random values)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    original = inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict
    inc.load_state_dict_from_url = lambda *a, **k: None
    inc.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None
    try:
        torch.manual_seed(0)
        model = inc.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    finally:
        inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    g = np.random.default_rng(0)
    samples = g.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8)
    reference = np.clip(g.normal(128, 60, (24, 3, 32, 32)), 0, 255).astype(np.uint8)
    write_sample_set(d / "samples.npz", samples)
    write_sample_set(d / "reference.npz", reference)
    return d / "samples.npz", d / "reference.npz", reference


@pytest.fixture(scope="module")
def direct(sets, inception_weights):
    samples, reference, _ = sets
    return evaluate_sample_set(samples, reference, feature_extractor=INCEPTION, weights_path=inception_weights,
                               isc=False, kid=False, prc=False, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def reference_statistics(sets, inception_weights, tmp_path_factory):
    """mu / sigma of the reference images' pool3 features, computed by torch-fidelity, in both file formats."""
    from torch_fidelity.metric_fid import fid_input_id_to_statistics
    from torch_fidelity.utils import create_feature_extractor

    from dd.evaluation.metrics import UInt8Images

    _, _, images = sets
    kwargs = dict(input1=UInt8Images(images), feature_extractor_weights_path=str(inception_weights), cuda=False,
                  batch_size=8, save_cpu_ram=True, verbose=False, cache=False)
    extractor = create_feature_extractor(INCEPTION, ["2048"], **kwargs)
    st = fid_input_id_to_statistics(1, extractor, "2048", **kwargs)
    d = tmp_path_factory.mktemp("stats")
    torch.save({"m": torch.from_numpy(st["mu"]), "s": torch.from_numpy(st["sigma"])}, d / "statistic.pth")
    np.savez(d / "VIRTUAL_ref_batch.npz", arr_0=images.transpose(0, 2, 3, 1), mu=st["mu"], sigma=st["sigma"])
    return d / "statistic.pth", d / "VIRTUAL_ref_batch.npz"


@pytest.mark.parametrize("fmt", ["torch {m, s}", "ADM npz"])
def test_fid_against_statistics_equals_fid_against_the_images(direct, sets, inception_weights, reference_statistics,
                                                               fmt):
    samples, _, _ = sets
    path = reference_statistics[0 if fmt.startswith("torch") else 1]
    assert isinstance(load_reference(path), FidStatistics)
    out = evaluate_sample_set(samples, path, feature_extractor=INCEPTION, weights_path=inception_weights,
                              isc=False, device="cpu", batch_size=8)
    assert out["fid"] == pytest.approx(direct["fid"], rel=1e-6, abs=1e-6) and direct["fid"] > 0
    # precision / recall / KID need reference images: not computed, and the reason is recorded
    assert "precision" not in out and "kid_mean" not in out
    assert set(out["not_computed"]) == {"kid", "prc"} and out["reference"] == str(path)


def test_evaluate_cli_with_statistics(sets, inception_weights, reference_statistics, tmp_path):
    samples, _, _ = sets
    out = tmp_path / "m.json"
    assert cli(["evaluate", "--samples", str(samples), "--reference", str(reference_statistics[0]),
                "--feature-extractor", INCEPTION, "--weights", str(inception_weights), "--no-isc",
                "--batch-size", "8", "--device", "cpu", "--splits", "2", "--out", str(out)]) == 0
    import json
    m = json.loads(out.read_text())
    assert m["fid"] > 0 and m["fid_std"] >= 0 and len(m["per_split"]["fid"]) == 2


def test_bad_statistics_files_are_refused_clearly(sets, inception_weights, tmp_path):
    samples, _, _ = sets
    torch.save({"m": torch.zeros(2048), "x": 1}, tmp_path / "nos.pth")
    with pytest.raises(SampleSetError, match=r"nos\.pth: expected FID statistics with keys 'm' and 's'"):
        load_fid_statistics(tmp_path / "nos.pth")
    torch.save({"m": torch.zeros(4), "s": torch.zeros(3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(SampleSetError, match=r"shape\.pth: FID statistics need a mean \[D\] and a covariance"):
        load_fid_statistics(tmp_path / "shape.pth")
    torch.save({"m": torch.zeros(64), "s": torch.eye(64)}, tmp_path / "dim.pth")
    with pytest.raises(ValueError, match=r"64-dimensional, but the feature extractor's FID layer '2048' gives 2048"):
        evaluate_sample_set(samples, tmp_path / "dim.pth", feature_extractor=INCEPTION, weights_path=inception_weights,
                            isc=False, device="cpu", batch_size=8)
