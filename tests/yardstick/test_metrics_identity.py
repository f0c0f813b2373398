"""The fidelity metric reads no difference between identical images (its noise floor is the model's, not its own)."""

import numpy as np

from tokprune.yardstick.dataset import render, sample_spec
from tokprune.yardstick.metrics import object_iou


def test_identical_images_have_object_iou_one():
    images = render([sample_spec(i, 1) for i in range(6)]).numpy().astype(np.float32) / 255.0  # (N, H, W, 3)
    for img in images:
        assert object_iou(img, img) == 1.0
    # a blurred copy (edge pixels of other colours, a wider object) reads below 1 against the original
    blurred = (images[0] + np.roll(images[0], 2, axis=0)) / 2
    assert object_iou(blurred, images[0]) < 1.0
