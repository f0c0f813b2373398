"""Budget -> allocation -> buckets on synthetic error profiles (no model: fast)."""

from __future__ import annotations

import itertools
import math

import pytest

from tokprune.calibrate.optimize import allocate, cat_schedule, fit_buckets, optimize_schedule
from tokprune.calibrate.profile import ErrorProfile, align_up, default_grid, derive_align
from tokprune.errors import ConfigError
from tokprune.pruning import ALL, PrunePlan
from tokprune.pruning.macs import mac_fraction

N, T, ALIGN = 256, 333, 16
STEPS = 14


def _check(geometry, alloc, budget, limit, steps):
    # achieved fraction recomputed independently from the plan
    frac = mac_fraction(geometry, alloc.to_plan())
    assert frac == pytest.approx(alloc.mac_fraction, abs=1e-12)
    assert abs(frac - budget) <= 0.02, (budget, limit, frac)
    buckets = alloc.buckets()
    assert 1 <= len(buckets) <= limit
    assert buckets[0] == (N, T)  # step 0 is dense, so the dense bucket is always there
    assert alloc.image_keep[0] == N and alloc.text_keep[0] == T
    for k, t in buckets:  # aligned (or full)
        assert k == N or k % ALIGN == 0, (k, t)
        assert t == T or t % ALIGN == 0, (k, t)
    # dense steps only in the warm-up prefix
    assert all(not alloc.is_dense(s) for s in range(alloc.warmup, steps))


@pytest.mark.parametrize("budget", [0.25, 0.4, 0.55, 0.7, 0.85])
def test_budget_honoured_for_every_bucket_limit(geometry, make_profile, budget):
    prof = make_profile(STEPS)
    for limit in range(2, 7):
        _check(geometry, optimize_schedule(geometry, prof, budget, max_buckets=limit), budget, limit, STEPS)


@pytest.mark.parametrize("budget", [0.25, 0.33, 0.5, 0.62, 0.8, 0.97])
def test_budget_honoured_with_one_bucket(geometry, make_profile, budget):
    # one bucket = the dense one: steps are dense or reuse, so the fraction moves in 1/steps;
    # 28 steps (spacing 0.036) always get within 0.02
    alloc = optimize_schedule(geometry, make_profile(28), budget, max_buckets=1)
    _check(geometry, alloc, budget, 1, 28)
    assert set(alloc.image_keep) <= {0, N}
    assert alloc.image_keep == (N,) * alloc.warmup + (0,) * (28 - alloc.warmup)


def test_more_buckets_never_hurt(geometry, make_profile):
    prof = make_profile(STEPS)
    errors = [optimize_schedule(geometry, prof, 0.5, max_buckets=m).error for m in range(1, 6)]
    assert errors[0] > errors[-1]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))


def test_budget_one_is_all_dense(geometry, make_profile):
    prof = make_profile(STEPS)
    for limit in (1, 4):
        alloc = optimize_schedule(geometry, prof, 1.0, max_buckets=limit)
        assert alloc.image_keep == (N,) * STEPS and alloc.text_keep == (T,) * STEPS
        assert alloc.mac_fraction == 1.0 and alloc.to_plan() == PrunePlan.dense(STEPS)


def test_steps_that_change_more_get_more_tokens(geometry, make_profile):
    busy = {6, 10}
    change = [1.0 if s in busy else 0.05 for s in range(STEPS)]
    g = geometry.with_text_tokens(77)  # short text: image tokens dominate the cost
    prof = make_profile(STEPS, change=change, text_grid=(), text_tokens=77)
    alloc = optimize_schedule(g, prof, 0.5, max_buckets=4)
    assert alloc.warmup < 6
    quiet = [s for s in range(alloc.warmup, STEPS) if s not in busy]
    for s in busy:
        assert alloc.image_keep[s] > max(alloc.image_keep[q] for q in quiet), alloc.image_keep
    # on a flat profile the same budget spreads tokens evenly instead
    flat = optimize_schedule(
        g, make_profile(STEPS, change=[0.05] * STEPS, text_grid=(), text_tokens=77), 0.5, max_buckets=4
    )
    assert flat.image_keep[6] <= max(flat.image_keep[q] for q in range(flat.warmup, STEPS) if q not in busy)


