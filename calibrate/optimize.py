"""Budget -> per-step keep counts -> at most ``max_buckets`` static shapes.

Method (exact dynamic programming, then bucket fitting, then an exact re-balance):

1. **Allocation.** Each step's options are: dense (only in the warm-up prefix), a keep pair
   ``(K, K_txt)`` from the probed grids, or reuse (K = 0, no call). Its cost is
   ``step_macs / dense_macs`` (:mod:`tokprune.pruning.macs`) discretised upward to 1/1000 of a
   dense step; its error is the profile's measured error, ``image_err(K) + text_err(K_txt)``,
   times the step's weight. A backward DP over steps finds, for every total cost, the minimum
   summed error of the steps after the warm-up; every warm-up length ``w`` (steps ``0..w-1``
   dense, step 0 always) is tried, and the best ``(w, cost)`` with cost in ``[B - tol, B]``
   (else ``(B, B + tol]``) wins. Exact for the additive error model, deterministic (ties go to
   the first option / shortest warm-up).
2. **Buckets.** The pruned steps' keep pairs, sorted, are cut into at most ``max_buckets - 1``
   contiguous groups (the dense bucket takes one slot) minimising the MACs added by rounding
   every member up to its group's maximum, aligned (:func:`~tokprune.calibrate.profile.derive_align`).
3. **Re-balance.** Step 1 runs again with only those buckets (plus dense warm-up and reuse) as
   options, which lowers some steps' buckets or turns them into reuse steps so the achieved MAC
   fraction is back within ``tol`` of B. Bucket sets fitted from allocations at slightly lower
   budgets and with fewer buckets are tried too; the lowest-error one within tolerance wins.

Budget 1.0 yields the all-dense schedule. :func:`cat_schedule` is the CAT reference (dense up
to t0, then one fixed keep count) at the same budget, for comparison.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tokprune.calibrate.profile import ErrorProfile, align_up, derive_align
from tokprune.errors import ConfigError
from tokprune.pruning.geometry import Geometry
from tokprune.pruning.macs import dense_macs, step_macs
from tokprune.pruning.plan import ALL, PrunePlan

logger = logging.getLogger(__name__)

__all__ = ["Allocation", "allocate", "cat_schedule", "fit_buckets", "optimize_schedule"]

UNITS = 1000  # cost resolution: units per dense step
TOLERANCE = 0.02  # achieved MAC fraction within +-TOLERANCE of the budget


@dataclass(frozen=True)
class Allocation:
    """Concrete per-step keep counts: ``image_keep[s]`` in {N (dense), 0 (reuse), 0 < K < N},
    ``text_keep[s]`` in [1, T] (T on dense and reuse steps)."""

    num_tokens: int
    text_tokens: int
    image_keep: tuple[int, ...]
    text_keep: tuple[int, ...]
    mac_fraction: float  # exact, from tokprune.pruning.macs
    error: float  # estimated: mean over steps of the weighted measured error

    @property
    def steps(self) -> int:
        return len(self.image_keep)

    @property
    def warmup(self) -> int:
        """Leading dense steps."""
        w = 0
        while w < self.steps and self.is_dense(w):
            w += 1
        return w

    def is_dense(self, step: int) -> bool:
        return self.image_keep[step] == self.num_tokens and self.text_keep[step] == self.text_tokens

    def buckets(self) -> tuple[tuple[int, int], ...]:
        """Distinct (image_keep, text_keep) of steps that call the transformer, descending."""
        return tuple(sorted({(k, t) for k, t in zip(self.image_keep, self.text_keep) if k > 0}, reverse=True))

    def to_plan(self) -> PrunePlan:
        image = tuple(ALL if k == self.num_tokens else k for k in self.image_keep)
        text = tuple(ALL if t == self.text_tokens else t for t in self.text_keep)
        prunes_text = any(t != ALL for k, t in zip(image, text) if k != 0)
        if not prunes_text:
            return PrunePlan(image_keep=image)
        return PrunePlan(image_keep=image, text_keep=tuple(ALL if k == 0 else t for k, t in zip(image, text)))


# ---- helpers ---------------------------------------------------------------------------------
def _check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ConfigError(f"--budget {budget!r} is out of range; expected a fraction of dense MACs in (0, 1], e.g. 0.5")
    return float(budget)


def _fraction(geometry: Geometry, image_keep: Sequence[int], text_keep: Sequence[int], reuse: str) -> float:
    total = sum(step_macs(geometry, k, t, reuse) if k > 0 else 0 for k, t in zip(image_keep, text_keep))
    return total / (len(image_keep) * dense_macs(geometry))


@dataclass(frozen=True)
class _Option:
    image_keep: int
    text_keep: int
    cost: int  # units (1/UNITS of a dense step), rounded up


def _options(geometry: Geometry, pairs: Sequence[tuple[int, int]], reuse: str) -> list[_Option]:
    """Non-dense options (reuse first) with their costs; errors depend on the step (:func:`_option_error`)."""
    dense = dense_macs(geometry)
    out = [_Option(0, geometry.text_tokens, 0)]
    for k, t in pairs:
        if k == geometry.num_tokens and t == geometry.text_tokens:
            continue
        cost = math.ceil(step_macs(geometry, k, t, reuse) * UNITS / dense - 1e-9)
        out.append(_Option(k, t, cost))
    return out


def _option_error(profile: ErrorProfile, step: int, opt: _Option) -> float:
    if opt.image_keep == 0:
        e = profile.reuse_error[step]
    else:
        e = profile.image_err(step, opt.image_keep) + profile.text_err(step, opt.text_keep)
    return e * profile.step_weight[step]


@dataclass(frozen=True)
class _Table:
    """Backward DP over the steps after step 0: ``f[s][c]`` = min summed error of steps ``s..S-1``
    (non-dense options) with total cost exactly ``c`` units; ``choice[s][c]`` = the option taken at s."""

    f: np.ndarray  # (S + 1, hi + 1)
    choice: np.ndarray  # (S, hi + 1) int16
    options: tuple[_Option, ...]


def _table(profile: ErrorProfile, options: Sequence[_Option], hi: int) -> _Table:
    s_total = profile.steps
    f = np.full((s_total + 1, hi + 1), np.inf)
    f[s_total, 0] = 0.0
    choice = np.zeros((s_total, hi + 1), dtype=np.int16)
    cand = np.empty(hi + 1)
    for s in range(s_total - 1, 0, -1):  # step 0 is always dense
        nxt, cur, ch = f[s + 1], f[s], choice[s]
        for i, opt in enumerate(options):
            err = _option_error(profile, s, opt)
            if not math.isfinite(err) or opt.cost > hi:
                continue
            cand.fill(np.inf)
            cand[opt.cost :] = nxt[: hi + 1 - opt.cost] + err
            better = cand < cur
            cur[better] = cand[better]
            ch[better] = i
    return _Table(f, choice, tuple(options))


def _pick(
    geometry: Geometry, profile: ErrorProfile, table: _Table, budget: float, tol: float, reuse: str
) -> Allocation | None:
    """Best warm-up length and total cost within the band (module docstring, step 1). None if unreachable."""
    s_total, n, t = profile.steps, geometry.num_tokens, geometry.text_tokens
    f = table.f
    hi = min(f.shape[1] - 1, math.floor((budget + tol) * s_total * UNITS + 1e-9))
    lo_band = math.ceil((budget - tol) * s_total * UNITS - 1e-9)
    cap = math.floor(budget * s_total * UNITS + 1e-9)
    best = None  # ((rank, error, w), w, c)
    for w in range(1, s_total + 1):
        base = w * UNITS
        if base > hi:
            break
        row = f[w]
        for lo, up, rank in ((max(lo_band, base), min(cap, hi), 0), (max(cap + 1, lo_band, base), hi, 1)):
            if lo > up:
                continue
            seg = row[lo - base : up - base + 1]
            if not np.isfinite(seg).any():
                continue
            j = int(np.argmin(seg))
            key = (rank, float(seg[j]), w)
            if best is None or key < best[0]:
                best = (key, w, lo + j - base)
    if best is None:
        return None
    _, w, c = best
    image, text = [n] * s_total, [t] * s_total
    for s in range(w, s_total):
        opt = table.options[int(table.choice[s, c])]
        image[s], text[s] = opt.image_keep, opt.text_keep
        c -= opt.cost
    assert c == 0, "DP reconstruction did not end at cost 0"
    err = sum(_option_error(profile, s, _Option(image[s], text[s], 0)) for s in range(w, s_total)) / s_total
    return Allocation(n, t, tuple(image), tuple(text), _fraction(geometry, image, text, reuse), err)


def _solve(
    geometry: Geometry, profile: ErrorProfile, options: Sequence[_Option], budget: float, tol: float, reuse: str
) -> Allocation | None:
    hi = math.floor((budget + tol) * profile.steps * UNITS + 1e-9)
    return _pick(geometry, profile, _table(profile, options, hi), budget, tol, reuse)


def _dense_allocation(geometry: Geometry, steps: int) -> Allocation:
    n, t = geometry.num_tokens, geometry.text_tokens
    return Allocation(n, t, (n,) * steps, (t,) * steps, 1.0, 0.0)


# ---- public ------------------------------------------------------------------------------------
def allocate(
    geometry: Geometry,
    profile: ErrorProfile,
    budget: float,
    *,
    reuse: str = "noise",
    prune_text: bool = True,
    tol: float = TOLERANCE,
) -> Allocation:
    """Step 1 alone: the error-minimal free allocation over the profile's grids (no bucket limit)."""
    budget = _check_budget(budget)
    _check_profile(geometry, profile)
    if budget >= 1.0:
        return _dense_allocation(geometry, profile.steps)
    alloc = _pick(geometry, profile, _free_table(geometry, profile, budget, reuse, prune_text, tol), budget, tol, reuse)
    if alloc is None:
        raise _infeasible(budget, profile.steps, None, tol)
    return alloc


