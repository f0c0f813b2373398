"""Schedule files: round trip, integrity, and refusal of mismatched models / sizes / steps."""

from __future__ import annotations

import json
import os

import pytest

from tokprune.calibrate.schedule import REUSE, SCHEMA_VERSION, Bucket, Schedule
from tokprune.errors import ScheduleError
from tokprune.models import tiny_transformer_config
from tokprune.pruning import ALL, PrunePlan

N, T = 256, 333


def _schedule(**changes) -> Schedule:
    kw = dict(
        model="sd3-tiny",
        model_fingerprint="0123456789abcdef",
        height=64,
        width=64,
        vae_scale_factor=2,
        num_tokens=N,
        text_tokens=T,
        steps=6,
        scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config={"shift": 3.0, "num_train_timesteps": 1000, "names": ("a", "b"), "x": None},
        guidance=7.0,
        budget=0.5,
        mac_fraction=0.49,
        policy="cat",
        buckets=(Bucket(N, T), Bucket(128, 333), Bucket(64, 96)),
        plan=("k0256-t0333", "k0256-t0333", "k0128-t0333", REUSE, "k0064-t0096", "k0064-t0096"),
        align=16,
        stats={"warmup": 2, "errors": [0.1, 0.2]},
    )
    kw.update(changes)
    return Schedule(**kw)


def test_bucket_key():
    assert Bucket(128, 333).key == "k0128-t0333"
    assert Bucket(4096, 333).key == "k4096-t0333"
    assert Bucket.from_key("k0064-t0096") == Bucket(64, 96)
    assert sorted([Bucket(64, 96), Bucket(128, 10), Bucket(64, 333)], reverse=True) == [
        Bucket(128, 10),
        Bucket(64, 333),
        Bucket(64, 96),
    ]
    with pytest.raises(ScheduleError):
        Bucket(0, 5)
    with pytest.raises(ScheduleError):
        Bucket.from_key("k12-t3")


def test_to_plan_and_geometry():
    s = _schedule()
    assert s.to_plan() == PrunePlan(image_keep=(ALL, ALL, 128, 0, 64, 64), text_keep=(ALL, ALL, ALL, ALL, 96, 96))
    assert s.bucket_at(3) is None and s.bucket_at(4) == Bucket(64, 96)
    g = s.geometry(tiny_transformer_config(), batch=2)
    assert g.num_tokens == N and g.text_tokens == T and g.latent_hw == (32, 32) and g.batch == 2
    no_text = _schedule(buckets=(Bucket(N, T), Bucket(64, T)), plan=("k0256-t0333",) + ("k0064-t0333",) * 5)
    assert no_text.to_plan() == PrunePlan(image_keep=(ALL,) + (64,) * 5)
    with pytest.raises(ScheduleError, match="N=256"):
        _schedule(
            num_tokens=1024,
            buckets=(Bucket(1024, T), Bucket(128, 333), Bucket(64, 96)),
            plan=("k1024-t0333",) * 2 + _schedule().plan[2:],
        ).geometry(tiny_transformer_config(), batch=2)


def test_round_trip(tmp_path):
    s = _schedule()
    path = s.save(tmp_path / "sub" / "schedule.json")
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["schedule.json"]  # no temp left
    back = Schedule.load(path, expect_fingerprint="0123456789abcdef", expect_height=64, expect_width=64, expect_steps=6)
    assert back == s
    assert back.content_hash == s.content_hash and len(s.content_hash) == 64
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["content_hash"] == s.content_hash
    assert data["buckets"] == ["k0256-t0333", "k0128-t0333", "k0064-t0096"]
    assert data["scheduler_config"]["names"] == ["a", "b"]
    assert s.key.startswith("64x64-s6-b050-")
    # saving again over an existing file replaces it
    _schedule(budget=0.6).save(path)
    assert Schedule.load(path).budget == 0.6


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.__setitem__("mac_fraction", 0.3),
        lambda d: d["plan"].__setitem__(2, "k0064-t0096"),
        lambda d: d["stats"].__setitem__("warmup", 3),
    ],
)
def test_tampered_file_is_refused(tmp_path, edit):
    path = _schedule().save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="hash mismatch"):
        Schedule.load(path)


def test_invalid_files_are_refused(tmp_path):
    path = tmp_path / "s.json"
    with pytest.raises(ScheduleError, match="does not exist"):
        Schedule.load(path)
    path.write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(path)
    data = _schedule().to_dict()
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="schema_version 99"):
        Schedule.load(path)
    # a wrong type with a correct hash (re-hashed by a careless tool) is still refused
    import hashlib

    from tokprune.calibrate.schedule import canonical_json

    data = _schedule().to_dict(include_hash=False)
    data["steps"] = "6"
    data["content_hash"] = hashlib.sha256(canonical_json(data).encode()).hexdigest()
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="'steps' is str"):
        Schedule.load(path)


@pytest.mark.parametrize(
    "expect,field",
    [
        (dict(expect_fingerprint="ffffffffffffffff"), "model fingerprint"),
        (dict(expect_height=128), "height: schedule has 64, expected 128"),
        (dict(expect_width=96), "width: schedule has 64, expected 96"),
        (dict(expect_steps=28), "steps: schedule has 6, expected 28"),
    ],
)
def test_mismatch_is_refused_with_the_fix(tmp_path, expect, field):
    path = _schedule().save(tmp_path / "s.json")
    with pytest.raises(ScheduleError) as info:
        Schedule.load(path, **expect)
    msg = str(info.value)
    assert field in msg
    assert "tokprune-calibrate" in msg and "--budget 0.5" in msg
    if "expect_steps" in expect:
        assert "--steps 28" in msg


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(plan=("k0128-t0333",) * 6, buckets=(Bucket(128, 333),)), "step 0"),
        (dict(plan=_schedule().plan[:5]), "5 entries for 6 steps"),
        (dict(buckets=(Bucket(128, 333), Bucket(N, T), Bucket(64, 96))), "sorted descending"),
        (dict(plan=("k0256-t0333",) * 5 + ("k0032-t0333",)), "neither 'reuse' nor one of the buckets"),
        (dict(plan=("k0256-t0333",) * 5 + (REUSE,)), "never used"),
        (dict(budget=0.0), "budget"),
        (dict(buckets=(Bucket(N, T), Bucket(512, 333), Bucket(64, 96))), "exceeds"),
        (dict(stats={"bad": float("inf")}), "non-finite"),
        (dict(stats={"bad": object()}), "cannot store"),
        (dict(reuse="bogus"), "reuse"),
    ],
)
def test_inconsistent_schedules_are_refused(changes, match):
    with pytest.raises(ScheduleError, match=match):
        _schedule(**changes)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = _schedule().save(tmp_path / "s.json")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        _schedule(budget=0.7).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_a_scheduler_config_with_infinities_is_recorded(tmp_path):
    """diffusers' DPMSolverMultistepScheduler (PixArt-Σ) has lambda_min_clipped = -inf by default."""
    sched = _schedule(scheduler_config={"lambda_min_clipped": float("-inf"), "solver_order": 2})
    assert sched.scheduler_config["lambda_min_clipped"] == "-inf"
    path = sched.save(tmp_path / "s.json")
    assert Schedule.load(path) == sched
