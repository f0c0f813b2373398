"""The tiny SD3 geometry calibration tests measure against."""

from __future__ import annotations

import pytest

from tokprune.models import tiny_transformer_config
from tokprune.pruning import Geometry

N, T = 256, 333  # the tiny pipeline's default call: 64 px, max_sequence_length 256


@pytest.fixture
def geometry() -> Geometry:
    return Geometry.from_config(tiny_transformer_config(), batch=2, latent_hw=(32, 32), text_tokens=T)
