"""The embedded-default data: split, upsampling, uint8 conversion and grid PNGs."""
import numpy as np
import pytest
import torch
from PIL import Image

from dd.evaluation.digits import NUM_CLASSES, _raw_digits, load_digits_images, save_grid_png, split_indices, to_uint8


def test_split_is_deterministic_disjoint_and_complete():
    _, labels = _raw_digits()
    train = split_indices(labels, "train", seed=0)
    test = split_indices(labels, "test", seed=0)
    assert np.array_equal(train, split_indices(labels, "train", seed=0))
    assert np.array_equal(test, split_indices(labels, "test", seed=0))
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.union1d(train, test), np.arange(len(labels)))
    assert not np.array_equal(test, split_indices(labels, "test", seed=1))
    # the images follow the indices
    x_test, y_test = load_digits_images(split="test")
    assert torch.equal(y_test, torch.from_numpy(labels[test]))
    x_again, _ = load_digits_images(split="test")
    assert torch.equal(x_test, x_again)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_split_is_stratified(fraction):
    _, labels = _raw_digits()
    test = split_indices(labels, "test", seed=3, test_fraction=fraction)
    for c in range(NUM_CLASSES):
        n_c = int((labels == c).sum())
        assert int((labels[test] == c).sum()) == round(fraction * n_c)


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="split"):
        load_digits_images(split="validation")
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_images(test_fraction=1.0)


def test_images_are_grey_rgb_in_range():
    x, y = load_digits_images(size=16, split="all")
    assert x.shape == (1797, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.long and set(y.tolist()) == set(range(NUM_CLASSES))
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_native_size_is_the_raw_pixels():
    pixels, _ = _raw_digits()
    x, _ = load_digits_images(size=8, split="all")
    assert torch.allclose(x[:, 0], torch.from_numpy(pixels / 16.0 * 2 - 1).float())


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1-D bilinear resampling with half-pixel centres (align_corners=False), edges clamped."""
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        a[i, lo] += 1 - (src - lo)
        a[i, hi] += src - lo
    return a


@pytest.mark.parametrize("size", [16, 12])
def test_upsampling_is_separable_bilinear(size):
    pixels, _ = _raw_digits()
    x, _ = load_digits_images(size=size, split="all")
    a = bilinear_matrix(8, size)
    for i in (0, 17, 1000):
        expected = a @ (pixels[i] / 16.0) @ a.T * 2 - 1
        assert np.allclose(x[i, 0].numpy(), expected, atol=1e-5)


def test_to_uint8():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, -1.0 + 1 / 127.5])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 1]
    assert to_uint8(x.numpy()).tolist() == [0, 0, 128, 255, 255, 1]
    assert to_uint8(x.numpy()).dtype == np.uint8
    images, _ = load_digits_images(split="test")
    u = to_uint8(images)
    assert u.dtype == torch.uint8 and u.shape == images.shape
    assert (u.float() / 127.5 - 1 - images).abs().max() <= 1 / 255 + 1e-6


def test_grid_png(tmp_path):
    x, y = load_digits_images(split="test")
    path = tmp_path / "grid.png"
    save_grid_png(x, y, path, nrow=7, scale=2, pad=1)
    img = Image.open(path)
    assert img.size == (7 * (32 + 1) + 1, NUM_CLASSES * (32 + 1) + 1)
    # row of class 4, first cell = the first test image of class 4
    arr = np.asarray(img)
    first4 = to_uint8(x[y == 4][0]).permute(1, 2, 0).numpy()
    y0 = 1 + 4 * 33
    assert np.array_equal(arr[y0 : y0 + 32 : 2, 1 : 33 : 2], first4)
    # without labels: rows of nrow images; only the final file is left
    save_grid_png(to_uint8(x[:25]), None, path, nrow=10, scale=1, pad=0)
    assert Image.open(path).size == (160, 48)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_gaussian_blur_keeps_to_the_images_device():
    # the digits classifier blurs its input: `dd evaluate --device cuda` once failed on a kernel built on the CPU.
    # The meta device stands in for a GPU here (an op mixing meta and CPU tensors fails the same way).
    from dd.evaluation.digits import gaussian_blur

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = gaussian_blur(images.to("meta"), [1.0, 0.5])
    assert out.device.type == "meta" and out.shape == images.shape
    assert torch.allclose(gaussian_blur(images, 0), images, atol=1e-6)


def test_transform_digits_identity_is_load_digits_images_and_moves_the_measured_attributes():
    from dd.evaluation import digit_prompts as dp
    from dd.evaluation.digits import load_digits_pixels, transform_digits

    pixels, labels = load_digits_pixels("train")
    images, image_labels = load_digits_images(16, "train")
    assert torch.equal(labels, image_labels)
    n = len(pixels)
    one, zero, still = torch.ones(n), torch.zeros(n), torch.zeros(n, 2, dtype=torch.long)
    torch.testing.assert_close(transform_digits(pixels, 16, one, zero, still), images, atol=1e-5, rtol=0)
    base = dp.measure(images.numpy())
    bigger = dp.measure(transform_digits(pixels, 16, one * 1.08, zero, still).numpy())
    smaller = dp.measure(transform_digits(pixels, 16, one / 1.08, zero, still).numpy())
    assert (bigger[:, 2] > base[:, 2]).mean() > 0.95 and (smaller[:, 2] < base[:, 2]).mean() > 0.95
    # positive shear leans the top left: the slant measure (right = positive) falls by about the shear
    sheared = dp.measure(transform_digits(pixels, 16, one, zero + 0.1, still).numpy())
    assert abs(np.mean(sheared[:, 1] - base[:, 1]) + 0.1) < 0.02
    # a whole-pixel shift moves the image and leaves the ink where it was relative to itself
    moved = transform_digits(pixels[:5], 16, one[:5], zero[:5], torch.tensor([[1, 0]] * 5))
    torch.testing.assert_close(moved[..., 2:-1], images[:5, ..., 1:-2], atol=1e-5, rtol=0)
