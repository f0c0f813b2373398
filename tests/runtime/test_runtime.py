"""The runtime inside an unmodified diffusers pipeline, on real sd3-tiny exports."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from tokprune.runtime import EngineTransformer, RuntimeBusyError

from tests.runtime.conftest import GUIDANCE, STEPS, TEXT, clone_pipe, generate
from tokprune import pruning, runtime
from tokprune.errors import (
    BackendUnavailableError,
    ConfigError,
    ManifestError,
    ShapeError,
)


@pytest.fixture(scope="module")
def ort_rt(pruned_export):
    rt = runtime.load(pruned_export, backend="onnxruntime")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def reference_images(pruned_export, tiny_pipe):
    """The eager sampler (tokprune.pruning.apply) with the export's schedule: what every backend must match."""
    from tokprune.export.manifest import load_manifest

    sched = load_manifest(pruned_export).schedule()
    pipe = clone_pipe(tiny_pipe)
    pruning.apply(pipe, sched.to_plan(), policy="cat")
    try:
        return {n: generate(pipe, num_images=n) for n in (1, 2)}
    finally:
        pruning.remove(pipe)


def test_onnxruntime_equals_torch_backend_and_eager_sampler(pruned_export, ort_rt, fresh_pipe, reference_images):
    runtime.attach(fresh_pipe, ort_rt)
    ort = generate(fresh_pipe)
    assert ort_rt.calls == 3  # 4 steps, one of them a reuse step (no engine call)
    runtime.detach(fresh_pipe)
    torch_rt = runtime.load(pruned_export, backend="torch", model=fresh_pipe.transformer)
    runtime.attach(fresh_pipe, torch_rt)
    ref = generate(fresh_pipe)
    runtime.detach(fresh_pipe)
    assert np.abs(ort - ref).max() <= 1e-4
    assert np.abs(ort - reference_images[1]).max() <= 1e-4
    dense = generate(fresh_pipe)  # detached: the original transformer, dense
    assert np.abs(ort - dense).max() > 1e-3  # the pruned run really differs from dense


def test_torch_backend_loads_the_recorded_model(pruned_export, reference_images, fresh_pipe):
    rt = runtime.load(pruned_export, backend="torch")  # builds sd3-tiny from the manifest's model ref
    runtime.attach(fresh_pipe, rt)
    assert np.abs(generate(fresh_pipe) - reference_images[1]).max() <= 1e-4


def test_budget_one_equals_dense_diffusers(dense_export, fresh_pipe):
    expected = generate(fresh_pipe)
    view = runtime.attach(fresh_pipe, dense_export, backend="onnxruntime")
    assert isinstance(fresh_pipe.transformer, EngineTransformer) and view.calls == 0
    got = generate(fresh_pipe)
    runtime.detach(fresh_pipe)
    assert np.abs(got - expected).max() <= 1e-4


def test_batch_and_cfg(ort_rt, fresh_pipe, reference_images):
    """Two images per prompt with CFG: batch 4 runs as two engine calls of the engines' batch 2."""
    runtime.attach(fresh_pipe, ort_rt)
    got = generate(fresh_pipe, num_images=2)
    runtime.detach(fresh_pipe)
    assert got.shape[0] == 2
    assert np.abs(got - reference_images[2]).max() <= 1e-4


def test_dense_view_reuses_the_dense_bucket(ort_rt, fresh_pipe):
    expected = generate(fresh_pipe)
    runtime.attach(fresh_pipe, ort_rt.share(pruned=False))
    got = generate(fresh_pipe)
    assert fresh_pipe.transformer.calls == STEPS
    assert np.abs(got - expected).max() <= 1e-4


def test_attach_detach_roundtrip(ort_rt, fresh_pipe):
    original = fresh_pipe.transformer
    view = runtime.attach(fresh_pipe, ort_rt)
    again = runtime.attach(fresh_pipe, ort_rt)  # idempotent
    assert fresh_pipe.transformer is again and view is again and again.scheduler is fresh_pipe.scheduler
    assert again.config.in_channels == original.config.in_channels and again.dtype == torch.float32
    assert again.device == torch.device("cpu")
    runtime.detach(fresh_pipe)
    runtime.detach(fresh_pipe)  # no-op
    assert fresh_pipe.transformer is original and view.scheduler is None


# ---- refusals --------------------------------------------------------------------------------------
def test_wrong_resolution_is_refused(ort_rt, fresh_pipe):
    runtime.attach(fresh_pipe, ort_rt)
    with pytest.raises(ShapeError, match=r"got 96x96 px.*height=64, width=64.*tokprune-export .*--height 96"):
        generate(fresh_pipe, height=96, width=96)
    assert np.isfinite(generate(fresh_pipe)).all()  # the view recovers for a correct call


def test_wrong_step_count_is_refused(ort_rt, fresh_pipe):
    runtime.attach(fresh_pipe, ort_rt)
    with pytest.raises(ConfigError, match=rf"runs 6 denoising steps.*scheduled for {STEPS}.*num_inference_steps={STEPS}"):
        generate(fresh_pipe, steps=6)


def test_wrong_batch_is_refused(ort_rt, fresh_pipe):
    runtime.attach(fresh_pipe, ort_rt)
    with pytest.raises(ShapeError, match=r"batch: got 1 latents, the engines take batches of 2.*guidance_scale > 1"):
        generate(fresh_pipe, guidance=1.0)


