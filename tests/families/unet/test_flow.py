"""The generic user flow on U-Nets: ``tokprune-export`` (calibrate or ``--schedule``) -> manifest -> runtime.

Every export here goes through the generic exporter (``tokprune.export``): one static ONNX graph per bucket
(dense, its text probe, DaTo-pruned + text-pruned, DeepCache cached), each checked against PyTorch in ONNX
Runtime at export, then loaded by ``tokprune.runtime`` as a drop-in ``pipe.unet``.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from tokprune import pruning, runtime
from tokprune.calibrate.api import baseline_schedule
from tokprune.calibrate.schedule import Schedule
from tokprune.errors import ManifestError, ShapeError
from tokprune.export.cli import main as export_main
from tokprune.export.manifest import MANIFEST_SCHEMA, load_manifest, verify
from tokprune.models import load_pipeline

PROMPTS = ["a red circle", "two blue squares"]
STEPS = 6


def _export(out, *argv: str) -> dict:
    assert export_main(["--out", str(out), "--backend", "onnx", "--quiet", *argv]) == 0
    data = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(data, MANIFEST_SCHEMA)
    assert verify(out) == []
    return data


def _scheduled_export(tmp_path_factory, model: str, budget: float) -> dict:
    """A DeepCache + DaTo + text-pruning schedule from the calibration API, exported with ``--schedule``."""
    root = tmp_path_factory.mktemp(model)
    pipe = load_pipeline(model)
    sched = baseline_schedule(pipe, "cache", budget=budget, steps=STEPS, guidance=7.5, model=model, text=0.5, interval=2)
    path = sched.save(root / "schedule.json")
    data = _export(root / "engines", "--model", model, "--schedule", str(path))
    return {"dir": root / "engines", "manifest": data, "schedule": sched}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return _scheduled_export(tmp_path_factory, "sd15-tiny", 0.6)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _scheduled_export(tmp_path_factory, "sdxl-tiny", 0.7)


def _images(pipe, **kw) -> np.ndarray:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, generator=gens, output_type="np", **kw).images


def _eager(model: str, schedule: Schedule, **kw) -> np.ndarray:
    pipe = load_pipeline(model)
    pruning.apply(pipe, schedule.to_plan(), policy=schedule.policy)
    return _images(pipe, **kw)


# ---- the export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_every_bucket_kind_is_exported_and_matches_pytorch(which, request):
    e = request.getfixturevalue(which)
    buckets = {b["key"]: b for b in e["manifest"]["buckets"]}
    n = e["manifest"]["geometry"]["latent_hw"][0] // (1 if which == "sd15" else 2)
    dense = f"k{n * n:04d}-t0077"
    kinds = {"dense": dense, "probe": dense + "-probe"}
    pruned = [k for k in buckets if k not in kinds.values()]
    assert len(pruned) == 2 and pruned[1] == pruned[0] + "-cached" and "-t0040" in pruned[0]  # DaTo + text, cached
    for key, b in buckets.items():
        eq = b["equivalence"]
        assert eq["status"] == "passed" and eq["worst"] <= 1e-4, (key, eq)
        names = [t["name"] for t in b["io"]]
        assert "prev_noise" not in names  # DaTo restores pruned tokens within the step: no previous prediction
        if key.endswith("-cached"):
            assert b["cached"] is True and "cache.deep" in names and "fresh.deep" not in names
        else:
            assert "cache.deep" not in names and "fresh.deep" in names
    if which == "sdxl":
        assert {"text_embeds", "time_ids"} <= {t["name"] for t in buckets[dense]["io"]}
    assert e["manifest"]["graph"] is None  # full and cached buckets differ in I/O: one static graph each


def test_schedule_file_records_cached_steps(sd15):
    sched = Schedule.load(sd15["dir"] / "schedule.json")
    plan = sched.to_plan()
    cached = [s for s in range(STEPS) if plan.is_cached(s)]
    assert cached == [2, 4] == [s for s, k in enumerate(sched.plan) if k.endswith("-cached")]
    assert sched.stats["cached_steps"] == cached and sched.family == "sd-unet"
    assert load_manifest(sd15["dir"]).step_buckets[2].endswith("-cached")
    assert sched.to_plan() == sd15["schedule"].to_plan()


def test_cached_bucket_checked_independently_in_onnxruntime(sd15):
    """Beyond the export's own check: the cached bucket on another seed's feed, ONNX Runtime vs PyTorch."""
    from tokprune.export.runners.eager import TorchRunner
    from tokprune.export.runners.ort import OnnxRuntimeRunner

    m = load_manifest(sd15["dir"])
    key = next(k for k in m.keys if k.endswith("-cached"))
    spec = m.bucket_specs()[key]
    feed = spec.sample_inputs(seed=7)
    pipe = load_pipeline("sd15-tiny")
    with TorchRunner(pipe.unet, spec) as ref, OnnxRuntimeRunner(m.onnx_path(key), spec) as ort:
        want, got = ref.infer(feed), ort.infer(feed)
    assert (want["noise"] - got["noise"]).abs().max().item() <= 1e-4


# ---- the runtime ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which, model", [("sd15", "sd15-tiny"), ("sdxl", "sdxl-tiny")])
def test_engines_in_the_pipeline_equal_the_eager_pruned_run(which, model, request):
    """Two prompts under CFG (U-Net batch 4 on batch-2 engines), every step kind, against eager pruning."""
    e = request.getfixturevalue(which)
    pipe = load_pipeline(model)
    view = runtime.attach(pipe, e["dir"])
    assert pipe.unet is view
    got = _images(pipe)
    assert view.calls == STEPS
    runtime.detach(pipe)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    want = _eager(model, e["schedule"])
    dense = _images(load_pipeline(model))
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - dense).max() > 1e-3  # it did prune


def test_sdxl_time_ids_reach_the_engines(sdxl):
    """SDXL's added conditions are bucket inputs: another original_size changes the image exactly as eagerly."""
    pipe = load_pipeline("sdxl-tiny")
    runtime.attach(pipe, sdxl["dir"])
    a = _images(pipe)
    b = _images(pipe, original_size=(32, 48))
    assert np.abs(a - b).max() > 1e-4
    assert np.abs(b - _eager("sdxl-tiny", sdxl["schedule"], original_size=(32, 48))).max() <= 1e-4


