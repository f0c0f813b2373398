"""PixArt-Σ: the DiT family with ada-norm-single blocks and T5 cross-attention
(``PixArtTransformer2DModel`` in ``PixArtSigmaPipeline``).

- :mod:`.geometry`: :class:`PixArtGeometry`, the shapes of one call (caches, per-prompt text K/V);
- :mod:`.forward`: the pruned forward (exact at keep-all against diffusers), the per-prompt text stage;
- :mod:`.macs`: MAC counts per keep bucket;
- :mod:`.models`: ``pixart-tiny`` / ``pixart-medium`` offline pipelines and the ``pixart-sigma`` hub alias;
- :mod:`.family`: :class:`PixArtFamily`, the :class:`~tokprune.pruning.family.ModelFamily` adapter;
- :mod:`.pipeline_hooks`: makes a ``PixArtSigmaPipeline`` report each call's CFG scale and T5 EOS mask.

Registered through the ``tokprune.families`` entry-point group as ``pixart-sigma = tokprune.families.pixart:FAMILY``.
"""

from tokprune.families.pixart.family import PixArtFamily

FAMILY = PixArtFamily()

__all__ = ["FAMILY", "PixArtFamily"]