def _free_table(
    geometry: Geometry, profile: ErrorProfile, budget: float, reuse: str, prune_text: bool, tol: float
) -> _Table:
    """The DP table over every grid keep pair, up to ``budget + tol`` (serves any lower budget too)."""
    texts = [*profile.text_grid, geometry.text_tokens] if prune_text else [geometry.text_tokens]
    pairs = [(k, tk) for k in [*profile.image_grid, geometry.num_tokens] for tk in texts]
    hi = math.floor((budget + tol) * profile.steps * UNITS + 1e-9)
    return _table(profile, _options(geometry, pairs, reuse), hi)


def fit_buckets(
    alloc: Allocation, max_pruned: int, align: int, geometry: Geometry, *, reuse: str = "noise"
) -> tuple[tuple[int, int], ...]:
    """Step 2: at most ``max_pruned`` aligned (image_keep, text_keep) buckets covering the pruned steps.

    Contiguous groups of the sorted keep pairs, each rounded up to its maximum (aligned), chosen by
    DP to minimise the MACs rounding adds. Buckets that round up to dense are dropped.
    """
    n, t = geometry.num_tokens, geometry.text_tokens
    pts = sorted((k, tk) for k, tk in zip(alloc.image_keep, alloc.text_keep) if k > 0 and not (k == n and tk == t))
    if not pts or max_pruned < 1:
        return ()

    def bucket(i: int, j: int) -> tuple[int, int]:  # group pts[i..j]
        return (
            align_up(max(p[0] for p in pts[i : j + 1]), align, n),
            align_up(max(p[1] for p in pts[i : j + 1]), align, t),
        )

    macs = {p: step_macs(geometry, p[0], p[1], reuse) for p in set(pts)}

    def group_cost(i: int, j: int) -> int:
        b = bucket(i, j)
        mb = step_macs(geometry, b[0], b[1], reuse)
        return sum(mb - macs[p] for p in pts[i : j + 1])

    m = len(pts)
    inf = float("inf")
    # best[g][j]: min added MACs covering pts[:j] with g groups
    best = [[inf] * (m + 1) for _ in range(max_pruned + 1)]
    cut = [[0] * (m + 1) for _ in range(max_pruned + 1)]
    best[0][0] = 0
    for g in range(1, max_pruned + 1):
        for j in range(1, m + 1):
            for i in range(j):
                if best[g - 1][i] == inf:
                    continue
                v = best[g - 1][i] + group_cost(i, j - 1)
                if v < best[g][j]:
                    best[g][j], cut[g][j] = v, i
    g = min(range(1, max_pruned + 1), key=lambda gg: (best[gg][m], gg))
    out, j = [], m
    while g > 0 and j > 0:
        i = cut[g][j]
        out.append(bucket(i, j - 1))
        j, g = i, g - 1
    return tuple(sorted({b for b in out if b != (n, t)}, reverse=True))