def test_cfg_halves_share_one_selection_per_prompt(sd15):
    pipe = load_pipeline("sd15-tiny")
    view = runtime.attach(pipe, sd15["dir"])
    seen = []
    run = view.executor.__call__

    def record(pruner, st, inputs):
        seen.append((st.step, inputs.img_idx.clone(), inputs.cached))
        return run(pruner, st, inputs)

    view._pruner.executor = record
    _images(pipe)
    pruned = [(s, idx, c) for s, idx, c in seen if idx.shape[1] < 1024]
    assert [c for _, _, c in pruned] == [False, True, False, True, False]
    for _, idx, _ in pruned:
        p = len(PROMPTS)
        assert torch.equal(idx[:p], idx[p:]) and not torch.equal(idx[0], idx[1])  # per prompt, shared by both halves


def test_manifest_refuses_another_architecture_and_size(sd15):
    with pytest.raises(ManifestError, match="fingerprint.*sd15-tiny"):
        runtime.attach(load_pipeline("sdxl-tiny"), sd15["dir"])
    pipe = load_pipeline("sd15-tiny")
    runtime.attach(pipe, sd15["dir"])
    with pytest.raises(ShapeError, match="resolution: got 32x32 px.*height=64, width=64"):
        pipe("x", num_inference_steps=STEPS, height=32, width=32, output_type="np")


def test_bench_grid_runs_unet_exports(sd15):
    """``tokprune-bench``'s grid on a U-Net export: eager and ONNX Runtime arms, per-bucket MAC ratios (cached too)."""
    from tokprune.bench.grid import run_bench
    from tokprune.bench.report import markdown
    from tokprune.bench.scenario import GridScenario
    from tokprune.pruning.macs import step_macs

    result = run_bench(GridScenario(engines=sd15["dir"], backends=("eager", "onnxruntime"), prompts=("a red circle",),
                                    runs=1, warmup=0, progress=False))  # fmt: skip
    rows = {(r["backend"], r["pruned"]): r for r in result.rows}
    assert set(rows) == {("eager", False), ("eager", True), ("onnxruntime", False), ("onnxruntime", True)}
    assert rows[("onnxruntime", True)]["psnr_db"] == pytest.approx(rows[("eager", True)]["psnr_db"], abs=0.5)
    g = load_manifest(sd15["dir"]).geometry
    cached = next(b for b in result.buckets if b["backend"] == "onnxruntime" and b["cached"])
    dense = step_macs(g, g.num_tokens, g.text_tokens)
    assert cached["mac_ratio"] == pytest.approx(step_macs(g, cached["image_keep"], 40, cached=True) / dense)
    assert cached["steps"] == 2 and "call_median_s" in cached
    assert "k0256-t0040-cached" in markdown(result)
