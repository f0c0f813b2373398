"""``tokprune-export --model sd15-tiny --budget B`` end to end: calibration, export, ``tokprune-generate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokprune import runtime
from tokprune.calibrate.schedule import Schedule
from tokprune.export.cli import main as export_main
from tokprune.export.manifest import load_manifest, verify
from tokprune.models import load_pipeline
from tokprune.runtime.cli import generate_main

STEPS = 6


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Calibrated by the measured search (no whole-step reuse, so DaTo pruning / DeepCache must spend the budget)."""
    out = tmp_path_factory.mktemp("cal") / "engines"
    code = export_main(["--model", "sd15-tiny", "--budget", "0.7", "--steps", str(STEPS), "--no-reuse-steps",
                        "--num-prompts", "2", "--backend", "onnx", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    return out


def test_calibrated_export_spends_the_budget_on_unet_moves(calibrated):
    assert verify(calibrated) == []
    m = load_manifest(calibrated)
    sched = Schedule.load(calibrated / "schedule.json")
    assert sched.family == "sd-unet" and sched.policy == "dynamics"  # the family's default policy (DaTo)
    assert abs(sched.mac_fraction - 0.7) <= 0.02 and m.data["mac_fraction"] == sched.mac_fraction
    plan = sched.to_plan()
    n = m.geometry.num_tokens
    pruned = [plan.image_k(s, n) for s in range(STEPS) if plan.image_k(s, n) < n]
    assert all(k >= m.geometry.min_keep for k in pruned)  # never below one base token per 2x2 window
    assert 0 not in plan.image_keep  # --no-reuse-steps
    assert not plan.is_dense(STEPS - 1)  # the budget is spent on pruned or cached steps
    cached = [s for s in range(STEPS) if plan.is_cached(s)]
    assert [s for s, k in enumerate(sched.plan) if k.endswith("-cached")] == cached
    rows = sched.stats["search"]["candidates"]
    assert any("-c2" in r["structure"] or "-c3" in r["structure"] for r in rows)  # DeepCache was a measured move
    for b in m.buckets:
        assert b["equivalence"]["status"] == "passed" and b["equivalence"]["worst"] <= 1e-4


def test_generate_with_the_calibrated_engines(calibrated, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert generate_main(["--engines", str(calibrated), "--prompt", "a red circle", "--seed", "1", "--out", str(out),
                          "--quiet"]) == 0  # fmt: skip
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert f"onnxruntime pruned ({STEPS} engine calls)" in capsys.readouterr().out


def test_budget_one_engines_reproduce_the_dense_pipeline(tmp_path):
    out = tmp_path / "dense"
    assert export_main(["--model", "sd15-tiny", "--budget", "1.0", "--steps", "4", "--backend", "onnx", "--out", str(out),
                        "--quiet"]) == 0  # fmt: skip
    data = json.loads((out / "manifest.json").read_text())
    assert [b["key"] for b in data["buckets"]] == ["k1024-t0077"] and data["mac_fraction"] == 1.0

    def images(pipe):
        return pipe(["a red circle", "a green star"], num_inference_steps=4, output_type="np",
                    generator=[torch.Generator().manual_seed(i) for i in range(2)]).images  # fmt: skip

    want = images(load_pipeline("sd15-tiny"))
    pipe = load_pipeline("sd15-tiny")
    runtime.attach(pipe, out)
    got = images(pipe)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("model", ["sd1.5", "sdxl"])
def test_real_checkpoints_offline_fail_with_the_model_error(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = export_main(["--model", model, "--budget", "0.5", "--out", str(tmp_path / "e"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "offline" in err and "--model" in err
    assert not (tmp_path / "e").exists()
