"""Token machinery: selection policies and the pruned MMDiT forward.

Two verbs, idempotent: :func:`apply` installs the pruned forward on a transformer or pipeline,
:func:`remove` restores the original module bit for bit. The maths lives in
:mod:`~tokprune.pruning.forward` (pure, shared with export) and
:mod:`~tokprune.pruning.policies` (scores in, K indices out; no diffusers import).
"""

from tokprune.pruning.forward import StepOutput, patchify, pruned_forward, unpatchify
from tokprune.pruning.geometry import REUSE_MODES, Geometry
from tokprune.pruning.plan import ALL, PrunePlan
from tokprune.pruning.sampler import TokenPruner, apply, get_pruner, remove

__all__ = [
    "ALL",
    "REUSE_MODES",
    "Geometry",
    "PrunePlan",
    "StepOutput",
    "TokenPruner",
    "apply",
    "get_pruner",
    "patchify",
    "pruned_forward",
    "remove",
    "unpatchify",
]
