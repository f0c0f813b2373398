"""PrunePlan.step_cache: the DeepCache step kind a plan can hold (backward compatible)."""

from __future__ import annotations

import pytest

from tokprune.errors import ConfigError
from tokprune.pruning.plan import ALL, PrunePlan


def test_cached_steps_are_not_dense_and_never_probe():
    plan = PrunePlan((ALL, ALL, ALL, 8), text_keep=(ALL, ALL, ALL, 4), step_cache=(False, False, True, False))
    assert [plan.is_cached(s) for s in range(4)] == [False, False, True, False]
    assert [plan.is_dense(s) for s in range(4)] == [True, True, False, False]
    assert plan.probe_steps() == (1,)  # the cached step 2 cannot measure text importance
    assert not PrunePlan((ALL, 8)).is_cached(1)  # default: no cached steps


@pytest.mark.parametrize("cache,match", [((True, False), "step 0"), ((False,), "match"), ((False, "yes"), "bool")])
def test_bad_step_cache_is_refused(cache, match):
    with pytest.raises(ConfigError, match=match):
        PrunePlan((ALL, 8), step_cache=cache)


def test_cached_and_reuse_is_refused():
    with pytest.raises(ConfigError, match="pick one"):
        PrunePlan((ALL, 0), step_cache=(False, True))
