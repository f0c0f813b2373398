"""The runner family (tokprune.export.runners): one life cycle, one feed check, timing, metadata, the
extension hook (runtime.load(runner_factory=...)), polygraphy's ONNX Runtime runner; the TensorRT buffer plan."""

from __future__ import annotations

import pytest
import torch
from tokprune.export.manifest import load_manifest
from tokprune.export.runners import OnnxRuntimeRunner, PolygraphyRunner, Runner, RunnerStateError, TorchRunner
from tokprune.export.spec import EXPORT_BACKENDS, RUNTIME_BACKENDS, Backend, FeedError
from tokprune.export.runners.trt import (
    ALIGN,
    TrtEngineSet,
    buffer_plan,
    require_tensorrt_runtime,
)

from tokprune.errors import BackendUnavailableError, ConfigError, ShapeError


@pytest.fixture(scope="module")
def manifest(pruned_export):
    return load_manifest(pruned_export)


@pytest.fixture(scope="module")
def pruned_spec(manifest):
    return manifest.bucket_specs()["k0064-t0080"]


def test_one_backend_enum_for_export_and_runtime():
    assert Backend.parse("ORT", choices=RUNTIME_BACKENDS) is Backend.ONNXRUNTIME
    assert Backend.parse("trt", choices=RUNTIME_BACKENDS) is Backend.TENSORRT
    assert Backend.parse("eager", choices=RUNTIME_BACKENDS) is Backend.TORCH
    assert Backend.parse("onnx", choices=EXPORT_BACKENDS) is Backend.ONNX is Backend.ONNXRUNTIME
    assert Backend.parse("auto", choices=EXPORT_BACKENDS) is Backend.AUTO
    with pytest.raises(ConfigError, match=r"backend 'tvm' is not one of .*--backend onnxruntime\|tensorrt\|torch"):
        Backend.parse("tvm", choices=RUNTIME_BACKENDS)
    with pytest.raises(ConfigError, match=r"backend 'auto' is not one of .*--backend onnxruntime\|tensorrt\|torch"):
        Backend.parse("auto", choices=RUNTIME_BACKENDS)  # AUTO is an export choice only
    with pytest.raises(ConfigError, match=r"backend 'torch' is not one of .*--backend auto\|onnx\|tensorrt"):
        Backend.parse("torch", choices=EXPORT_BACKENDS)


def test_onnxruntime_and_torch_runners_agree(manifest, pruned_spec, tiny_pipe):
    feed = pruned_spec.sample_inputs(seed=3)
    with OnnxRuntimeRunner(manifest.onnx_path(pruned_spec.key), pruned_spec) as ort, TorchRunner(tiny_pipe.transformer, pruned_spec) as ref:
        assert ort.is_active and ref.is_active and not ort.aliases_outputs
        a, b = ort.infer(feed), ref.infer(feed)
    assert not ort.is_active
    assert list(a) == pruned_spec.output_names() == list(b)
    for name in a:
        assert a[name].shape == b[name].shape
        assert (a[name] - b[name]).abs().max() <= 1e-4, name


def test_infer_before_activate_is_refused(manifest, pruned_spec):
    runner = OnnxRuntimeRunner(manifest.onnx_path(pruned_spec.key), pruned_spec)
    with pytest.raises(RunnerStateError, match=r"onnxruntime:k0064-t0080 is not active; call activate\(\)"):
        runner.infer(pruned_spec.sample_inputs())
    runner.activate()
    runner.activate()  # no-op
    runner.deactivate()
    runner.deactivate()  # no-op
    assert not runner.is_active


def test_feed_is_checked_against_the_io_table(manifest, pruned_spec):
    feed = pruned_spec.sample_inputs()
    feed["img_idx"] = feed["img_idx"][:, :32]
    feed["latent"] = feed["latent"].double()
    del feed["cache.blocks.0.k"]
    feed["extra"] = torch.zeros(1)
    with OnnxRuntimeRunner(manifest.onnx_path(pruned_spec.key), pruned_spec) as runner:
        with pytest.raises(FeedError) as info:
            runner.infer(feed)
    text = str(info.value)
    assert "img_idx: got shape (2, 32) int64 on cpu, expected shape (2, 64) int64" in text
    assert "latent: got shape (2, 16, 32, 32) float64 on cpu, expected shape (2, 16, 32, 32) float32" in text
    assert "cache.blocks.0.k: missing, expected shape (2, 4, 256, 8) float32" in text
    assert "extra: unexpected input" in text


def test_check_feed_names_the_device(pruned_spec):
    feed = pruned_spec.sample_inputs()
    pruned_spec.check_feed(feed, device=torch.device("cpu"))
    with pytest.raises(FeedError, match=r"latent: got shape \(2, 16, 32, 32\) float32 on cpu, expected shape "
                                        r"\(2, 16, 32, 32\) float32 on cuda"):
        pruned_spec.check_feed(feed, device=torch.device("cuda"))


