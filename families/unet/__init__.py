"""Stable Diffusion U-Nets (SD1.5, SDXL): DaTo token pruning, cross-attention text pruning, DeepCache.

``FAMILY`` is the :class:`~tokprune.pruning.family.ModelFamily` (``sd-unet``); the generic
:func:`tokprune.pruning.apply` / :func:`~tokprune.pruning.remove` (re-exported here) prune a pipeline
eagerly, DeepCache steps (``PrunePlan.step_cache``) included. See ``families/unet/README.md``.

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

from tokprune.families.unet.family import UNetFamily
from tokprune.pruning.sampler import apply, get_pruner, remove  # the generic hook drives U-Nets too

FAMILY = UNetFamily()  # found through the `tokprune.families` entry point (pyproject.toml)

__all__ = ["FAMILY", "UNetFamily", "apply", "get_pruner", "remove"]


