"""Image fidelity metrics of a pruned image against the dense image, and bootstrap intervals.

PSNR and SSIM live in :mod:`tokprune.fidelity` (re-exported here); this module adds the per-object
mask IoU that sees edges and small objects:

- :func:`psnr`, :func:`ssim`: per-image, images in [0, ``data_range``], (N, H, W, C) or one (H, W, C);
- :func:`object_iou`: every object of the dense image (the checker's segmentation: per grid cell, the
  largest 4-connected component of palette-labelled foreground) is matched to the pruned image's
  component of the *same colour* in the same cell; the score is the mean mask IoU over the dense
  objects plus one zero for every object the pruned image adds in an empty cell. A wrong colour, a
  lost small object, ragged edges or a smear all lower it; identical images score 1;
- :func:`bootstrap_ci`: seeded percentile bootstrap of a mean over captions (paired differences too).

Example::

    import numpy as np
    from tokprune.yardstick.metrics import psnr, bootstrap_ci
    a = np.zeros((2, 16, 16, 3)); b = a + 0.1
    psnr(b, a)                                   # array([20., 20.])
    bootstrap_ci([1.0, 2.0, 3.0], seed=0)        # (2.0, lo, hi)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tokprune.errors import ConfigError, ShapeError

__all__ = [
    "PSNR_CAP_DB", "accuracies", "bootstrap_ci", "capped_psnr", "chunk_metrics", "latent_error", "object_iou", "object_ious",
    "object_masks", "psnr", "ssim",
]

from tokprune.fidelity import PSNR_CAP_DB, capped_psnr, psnr, ssim  # noqa: E402  (the one home; re-exported)


# --------------------------------------------------------------------------- objects
def object_masks(image: Any) -> dict[tuple[int, int], tuple[np.ndarray, int]]:
    """The objects the checker sees in one image: ``{(row, col): (mask (H, W) bool, palette label)}``.

    Per grid cell, the largest 4-connected foreground component (checker's segmentation), kept when
    it has at least :data:`~tokprune.yardstick.checker.MIN_PIXELS` pixels; its label is the
    component's majority palette colour (1 + index into ``COLOURS``).
    """
    from tokprune.yardstick.checker import MIN_PIXELS, as_uint8, cell_component, palette_labels
    from tokprune.yardstick.dataset import GRID

    labels = palette_labels(as_uint8(image))
    out: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
    for r in range(GRID):
        for c in range(GRID):
            mask = cell_component(labels, r, c, labels > 0)
            if mask.sum() >= MIN_PIXELS:
                out[(r, c)] = (mask, int(np.bincount(labels[mask]).argmax()))
    return out


def object_iou(pruned: Any, dense: Any) -> float:
    """Mean per-object mask IoU of one pruned image against the dense image's objects (1 = same objects).

    Each dense object (cell, colour) is compared with the largest component of the *same colour*
    in the same cell of the pruned image; objects the pruned image adds in cells where dense has
    none count as IoU 0. A dense image with no object and a pruned image with none score 1.
    """
    from tokprune.yardstick.checker import MIN_PIXELS, as_uint8, cell_component, palette_labels

    ref = object_masks(dense)
    labels = palette_labels(as_uint8(pruned))
    dense_labels = palette_labels(as_uint8(dense))
    ious = []
    for (r, c), (_, colour) in ref.items():
        # like with like: the dense object's own colour component against the pruned one's, so identical
        # images score exactly 1 (the cell's whole foreground would include edge pixels of other colours)
        mask = cell_component(dense_labels, r, c, dense_labels == colour)
        got = cell_component(labels, r, c, labels == colour)
        union = int((mask | got).sum())
        ious.append(float((mask & got).sum()) / union if union else 1.0)
    extra = [rc for rc, (m, _) in object_masks(pruned).items() if rc not in ref and m.sum() >= MIN_PIXELS]
    ious += [0.0] * len(extra)
    return float(np.mean(ious)) if ious else 1.0


def object_ious(pruned: Any, dense: Any) -> np.ndarray:
    """:func:`object_iou` for each image of two (N, H, W, C) batches."""
    p, d = np.asarray(pruned), np.asarray(dense)
    if p.shape != d.shape:
        raise ShapeError(f"object_iou: shapes {p.shape} and {d.shape} differ")
    if p.ndim == 3:
        p, d = p[None], d[None]
    return np.array([object_iou(x, y) for x, y in zip(p, d)], dtype=np.float64)


# --------------------------------------------------------------------------- one chunk of captions
def latent_error(latents: Any, dense: Any) -> np.ndarray:
    """Per-caption relative L2 error of final latents vs dense."""
    latents, dense = torch.as_tensor(latents), torch.as_tensor(dense)
    d = (latents.double() - dense.double()).flatten(1).norm(dim=1)
    return (d / dense.double().flatten(1).norm(dim=1).clamp_min(1e-12)).numpy()


def chunk_metrics(images: np.ndarray, dense: np.ndarray, latents: Any, dense_latents: Any, captions: Sequence[str],
                  score: bool) -> dict[str, list[float] | None]:
    """Per-caption metrics of pruned vs dense images (and latents) of one chunk."""
    return {
        "psnr": capped_psnr(images, dense).tolist(),
        "ssim": ssim(images, dense).tolist(),
        "iou": object_ious(images, dense).tolist() if score else None,
        "acc": accuracies(images, captions) if score else None,
        "latent_err": latent_error(latents, dense_latents).tolist(),
    }


def accuracies(images: np.ndarray, captions: Sequence[str]) -> list[float]:
    """Checker accuracy per image: mean over its stated objects of the four attributes."""
    from tokprune.yardstick.checker import check
    from tokprune.yardstick.dataset import parse_caption

    out = []
    for img, cap in zip(images, captions):
        objs = check(img, parse_caption(cap)).objects
        out.append(float(np.mean([np.mean(list(o.values())) for o in objs])))
    return out


# --------------------------------------------------------------------------- intervals
def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean over captions and its percentile-bootstrap ``level`` interval.

    Resamples captions with replacement ``resamples`` times from a generator seeded ``seed`` (so
    the same values always give the same interval). One value gives a zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ConfigError("bootstrap_ci: no values; expected one value per caption")
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"bootstrap_ci: {int((~np.isfinite(x)).sum())} non-finite values; cap them first (capped_psnr)")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ConfigError(f"bootstrap_ci: level={level}, resamples={resamples}; expected 0 < level < 1, resamples >= 1")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def half_width(ci: tuple[float, float, float]) -> float:
    """Half the width of a :func:`bootstrap_ci` interval (the noise of that mean)."""
    return (ci[2] - ci[1]) / 2


def finite_or_none(v: float) -> float | None:
    """JSON-safe float: None for inf / nan."""
    return float(v) if math.isfinite(v) else None
