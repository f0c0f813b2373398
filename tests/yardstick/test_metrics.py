"""Fidelity metrics: PSNR / SSIM, per-object mask IoU on constructed scenes, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from tokprune.errors import ConfigError, ShapeError
from tokprune.yardstick import metrics
from tokprune.yardstick.dataset import COLOURS, sample


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four smooth-ish 48x48 RGB images in [0, 1] (blurred noise, so SSIM has structure to lose)."""
    rng = np.random.default_rng(0)
    x = rng.random((4, 48, 48, 3))
    for _ in range(3):
        x = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 3
    return x.astype(np.float32)


# --------------------------------------------------------------------------- PSNR / SSIM
def test_identical_images_give_ssim_one_and_infinite_psnr(images):
    s, p = metrics.ssim(images, images), metrics.psnr(images, images)
    assert s.shape == (4,) and p.shape == (4,)
    np.testing.assert_allclose(s, 1.0, atol=1e-12)
    assert np.all(np.isinf(p)) and np.all(p > 0)
    np.testing.assert_array_equal(metrics.capped_psnr(images, images), metrics.PSNR_CAP_DB)
    assert metrics.ssim(images[0], images[0]).shape == (1,)


def test_psnr_matches_its_definition(images):
    noisy = np.clip(images + 0.05, 0, 1)
    mse = ((noisy.astype(np.float64) - images) ** 2).reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(metrics.psnr(noisy, images), 10 * np.log10(1.0 / mse), rtol=1e-9)
    base = np.full((1, 16, 16, 3), 0.5)
    assert metrics.psnr(base + 0.1, base)[0] == pytest.approx(20.0, abs=1e-9)  # offset 0.1 -> exactly 20 dB


def test_ssim_decreases_with_noise_and_sees_structure(images):
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(images.shape)
    values = [float(metrics.ssim(np.clip(images + s * noise, 0, 1), images).mean()) for s in (0.0, 0.01, 0.05, 0.2)]
    assert values[0] == pytest.approx(1.0) and values[0] > values[1] > values[2] > values[3] and values[3] < 0.5
    assert metrics.ssim(np.clip(images + 0.02, 0, 1), images).mean() > 0.98  # luminance shift only
    assert metrics.ssim(images[:, ::-1, ::-1].copy(), images).mean() < 0.9  # same mean, scrambled structure


def test_metrics_reject_mismatched_or_tiny_images(images):
    with pytest.raises(ShapeError, match="differ"):
        metrics.ssim(images, images[:2])
    with pytest.raises(ShapeError, match="window"):
        metrics.ssim(images[:, :8, :8], images[:, :8, :8])


# --------------------------------------------------------------------------- object IoU
def _canvas() -> np.ndarray:
    return np.zeros((128, 128, 3), dtype=np.float32)


def _square(img: np.ndarray, y: int, x: int, side: int, colour: str) -> np.ndarray:
    img = img.copy()
    img[y : y + side, x : x + side] = np.array(COLOURS[colour], dtype=np.float32) / 255.0
    return img


def test_object_iou_of_known_shifts_colours_and_losses():
    dense = _square(_square(_canvas(), 10, 10, 19, "red"), 55, 55, 15, "blue")  # cells (0, 0) and (1, 1)
    assert metrics.object_iou(dense, dense) == 1.0
    assert set(metrics.object_masks(dense)) == {(0, 0), (1, 1)}
    # The red square moved 2 px right: IoU 19*17 / (19*21) = 17/21; blue unchanged.
    shifted = _square(_square(_canvas(), 10, 12, 19, "red"), 55, 55, 15, "blue")
    assert metrics.object_iou(shifted, dense) == pytest.approx((17 / 21 + 1.0) / 2, abs=1e-12)
    # Blue turned green: that object scores 0 (same cell, wrong colour).
    recoloured = _square(_square(_canvas(), 10, 10, 19, "red"), 55, 55, 15, "green")
    assert metrics.object_iou(recoloured, dense) == pytest.approx(0.5, abs=1e-12)
    # The small blue one is lost, and a yellow one appears in an empty cell: (1 + 0 + 0) / 3.
    lost = _square(_square(_canvas(), 10, 10, 19, "red"), 95, 95, 15, "yellow")
    assert metrics.object_iou(lost, dense) == pytest.approx(1 / 3, abs=1e-12)
    # A ragged edge (one row of 19 px eaten away) costs exactly those pixels.
    ragged = dense.copy()
    ragged[28, 10:29] = 0.0
    assert metrics.object_iou(ragged, dense) == pytest.approx((18 / 19 + 1.0) / 2, abs=1e-12)


def test_object_iou_on_dataset_scenes_and_batches():
    imgs = np.stack([sample(i)[0] for i in range(3)]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(metrics.object_ious(imgs, imgs), 1.0)
    blank = np.zeros_like(imgs)
    np.testing.assert_array_equal(metrics.object_ious(blank, imgs), 0.0)  # every object lost
    assert metrics.object_iou(blank[0], blank[0]) == 1.0  # nothing to find, nothing found
    acc = metrics.accuracies(imgs, [sample(i)[1] for i in range(3)])
    assert acc == [1.0, 1.0, 1.0]  # ground truth reads back perfectly
    assert metrics.accuracies(blank, [sample(i)[1] for i in range(3)]) == [0.0, 0.0, 0.0]


def test_latent_error_is_relative_l2_per_caption():
    import torch

    dense = torch.ones(2, 4, 3, 3)
    lat = dense.clone()
    lat[1] *= 1.5
    np.testing.assert_allclose(metrics.latent_error(lat, dense), [0.0, 0.5], atol=1e-12)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(123)
    hits = 0
    trials = 300
    for t in range(trials):
        x = rng.normal(2.0, 1.0, size=40)
        mean, lo, hi = metrics.bootstrap_ci(x, resamples=1000, seed=t)
        assert lo <= mean <= hi and mean == pytest.approx(x.mean())
        hits += lo <= 2.0 <= hi
    # Percentile bootstrap at n=40 under-covers slightly; 95% nominal lands in ~[0.90, 0.97].
    assert 0.89 <= hits / trials <= 0.98


def test_bootstrap_is_seeded_and_scales_with_spread():
    x = np.random.default_rng(0).normal(size=30)
    assert metrics.bootstrap_ci(x, seed=5) == metrics.bootstrap_ci(x, seed=5)
    assert metrics.bootstrap_ci(x, seed=5) != metrics.bootstrap_ci(x, seed=6)
    w1 = metrics.half_width(metrics.bootstrap_ci(x))
    w10 = metrics.half_width(metrics.bootstrap_ci(10 * x))
    assert w10 == pytest.approx(10 * w1, rel=1e-9)
    # Half-width ~ 1.96 * sd / sqrt(n) for a normal sample.
    assert w1 == pytest.approx(1.96 * x.std() / np.sqrt(30), rel=0.2)
    assert metrics.bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ConfigError, match="non-finite"):
        metrics.bootstrap_ci([1.0, np.inf])
    with pytest.raises(ConfigError, match="no values"):
        metrics.bootstrap_ci([])


def test_separable_ssim_equals_the_two_dimensional_window(images):
    import torch

    x = torch.as_tensor(images[:2], dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.clip(images[2:] + 0.03, 0, 1), dtype=torch.float64).permute(0, 3, 1, 2)
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    w = (torch.outer(g, g) / torch.outer(g, g).sum()).expand(3, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, w, groups=3)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).flatten(1).mean(1)
    got = metrics.ssim(images[:2], np.clip(images[2:] + 0.03, 0, 1))
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-12)
