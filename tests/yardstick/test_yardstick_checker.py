"""The checker reads every attribute back off ground-truth pixels, and only the right ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tokprune.errors import ShapeError
from tokprune.yardstick import checker
from tokprune.yardstick import dataset as ds

N = 240


@pytest.fixture(scope="module")
def ground_truth():
    specs = [ds.sample_spec(i, ds.EVAL_SEED) for i in range(N)]
    return ds.render(specs).numpy(), specs


def test_perfect_on_ground_truth(ground_truth):
    images, specs = ground_truth
    result = checker.score(images, specs)
    assert result["n_images"] == N and result["n_objects"] > 400
    for key in ("position", "colour", "shape", "size", "mean", "object", "image"):
        assert result[key] == 1.0, key
    assert result["extra"] == 0.0


def test_perfect_from_parsed_captions_and_float_images(ground_truth):
    images, specs = ground_truth
    parsed = [ds.parse_caption(s.caption) for s in specs[:60]]
    assert checker.score(images[:60], parsed)["image"] == 1.0
    as_float = images[:20].astype(np.float32) / 255.0  # what pipe(..., output_type="np") returns
    assert checker.score(as_float, specs[:20])["image"] == 1.0


def test_discriminates_shuffled_captions(ground_truth):
    images, specs = ground_truth
    shuffled = specs[1:] + specs[:1]
    result = checker.score(images, shuffled)
    assert result["mean"] < 0.3
    assert result["colour"] < 0.2 and result["shape"] < 0.2
    assert result["image"] < 0.02
    assert result["extra"] > 1.0


@pytest.mark.parametrize("attribute", ["colour", "shape", "size"])
def test_each_attribute_is_read_on_its_own(ground_truth, attribute):
    images, specs = ground_truth
    options = {"colour": list(ds.COLOURS), "shape": list(ds.SHAPES), "size": list(ds.SIZES)}[attribute]
    for image, spec in list(zip(images, specs))[:40]:
        first = spec.objects[0]
        wrong = options[(options.index(getattr(first, attribute)) + 1) % len(options)]
        lie = dataclasses.replace(spec, objects=(dataclasses.replace(first, **{attribute: wrong}),) + spec.objects[1:])
        check = checker.check(image, lie)
        assert check.objects[0][attribute] is False
        assert all(v for k, v in check.objects[0].items() if k != attribute)
        assert all(all(o.values()) for o in check.objects[1:])


def test_moved_object_fails_position_and_counts_as_extra(ground_truth):
    images, specs = ground_truth
    image, spec = next((im, s) for im, s in zip(images, specs) if len(s.objects) == 1)
    o = spec.objects[0]
    moved = ds.SceneSpec((dataclasses.replace(o, row=(o.row + 1) % 3, dx=0, dy=0),))
    check = checker.check(image, moved)
    assert check.objects[0] == {"position": False, "colour": False, "shape": False, "size": False}
    assert check.extra == 1 and not check.correct


def test_robust_to_blur_and_noise(ground_truth):
    images, specs = ground_truth
    x = torch.from_numpy(images[:80]).permute(0, 3, 1, 2).float()
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    noisy = blurred * 0.85 + np.random.default_rng(0).normal(0, 20, blurred.shape)
    result = checker.score(noisy.clip(0, 255).astype(np.uint8), specs[:80])
    assert result["mean"] >= 0.97 and result["position"] == 1.0 and result["colour"] == 1.0


def test_blank_and_noise_images_score_zero(ground_truth):
    _, specs = ground_truth
    blank = checker.score(np.zeros((10, 128, 128, 3), np.uint8), specs[:10])
    assert blank["mean"] == 0.0 and blank["extra"] == 0.0
    noise = np.random.default_rng(1).integers(0, 256, (10, 128, 128, 3)).astype(np.uint8)
    smeared = checker.score(noise, specs[:10])
    assert smeared["mean"] == 0.0 and smeared["extra"] > 5


def test_rejects_wrong_shapes(ground_truth):
    images, specs = ground_truth
    with pytest.raises(ShapeError, match="HWC"):
        checker.check(images[0].transpose(2, 0, 1), specs[0])
    with pytest.raises(ShapeError, match="one spec per image"):
        checker.score(images[:2], specs[:1])
