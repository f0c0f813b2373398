"""Model families: one folder each, behind :class:`tokprune.pruning.family.ModelFamily`.

- ``sd3``: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel`` in ``StableDiffusion3Pipeline``).

A family module exposes ``FAMILY`` and is registered in ``pyproject.toml``'s ``tokprune.families``
entry-point group; :func:`get_family` / :func:`family_for` find it without this package importing it.
"""

from tokprune.pruning.family import (
    CallSettings,
    DenoiserCall,
    ModelFamily,
    all_families,
    family_for,
    get_family,
    register_family,
)

__all__ = ["CallSettings", "DenoiserCall", "ModelFamily", "all_families", "family_for", "get_family", "register_family"]
