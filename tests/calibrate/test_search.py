"""The calibration search on synthetic measured objectives (fast: no model)."""

from __future__ import annotations

import pytest

from tokprune.calibrate.search import Structure, realize, search, seeds
from tokprune.errors import ConfigError
from tokprune.pruning.geometry import Geometry
from tokprune.pruning.macs import mac_fraction
from tokprune.pruning.plan import ALL, PrunePlan

# the shipped `shapes` model's geometry (N = 1024, T = 109), CFG batch
G = Geometry(batch=2, latent_hw=(64, 64), text_tokens=109, patch=2, in_channels=4, out_channels=4, num_layers=8,
             heads=4, head_dim=64, joint_attention_dim=128, pooled_dim=128, qk_norm="rms_norm")
S, ALIGN = 28, 64


@pytest.mark.parametrize("budget", [0.3, 0.4, 0.5, 0.6, 0.75])
@pytest.mark.parametrize("structure", [
    Structure(8), Structure(4, refresh=4), Structure(6, reuse_every=3), Structure(8, shape="down"),
    Structure(8, text=0.5), Structure(4, refresh=5, shape="up", text=0.75),
])
@pytest.mark.parametrize("max_buckets", [2, 4])
def test_realize_hits_the_budget_with_the_bucket_limit(budget, structure, max_buckets):
    plan = realize(structure, G, S, budget, align=ALIGN, max_buckets=max_buckets)
    if plan is None:  # infeasible is allowed (warm-up too long for a small budget), never a wrong plan
        return
    assert abs(mac_fraction(G, plan) - budget) <= 0.02
    text = plan.text_keep or (ALL,) * S
    pruned = {(k, t) for k, t in zip(plan.image_keep, text) if k != 0 and not (k == ALL and t == ALL)}
    assert len(pruned) + 1 <= max_buckets
    assert all(k == ALL or k % ALIGN == 0 or k == 0 for k in plan.image_keep)
    assert all(k == ALL for k in plan.image_keep[: structure.warmup])


def test_most_seeds_are_feasible_at_half_budget():
    ok = [name for name, st in seeds(S) if realize(st, G, S, 0.5, align=ALIGN, max_buckets=4) is not None]
    assert {"cat-t0=4", "cat-t0=8", "cat-text-0.5", "ras-refresh=4"} <= set(ok)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.75])
def test_every_seed_is_measured_with_its_nearest_feasible_warmup(budget):
    res = search(compounding, G, S, budget, align=ALIGN, max_rollouts=40)
    origins = {c.origin for c in res.candidates}
    assert "seed:cat-t0=4" in origins  # (a seed whose nearest feasible form equals an earlier one is not re-listed)
    if budget >= 0.5:
        assert "seed:interleaved-2" in origins  # its warm-up is moved until dense/reuse alternation fits
    for c in res.candidates:
        assert abs(c.mac_fraction - budget) <= 0.02


def _reuse_runs(plan: PrunePlan) -> list[int]:
    runs, cur = [], 0
    for k in plan.image_keep:
        cur = cur + 1 if k == 0 else 0
        if cur:
            runs.append(cur)
    return runs


def compounding(plan: PrunePlan) -> float:
    """A 'measured' error where consecutive reuse compounds (as measured on shapes) and pruning is mild."""
    err = 0.0
    for s, k in enumerate(plan.image_keep):
        if k == 0:
            err += 0.01
        elif k != ALL:
            err += 0.004 * (1 - k / 1024) * (S - s) / S
    return err + 0.02 * sum(r * r for r in _reuse_runs(plan))


def test_search_follows_the_measurements_not_a_fixed_rule():
    res = search(compounding, G, S, 0.5, align=ALIGN, max_rollouts=30)
    assert 0 not in res.best.plan.image_keep  # reuse compounds here: the pick prunes tokens instead
    assert any(0 < k < 1024 for k in res.best.plan.image_keep if k != ALL)
    cats = [c for c in res.candidates if c.origin.startswith("seed:cat-t0=")]
    assert cats and res.best.error <= min(c.error for c in cats)

    def reuse_is_free(plan: PrunePlan) -> float:  # the opposite world: reusing costs nothing, pruning a lot
        return sum(0.1 for k in plan.image_keep if 0 < k < 1024)

    res2 = search(reuse_is_free, G, S, 0.5, align=ALIGN, max_rollouts=30)
    assert all(k in (0, ALL) for k in res2.best.plan.image_keep)


def test_search_is_deterministic_and_respects_the_rollout_budget():
    calls = []

    def measure(plan):
        calls.append(plan)
        return compounding(plan)

    a = search(measure, G, S, 0.5, align=ALIGN, max_rollouts=12)
    assert len(calls) == len(set(calls)) <= 12 and a.rollouts == len(calls)
    b = search(compounding, G, S, 0.5, align=ALIGN, max_rollouts=12)
    assert a.best.plan == b.best.plan and a.to_stats() == b.to_stats()


def test_search_without_reuse_or_text_never_uses_them():
    res = search(lambda p: compounding(p) - 0.001 * sum(k == 0 for k in p.image_keep), G, S, 0.5, align=ALIGN,
                 allow_reuse=False, prune_text=False, max_rollouts=20)
    for c in res.candidates:
        assert 0 not in c.plan.image_keep and c.plan.text_keep is None


def test_unreachable_budget_is_refused():
    with pytest.raises(ConfigError, match="--budget 0.03"):
        search(compounding, G, S, 0.03, align=ALIGN, max_buckets=4)


@pytest.mark.parametrize("max_rollouts", [5, 12, 40])
def test_on_round_announces_exactly_the_plans_each_round_measures(max_rollouts):
    """The progress bar's cost model: before each round the search names the new plans it will measure, in
    order, and how many later rounds could still add; together they are every measurement, once."""
    measured, rounds = [], []

    def measure(plan):
        measured.append(plan)
        return compounding(plan)

    def on_round(plans, further, best):
        rounds.append((list(plans), further, best, len(measured)))

    res = search(measure, G, S, 0.5, align=ALIGN, max_rollouts=max_rollouts, on_round=on_round)
    assert rounds[0][2] is None and len(rounds) >= (1 if max_rollouts <= 9 else 2)  # seeds, then move rounds
    announced = [p for plans, *_ in rounds for p in plans]
    assert announced == measured and len(set(measured)) == len(measured) == res.rollouts <= max_rollouts
    for i, (plans, further, best, before) in enumerate(rounds):
        after = rounds[i + 1][3] if i + 1 < len(rounds) else len(measured)
        assert after - before == len(plans)  # the round measured what it announced
        assert further == max_rollouts - before - len(plans) >= 0
        assert i == 0 or best in {c.plan for c in res.candidates}
