"""Fixed comparison schedules (CAT, RAS-style, dense/reuse interleaving) solved to a MAC budget."""

from __future__ import annotations

import pytest

from tokprune.calibrate.baselines import cat_schedule, interleaved_schedule, ras_schedule
from tokprune.errors import ConfigError
from tokprune.pruning.geometry import Geometry
from tokprune.pruning.macs import mac_fraction
from tokprune.pruning.plan import ALL, PrunePlan

# the shipped `shapes` model's geometry (8 blocks, hidden 256, N = 1024, T = 109) with CFG
G = Geometry(batch=2, latent_hw=(64, 64), text_tokens=109, patch=2, in_channels=4, out_channels=4, num_layers=8,
             heads=4, head_dim=64, joint_attention_dim=128, pooled_dim=128, qk_norm="rms_norm")
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.75)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("t0", [4, 6, 8, 10])
def test_cat_hits_the_budget_with_its_warmup(budget, t0):
    plan = cat_schedule(G, 28, budget, t0=t0)
    assert abs(mac_fraction(G, plan) - budget) <= 0.01
    dense = [k == ALL for k in plan.image_keep]
    warm = sum(1 for d in dense if d)
    assert dense[:warm] == [True] * warm and not any(dense[warm:])  # dense prefix, then one K
    assert len(set(plan.image_keep[warm:])) == 1
    assert warm <= t0  # shrinks only when the warm-up alone is over budget


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("refresh", [3, 4, 6])
def test_ras_has_periodic_dense_refresh(budget, refresh):
    plan = ras_schedule(G, 28, budget, refresh_every=refresh)
    assert abs(mac_fraction(G, plan) - budget) <= 0.01
    pruned = {k for k in plan.image_keep if k != ALL}
    assert len(pruned) == 1 and 0 not in pruned  # one fixed keep count, no reuse
    dense_after = [s for s, k in enumerate(plan.image_keep) if k == ALL and s >= 4]
    assert dense_after, "RAS refreshes densely after its warm-up"


@pytest.mark.parametrize("budget", [0.5, 0.6, 0.75])
def test_interleaved_alternates_dense_and_reuse(budget):
    plan = interleaved_schedule(G, 28, budget, period=2)
    assert abs(mac_fraction(G, plan) - budget) <= 0.02
    assert set(plan.image_keep) <= {ALL, 0}
    first_reuse = plan.image_keep.index(0)
    tail = plan.image_keep[first_reuse:]
    assert all(a != b for a, b in zip(tail, tail[1:]))  # strictly alternating after the warm-up


def test_budget_one_is_dense_and_bad_budgets_are_refused():
    assert cat_schedule(G, 28, 1.0) == PrunePlan.dense(28)
    assert ras_schedule(G, 28, 1.0) == PrunePlan.dense(28)
    with pytest.raises(ConfigError, match="--budget"):
        cat_schedule(G, 28, 0.0)
    with pytest.raises(ConfigError, match="budget >= 0.50"):
        interleaved_schedule(G, 28, 0.3, period=2)
