"""Fixed schedules users compare against, each solved to a MAC budget.

- :func:`cat_schedule`: CAT Pruning's rule: ``t0`` dense steps, then one fixed image keep count.
- :func:`ras_schedule`: RAS-style: dense first steps, a periodic dense refresh, one fixed keep count.
- :func:`interleaved_schedule`: whole-step reuse: dense warm-up, then dense / reuse alternating.

Every one returns a :class:`~tokprune.pruning.plan.PrunePlan` whose
:func:`~tokprune.pruning.macs.mac_fraction` (what actually runs) is the closest reachable to
``budget`` (within :data:`TOLERANCE`; typically within 0.01), or raises :class:`ConfigError`
saying which budget the structure can reach. They are also the seeds of the calibration search
(:mod:`tokprune.calibrate.search`).

Example::

    from tokprune.calibrate.baselines import cat_schedule, ras_schedule
    plan = cat_schedule(geometry, 28, 0.5, t0=8)         # 8 dense steps, then one K
    plan = ras_schedule(geometry, 28, 0.5, refresh_every=5)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from tokprune.errors import ConfigError
from tokprune.pruning.geometry import Geometry
from tokprune.pruning.macs import mac_fraction
from tokprune.pruning.plan import ALL, PrunePlan

__all__ = [
    "TOLERANCE", "align_up", "cat_schedule", "derive_align", "check_budget", "interleaved_schedule", "keep_levels", "ras_schedule",
    "warmup_steps",
]

TOLERANCE = 0.02  # a schedule's MAC fraction lies within +-TOLERANCE of its budget


def derive_align(num_tokens: int) -> int:
    """Bucket alignment for N image tokens: the largest power of two <= 64 that divides N and
    leaves at least 16 levels (64 at real sizes, N >= 1024; 16 for the tiny N = 256)."""
    if num_tokens < 1:
        raise ConfigError(f"num_tokens = {num_tokens}; expected >= 1")
    a = 64
    while a > 1 and (num_tokens % a or num_tokens // a < 16):
        a //= 2
    return a


def align_up(k: int, align: int, cap: int) -> int:
    """``k`` rounded up to a multiple of ``align``, at most ``cap`` (which need not be aligned)."""
    return min(cap, -(-int(k) // align) * align)


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ConfigError(f"--budget {budget!r} is out of range; expected a fraction of dense MACs in (0, 1], e.g. 0.5")
    return float(budget)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"--steps {steps!r}; expected an int >= 2 (step 0 always runs dense)")
    return steps


def keep_levels(num_tokens: int, align: int) -> list[int]:
    """Every aligned image keep count ``0 < K < N``, ascending."""
    if align < 1:
        raise ConfigError(f"align = {align}; expected >= 1")
    return sorted({align_up(k, align, num_tokens) for k in range(align, num_tokens, align)} - {num_tokens})


def _closest(
    geometry: Geometry, plans: Sequence[PrunePlan], budget: float, reuse: str, refusal: Callable[[float], str]
) -> PrunePlan:
    """The plan whose MAC fraction is closest to ``budget`` (ties: the cheaper one); :class:`ConfigError`
    with ``refusal(closest fraction)`` when even that one is off by more than :data:`TOLERANCE`."""
    scored = [(abs(f - budget), f, p) for p in plans for f in (mac_fraction(geometry, p, reuse),)]
    if not scored:
        raise ConfigError("no candidate schedule")
    gap, f, p = min(scored, key=lambda x: (x[0], x[1]))
    if gap > TOLERANCE + 1e-9:
        raise ConfigError(refusal(f))
    return p


def _fixed_k(
    geometry: Geometry, budget: float, pattern: Sequence[bool], *, align: int, reuse: str, what: str
) -> PrunePlan:
    """Dense where ``pattern`` is True, else one fixed K chosen (binary search) to hit ``budget``."""
    n = geometry.num_tokens
    ks = keep_levels(n, align)
    if not ks:
        raise ConfigError(f"no keep count below N={n} is a multiple of align={align}")

    def plan_of(k: int) -> PrunePlan:
        return PrunePlan(tuple(ALL if d else k for d in pattern))

    lo, hi = 0, len(ks) - 1  # mac_fraction grows with K: find the first K at or above the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if mac_fraction(geometry, plan_of(ks[mid]), reuse) < budget:
            lo = mid + 1
        else:
            hi = mid
    near = [plan_of(ks[i]) for i in {max(0, lo - 1), lo} if 0 <= i < len(ks)]
    return _closest(geometry, near, budget, reuse, lambda frac: (
        f"{what} cannot reach --budget {budget:g} within +-{TOLERANCE:g}: with this warm-up and refresh it spends "
        f"{frac:.3f} of dense MACs at its closest; choose a larger budget or a shorter warm-up"
    ))


def cat_schedule(
    geometry: Geometry,
    steps: int,
    budget: float,
    t0: int | None = None,
    *,
    t0_fraction: float = 8 / 28,
    align: int = 1,
    reuse: str = "noise",
) -> PrunePlan:
    """CAT's fixed schedule: steps ``0..t0-1`` dense, then one image keep K (text never pruned).

    ``t0`` defaults to ``round(t0_fraction * steps)`` (CAT's 8 of 28). If the warm-up alone exceeds
    the budget, t0 shrinks. K is a multiple of ``align`` chosen so the MAC fraction is closest to
    ``budget``.
    """
    budget, steps = check_budget(budget), _check_steps(steps)
    if budget >= 1.0:
        return PrunePlan.dense(steps)
    t0 = round(t0_fraction * steps) if t0 is None else int(t0)
    t0 = min(steps - 1, max(1, t0))
    ks = keep_levels(geometry.num_tokens, align)
    while t0 > 1 and mac_fraction(geometry, PrunePlan((ALL,) * t0 + (ks[0],) * (steps - t0)), reuse) > budget:
        t0 -= 1
    return _fixed_k(geometry, budget, [s < t0 for s in range(steps)], align=align, reuse=reuse, what=f"CAT with t0={t0}")


def ras_schedule(
    geometry: Geometry,
    steps: int,
    budget: float,
    *,
    warmup: int | None = None,
    refresh_every: int = 4,
    align: int = 1,
    reuse: str = "noise",
) -> PrunePlan:
    """RAS-style: ``warmup`` dense steps, then every ``refresh_every``-th step dense, the others one fixed K.

    ``warmup`` defaults to ``round(4/28 * steps)`` (at least 1). When the dense steps alone exceed
    the budget, the warm-up shrinks, then the refresh period grows.
    """
    budget, steps = check_budget(budget), _check_steps(steps)
    if budget >= 1.0:
        return PrunePlan.dense(steps)
    if not isinstance(refresh_every, int) or refresh_every < 2:
        raise ConfigError(f"refresh_every = {refresh_every!r}; expected an int >= 2 (every r-th step dense)")
    w = max(1, round(4 / 28 * steps)) if warmup is None else max(1, min(steps - 1, int(warmup)))
    r = refresh_every

    def pattern(w: int, r: int) -> list[bool]:
        return [s < w or (s - w + 1) % r == 0 for s in range(steps)]

    cheapest = keep_levels(geometry.num_tokens, align)[0]
    while True:
        pat = pattern(w, r)
        floor = mac_fraction(geometry, PrunePlan(tuple(ALL if d else cheapest for d in pat)), reuse)
        if floor <= budget or (w == 1 and r > steps):
            break
        if w > 1:
            w -= 1
        else:
            r += 1
    return _fixed_k(geometry, budget, pattern(w, r), align=align, reuse=reuse, what=f"RAS (warm-up {w}, refresh {r})")


def interleaved_schedule(
    geometry: Geometry,
    steps: int,
    budget: float,
    *,
    period: int = 2,
    reuse: str = "noise",
) -> PrunePlan:
    """Whole-step reuse: ``w`` dense steps, then in every ``period`` steps one dense and the rest reuse
    (aligned so the run ends on a dense step unless ending on reuse lands closer to the budget). ``w``
    is chosen so the MAC fraction is closest to ``budget``; no token is ever pruned.
    """
    budget, steps = check_budget(budget), _check_steps(steps)
    if budget >= 1.0:
        return PrunePlan.dense(steps)
    if not isinstance(period, int) or period < 2:
        raise ConfigError(f"period = {period!r}; expected an int >= 2 (one dense step per period)")
    plans = [  # phase 0 ends the run on a dense step (preferred on ties), the others on reuse
        PrunePlan(tuple(ALL if s < w or (steps - 1 - s + phase) % period == 0 else 0 for s in range(steps)))
        for phase in range(period)
        for w in range(1, steps + 1)
    ]
    return _closest(geometry, plans, budget, reuse, lambda frac: (
        f"dense/reuse interleaving with period {period} cannot reach --budget {budget:g} within +-{TOLERANCE:g} "
        f"(closest {frac:.3f}); choose a budget >= {1 / period:.2f} or a longer period"
    ))


def warmup_steps(fraction: float, steps: int) -> int:
    """``round(fraction * steps)`` clipped to ``[1, steps - 1]`` (a warm-up scaled to the step count)."""
    return min(steps - 1, max(1, int(math.floor(fraction * steps + 0.5))))
