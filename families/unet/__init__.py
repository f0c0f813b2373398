"""Stable Diffusion U-Net family (SD1.5, SDXL): DaTo token pruning, text-token pruning, DeepCache.

See ``families/unet/README.md``. Heavy imports are lazy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["apply", "remove", "get_pruner"]


def apply(*args: Any, **kwargs: Any):
    from tokprune.families.unet.sampler import apply as _apply

    return _apply(*args, **kwargs)


def remove(target: Any) -> None:
    from tokprune.families.unet.sampler import remove as _remove

    _remove(target)


def get_pruner(target: Any):
    from tokprune.families.unet.sampler import get_pruner as _get

    return _get(target)