def test_wrong_text_length_is_refused(ort_rt, fresh_pipe):
    runtime.attach(fresh_pipe, ort_rt)
    with torch.inference_mode(), pytest.raises(ShapeError, match=r"text tokens: got 109, the engines take 93.*max_sequence_length=16.*--max-sequence-length 32"):
        fresh_pipe("a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=32)


def test_other_architecture_is_refused(pruned_export, ort_rt):
    from tokprune.models import build_tiny_pipeline

    other = build_tiny_pipeline("sd3.5")
    with pytest.raises(ManifestError, match=r"fingerprint .* exported from 'sd3-tiny'.*tokprune-export --model"):
        runtime.attach(other, ort_rt)
    assert not isinstance(other.transformer, EngineTransformer)


def _copy(src, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(src, dst)
    return dst


def test_corrupted_file_is_refused(pruned_export, tmp_path):
    d = _copy(pruned_export, tmp_path)
    data = bytearray((d / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"corrupted: weights.bin \(sha256 .*rebuild with: tokprune-export"):
        runtime.load(d)
    (d / "k0064-t0080.onnx").unlink()
    with pytest.raises(ManifestError, match=r"missing: k0064-t0080.onnx"):
        runtime.load(d)


def test_mismatched_manifest_is_refused(pruned_export, tmp_path):
    d = _copy(pruned_export, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"schema_version 99.*reads 'tokprune-export' version 1.*Re-export"):
        runtime.load(d)
    manifest["schema_version"] = 1
    manifest["buckets"][1]["io"][0]["shape"] = [3, 16, 32, 32]  # an I/O table this tokprune would not derive
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"recorded I/O table differs.*re-export"):
        runtime.load(d)


def test_tensorrt_engine_environment_mismatch(pruned_export, tmp_path):
    from tokprune.runtime.engine import verify_export
    from tokprune.export.spec import Backend

    with pytest.raises(ManifestError, match=r"no TensorRT engines were built.*tokprune-build"):
        verify_export(pruned_export, Backend.TENSORRT, trt_version=lambda: "10.9.0",
                      gpu=lambda: {"name": "H100", "compute_capability": "9.0", "cuda": "12.8"})
    d = _copy(pruned_export, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["engines"] = {"tensorrt": "10.9.0", "gpu": {"name": "NVIDIA A100", "compute_capability": "8.0"},
                           "flags": {}, "built_utc": "2026-01-01T00:00:00+00:00"}
    (d / "manifest.json").write_text(json.dumps(manifest))
    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0", "cuda": "12.8"}
    with pytest.raises(ManifestError, match=r"TensorRT 10.13.0 here, engines built with 10.9.0.*sm 9.0.*sm 8.0.*tokprune-build"):
        verify_export(d, Backend.TENSORRT, check_files=False, trt_version=lambda: "10.13.0", gpu=lambda: gpu)
    verify_export(d, Backend.TENSORRT, check_files=False, trt_version=lambda: "10.9.1",
                  gpu=lambda: {**gpu, "name": "NVIDIA A100", "compute_capability": "8.0"})  # same env: accepted


def test_tensorrt_backend_refused_without_gpu(pruned_export):
    with pytest.raises(BackendUnavailableError, match=r"CUDA|TensorRT"):
        runtime.load(pruned_export, backend="tensorrt")


def test_text_pruning_needs_text_mass(pruned_export, tmp_path):
    d = _copy(pruned_export, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    assert [b["key"] for b in manifest["buckets"]][:2] == [f"k0256-t{TEXT:04d}", f"k0256-t{TEXT:04d}-probe"]
    manifest["buckets"] = [b for b in manifest["buckets"] if not b["key"].endswith("-probe")]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"prunes text tokens.*probe bucket k0256-t0093-probe.*'text_mass' output.*re-export"):
        runtime.load(d, check_files=False)


# ---- threads ---------------------------------------------------------------------------------------
def test_two_pipelines_on_one_runtime_generate_concurrently(ort_rt, tiny_pipe, reference_images):
    pipes = [clone_pipe(tiny_pipe), clone_pipe(tiny_pipe)]
    views = [runtime.attach(p, ort_rt) for p in pipes]
    assert views[0] is not views[1]  # the second pipeline got its own view on the same engines
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def at_step(_pipe, i, _t, _kw):
        if i == 1:
            barrier.wait()  # both generations are mid-run here
        return {}

    def work(k):
        try:
            results[k] = generate(pipes[k], callback=at_step)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k in range(2):
        assert np.abs(results[k] - reference_images[1]).max() <= 1e-4
        runtime.detach(pipes[k])


def test_one_view_used_by_two_generations_is_refused(pruned_export, tiny_pipe, reference_images):
    rt = runtime.load(pruned_export)
    pipe_a, pipe_b = clone_pipe(tiny_pipe), clone_pipe(tiny_pipe)
    runtime.attach(pipe_a, rt)
    pipe_b.transformer = rt  # the same view in a second pipeline, bypassing attach
    in_flight, release = threading.Event(), threading.Event()
    result = {}

    def at_step(_pipe, i, _t, _kw):
        if i == 0:
            in_flight.set()
            release.wait(60)
        return {}

    def work():
        result["a"] = generate(pipe_a, callback=at_step)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert in_flight.wait(60)
        with pytest.raises(RuntimeBusyError, match=r"generating in thread .*runtime.attach\(pipe, runtime\)"):
            generate(pipe_b)
    finally:
        release.set()
        thread.join(120)
    assert np.abs(result["a"] - reference_images[1]).max() <= 1e-4  # the first generation was not disturbed
    assert np.abs(generate(pipe_a) - reference_images[1]).max() <= 1e-4  # the view is free again