def test_missing_onnx_file_is_refused(tmp_path, pruned_spec):
    with pytest.raises(BackendUnavailableError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "nope.onnx", pruned_spec).activate()


def test_life_cycle_reports_time_and_input_metadata(manifest, pruned_spec):
    runner = OnnxRuntimeRunner(manifest.onnx_path(pruned_spec.key), pruned_spec)
    meta = runner.get_input_metadata()  # known before activate: the bucket's I/O table
    assert list(meta) == pruned_spec.input_names()
    assert meta["img_idx"].shape == (2, 64) and meta["img_idx"].dtype == "int64"
    assert runner.last_inference_time() is None
    with runner:
        runner.infer(pruned_spec.sample_inputs())
        first = runner.last_inference_time()
        assert isinstance(first, float) and first > 0
    assert runner.last_inference_time() is None  # deactivate forgets it, as polygraphy's runners do


def test_polygraphy_onnxruntime_runner_matches_ours(manifest, pruned_spec):
    path = manifest.onnx_path(pruned_spec.key)
    feed = pruned_spec.sample_inputs(seed=5)
    with PolygraphyRunner.onnxruntime(path, pruned_spec) as poly, OnnxRuntimeRunner(path, pruned_spec) as ours:
        assert poly.backend is Backend.ONNXRUNTIME and poly.name == "onnxruntime:k0064-t0080"
        a, b = poly.infer(feed), ours.infer(feed)
        assert poly.last_inference_time() == poly.runner.last_inference_time() > 0  # polygraphy's own timing
        with pytest.raises(FeedError, match="txt_idx: missing"):
            poly.infer({k: v for k, v in feed.items() if k != "txt_idx"})
    assert not poly.runner.is_active
    assert list(a) == pruned_spec.output_names()
    for name in a:
        assert isinstance(a[name], torch.Tensor) and a[name].shape == b[name].shape
        assert (a[name] - b[name]).abs().max() <= 1e-5, name


def test_polygraphy_runner_refuses_another_buckets_graph(manifest, pruned_spec):
    dense_key = next(k for k, s in manifest.bucket_specs().items() if s.dense and not s.record_text)
    runner = PolygraphyRunner.onnxruntime(manifest.onnx_path(dense_key), pruned_spec)
    with pytest.raises(ShapeError, match=r"the graph reads .* bucket k0064-t0080's I/O table has"):
        runner.activate()
    assert not runner.is_active and not runner.runner.is_active


def test_polygraphy_tensorrt_runner_is_built_lazily_and_refused_without_tensorrt(tmp_path, pruned_spec):
    from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

    runner = PolygraphyRunner.tensorrt(tmp_path / "k0064-t0080.plan", pruned_spec, profile=1, device="cpu")
    assert isinstance(runner.runner, PolygraphyTrtRunner) and runner.runner.optimization_profile == 1
    assert runner.backend is Backend.TENSORRT and runner.aliases_outputs  # polygraphy reuses its device buffers
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed.*--backend onnxruntime"):
        runner.activate()  # this host has no TensorRT: refused before polygraphy tries to import it
    assert not runner.is_active


class CountingRunner(Runner):
    """A backend of the test's own (the extension hook): ONNX Runtime underneath, calls counted."""

    backend = "counting"

    def __init__(self, spec, path):
        super().__init__(spec)
        self.inner = OnnxRuntimeRunner(path, spec)
        self.calls = 0

    def activate_impl(self):
        self.inner.activate()

    def infer_impl(self, feed):
        self.calls += 1
        return self.inner.infer(feed, check=False)

    def deactivate_impl(self):
        self.inner.deactivate()


def test_runner_factory_runs_a_backend_of_ones_own(pruned_export, fresh_pipe):
    from tokprune import runtime

    from tests.runtime.conftest import clone_pipe, generate

    made = {}

    def factory(spec, manifest):
        made[spec.key] = CountingRunner(spec, manifest.onnx_path(spec.key))
        return made[spec.key]

    rt = runtime.load(pruned_export, runner_factory=factory)
    assert sorted(made) == sorted(rt.runners) and all(r.is_active for r in made.values())
    assert rt.runners == made and rt.runners["k0064-t0080"].name == "counting:k0064-t0080"
    runtime.attach(fresh_pipe, rt)
    got = generate(fresh_pipe)
    runtime.detach(fresh_pipe)
    assert sum(r.calls for r in made.values()) == rt.calls == 3  # 4 steps, one of them reuses
    plain = clone_pipe(fresh_pipe)
    runtime.attach(plain, pruned_export, backend="onnxruntime")
    want = generate(plain)
    runtime.detach(plain)
    assert (got == want).all()  # the same engines behind the hook: the same image
    rt.close()
    assert not any(r.is_active for r in made.values())


