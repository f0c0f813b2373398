"""The runtime's step loop: :class:`~tokprune.pruning.sampler.TokenPruner` with pooled caches.

The runtime reuses pruning's one step loop through its public hooks only: the constructor (an
``executor`` that runs the bucket engines, the exported ``config`` and ``family``) and
:meth:`~tokprune.pruning.sampler.TokenPruner.allocate_caches`, overridden here to hand every run of
a view the same cache tensors (no per-run allocation; stable addresses for CUDA graphs).
"""

from __future__ import annotations

from typing import Any

import torch
from tokprune.pruning.sampler import TokenPruner

__all__ = ["PooledCachePruner"]


class PooledCachePruner(TokenPruner):
    """TokenPruner whose caches come from a per-view pool in the engines' dtype (no per-run allocation).

    Step 0 of every schedule is dense and rewrites every cache row, so pooled caches are not zeroed.
    """

    def __init__(self, *args: Any, cache_dtype: torch.dtype, use_caches: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache_dtype = cache_dtype
        self._use_caches = use_caches
        self._pool: tuple[Any, torch.device, dict[str, torch.Tensor]] | None = None

    def allocate_caches(self, geometry: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if not self._use_caches:
            return {}
        if self._pool is not None and self._pool[0] == geometry and self._pool[1] == device:
            return self._pool[2]
        caches = {
            name: torch.zeros(shape, device=device, dtype=self._cache_dtype)
            for name, shape in geometry.cache_specs(self.reuse).items()
        }
        self._pool = (geometry, device, caches)
        return caches
