"""``tokprune-bench`` end to end on an sd3-tiny export; the fidelity metrics; the CAT reference schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokprune.bench.cli import main as bench_main
from tokprune.bench.metrics import fidelity, latent_psnr, latent_ssim


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
    assert latent_psnr(a, a) == float("inf") and latent_ssim(a, a) == pytest.approx(1.0)
    rng = float(a.max() - a.min())
    noisy = a + 0.1 * rng * torch.randn_like(a)
    assert latent_psnr(a, noisy) == pytest.approx(20.0, abs=0.3)  # 10 log10(range^2 / (0.1 range)^2)
    assert 0.0 < latent_ssim(a, noisy) < latent_ssim(a, a + 0.01 * rng * torch.randn_like(a)) < 1.0
    img = np.random.default_rng(0).random((32, 32, 3))
    out = fidelity(img, np.clip(img + 0.1, 0, 1), a, a)
    assert 15.0 < out["psnr_db"] < 25.0 and out["ssim"] < 1.0 and out["latent_psnr_db"] == float("inf")


def test_cat_reference_schedule_for_the_bench():
    from tokprune.bench.models import cat_reference_schedule

    sched = cat_reference_schedule("sd3-tiny", budget=0.5, steps=7, max_sequence_length=16, align=16)
    assert sched.plan[:2] == ("k0256-t0093",) * 2 and len(set(sched.plan[2:])) == 1  # 2 dense, then one K
    assert abs(sched.mac_fraction - 0.5) < 0.05 and sched.text_tokens == 93


def test_bench_per_thread_count_runs_each_in_its_own_process(pruned_export, tmp_path, capsys):
    out_json = tmp_path / "threads.json"
    code = bench_main(["--engines", str(pruned_export), "--backends", "eager,onnxruntime", "--runs", "1", "--warmup", "0",
                       "--threads", "1,2", "--json", str(out_json), "--quiet"])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert sorted(data["threads"]) == ["1", "2"] and data["command"].startswith("tokprune-bench")
    for n, result in data["threads"].items():
        assert result["meta"]["torch_threads"] == int(n)  # each count set in its own process
        assert {(r["backend"], r["pruned"]) for r in result["rows"]} == {(b, p) for b in ("eager", "onnxruntime")
                                                                          for p in (False, True)}
    printed = capsys.readouterr().out
    assert printed.index("### 1 thread (own process)") < printed.index("### 2 threads (own process)")