def optimize_schedule(
    geometry: Geometry,
    profile: ErrorProfile,
    budget: float,
    *,
    max_buckets: int = 4,
    align: int | None = None,
    reuse: str = "noise",
    prune_text: bool = True,
    tol: float = TOLERANCE,
) -> Allocation:
    """Budget -> allocation using at most ``max_buckets`` static shapes, the dense one included.

    Example::

        alloc = optimize_schedule(geometry, profile, 0.5, max_buckets=4)
        alloc.mac_fraction   # within 0.02 of 0.5
        alloc.buckets()      # <= 4 (image_keep, text_keep) pairs, the dense one first
    """
    budget = _check_budget(budget)
    if not isinstance(max_buckets, int) or isinstance(max_buckets, bool) or max_buckets < 1:
        raise ConfigError(f"--max-buckets {max_buckets!r}; expected an int >= 1 (the dense bucket takes one)")
    _check_profile(geometry, profile)
    if budget >= 1.0:
        return _dense_allocation(geometry, profile.steps)
    align = derive_align(geometry.num_tokens) if align is None else int(align)
    if align < 1:
        raise ConfigError(f"align = {align}; expected >= 1")
    max_pruned = max_buckets - 1
    candidates: list[tuple[tuple[int, int], ...]] = [()]  # dense + reuse only
    if max_pruned > 0:
        table = _free_table(geometry, profile, budget, reuse, prune_text, tol)
        for shrink in (0.0, 0.03, 0.06, 0.1, 0.15, 0.25):  # rounding up to buckets costs MACs: start lower too
            free = _pick(geometry, profile, table, max(budget - shrink, 1.0 / profile.steps), tol, reuse)
            if free is None:
                continue
            for count in range(1, max_pruned + 1):
                fitted = fit_buckets(free, count, align, geometry, reuse=reuse)
                if fitted and fitted not in candidates:
                    candidates.append(fitted)
    best: Allocation | None = None
    for buckets in candidates:
        alloc = _solve(geometry, profile, _options(geometry, buckets, reuse), budget, tol, reuse)
        if alloc is None or abs(alloc.mac_fraction - budget) > tol + 1e-9:
            continue
        key = (alloc.mac_fraction > budget + 1e-9, alloc.error)
        if best is None or key < (best.mac_fraction > budget + 1e-9, best.error):
            best = alloc
    if best is None:
        raise _infeasible(budget, profile.steps, max_buckets, tol)
    assert len(best.buckets()) <= max_buckets
    return best


