"""The generic pieces U-Nets plug into: search floor and caching knob, cached buckets, their I/O tables."""

from __future__ import annotations

import pytest

from tokprune.calibrate.baselines import derive_align
from tokprune.calibrate.schedule import Bucket
from tokprune.calibrate.search import Structure, describe, realize, search
from tokprune.errors import ConfigError, ScheduleError
from tokprune.export.spec import BucketSpec
from tokprune.families.unet import FAMILY
from tokprune.families.unet.macs import mac_fraction as unet_fraction
from tokprune.families.unet.models import build_pipeline
from tokprune.pruning.macs import mac_fraction
from tokprune.pruning.plan import ALL, PrunePlan


@pytest.fixture(scope="module")
def g():
    pipe = build_pipeline("sd15-tiny")
    return FAMILY.settings(pipe, steps=8, guidance=7.5).geometry(pipe.unet)


def test_generic_mac_fraction_counts_cached_steps(g):
    plan = PrunePlan((ALL, 256, 256, 512, 256, 256, 512, 256), step_cache=(False, False, True, False, True, False, True, False))
    assert mac_fraction(g, plan) == pytest.approx(unet_fraction(g, plan), rel=1e-12)
    assert mac_fraction(g, plan) < mac_fraction(g, PrunePlan(plan.image_keep))


def test_search_keeps_at_least_one_token_per_window(g):
    """A budget that would need K < N/4 without caching is reached with the floor K = N/4 (or not at all)."""
    for st in (Structure(2), Structure(1, cache=2), Structure(2, text=0.5), Structure(1, reuse_every=3)):
        plan = realize(st, g, 8, 0.55, align=derive_align(g.num_tokens), max_buckets=4)
        if plan is None:
            continue
        ks = [k for k in plan.image_keep if k not in (ALL, 0)]
        assert ks and min(ks) >= g.min_keep == 256, (st, plan)
        assert abs(mac_fraction(g, plan) - 0.55) <= 0.02
    assert realize(Structure(2), g, 8, 0.45, align=16, max_buckets=4) is None  # DaTo alone cannot reach it


def test_cache_structure_realizes_deepcache_steps(g):
    plan = realize(Structure(1, cache=3), g, 8, 0.6, align=16, max_buckets=4)
    assert plan is not None and plan.step_cache == (False, False, True, True, False, True, True, False)
    k = plan.image_keep[1]
    assert describe(plan) == f"D x1 | {k} x1 | {k}c x2 | {k} x1 | {k}c x2 | {k} x1"
    assert Structure(1, cache=3).key.endswith("-c3") and Structure(1).key == "w1-r0-u0-flat-t1"


def test_search_moves_the_caching_interval_only_when_the_family_caches(g):
    def measure(plan: PrunePlan) -> float:  # synthetic: cached plans are better, longer intervals better still
        return 1.0 - 0.1 * sum(plan.is_cached(s) for s in range(plan.num_steps))

    on = search(measure, g, 8, 0.55, align=16, max_rollouts=20, step_cache=True, allow_reuse=False, prune_text=False)
    assert on.best.plan.step_cache is not None and on.best.structure.cache >= 2
    assert any(c.origin == "move:cache" for c in on.candidates) or on.best.origin.startswith("seed:cache")
    off = search(measure, g, 8, 0.7, align=16, max_rollouts=20, allow_reuse=False, prune_text=False)
    assert all(c.plan.step_cache is None for c in off.candidates)


def test_cached_bucket_keys_round_trip_and_sort_after_their_full_step():
    b = Bucket.from_key("k0256-t0077-cached")
    assert b == Bucket(256, 77, cached=True) and b.key == "k0256-t0077-cached"
    assert Bucket.from_key("k0256-t0077").cached is False
    order = sorted({Bucket(1024, 77), Bucket(256, 77, True), Bucket(256, 77), Bucket(1024, 77, True)},
                   key=lambda x: x.order, reverse=True)
    assert [x.key for x in order] == ["k1024-t0077", "k1024-t0077-cached", "k0256-t0077", "k0256-t0077-cached"]
    with pytest.raises(ScheduleError, match="k0128-t0333-cached"):
        Bucket.from_key("k0256-t0077-cache")


def test_bucket_io_tables(g):
    dense = BucketSpec(g, g.num_tokens)
    full = BucketSpec(g, 256, 40)
    cached = BucketSpec(g, 256, 40, cached=True)
    assert dense.key == "k1024-t0077" and cached.key == "k0256-t0040-cached" and not cached.dense
    assert dense.input_names() == ["latent", "encoder_hidden_states", "timestep", "img_idx"]
    assert full.input_names() == ["latent", "encoder_hidden_states", "timestep", "img_idx", "txt_idx"]
    assert full.output_names() == ["noise", "fresh.deep"] == dense.output_names()
    assert cached.input_names()[-1] == "cache.deep" and cached.output_names() == ["noise"]
    assert BucketSpec.from_dict(cached.to_dict(), g) == cached and "cached" not in full.to_dict()
    assert {t.name: t.shape for t in cached.io()}["cache.deep"] == g.deep_shape


def test_cached_bucket_needs_a_caching_family():
    from tokprune.pruning.geometry import Geometry

    sd3 = Geometry(batch=2, latent_hw=(8, 8), text_tokens=9, patch=2, in_channels=4, out_channels=4, num_layers=2,
                   heads=2, head_dim=8, joint_attention_dim=16, pooled_dim=16)
    with pytest.raises(ConfigError, match="step caching"):
        BucketSpec(sd3, 8, cached=True)