def test_deterministic(geometry, make_profile):
    prof = make_profile(STEPS)
    runs = [optimize_schedule(geometry, prof, 0.45, max_buckets=3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_free_allocation_is_optimal_against_brute_force(geometry, make_profile):
    steps = 4
    ig, tg = (64, 128, 192), ()
    prof = make_profile(steps, change=[1.0, 0.2, 0.9, 0.4], image_grid=ig, text_grid=tg)
    budget = 0.55
    alloc = allocate(geometry, prof, budget, prune_text=False)
    best = math.inf
    for w in range(1, steps + 1):
        for ks in itertools.product((0, *ig), repeat=steps - w):
            plan = PrunePlan(image_keep=(ALL,) * w + ks)
            frac = mac_fraction(geometry, plan)
            if budget - 0.02 <= frac <= budget + 1e-9:
                err = sum(prof.image_err(w + i, k) for i, k in enumerate(ks)) / steps
                best = min(best, err)
    assert alloc.error == pytest.approx(best, rel=1e-9)
    assert alloc.mac_fraction <= budget + 1e-9


def test_fit_buckets_rounds_up_aligned_and_limits_count(geometry, make_profile):
    prof = make_profile(STEPS)
    free = allocate(geometry, prof, 0.5)
    pruned = {(k, t) for k, t in zip(free.image_keep, free.text_keep) if 0 < k and (k, t) != (N, T)}
    for count in (1, 2, 3):
        buckets = fit_buckets(free, count, 32, geometry)
        assert 1 <= len(buckets) <= count
        for k, t in pruned:  # every pruned step fits in some bucket (rounding up)
            assert any(bk >= k and bt >= t for bk, bt in buckets)
        assert all(k % 32 == 0 or k == N for k, _ in buckets)
    assert fit_buckets(free, 0, 32, geometry) == ()


def test_alignment_derived_from_n():
    assert derive_align(4096) == 64  # SD3 at 1024^2
    assert derive_align(1024) == 64  # 512^2
    assert derive_align(256) == 16  # the tiny pipeline's default
    assert derive_align(576) == 32
    assert derive_align(64) == 4
    assert derive_align(7) == 1
    assert align_up(17, 16, 256) == 32 and align_up(250, 16, 256) == 256 and align_up(330, 16, 333) == 333
    assert default_grid(256, (1 / 16, 0.5, 1.0), 16) == (16, 128)


def test_cat_reference(geometry):
    plan = cat_schedule(geometry, 28, 0.75)
    t0 = 8
    assert plan.image_keep[:t0] == (ALL,) * t0
    ks = set(plan.image_keep[t0:])
    assert len(ks) == 1 and 0 < next(iter(ks)) < N
    assert abs(mac_fraction(geometry, plan) - 0.75) <= 0.02
    assert plan.text_keep is None  # CAT never prunes text
    # a budget below what 8 dense steps cost shrinks the warm-up instead of failing
    low = cat_schedule(geometry, 28, 0.5)
    assert 1 <= low.image_keep.count(ALL) < t0
    assert abs(mac_fraction(geometry, low) - 0.5) <= 0.02
    assert cat_schedule(geometry, 28, 1.0) == PrunePlan.dense(28)


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan"), True])
def test_bad_budget(geometry, make_profile, budget):
    with pytest.raises(ConfigError, match="budget"):
        optimize_schedule(geometry, make_profile(STEPS), budget)


def test_bad_limits(geometry, make_profile):
    prof = make_profile(STEPS)
    with pytest.raises(ConfigError, match="max-buckets"):
        optimize_schedule(geometry, prof, 0.5, max_buckets=0)
    with pytest.raises(ConfigError, match="cannot be met"):
        optimize_schedule(geometry, make_profile(2), 0.3)  # step 0 alone is 0.5 of 2 steps
    with pytest.raises(ConfigError, match="N=128"):
        optimize_schedule(
            geometry.with_batch(1),
            ErrorProfile(
                num_tokens=128,
                text_tokens=T,
                image_grid=(64,),
                image_error=((math.inf,), (0.1,)),
                reuse_error=(math.inf, 0.2),
            ),
            0.5,
        )
