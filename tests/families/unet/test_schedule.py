"""budget_plan: a DaTo + DeepCache plan solved to a MAC budget."""

from __future__ import annotations

import pytest

from tokprune.errors import ConfigError
from tokprune.families.unet.geometry import UNetGeometry
from tokprune.families.unet.macs import mac_fraction
from tokprune.families.unet.models import unet_config
from tokprune.families.unet.schedule import budget_plan
from tokprune.pruning.plan import ALL


@pytest.fixture(scope="module")
def g():
    return UNetGeometry.from_config(unet_config("sd15-medium"), batch=2, latent_hw=(64, 64), text_tokens=77)


def test_largest_keep_within_budget(g):
    plan = budget_plan(g, steps=8, budget=0.5, cache_interval=3)
    k = plan.image_keep[1]
    assert plan.image_keep[0] == ALL and set(plan.image_keep[1:]) == {k} and k >= g.min_keep
    assert plan.step_cache == (False, False, True, True, False, True, True, False)
    assert mac_fraction(g, plan) <= 0.5
    more = budget_plan(g, steps=8, budget=0.6, cache_interval=3)
    assert more.image_keep[1] > k and 0.5 < mac_fraction(g, more) <= 0.6


def test_unreachable_budget_names_the_fix(g):
    with pytest.raises(ConfigError, match="cache_interval"):
        budget_plan(g, steps=8, budget=0.3, cache_interval=2)
    assert budget_plan(g, steps=4, budget=1.0).image_keep == (ALL,) * 4
