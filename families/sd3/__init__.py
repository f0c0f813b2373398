"""Stable Diffusion 3 / 3.5: the MMDiT family (``SD3Transformer2DModel`` in ``StableDiffusion3Pipeline``).

The pruned forward, geometry and MAC counter are :mod:`tokprune.pruning.forward`,
:mod:`tokprune.pruning.geometry` and :mod:`tokprune.pruning.macs` (the reference family the generic
machinery was first written for); this module adapts them to :class:`~tokprune.pruning.family.ModelFamily`
and adds what the sampling loop needs (prompt encoding, latents, timesteps).
"""

from tokprune.families.sd3.family import SD3Family

FAMILY = SD3Family()

__all__ = ["FAMILY", "SD3Family"]
