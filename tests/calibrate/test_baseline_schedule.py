"""calibrate.api.baseline_schedule: a fixed baseline frozen into a Schedule without measuring anything."""

from __future__ import annotations

import pytest

from tokprune.calibrate.api import baseline_schedule
from tokprune.calibrate.baselines import TOLERANCE
from tokprune.errors import ConfigError


@pytest.fixture(scope="module")
def pipe():
    from tokprune.models import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


@pytest.mark.parametrize("baseline, options, budget", [
    ("cat", {"t0": 2}, 0.6), ("ras", {"refresh_every": 3}, 0.6), ("interleaved", {}, 0.625),  # 8 steps: eighths
])
def test_each_baseline_freezes_at_its_budget(pipe, baseline, options, budget):
    sched = baseline_schedule(pipe, baseline, budget=budget, steps=8, guidance=5.0, max_sequence_length=16,
                              model="sd3-tiny", **options)
    assert abs(sched.mac_fraction - budget) <= TOLERANCE and sched.text_tokens == 77 + 16 and len(sched.plan) == 8
    assert sched.plan[0] == sched.dense_bucket.key  # step 0 dense
    assert sched.stats["method"].startswith(f"baseline:{baseline}") and sched.stats["options"] == options
    if baseline == "cat":
        assert sched.plan[:2] == (sched.dense_bucket.key,) * 2 and len(set(sched.plan[2:])) == 1
    if baseline == "interleaved":
        assert set(sched.plan) == {sched.dense_bucket.key, "reuse"}  # no token pruned, whole steps reused


def test_unknown_baseline_is_refused(pipe):
    with pytest.raises(ConfigError, match="baseline 'fancy' is unknown; expected one of cat, ras, interleaved"):
        baseline_schedule(pipe, "fancy", budget=0.5, steps=8)
