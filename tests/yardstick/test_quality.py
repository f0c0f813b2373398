"""Image metrics of the quality benchmark, and a tiny end-to-end run of ``tokprune-quality``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tokprune.yardstick import quality


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four smooth-ish 48x48 RGB images in [0, 1] (blurred noise, so SSIM has structure to lose)."""
    rng = np.random.default_rng(0)
    x = rng.random((4, 48, 48, 3))
    for _ in range(3):  # cheap box blur
        x = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 3
    return x.astype(np.float32)


def test_identical_images_give_ssim_one_and_infinite_psnr(images):
    s = quality.ssim(images, images)
    p = quality.psnr(images, images)
    assert s.shape == (4,) and p.shape == (4,)
    np.testing.assert_allclose(s, 1.0, atol=1e-12)
    assert np.all(np.isinf(p)) and np.all(p > 0)
    assert quality.ssim(images[0], images[0]).shape == (1,)  # one HWC image


def test_psnr_matches_its_definition(images):
    noisy = np.clip(images + 0.05, 0, 1)
    mse = ((noisy.astype(np.float64) - images) ** 2).reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(quality.psnr(noisy, images), 10 * np.log10(1.0 / mse), rtol=1e-9)
    # A constant offset of 0.1 on every pixel: exactly 20 dB.
    base = np.full((1, 16, 16, 3), 0.5)
    assert quality.psnr(base + 0.1, base)[0] == pytest.approx(20.0, abs=1e-9)


def test_ssim_decreases_with_noise(images):
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(images.shape)
    values = [float(quality.ssim(np.clip(images + s * noise, 0, 1), images).mean()) for s in (0.0, 0.01, 0.05, 0.2)]
    assert values[0] == pytest.approx(1.0)
    assert values[0] > values[1] > values[2] > values[3]
    assert values[3] < 0.5  # heavy noise destroys the structure
    psnrs = [float(quality.psnr(np.clip(images + s * noise, 0, 1), images).mean()) for s in (0.01, 0.05, 0.2)]
    assert psnrs[0] > psnrs[1] > psnrs[2]


def test_ssim_is_symmetric_and_sees_structure_not_only_mean(images):
    other = images[::-1].copy()
    np.testing.assert_allclose(quality.ssim(images, other), quality.ssim(other, images), atol=1e-12)
    # Luminance shift only: SSIM stays high; scrambled structure at the same mean: SSIM drops.
    shifted = np.clip(images + 0.02, 0, 1)
    flipped = images[:, ::-1, ::-1].copy()
    assert quality.ssim(shifted, images).mean() > 0.98
    assert quality.ssim(flipped, images).mean() < 0.9


def test_metrics_reject_mismatched_or_tiny_images(images):
    from tokprune.errors import ShapeError

    with pytest.raises(ShapeError, match="differ"):
        quality.ssim(images, images[:2])
    with pytest.raises(ShapeError, match="window"):
        quality.ssim(images[:, :8, :8], images[:, :8, :8])


def test_bad_cli_values_exit_2(capsys):
    assert quality.main(["--budgets", "0.5,1.5"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert quality.main(["--methods", "calibrated,tome"]) == 2
    assert "tome" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_end_to_end_writes_valid_json(tmp_path, capsys, monkeypatch):
    from tokprune.calibrate import profile

    # A coarser probe grid keeps profiling (14 calls per step by default) inside the test budget.
    monkeypatch.setattr(profile, "IMAGE_FRACTIONS", (1 / 4, 1 / 2, 3 / 4))
    monkeypatch.setattr(profile, "TEXT_FRACTIONS", (1 / 2,))
    out = tmp_path / "q"
    rc = quality.main(
        [
            "--model",
            "sd3-tiny",
            "--n",
            "2",
            "--budgets",
            "0.5",
            "--methods",
            "calibrated,cat,random",
            "--steps",
            "4",
            "--max-sequence-length",
            "16",
            "--calib-prompts",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    doc = json.loads((out / "quality.json").read_text())
    assert (out / "quality.png").stat().st_size > 10_000
    md = (out / "quality.md").read_text()
    assert "tokprune-quality --model sd3-tiny" in md and "## Findings" in md and "| calibrated | 0.50 |" in md
    assert doc["model"] == "sd3-tiny" and doc["settings"]["call"]["num_inference_steps"] == 4
    assert "not a trained yardstick" in doc["accuracy_skipped"]  # random weights: no checker accuracy
    dense = doc["dense"]
    assert dense["method"] == "dense" and dense["mac_fraction"] == 1.0 and dense["ssim"] == 1.0
    assert [r["method"] for r in doc["rows"]] == ["calibrated", "cat", "random"]
    for row in doc["rows"]:
        assert set(quality.ROW_KEYS) <= set(row)
        # calibrate() meets the budget within 0.02; CAT's single K on 4 steps only gets close.
        assert row["budget"] == 0.5 and abs(row["mac_fraction"] - 0.5) <= (0.1 if row["method"] == "cat" else 0.021)
        assert row["accuracy"] is None and row["per_attribute"] is None
        assert row["psnr_db"] is not None and math.isfinite(row["psnr_db"]) and row["psnr_db"] > 5
        assert 0.0 < row["ssim"] < 1.0 and len(row["ssim_per_image"]) == 2
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows["random"]["plan"] == rows["calibrated"]["plan"]  # same plan, another policy
    assert rows["cat"]["plan"]["text_keep"] is None  # CAT never prunes text
    if not any(0 < k < 256 for k in rows["calibrated"]["plan"]["image_keep"]):  # no step selects image tokens
        assert rows["random"]["identical_to"] == "calibrated" and rows["random"]["ssim"] == rows["calibrated"]["ssim"]
        assert "copied rows (random@0.5)" in md and "| random (= calibrated) | 0.50 |" in md
    else:
        assert "identical_to" not in rows["random"] and rows["random"]["seconds"] > 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| random")  # the table is printed last