def cat_schedule(
    geometry: Geometry, steps: int, budget: float, t0_fraction: float = 8 / 28, *, align: int = 1, reuse: str = "noise"
) -> PrunePlan:
    """The CAT reference: steps ``0..t0-1`` dense (t0 = round(t0_fraction * steps), at least 1),
    then one fixed image keep K (text never pruned), K a multiple of ``align`` chosen so the MAC
    fraction is closest to ``budget``. If the warm-up alone exceeds the budget, t0 shrinks.

    Example::

        plan = cat_schedule(geometry, 28, 0.55)   # 8 dense steps, then a constant K
    """
    budget = _check_budget(budget)
    if steps < 2:
        raise ConfigError(f"steps = {steps}; expected >= 2")
    n = geometry.num_tokens
    if budget >= 1.0:
        return PrunePlan.dense(steps)
    dense = dense_macs(geometry)
    ks = sorted({align_up(k, align, n) for k in range(align, n, align)} - {n})
    if not ks:
        raise ConfigError(f"no keep count below N={n} is a multiple of align={align}")
    t0 = min(steps - 1, max(1, round(t0_fraction * steps)))
    while t0 > 1 and (t0 + (steps - t0) * step_macs(geometry, ks[0], None, reuse) / dense) / steps > budget:
        t0 -= 1
    frac = {k: (t0 + (steps - t0) * step_macs(geometry, k, None, reuse) / dense) / steps for k in ks}
    k = min(ks, key=lambda kk: (abs(frac[kk] - budget), kk))
    return PrunePlan(image_keep=(ALL,) * t0 + (k,) * (steps - t0))


def estimate_error(profile: ErrorProfile, plan: PrunePlan) -> float:
    """The profile's error model applied to any plan (mean over steps of the weighted step error)."""
    n, t = profile.num_tokens, profile.text_tokens
    total = 0.0
    for s in range(plan.num_steps):
        k, tk = plan.image_k(s, n), plan.text_k(s, t)
        if k == n and tk == t:
            continue
        total += _option_error(profile, s, _Option(k, tk, 0))
    return total / plan.num_steps


def _check_profile(geometry: Geometry, profile: ErrorProfile) -> None:
    if profile.num_tokens != geometry.num_tokens or profile.text_tokens != geometry.text_tokens:
        raise ConfigError(
            f"profile was measured with N={profile.num_tokens}, T={profile.text_tokens}; the geometry has "
            f"N={geometry.num_tokens}, T={geometry.text_tokens}"
        )
    if profile.steps < 2:
        raise ConfigError(f"steps = {profile.steps}; calibration needs >= 2 steps (step 0 is always dense)")


def _infeasible(budget: float, steps: int, max_buckets: int | None, tol: float) -> ConfigError:
    more = f" or --max-buckets above {max_buckets}" if max_buckets is not None else ""
    limit = "" if max_buckets is None else f" and {max_buckets} buckets"
    return ConfigError(
        f"--budget {budget:g} cannot be met within +-{tol:g} with {steps} steps{limit} "
        f"(step 0 is always dense, i.e. at least {1 / steps:.3f} of dense MACs); choose a larger budget, "
        f"more --steps{more}"
    )
