"""``tokprune-generate`` and ``tokprune-bench`` end to end on an sd3-tiny export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokprune.runtime.bench_report import psnr, ssim
from tokprune.runtime.bench_cli import main as bench_main
from tokprune.runtime.cli import generate_main


def test_generate_writes_the_image(pruned_export, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert generate_main(["--engines", str(pruned_export), "--prompt", "a red circle", "--seed", "1", "--out", str(out),
                          "--quiet"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert "onnxruntime pruned (3 engine calls)" in capsys.readouterr().out


def test_generate_refuses_other_steps_with_the_fix(pruned_export, tmp_path, capsys):
    code = generate_main(["--engines", str(pruned_export), "--prompt", "x", "--steps", "7", "--out", str(tmp_path / "b.png"),
                          "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--steps 7" in err and "pass --steps 4" in err and "tokprune-export --model sd3-tiny" in err
    assert "num_inference_steps" not in err  # the CLI speaks its flags, not the Python API's keywords


def test_generate_refuses_a_missing_export(tmp_path, capsys):
    assert generate_main(["--engines", str(tmp_path / "none"), "--prompt", "x"]) == 1
    assert "manifest.json does not exist" in capsys.readouterr().err


def test_bench_end_to_end(pruned_export, tmp_path, capsys):
    out_json, out_png, out_md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    code = bench_main([
        "--engines", str(pruned_export), "--backends", "eager,onnxruntime,tensorrt", "--runs", "1", "--warmup", "0",
        "--json", str(out_json), "--plot", str(out_png), "--markdown", str(out_md), "--quiet",
    ])
    assert code == 0
    data = json.loads(out_json.read_text())
    rows = {(r["backend"], r["pruned"]): r for r in data["rows"]}
    assert set(rows) == {(b, p) for b in ("eager", "onnxruntime", "tensorrt") for p in (False, True)}
    for row in data["rows"]:
        assert {"backend", "pruned", "median_s", "speedup", "mac_fraction", "psnr_db"} <= row.keys()
    base = rows[("eager", False)]
    assert base["speedup"] == 1.0 and base["mac_fraction"] == 1.0 and base["identical_to_baseline"]
    ort = rows[("onnxruntime", True)]
    assert ort["status"] == "ok" and ort["median_s"] > 0 and ort["mac_fraction"] < 0.8
    # step 0 is the probe step (text pruning follows): the -probe bucket runs there, and nowhere else
    assert set(ort["bucket_call_median_s"]) == {"k0256-t0093-probe", "k0064-t0080"}
    assert set(rows[("onnxruntime", False)]["bucket_call_median_s"]) == {"k0256-t0093"}  # plain dense only
    from tokprune.export.manifest import load_manifest
    from tokprune.pruning.macs import mac_fraction

    m = load_manifest(pruned_export)
    assert ort["mac_fraction"] == pytest.approx(mac_fraction(m.geometry, m.schedule().to_plan()))  # probe counted
    probe = next(b for b in data["buckets"] if b["backend"] == "onnxruntime" and b["bucket"].endswith("-probe"))
    assert probe["text_mass"] and probe["mac_ratio"] > 1.0 and probe["steps"] == 1
    # ORT pruned and eager pruned run the same plan: same images (PSNR to the dense baseline equal)
    assert abs(ort["psnr_db"] - rows[("eager", True)]["psnr_db"]) < 0.5
    ort_dense = rows[("onnxruntime", False)]
    assert ort_dense["psnr_db"] is None or ort_dense["psnr_db"] > 80  # the dense bucket = dense diffusers
    assert rows[("tensorrt", True)]["status"] == "skipped" and "TensorRT" in rows[("tensorrt", True)]["reason"]
    assert data["meta"]["settings"]["steps"] == 4 and data["meta"]["command"].startswith("tokprune-bench")
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| tensorrt | pruned | skipped:")  # the grid is printed last
    assert "| eager | dense |" in printed and "| tensorrt | pruned | skipped:" in printed


def test_fidelity_metrics():
    torch.manual_seed(0)
    a = torch.rand(3, 32, 32)
    assert psnr(a, a, 1.0) == float("inf") and ssim(a, a, 1.0) == pytest.approx(1.0)
    noisy = a + 0.1 * torch.randn_like(a)
    assert psnr(a, noisy, 1.0) == pytest.approx(20.0, abs=0.3)  # 10 log10(1 / 0.01)
    assert 0.0 < ssim(a, noisy, 1.0) < ssim(a, a + 0.01 * torch.randn_like(a), 1.0) < 1.0


def test_cat_reference_schedule_for_the_bench():
    from tokprune.runtime.bench_models import cat_reference_schedule

    sched = cat_reference_schedule("sd3-tiny", budget=0.5, steps=7, max_sequence_length=16, align=16)
    assert sched.plan[:2] == ("k0256-t0093",) * 2 and len(set(sched.plan[2:])) == 1  # 2 dense, then one K
    assert abs(sched.mac_fraction - 0.5) < 0.05 and sched.text_tokens == 93
