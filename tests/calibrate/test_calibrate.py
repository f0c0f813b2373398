"""calibrate() on measured whole runs of the tiny pipeline, resume from checkpoints, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from tokprune.calibrate import Schedule, calibrate
from tokprune.calibrate.cli import main
from tokprune.calibrate.prompts import load_prompts, pick_prompts, split_prompts
from tokprune.calibrate.rollout import Rollouts
from tokprune.errors import ConfigError
from tokprune.pruning import Geometry
from tokprune.pruning.macs import mac_fraction

STEPS = 4
MSL = 16  # T5 tokens: T = 77 + 16 = 93
PROMPTS = ["a red circle on a white background", "two blue squares", "a green triangle", "a small yellow star"]
SMALL = dict(steps=6, guidance=5.0, max_sequence_length=MSL, num_prompts=2, holdout_prompts=1, max_rollouts=8,
             progress=False, model="sd3-tiny")


@pytest.fixture(scope="module")
def pipe():
    from tokprune.models import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def schedule(pipe):
    return calibrate(pipe, budget=0.6, prompts=PROMPTS, max_buckets=3, **SMALL)


def test_calibrate_measures_whole_runs_within_budget(pipe, schedule):
    g = schedule.geometry(pipe.transformer.config, batch=2)
    plan = schedule.to_plan()
    assert abs(schedule.mac_fraction - 0.6) <= 0.02
    assert schedule.mac_fraction == pytest.approx(mac_fraction(g, plan))  # probe included where it runs
    assert len(schedule.buckets) <= 3 and schedule.plan[0] == "k0256-t0093"
    st = schedule.stats
    assert st["method"] == "measured-rollout-search" and 0 < st["search"]["rollouts"] <= 8
    assert st["holdout"]["num_prompts"] == 1 and st["holdout"]["error"] > 0 and st["holdout"]["psnr_db"] > 10
    assert st["cost"]["measured_runs"] == st["search"]["rollouts"] and st["cost"]["holdout_runs"] == 1
    # the predicted error is the measured error of the chosen plan on the calibration prompts
    calib, _ = split_prompts(PROMPTS, 2, 1)
    ro = Rollouts(pipe, calib, steps=6, guidance=5.0, max_sequence_length=MSL)
    assert st["predicted_error"] == pytest.approx(ro.error(plan), rel=1e-9)


def test_calibrated_beats_cats_fixed_schedule_at_equal_macs(pipe, schedule):
    """The pick is the best measured candidate, CAT's fixed schedule at every warm-up among them."""
    st = schedule.stats
    cats = [c for c in st["search"]["candidates"] if c["origin"].startswith("seed:cat-t0=")]
    assert cats, "CAT's schedule is always a seed"
    for c in cats:
        assert abs(c["mac_fraction"] - schedule.mac_fraction) <= 0.04  # both within +-0.02 of the budget
        assert st["predicted_error"] <= c["error"]
    assert st["cat_reference"]["error"] == min(c["error"] for c in cats)


def test_budget_one_is_dense_without_model_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        dense = calibrate(pipe, budget=1.0, prompts=PROMPTS, **SMALL)
    finally:
        handle.remove()
    assert calls == [] and dense.mac_fraction == 1.0 and set(dense.plan) == {"k0256-t0093"}


@pytest.mark.parametrize("kwargs,message", [
    ({"budget": 0.0}, "--budget 0.0 is out of range"),
    ({"budget": 0.5, "max_buckets": 0}, "--max-buckets 0"),
    ({"budget": 0.5, "policy": "bogus"}, "unknown selection policy 'bogus'"),
    ({"budget": 0.5, "max_rollouts": 0}, "--max-rollouts 0"),
    ({"budget": 0.5, "height": 63}, "not a positive multiple of 4"),
])
def test_bad_inputs_are_refused_before_any_model_call(pipe, kwargs, message):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises((ConfigError, ValueError), match=message):
            calibrate(pipe, prompts=PROMPTS, **{**SMALL, **kwargs})
    finally:
        handle.remove()
    assert calls == []


