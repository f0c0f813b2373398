"""Synthetic error profiles (fast: no model) and the tiny SD3 geometry they are measured against."""

from __future__ import annotations

import math

import pytest

from tokprune.calibrate.profile import IMAGE_FRACTIONS, TEXT_FRACTIONS, ErrorProfile, default_grid
from tokprune.models import tiny_transformer_config
from tokprune.pruning import Geometry

N, T = 256, 333  # the tiny pipeline's default call: 64 px, max_sequence_length 256
ALIGN = 16


@pytest.fixture
def geometry() -> Geometry:
    return Geometry.from_config(tiny_transformer_config(), batch=2, latent_hw=(32, 32), text_tokens=T)


def synthetic_profile(
    steps: int, *, change=None, text_scale: float = 0.3, image_grid=None, text_grid=None, text_tokens: int = T
) -> ErrorProfile:
    """Error of keeping K image tokens at step s: change[s] * (1 - K/N)^1.5; reuse: change[s] * 1.2;
    text: text_scale * (1 - K_txt/T)^2. ``change`` defaults to a smooth decay (early steps change most)."""
    change = change or [1.0 / (1 + 0.3 * s) for s in range(steps)]
    ig = image_grid or default_grid(N, IMAGE_FRACTIONS, ALIGN)
    tg = text_grid if text_grid is not None else default_grid(text_tokens, TEXT_FRACTIONS, ALIGN)
    img = [[math.inf] * len(ig)] + [[change[s] * (1 - k / N) ** 1.5 for k in ig] for s in range(1, steps)]
    txt = [[math.inf] * len(tg)] + [[text_scale * (1 - k / text_tokens) ** 2 for k in tg] for s in range(1, steps)]
    reuse = [math.inf] + [change[s] * 1.2 for s in range(1, steps)]
    return ErrorProfile(
        num_tokens=N,
        text_tokens=text_tokens,
        image_grid=tuple(ig),
        image_error=tuple(map(tuple, img)),
        reuse_error=tuple(reuse),
        text_grid=tuple(tg),
        text_error=tuple(map(tuple, txt)) if tg else (),
    )


@pytest.fixture
def make_profile():
    return synthetic_profile
