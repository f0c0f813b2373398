"""A DaTo + DeepCache plan solved to a MAC budget (a fixed structure, no measured search).

Structure: ``warmup`` dense full steps, then every step keeps K tokens of the pruned level, and every
``cache_interval``-th step after the warm-up is a full step (the others are DeepCache steps; interval 1
= no caching). K is the largest multiple of ``align`` (>= ``geometry.min_keep``, one base token per 2x2
window) whose plan spends at most ``budget`` of a dense run; the MAC fraction grows with K, so it is
found by bisection. Not measured: the benchmarks' fixed structure. ``tokprune.calibrate`` measures
U-Net schedules (DaTo keep counts, DeepCache interval, text pruning, whole-step reuse) as for every family;
``baseline_schedule(pipe, "cache", ...)`` is this structure's generic counterpart.

Example::

    from tokprune.families.unet.schedule import budget_plan
    plan = budget_plan(geometry, steps=8, budget=0.5, cache_interval=3)   # D | K, 2 of 3 steps cached
"""

from __future__ import annotations

from tokprune.errors import ConfigError
from tokprune.families.unet.geometry import UNetGeometry
from tokprune.families.unet.macs import mac_fraction
from tokprune.pruning.plan import ALL, PrunePlan


def _plan(steps: int, warmup: int, interval: int, keep: int, n: int) -> PrunePlan:
    image = tuple(ALL if s < warmup or keep >= n else keep for s in range(steps))
    cache = tuple(s >= warmup and (s - warmup) % interval != 0 for s in range(steps))
    return PrunePlan(image, step_cache=cache if any(cache) else None)


def budget_plan(geometry: UNetGeometry, *, steps: int, budget: float, warmup: int = 1, cache_interval: int = 2,
                align: int = 64) -> PrunePlan:  # fmt: skip
    """The plan of this structure with the largest MAC fraction <= ``budget`` (module docstring).

    Raises :class:`ConfigError` when even K = ``min_keep`` spends more than ``budget`` (lower the warm-up,
    raise ``cache_interval``) or the arguments are out of range.
    """
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"budget={budget}; expected a fraction in (0, 1]")
    if not 0 < warmup <= steps or cache_interval < 1:
        raise ConfigError(f"warmup={warmup}, cache_interval={cache_interval}; expected 1 <= warmup <= steps, interval >= 1")
    n, lo = geometry.num_tokens, geometry.min_keep
    if budget >= 1.0:
        return PrunePlan.dense(steps)

    def frac(k: int) -> float:
        return mac_fraction(geometry, _plan(steps, warmup, cache_interval, k, n))

    if frac(lo) > budget + 1e-9:
        raise ConfigError(
            f"budget {budget} is below what this structure can reach ({frac(lo):.3f} at K={lo}, the 2x2-window "
            f"floor); use fewer warm-up steps (warmup={warmup}) or a longer cache_interval ({cache_interval})"
        )
    ks = sorted({min(n, max(lo, -(-k // align) * align)) for k in range(lo, n + 1, align)} | {lo, n})
    best = lo
    left, right = 0, len(ks) - 1
    while left <= right:  # largest K whose fraction stays within the budget
        mid = (left + right) // 2
        if frac(ks[mid]) <= budget + 1e-9:
            best, left = ks[mid], mid + 1
        else:
            right = mid - 1
    return _plan(steps, warmup, cache_interval, best, n)
