"""Image fidelity of a pruned image against the dense one: PSNR and SSIM, written once.

Calibration (held-out PSNR), the yardstick's quality comparison, the bench and the demo all import
them from here. Images in [0, ``data_range``], (N, H, W, C) or one (H, W, C).

Example::

    import numpy as np
    from tokprune.fidelity import psnr, ssim
    a = np.zeros((2, 16, 16, 3)); b = a + 0.1
    psnr(b, a)                                   # array([20., 20.])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokprune.errors import ShapeError

__all__ = ["PSNR_CAP_DB", "capped_psnr", "psnr", "ssim"]


#: PSNR of an image identical to dense is infinite; per-caption means use this cap instead (documented in reports).
PSNR_CAP_DB = 100.0


def _nchw(images: Any) -> torch.Tensor:
    """(N, C, H, W) float64 from (H, W, C) or (N, H, W, C) arrays in [0, 1]."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ShapeError(f"images have shape {tuple(x.shape)}; expected (H, W, C) or (N, H, W, C)")
    return x.permute(0, 3, 1, 2)


def psnr(a: Any, b: Any, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB of (N, H, W, C) (or one (H, W, C)) images; ``inf`` where identical."""
    x, y = _nchw(a), _nchw(b)
    if x.shape != y.shape:
        raise ShapeError(f"psnr: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(data_range**2 / mse.numpy())).astype(np.float64)


def capped_psnr(a: Any, b: Any, data_range: float = 1.0, cap: float = PSNR_CAP_DB) -> np.ndarray:
    """:func:`psnr` with identical (or nearly identical) images capped at ``cap`` dB, so means stay finite."""
    return np.minimum(psnr(a, b, data_range), cap)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    """1-D Gaussian taps summing to 1; the 2-D window is their outer product (separable)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: Any, b: Any, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of (N, H, W, C) (or one (H, W, C)) images in [0, ``data_range``].

    Gaussian window ``window`` x ``window``, std ``sigma``, valid positions only, each channel
    separately, then the SSIM map averaged over channels and positions. Identical images give 1.
    """
    x, y = _nchw(a), _nchw(b)
    if x.shape != y.shape:
        raise ShapeError(f"ssim: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    if min(x.shape[-2:]) < window:
        raise ShapeError(f"ssim: images are {tuple(x.shape[-2:])}, smaller than the {window}x{window} window")
    g = _gaussian(window, sigma)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable: rows then columns, valid positions (5x faster than 2-D)
        n, ch, h, w = t.shape
        a = torch.nn.functional.conv2d(t.reshape(n * ch, 1, h, w), g.view(1, 1, 1, window))
        return torch.nn.functional.conv2d(a, g.view(1, 1, window, 1)).reshape(n, ch, h - window + 1, w - window + 1)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(dim=1).numpy()