def test_interrupted_calibration_resumes_to_the_same_schedule(pipe, tmp_path, monkeypatch, caplog):
    ref = calibrate(pipe, budget=0.6, prompts=PROMPTS, max_buckets=3, **SMALL)
    ckpt = tmp_path / "ckpt"
    real = Rollouts.errors
    count = {"n": 0}

    def flaky(self, plan, policy=None):
        count["n"] += 1
        if count["n"] == 4:
            raise KeyboardInterrupt
        return real(self, plan, policy)

    monkeypatch.setattr(Rollouts, "errors", flaky)
    with pytest.raises(KeyboardInterrupt):
        calibrate(pipe, budget=0.6, prompts=PROMPTS, max_buckets=3, checkpoint_dir=ckpt, **SMALL)
    saved = (ckpt / "rollouts.jsonl").read_text().splitlines()
    assert len(saved) == 3  # every finished measurement was checkpointed before the interrupt
    monkeypatch.setattr(Rollouts, "errors", real)
    measured = []
    monkeypatch.setattr(Rollouts, "errors", lambda self, plan, policy=None: measured.append(plan) or real(self, plan, policy))
    with caplog.at_level("INFO", logger="tokprune.calibrate.api"):
        resumed = calibrate(pipe, budget=0.6, prompts=PROMPTS, max_buckets=3, checkpoint_dir=ckpt, **SMALL)
    assert "3 measured runs reused" in caplog.text
    assert len(measured) == ref.stats["search"]["rollouts"] - 3 + 1  # the rest, plus the held-out check
    assert resumed.to_json() == ref.to_json()  # byte for byte
    again = calibrate(pipe, budget=0.6, prompts=PROMPTS, max_buckets=3, checkpoint_dir=ckpt, **SMALL)
    assert again.to_json() == ref.to_json() and len(measured) == ref.stats["search"]["rollouts"] - 3 + 1 + 0 * 1


def test_builtin_prompts():
    prompts = load_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert any('"' in p for p in prompts)  # text rendering
    assert min(map(len, prompts)) < 12 and max(map(len, prompts)) > 200  # short and long
    picked = pick_prompts(prompts, 8)
    assert len(set(picked)) == 8 and picked == pick_prompts(prompts, 8)


def test_cli_end_to_end(tmp_path, capsys):
    from tokprune.models import build_tiny_transformer, fingerprint

    out = tmp_path / "schedule.json"
    rc = main(
        [
            "--model",
            "sd3-tiny",
            "--budget",
            "0.5",
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--num-prompts",
            "2",
            "--max-sequence-length",
            str(MSL),
            "--batch-size",
            "2",
            "--guidance",
            "5",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    sched = Schedule.load(
        out,
        expect_fingerprint=fingerprint(build_tiny_transformer()),
        expect_height=64,
        expect_width=64,
        expect_steps=STEPS,
    )
    assert abs(sched.mac_fraction - 0.5) <= 0.02
    assert 1 <= len(sched.buckets) <= 4 and sched.model == "sd3-tiny" and sched.policy == "cat"
    assert sched.scheduler == "FlowMatchEulerDiscreteScheduler" and sched.scheduler_config["shift"] == 3.0
    g = Geometry(
        batch=2,
        latent_hw=(32, 32),
        text_tokens=93,
        patch=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        heads=4,
        head_dim=8,
        joint_attention_dim=32,
        pooled_dim=64,
    )
    assert sched.mac_fraction == pytest.approx(mac_fraction(g, sched.to_plan()))
    assert sched.stats["search"]["candidates"] and "cat_reference" in sched.stats
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "achieved mac_fraction" in capsys.readouterr().out


@pytest.fixture
def cli(pipe, monkeypatch, capsys):
    """main() with the model loader stubbed to the module's tiny pipeline; returns (rc, stderr)."""
    import tokprune.models

    monkeypatch.setattr(tokprune.models, "load_pipeline", lambda *a, **k: pipe)

    def run(*extra, out="s.json"):
        rc = main(["--budget", "0.5", "--out", out, "--steps", "4", "--quiet", *extra])
        return rc, capsys.readouterr().err

    return run


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "0"], "--budget 0.0 is out of range"),
        (["--budget", "1.5"], "--budget 1.5 is out of range"),
        (["--steps", "1"], "--steps 1"),
        (["--max-buckets", "0"], "--max-buckets 0"),
        (["--height", "63"], "not a positive multiple of 4"),
        (["--height", "256", "--width", "256"], "exceeds the model's positional table"),
        (["--policy", "bogus"], "unknown selection policy 'bogus'"),
        (["--budget", "0.01"], "below what 4 steps can reach"),
    ],
)
def test_cli_bad_inputs(cli, tmp_path, args, message):
    rc, err = cli(*args, out=str(tmp_path / "s.json"))
    assert rc == 2
    assert err.startswith("tokprune-calibrate: error:") and message in err
    assert not (tmp_path / "s.json").exists()


