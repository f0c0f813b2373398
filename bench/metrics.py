"""Fidelity of a benchmark run against its reference run: PSNR and SSIM of images and of latents.

PSNR and SSIM themselves live in one place, :mod:`tokprune.fidelity`; this module only
applies them to what a benchmark holds (an (H, W, 3) image in [0, 1] and a (C, h, w) latent whose
data range is the reference latent's own range).

Example::

    import numpy as np, torch
    from tokprune.bench.metrics import fidelity
    img = np.random.rand(32, 32, 3); lat = torch.randn(4, 16, 16)
    fidelity(img, img, lat, lat)["psnr_db"]      # inf: identical
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from tokprune.fidelity import psnr, ssim

__all__ = ["fidelity", "finite", "latent_psnr", "latent_ssim"]


def _hwc(latent: torch.Tensor) -> np.ndarray:
    """(C, h, w) tensor -> (h, w, C) float64 array (the metrics' image layout)."""
    return latent.detach().double().cpu().permute(1, 2, 0).numpy()


def _window(h: int, w: int) -> int:
    size = min(11, h, w)
    return size - (1 - size % 2)  # odd


def latent_psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR in dB of a (C, h, w) latent against ``ref``, whose max - min is the data range (inf when identical)."""
    rng = float(ref.max() - ref.min()) or 1.0
    return float(psnr(_hwc(ref), _hwc(x), rng)[0])


def latent_ssim(ref: torch.Tensor, x: torch.Tensor) -> float:
    """SSIM of a (C, h, w) latent against ``ref`` (data range as :func:`latent_psnr`; window <= 11, odd)."""
    rng = float(ref.max() - ref.min()) or 1.0
    return float(ssim(_hwc(ref), _hwc(x), data_range=rng, window=_window(*ref.shape[-2:]))[0])


def fidelity(ref_image: Any, image: Any, ref_latent: torch.Tensor, latent: torch.Tensor) -> dict[str, float]:
    """``psnr_db``, ``ssim`` of an (H, W, 3) image in [0, 1] and ``latent_psnr_db``, ``latent_ssim`` of a (C, h, w) latent."""
    a, b = np.asarray(ref_image, dtype=np.float64), np.asarray(image, dtype=np.float64)
    return {
        "psnr_db": float(psnr(a, b, 1.0)[0]),
        "ssim": float(ssim(a, b, data_range=1.0, window=_window(*a.shape[:2]))[0]),
        "latent_psnr_db": latent_psnr(ref_latent, latent),
        "latent_ssim": latent_ssim(ref_latent, latent),
    }


def finite(x: float | None) -> float | None:
    """``x`` as a float, or None where it is missing or infinite (JSON has no inf)."""
    return None if x is None or not math.isfinite(x) else float(x)
