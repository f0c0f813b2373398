"""Profiling the tiny pipeline, calibrate(), and the tokprune-calibrate CLI end to end."""

from __future__ import annotations

import math

import pytest
import torch

from tokprune.calibrate import Schedule, calibrate
from tokprune.calibrate.cli import main
from tokprune.calibrate.profile import load_prompts, pick_prompts, profile_pipeline
from tokprune.errors import ConfigError
from tokprune.pruning import Geometry
from tokprune.pruning.macs import mac_fraction

STEPS = 4
MSL = 16  # T5 tokens: T = 77 + 16 = 93
PROMPTS = ["a red circle on a white background", "two blue squares"]
SMALL = dict(image_grid=(64, 192), text_grid=(48,), max_sequence_length=MSL, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def pipe():
    from tokprune.models import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def profile(pipe):
    return profile_pipeline(pipe, PROMPTS, steps=STEPS, guidance=5.0, seed=3, **SMALL)


def _guided_predictions(pipe, guidance):
    """Guided noise predictions of a plain pipeline run, per step: list of (P, C*H*W)."""
    preds = []

    def hook(module, args, kwargs, output):
        p = output[0].float().flatten(1)
        u, c = p.chunk(2)
        preds.append(u + guidance * (c - u))

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        latents = pipe(
            prompt=PROMPTS,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            output_type="latent",
            generator=torch.Generator().manual_seed(3),
            max_sequence_length=MSL,
        ).images
    finally:
        handle.remove()
    return preds, latents


def test_profile_measures_the_dense_run(pipe, profile):
    assert "forward" not in pipe.transformer.__dict__  # the recording hook is gone
    assert profile.steps == STEPS and profile.num_samples == 2
    assert profile.num_tokens == 256 and profile.text_tokens == 77 + MSL
    assert math.isinf(profile.reuse_error[0]) and all(math.isinf(e) for e in profile.image_error[0])
    # reuse error = ||v_{i-1} - v_i|| / ||v_i|| of the guided prediction of an independent plain run
    preds, _ = _guided_predictions(pipe, 5.0)
    assert len(preds) == STEPS
    for s in range(1, STEPS):
        want = ((preds[s - 1] - preds[s]).norm(dim=1) / preds[s].norm(dim=1)).mean().item()
        assert profile.reuse_error[s] == pytest.approx(want, rel=1e-4)
        assert all(0.0 < e < 10.0 for e in profile.image_error[s] + profile.text_error[s])
    # step weights follow the shifted flow-matching step sizes: normalised to mean 1
    assert sum(profile.step_weight) == pytest.approx(STEPS)
    assert profile.scores["relative_noise"][0]["p99"] == 0.0  # step 0 is its own reference
    assert profile.scores["dynamics"][1]["mean"] > 0.0


def test_profile_is_deterministic(pipe, profile):
    again = profile_pipeline(pipe, PROMPTS, steps=STEPS, guidance=5.0, seed=3, **SMALL)
    assert again == profile


def test_calibrate_from_profile_without_model_calls(pipe, profile):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        sched = calibrate(
            pipe,
            budget=0.5,
            steps=STEPS,
            guidance=5.0,
            max_sequence_length=MSL,
            profile=profile,
            model="sd3-tiny",
            max_buckets=3,
        )
        dense = calibrate(pipe, budget=1.0, steps=STEPS, guidance=5.0, max_sequence_length=MSL, model="sd3-tiny")
    finally:
        handle.remove()
    assert calls == []
    g = sched.geometry(pipe.transformer.config, batch=2)
    assert abs(mac_fraction(g, sched.to_plan()) - 0.5) <= 0.02
    assert sched.mac_fraction == pytest.approx(mac_fraction(g, sched.to_plan()))
    assert len(sched.buckets) <= 3 and sched.plan[0] == "k0256-t0093"
    assert dense.plan == ("k0256-t0093",) * STEPS and dense.mac_fraction == 1.0
    with pytest.raises(ConfigError, match="profile has 4 steps"):
        calibrate(pipe, budget=0.5, steps=6, guidance=5.0, max_sequence_length=MSL, profile=profile)


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
    assert len(sched.stats["profile"]["image_error"]) == STEPS and "cat_reference" in sched.stats
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
    assert rc == 2 and "missing.txt" in err and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n# only a comment\n")
    rc, err = cli("--prompts", str(empty), out=str(tmp_path / "s.json"))
    assert rc == 2 and "holds no prompts" in err
