"""Stable Diffusion U-Nets (SD1.5, SDXL): DaTo token pruning, cross-attention text pruning, DeepCache.

``FAMILY`` is the :class:`~tokprune.pruning.family.ModelFamily` (``sd-unet``); :func:`apply` /
:func:`remove` prune a pipeline eagerly (DeepCache steps included). See ``families/unet/README.md``.

Example::

    from tokprune.families.unet import apply, remove
    from tokprune.families.unet.models import build_pipeline
    from tokprune.pruning import PrunePlan

    pipe = build_pipeline("sd15-tiny")
    apply(pipe, PrunePlan((-1, -1, 512, 512), step_cache=(False, False, True, False)))
    image = pipe("a red circle", num_inference_steps=4).images[0]
    remove(pipe)
"""

from __future__ import annotations

from typing import Any

from tokprune.families.unet.family import UNetFamily
from tokprune.pruning.family import register_family

FAMILY = UNetFamily()
# Found through the `tokprune.families` entry point once pyproject lists it; registering here too
# makes `family_for(unet)` work wherever this module is imported.
register_family(FAMILY, replace=True)

__all__ = ["FAMILY", "UNetFamily", "apply", "get_pruner", "remove"]


def apply(*args: Any, **kwargs: Any):
    """:func:`tokprune.families.unet.sampler.apply`."""
    from tokprune.families.unet.sampler import apply as _apply

    return _apply(*args, **kwargs)


def remove(target: Any) -> None:
    """:func:`tokprune.families.unet.sampler.remove`."""
    from tokprune.families.unet.sampler import remove as _remove

    _remove(target)


def get_pruner(target: Any):
    from tokprune.families.unet.sampler import get_pruner as _get

    return _get(target)