def test_runner_factory_must_return_a_runner(pruned_export):
    from tokprune import runtime

    with pytest.raises(ConfigError, match=r"runner_factory returned str for bucket .* must return a tokprune"):
        runtime.load(pruned_export, runner_factory=lambda spec, manifest: "not a runner")


def test_the_docstring_example_backend(pruned_export):
    """The extension example in tokprune.export.runners' docstring runs as written."""
    import tokprune.export.runners as family

    scope: dict = {"directory": pruned_export}
    example = family.__doc__.split("runs your runner for every bucket::")[1].split("Anything polygraphy")[0]
    code = "\n".join(line[4:] for line in example.strip("\n").splitlines()).replace('"engines/x"', "str(directory)")
    exec(compile(code, "docstring", "exec"), scope)  # noqa: S102 - our own docstring
    rt = scope["rt"]
    assert all(type(r).__name__ == "EchoRunner" and r.is_active for r in rt.runners.values())
    spec = rt.runners["k0064-t0080"].spec
    feed = spec.sample_inputs(seed=1)
    assert torch.equal(rt.runners["k0064-t0080"].infer(feed)["noise"], feed["latent"])
    rt.close()


# ---- TensorRT, without TensorRT -----------------------------------------------------------------------
def test_buffer_plan_from_the_io_tables(manifest):
    specs = manifest.bucket_specs()
    plan = buffer_plan(specs)
    for key, spec in specs.items():
        slots = plan.for_bucket(key)
        assert [s.name for s in slots] == spec.output_names()  # outputs only: inputs are bound by address
        end = 0
        for s, t in zip(slots, spec.outputs()):
            assert s.offset % ALIGN == 0 and s.offset >= end  # aligned, in order, no overlap
            assert s.nbytes == t.nbytes and s.shape == t.shape and s.dtype == t.dtype
            end = s.offset + s.nbytes
        assert end <= plan.arena_bytes
    # buckets share the arena: it is as large as the largest bucket, not their sum
    sizes = [max(s.offset + s.nbytes for s in plan.for_bucket(k)) for k in specs]
    assert max(sizes) <= plan.arena_bytes < max(sizes) + ALIGN < sum(sizes)
    views = plan.views(torch.empty(plan.arena_bytes, dtype=torch.uint8), "k0064-t0080")
    assert views["noise"].shape == (2, 16, 32, 32) and views["fresh.blocks.1.v"].shape == (2, 4, 64, 8)


def test_buffer_plan_stages_small_inputs_for_cuda_graphs(manifest):
    specs = manifest.bucket_specs()
    plan = buffer_plan(specs, stage_inputs=True)
    names = {s.name for s in plan.for_bucket("k0064-t0080")}
    assert {"latent", "timestep", "img_idx", "txt_idx", "prev_noise", "noise"} <= names
    assert not any(n.startswith("cache.") for n in names)  # caches stay bound by address


def test_tensorrt_refused_without_tensorrt_or_gpu(manifest):
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed.*--backend onnxruntime"):
        require_tensorrt_runtime(trt_version=lambda: None, gpu=lambda: None)
    with pytest.raises(BackendUnavailableError, match=r"no CUDA GPU is visible.*--backend onnxruntime"):
        require_tensorrt_runtime(trt_version=lambda: "10.9.0", gpu=lambda: None)
    specs = manifest.bucket_specs()
    with pytest.raises(Exception, match=r"no TensorRT engine was built for buckets"):
        TrtEngineSet({k: None for k in specs}, specs)
    engines = TrtEngineSet({k: f"/nonexistent/{k}.plan" for k in specs}, specs, device="cpu")
    runner = engines.runner("k0064-t0080")
    with pytest.raises(BackendUnavailableError):
        runner.activate()
    assert not runner.is_active and not engines.is_active


@pytest.mark.parametrize("spin", [False, True])
def test_onnxruntime_threads_spin_only_while_a_run_is_in_flight(manifest, pruned_spec, monkeypatch, spin):
    """spin=True lets intra-op threads spin for work during a run and stops them when it returns
    (session.force_spinning_stop), so torch work between engine calls keeps the cores; spin=False never spins."""
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def capture(path, sess_options=None, **kw):
        seen.append(sess_options)
        return real(path, sess_options=sess_options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", capture)
    with OnnxRuntimeRunner(manifest.onnx_path(pruned_spec.key), pruned_spec, threads=2, spin=spin) as runner:
        runner.infer(pruned_spec.sample_inputs(0))
    options = seen[-1]
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    if spin:
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.parametrize("spin", [False, True])
def test_load_passes_spin_to_every_onnxruntime_runner(pruned_export, spin):
    from tokprune import runtime

    rt = runtime.load(pruned_export, backend="onnxruntime", threads=2, spin=spin)
    try:
        ort_runners = [r for r in rt.runners.values() if isinstance(r, OnnxRuntimeRunner)]
        assert ort_runners and all(r.spin is spin and r.threads == 2 for r in ort_runners)
    finally:
        rt.close()