def test_cli_bad_prompt_files(cli, tmp_path):
    rc, err = cli("--prompts", str(tmp_path / "missing.txt"), out=str(tmp_path / "s.json"))
    assert rc == 2 and "missing.txt" in err and "no such file" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n# only a comment\n")
    rc, err = cli("--prompts", str(empty), out=str(tmp_path / "s.json"))
    assert rc == 2 and "holds no prompts" in err


def test_progress_total_is_the_work_done(pipe, monkeypatch):
    """The bar's total is forecast from the cost model: exact once no later round can add measurements,
    and the first forecast (before anything ran) is within 15% of what ran; the bar ends at its total."""
    from tokprune.calibrate import api

    bars = []
    real = api._Meter.progress

    def spy(self, enabled):
        bars.append(self)
        return real(self, enabled)

    monkeypatch.setattr(api._Meter, "progress", spy)
    calls = []
    real_forecast = api._Meter.forecast

    def record(self, calib, held, plans, further, best):
        total = real_forecast(self, calib, held, plans, further, best)
        calls.append((further, total, self._bar.total))
        return total

    monkeypatch.setattr(api._Meter, "forecast", record)
    calibrate(pipe, budget=0.5, prompts=PROMPTS, max_buckets=3, **{**SMALL, "progress": True})
    meter = bars[0]
    done = meter.units
    assert len(calls) >= 3  # the seeds, at least one move round, and the held-out check
    assert calls[0][0] > 0 and abs(calls[0][1] - done) <= 0.15 * done
    for further, total, bar_total in calls:
        assert bar_total == pytest.approx(total)
        if further == 0:
            assert total == pytest.approx(done, rel=1e-9)
    assert calls[-1][1] == pytest.approx(done, rel=1e-9)


def test_forecast_counts_later_rounds_at_the_mean_cost_of_a_plan(pipe):
    """Later measurements are forecast at this round's mean cost per plan, without the dense run."""
    from tokprune.calibrate.api import _Meter
    from tokprune.calibrate.baselines import cat_schedule
    from tokprune.calibrate.checkpoint import RolloutStore

    settings = dict(steps=6, guidance=5.0, height=None, width=None, max_sequence_length=MSL, seed=0, reuse="noise")
    meter = _Meter(pipe, RolloutStore(None, {}), batch_size=4, policy="cat", **settings)
    calib = PROMPTS[:2]
    ro = Rollouts(pipe, calib, **settings)
    plans = [cat_schedule(ro.geometry, 6, 0.6, t0=t0) for t0 in (2, 3)]
    dense = ro.planned_units([]) * 2
    both = ro.planned_units(plans) * 2
    assert dense == pytest.approx(12.0)  # 6 dense steps of 2 prompts
    assert meter.forecast(calib, [], plans, 3, None) == pytest.approx(both + 3 * (both - dense) / 2)
    with meter.progress(False):
        for p in plans:
            meter.error("calib", calib, p)
    assert meter.units == pytest.approx(both)
    assert meter.forecast(calib, [], plans, 0, plans[0]) == pytest.approx(both)  # measured: nothing left


def test_cli_without_prompts_takes_the_models_own_set_as_export_does(cli, pipe, tmp_path, monkeypatch):
    """tokprune-calibrate and tokprune-export calibrate on the same prompts by default (the model's own set,
    e.g. the shapes captions); the CLI used to pass the built-in set, measuring other prompts than the export."""
    monkeypatch.setattr(pipe, "_tokprune_calibration_prompts", list(PROMPTS), raising=False)
    out = tmp_path / "s.json"
    rc, err = cli("--num-prompts", "2", "--holdout-prompts", "0", "--max-rollouts", "2", "--guidance", "5",
                  "--max-sequence-length", str(MSL), out=str(out))
    assert rc == 0, err
    assert Schedule.load(out).stats["calibration"]["prompt_source"] == "model"


def test_a_checkpoint_is_not_reused_for_other_prompts(pipe, tmp_path, monkeypatch):
    """The checkpoint's measurements are per prompt: the same directory with other prompts measures afresh."""
    ckpt = tmp_path / "ckpt"
    first = calibrate(pipe, budget=0.6, prompts=PROMPTS, max_buckets=3, checkpoint_dir=ckpt, **SMALL)
    measured = []
    real = Rollouts.errors
    monkeypatch.setattr(Rollouts, "errors", lambda self, plan, policy=None: measured.append(plan) or real(self, plan, policy))
    calibrate(pipe, budget=0.6, prompts=list(reversed(PROMPTS)), max_buckets=3, checkpoint_dir=ckpt, **SMALL)
    assert len(measured) == first.stats["search"]["rollouts"] + 1  # nothing reused: every run measured again
