"""The calibration search: schedules judged by measured whole runs, improved by measured moves.

A schedule is described by a small :class:`Structure` (dense warm-up, periodic dense refresh,
interleaved reuse, a keep-count profile over the pruned steps, text pruning); :func:`realize`
turns a structure into a concrete :class:`~tokprune.pruning.plan.PrunePlan` whose MAC fraction
(everything that runs, the text-importance probe included) is the closest reachable to the
budget, with at most ``max_buckets`` static shapes. So every candidate is budget-feasible by
construction and the search only decides *how* to spend the budget.

:func:`search`:

1. **Seeds**, each measured: CAT's fixed schedule at several warm-ups t0 (4, 6, 8, 10 of 28),
   RAS-style periodic dense refresh, dense/reuse interleaving, some reuse between pruned steps,
   a falling keep profile and text pruning (when allowed): 9 runs; for families with step caching
   (U-Nets' DeepCache) also caching every 2nd and 3rd pruned step. Keep counts never go below the
   geometry's ``min_keep`` (U-Nets: one base token per 2x2 window).
2. **Measured moves** from the best: change one structural knob (warm-up +-1/+-2, refresh
   period, reuse spacing, keep profile, text fraction, caching interval), measure every feasible neighbour, move to
   the best if it is better, until no neighbour improves or the rollout budget is spent.
3. The pick is the best *measured* candidate; the caller validates it on held-out prompts.

The measurement is a callable ``plan -> error`` (e.g. :meth:`Rollouts.error`), so this module is
pure bookkeeping and is tested with synthetic objectives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from tokprune.calibrate.baselines import TOLERANCE, align_up, warmup_steps
from tokprune.errors import ConfigError
from tokprune.pruning.geometry import Geometry
from tokprune.pruning.macs import mac_fraction
from tokprune.pruning.plan import ALL, PrunePlan

logger = logging.getLogger(__name__)

__all__ = ["SHAPES", "Candidate", "SearchResult", "Structure", "describe", "realize", "search", "seeds"]

#: Keep-count multipliers over the pruned steps (first, middle, last third).
SHAPES: dict[str, tuple[float, ...]] = {"flat": (1.0,), "down": (1.3, 1.0, 0.7), "up": (0.7, 1.0, 1.3)}
TEXT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
REFRESH_CHOICES = (0, 2, 3, 4, 5, 6, 8)
REUSE_CHOICES = (0, 2, 3, 4)
#: Step-caching intervals (families with step caching, e.g. DeepCache on U-Nets): among the pruned steps
#: every ``c``-th runs full, the others are cached steps (0 = no caching).
CACHE_CHOICES = (0, 2, 3, 4)
TEXT_ALIGN = 8


@dataclass(frozen=True)
class Structure:
    """How a schedule spends its budget (the knobs the search moves).

    ``warmup``: leading dense steps. ``refresh``: after the warm-up, every ``refresh``-th step is
    dense (0 = never; RAS-style). ``reuse_every``: among the other steps every ``u``-th reuses the
    previous prediction (0 = never, 1 = all of them: dense/reuse interleaving). ``shape``: keep
    profile of the pruned steps (:data:`SHAPES`). ``text``: fraction of text tokens kept on pruned
    steps (1.0 = text never pruned). ``cache``: step-caching interval among the pruned steps (every
    ``cache``-th runs full, the others are cached steps; 0 = none; families with step caching only).
    """

    warmup: int
    refresh: int = 0
    reuse_every: int = 0
    shape: str = "flat"
    text: float = 1.0
    cache: int = 0

    @property
    def key(self) -> str:
        base = f"w{self.warmup}-r{self.refresh}-u{self.reuse_every}-{self.shape}-t{self.text:g}"
        return base + (f"-c{self.cache}" if self.cache else "")


@dataclass(frozen=True)
class Candidate:
    structure: Structure
    plan: PrunePlan
    mac_fraction: float
    error: float
    origin: str  # "seed:<name>" or "move:<knob>"


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    rollouts: int = 0  # measurements requested (cached or not)

    def to_stats(self) -> dict:
        """JSON-native record: every distinct measured plan (first structure that produced it), best first."""
        seen, rows = set(), []
        for c in sorted(self.candidates, key=lambda c: (c.error, c.mac_fraction)):
            if c.plan in seen:
                continue
            seen.add(c.plan)
            rows.append({"structure": c.structure.key, "origin": c.origin, "mac_fraction": round(c.mac_fraction, 6),
                         "error": c.error, "plan": describe(c.plan)})
        return {"rollouts": self.rollouts, "best": self.best.structure.key, "candidates": rows}


def describe(plan: PrunePlan) -> str:
    """Compact run-length form of a plan: ``D x8 | 256 x20`` (D dense, R reuse, K[/t text], a trailing
    ``c`` for a cached step: ``256c``, ``Nc``)."""
    parts: list[tuple[str, int]] = []
    for s in range(plan.num_steps):
        k = plan.image_keep[s]
        t = None if plan.text_keep is None else plan.text_keep[s]
        dense = k == ALL and (t is None or t == ALL) and not plan.is_cached(s)
        tok = "D" if dense else "R" if k == 0 else ("N" if k == ALL else str(k))
        if t not in (None, ALL) and k != 0:
            tok += f"/{t}"
        if plan.is_cached(s):
            tok += "c"
        if parts and parts[-1][0] == tok:
            parts[-1] = (tok, parts[-1][1] + 1)
        else:
            parts.append((tok, 1))
    return " | ".join(f"{tok} x{n}" for tok, n in parts)


# ---- structure -> plan ---------------------------------------------------------------------------
def _pattern(st: Structure, steps: int) -> list[str] | None:
    """Per step 'D' (dense), 'R' (reuse), 'P' (pruned) or 'C' (cached: pruned, only the outer blocks run);
    None when the structure does not fit."""
    if not 1 <= st.warmup < steps:
        return None
    kinds, j, p = [], 0, 0
    for s in range(steps):
        if s < st.warmup or (st.refresh and (s - st.warmup + 1) % st.refresh == 0):
            kinds.append("D")
            continue
        if st.reuse_every == 1 or (st.reuse_every >= 2 and j % st.reuse_every == st.reuse_every - 1):
            kinds.append("R")
        else:
            kinds.append("C" if st.cache >= 2 and p % st.cache else "P")
            p += 1
        j += 1
    return kinds


def _levels(shape: str, max_pruned: int) -> tuple[float, ...]:
    lv = SHAPES[shape]
    if len(lv) <= max_pruned:
        return lv
    if max_pruned == 1:
        return (1.0,)
    return (lv[0], lv[-1])  # two buckets: first and last level


def _plan_at(
    kinds: list[str], rho: float, levels: tuple[float, ...], n: int, align: int, k_txt: int | None,
    floor: int = 1,
) -> PrunePlan:
    pruned = [s for s, k in enumerate(kinds) if k in "PC"]
    image, text = [], []
    cached = tuple(k == "C" for k in kinds)
    for s, kind in enumerate(kinds):
        if kind == "D":
            image.append(ALL)
            text.append(ALL)
        elif kind == "R":
            image.append(0)
            text.append(ALL)
        else:
            seg = min(len(levels) - 1, pruned.index(s) * len(levels) // max(1, len(pruned)))
            k = align_up(max(floor, math.ceil(rho * levels[seg] * n)), align, n)
            image.append(ALL if k >= n else k)  # K = N with text pruned is a text-only pruned step
            text.append(ALL if k_txt is None else k_txt)
    step_cache = cached if any(cached) else None
    if k_txt is None:
        return PrunePlan(tuple(image), step_cache=step_cache)
    return PrunePlan(tuple(image), text_keep=tuple(text), step_cache=step_cache)


def realize(
    st: Structure,
    geometry: Geometry,
    steps: int,
    budget: float,
    *,
    align: int,
    max_buckets: int,
    reuse: str = "noise",
    tol: float = TOLERANCE,
) -> PrunePlan | None:
    """The plan of ``st`` whose MAC fraction is closest to ``budget`` (None if none within ``tol``).

    The pruned steps' keep counts are ``ceil(rho * level * N)`` aligned, with one scale ``rho``
    found by bisection (the MAC fraction grows with rho), never below the geometry's ``min_keep``
    (U-Nets: one base token per 2x2 window); text keeps ``text * T`` (aligned to 8).
    """
    kinds = _pattern(st, steps)
    if kinds is None or max_buckets < 1:
        return None
    n, t = geometry.num_tokens, geometry.text_tokens
    floor = max(1, int(getattr(geometry, "min_keep", 1)))
    k_txt = None
    if st.text < 1.0:
        k_txt = align_up(max(1, math.ceil(st.text * t)), TEXT_ALIGN, t)
        if k_txt >= t:
            k_txt = None
    levels = _levels(st.shape, max(1, max_buckets - 1))
    if "P" not in kinds and "C" not in kinds:
        plan = _plan_at(kinds, 0.0, levels, n, align, None)
        best = [plan]
    else:
        if max_buckets < 2:
            return None
        lo, hi = 0.0, 1.0 / min(levels)
        best = []
        for _ in range(20):  # K is discrete (aligned): 20 halvings resolve it
            mid = (lo + hi) / 2
            plan = _plan_at(kinds, mid, levels, n, align, k_txt, floor)
            f = mac_fraction(geometry, plan, reuse)
            best.append(plan)
            if f < budget:
                lo = mid
            else:
                hi = mid
        best += [_plan_at(kinds, lo, levels, n, align, k_txt, floor), _plan_at(kinds, hi, levels, n, align, k_txt, floor)]
    scored = sorted(
        {p: abs(mac_fraction(geometry, p, reuse) - budget) for p in best}.items(), key=lambda x: (x[1], x[0].image_keep)
    )
    plan, gap = scored[0]
    if gap > tol + 1e-9 or _bucket_count(plan) > max_buckets:
        return None
    return plan


def _bucket_count(plan: PrunePlan) -> int:
    keys = {
        (plan.image_keep[s], None if plan.text_keep is None else plan.text_keep[s], plan.is_cached(s))
        for s in range(plan.num_steps)
        if plan.image_keep[s] != 0
    }
    dense = {(ALL, None, False), (ALL, ALL, False)}
    return len(keys - dense) + 1  # the dense bucket is always exported


# ---- seeds and moves ------------------------------------------------------------------------------
def seeds(steps: int, *, allow_reuse: bool = True, prune_text: bool = True,
          step_cache: bool = False) -> list[tuple[str, Structure]]:
    """The starting structures (named), deduplicated. ``step_cache``: add step-caching seeds (DeepCache
    every 2nd and 3rd pruned step; families with step caching)."""
    w = lambda n: warmup_steps(n / 28, steps)  # noqa: E731 - a warm-up given for 28 steps, scaled
    out: list[tuple[str, Structure]] = [(f"cat-t0={n}", Structure(w(n))) for n in (4, 6, 8, 10)]
    out += [("ras-refresh=4", Structure(w(4), refresh=4))]
    out += [("cat-down", Structure(w(8), shape="down"))]
    if allow_reuse:
        out += [("interleaved-2", Structure(w(8), refresh=2, reuse_every=1)),
                ("cat-reuse-3", Structure(w(6), reuse_every=3))]
    if prune_text:
        out += [("cat-text-0.5", Structure(w(8), text=0.5))]
    if step_cache:
        out += [("cache-2", Structure(w(4), cache=2)), ("cache-3", Structure(w(4), cache=3))]
    seen, uniq = set(), []
    for name, st in out:
        if st not in seen:
            seen.add(st)
            uniq.append((name, st))
    return uniq


def _adjacent(values: tuple, current) -> list:
    if current not in values:
        return [v for v in values if v != current][:2]
    i = values.index(current)
    return [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]


def neighbours(st: Structure, steps: int, *, allow_reuse: bool, prune_text: bool,
               step_cache: bool = False) -> list[tuple[str, Structure]]:
    """Structures one knob away from ``st`` (``step_cache``: the caching interval is a knob too)."""
    out = [(f"warmup{d:+d}", replace(st, warmup=st.warmup + d)) for d in (-2, -1, 1, 2) if 1 <= st.warmup + d < steps]
    out += [("refresh", replace(st, refresh=r)) for r in _adjacent(REFRESH_CHOICES, st.refresh)]
    if allow_reuse:
        if st.reuse_every == 1:  # interleaving: try pruning between the dense steps instead
            out.append(("reuse", replace(st, reuse_every=0)))
        else:
            out += [("reuse", replace(st, reuse_every=u)) for u in _adjacent(REUSE_CHOICES, st.reuse_every)]
    out += [("shape", replace(st, shape=s)) for s in SHAPES if s != st.shape]
    if prune_text:
        out += [("text", replace(st, text=t)) for t in _adjacent(TEXT_FRACTIONS, st.text)]
    if step_cache:
        out += [("cache", replace(st, cache=c)) for c in _adjacent(CACHE_CHOICES, st.cache)]
    return out


def search(
    measure: Callable[[PrunePlan], float],
    geometry: Geometry,
    steps: int,
    budget: float,
    *,
    align: int,
    max_buckets: int = 4,
    reuse: str = "noise",
    allow_reuse: bool = True,
    prune_text: bool = True,
    max_rollouts: int = 16,
    extra_seeds: Iterable[tuple[str, Structure]] = (),
    step_cache: bool = False,
    on_round: Callable[[list[PrunePlan], int, PrunePlan | None], None] | None = None,
) -> SearchResult:
    """Seeds, then measured best-neighbour moves, within ``max_rollouts`` measurements (module docstring).

    ``on_round(plans, further, best)``, if given, is called before each round (the seeds, then each
    move round) with the plans the round will measure, in order, the most measurements later rounds
    could still make, and the best plan so far (None before the seeds): the cost model of what is
    left (the calibration's progress bar), nothing else.

    ``step_cache``: the family runs cached steps (:attr:`~tokprune.pruning.family.ModelFamily.step_caching`),
    so the caching interval is seeded and moved too.

    ``measure(plan) -> error`` is called once per distinct plan (structures that realize the same
    plan share a measurement). Deterministic: the same measurements give the same result.
    """
    if max_rollouts < 1:
        raise ConfigError(f"max_rollouts = {max_rollouts}; expected >= 1")
    measured: dict[PrunePlan, float] = {}
    cands: list[Candidate] = []
    by_structure: dict[Structure, Candidate | None] = {}

    realized: dict[Structure, PrunePlan | None] = {}

    def plan_of(st: Structure) -> PrunePlan | None:
        if st not in realized:
            realized[st] = realize(st, geometry, steps, budget, align=align, max_buckets=max_buckets, reuse=reuse)
        return realized[st]

    def announce(structures: list[Structure], best_plan: PrunePlan | None) -> None:
        """Tell ``on_round`` which new plans this round measures, as :func:`evaluate` will."""
        if on_round is None:
            return
        new: list[PrunePlan] = []
        for st in structures:
            plan = None if st in by_structure else plan_of(st)
            if plan is not None and plan not in measured and plan not in new and len(measured) + len(new) < max_rollouts:
                new.append(plan)
        on_round(new, max_rollouts - len(measured) - len(new), best_plan)

    def evaluate(origin: str, st: Structure) -> Candidate | None:
        if st in by_structure:
            return by_structure[st]
        plan = plan_of(st)
        cand = None
        if plan is not None:
            if plan not in measured:
                if len(measured) >= max_rollouts:
                    return None  # budget spent; not cached as infeasible
                measured[plan] = float(measure(plan))
            cand = Candidate(st, plan, mac_fraction(geometry, plan, reuse), measured[plan], origin)
            cands.append(cand)
        by_structure[st] = cand
        return cand

    def nearest_feasible(st: Structure) -> Structure:
        """``st``, or the same structure with the nearest warm-up that reaches the budget."""
        for w in sorted(range(1, steps), key=lambda w: (abs(w - st.warmup), w)):
            cand = replace(st, warmup=w)
            if plan_of(cand) is not None:
                return cand
        return st

    start = [(name, nearest_feasible(st)) for name, st in
             [*seeds(steps, allow_reuse=allow_reuse, prune_text=prune_text, step_cache=step_cache), *extra_seeds]]
    announce([st for _, st in start], None)
    for name, st in start:
        evaluate(f"seed:{name}", st)
    if not cands:
        raise ConfigError(
            f"no schedule structure reaches --budget {budget:g} within +-{TOLERANCE:g} with {steps} steps and "
            f"{max_buckets} buckets; raise --budget or --max-buckets"
        )
    best = min(cands, key=lambda c: (c.error, c.mac_fraction))
    while len(measured) < max_rollouts:
        round_ = neighbours(best.structure, steps, allow_reuse=allow_reuse, prune_text=prune_text, step_cache=step_cache)
        announce([st for _, st in round_], best.plan)
        moved = [evaluate(f"move:{knob}", st) for knob, st in round_]
        moved = [c for c in moved if c is not None]
        top = min(moved, key=lambda c: (c.error, c.mac_fraction), default=None)
        if top is None or not top.error < best.error * (1 - 1e-6):
            break
        logger.info("calibration move %s: error %.4g -> %.4g (%s)", top.origin, best.error, top.error, top.structure.key)
        best = top
    return SearchResult(best=best, candidates=cands, rollouts=len(measured))
