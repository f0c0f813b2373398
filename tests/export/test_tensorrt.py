"""Everything about the TensorRT path that is derivable without TensorRT: profiles, flags, refusals, manifest.

The build itself goes through polygraphy's documented loaders; here a fake
``polygraphy.backend.trt`` module records what would be passed to TensorRT.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import jsonschema
import pytest
from tokprune.export import tensorrt as trt
from tokprune.export.errors import LintError
from tokprune.export.lint import LintIssue
from tokprune.export.manifest import MANIFEST_SCHEMA, load_manifest, verify
from tokprune.export.spec import BucketSpec
from tokprune.pruning.geometry import Geometry

from tokprune.errors import BackendUnavailableError, ManifestError

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda": "12.8"}


def geometry() -> Geometry:
    return Geometry(batch=2, latent_hw=(32, 32), text_tokens=333, patch=2, in_channels=16, out_channels=16,
                    num_layers=2, heads=4, head_dim=8, joint_attention_dim=32, pooled_dim=64)


def test_profile_is_static_and_derived_from_the_spec_inputs():
    spec = BucketSpec(geometry(), 64, 100)
    shapes = trt.profile_shapes(spec)
    assert list(shapes) == spec.input_names()  # inputs only, in graph order
    for t in spec.inputs():
        assert shapes[t.name] == (t.shape, t.shape, t.shape)
    assert shapes["cache.blocks.0.k"][0] == (2, 4, 256, 8) and shapes["img_idx"][1] == (2, 64)


def test_build_flags_are_strongly_typed_without_tf32():
    flags = trt.build_flags("fp16", "10.9.0.34", opt_level=4)
    assert flags["strongly_typed"] is True and flags["tf32"] is False
    assert flags["precision"] == "fp16" and flags["builder_optimization_level"] == 4 and flags["tensorrt_major"] == 10
    assert trt.build_flags("bf16", "11.0.0")["tensorrt_major"] == 11
    with pytest.raises(ValueError):
        trt.build_flags("fp32", "10.9", opt_level=7)


@pytest.mark.parametrize(
    "version, gpu, needle",
    [(None, H100, "TensorRT is not installed"), ("10.3.0", H100, "too old"), ("10.9.0", None, "no CUDA GPU")],
)
def test_refusals_say_why_and_how_to_build_later(version, gpu, needle):
    ok, why = trt.availability(trt_version=lambda: version, gpu=lambda: gpu)
    assert not ok and needle in why
    with pytest.raises(BackendUnavailableError) as err:
        trt.require_tensorrt("engines/x", trt_version=lambda: version, gpu=lambda: gpu)
    assert needle in str(err.value) and "tokprune-build engines/x" in str(err.value)
    assert trt.availability(trt_version=lambda: "10.9.1", gpu=lambda: H100) == (True, "")


def test_this_host_cannot_build():
    assert trt.tensorrt_version() is None  # TensorRT cannot be installed in this workplace
    ok, why = trt.availability()
    assert not ok and why


def test_engine_mismatches_name_what_differs():
    recorded = {"tensorrt": "10.9.0", "gpu": H100}
    assert trt.engine_mismatches(recorded, trt_version="10.9.1", gpu=H100) == []
    lines = trt.engine_mismatches(recorded, trt_version="10.11.0",
                                  gpu={"name": "NVIDIA A100", "compute_capability": "8.0", "cuda": "12.8"})
    assert len(lines) == 2 and "10.11.0" in lines[0] and "A100" in lines[1]
    assert trt.engine_mismatches(None, trt_version=None, gpu=None) == ["no TensorRT engines were built for this export"]


def test_export_backend_tensorrt_fails_fast_before_loading_anything(monkeypatch, capsys, tmp_path):
    from tokprune.export.cli import main

    import tokprune.models

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(tokprune.models, "load_pipeline", boom)
    rc = main(["--model", "sd3-tiny", "--budget", "0.5", "--backend", "tensorrt", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "TensorRT is not installed" in err and f"tokprune-build {tmp_path / 'x'}" in err
    assert not (tmp_path / "x").exists()


def test_build_cli_refuses_without_tensorrt(export_dense, capsys):
    from tokprune.export.cli import build_main

    rc = build_main([str(export_dense["dir"]), "--quiet"])
    assert rc == 1 and "cannot build TensorRT engines" in capsys.readouterr().err


class FakePolygraphyTrt(types.ModuleType):
    """Records the calls tokprune makes to polygraphy.backend.trt."""

    def __init__(self):
        super().__init__("polygraphy.backend.trt")
        self.calls: list[tuple] = []
        fake = self

        class Profile(dict):
            def add(self, name, min, opt, max):
                self[name] = (tuple(min), tuple(opt), tuple(max))
                return self

        def network_from_onnx_path(path, strongly_typed=None):
            fake.calls.append(("network", Path(path).name, strongly_typed))
            return ("network", path)

        def CreateConfig(**kwargs):
            fake.calls.append(("config", kwargs))
            return kwargs

        def engine_from_network(network, config=None, save_timing_cache=None):
            fake.calls.append(("build", network[1], save_timing_cache))
            Path(save_timing_cache).write_bytes(b"timing")
            return b"serialized engine for " + Path(network[1]).name.encode()

        def save_engine(engine, path):
            Path(path).write_bytes(engine)

        self.Profile = Profile
        self.network_from_onnx_path = network_from_onnx_path
        self.CreateConfig = CreateConfig
        self.engine_from_network = engine_from_network
        self.save_engine = save_engine


@pytest.fixture
def fake_gpu_host(monkeypatch):
    fake = FakePolygraphyTrt()
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", fake)
    monkeypatch.setattr(trt, "tensorrt_version", lambda: "10.9.0.34")
    monkeypatch.setattr(trt, "gpu_info", lambda: dict(H100))
    return fake


def test_build_engines_records_the_build_in_the_manifest(export_half, tmp_path, fake_gpu_host):
    directory = tmp_path / "copy"
    shutil.copytree(export_half["dir"], directory)
    engines = trt.build_engines(directory, progress=False, layout="per-bucket")  # single: tests/export/test_dynamic_trt.py
    manifest = load_manifest(directory)
    jsonschema.validate(manifest.data, MANIFEST_SCHEMA)
    assert engines["gpu"] == H100 and engines["tensorrt"] == "10.9.0.34" and engines["layout"] == "engine-per-bucket"
    assert engines["flags"]["strongly_typed"] is True and engines["flags"]["builder_optimization_level"] == 3
    assert manifest.data["versions"]["tensorrt"] == "10.9.0.34"
    specs = manifest.bucket_specs()
    for key, spec in specs.items():
        path = manifest.engine_path(key)
        assert path == directory / "engines" / f"{key}.plan" and path.read_bytes().endswith(f"{key}.onnx".encode())
    assert verify(directory) == []
    builds = [c for c in fake_gpu_host.calls if c[0] == "build"]
    assert len(builds) == len(specs)
    configs = [c[1] for c in fake_gpu_host.calls if c[0] == "config"]
    assert configs[0]["load_timing_cache"] is None and all(c["load_timing_cache"] for c in configs[1:])  # shared cache
    for cfg, spec in zip(configs, specs.values()):
        (profile,) = cfg["profiles"]
        assert profile == trt.profile_shapes(spec) and cfg["tf32"] is False
    assert all(c[2] is True for c in fake_gpu_host.calls if c[0] == "network")
    with pytest.raises(ManifestError, match="--rebuild"):
        trt.build_engines(directory, progress=False, layout="per-bucket")
    (directory / "engines" / f"{next(iter(specs))}.plan").write_bytes(b"tampered")
    assert any("corrupted: engines/" in p for p in verify(directory))


def test_lint_errors_stop_the_build_before_any_engine(export_dense, tmp_path, fake_gpu_host, monkeypatch):
    from tokprune.export import lint

    directory = tmp_path / "copy"
    shutil.copytree(export_dense["dir"], directory)
    monkeypatch.setattr(lint, "lint_model", lambda path: [LintIssue("error", "node_scatter", "ScatterND", "reduction='add'")])
    with pytest.raises(LintError, match="node_scatter"):
        trt.build_engines(directory, progress=False)
    assert not any(c[0] == "build" for c in fake_gpu_host.calls)
    assert load_manifest(directory).data["engines"] is None and verify(directory) == []


def test_export_builds_engines_when_tensorrt_and_gpu_are_present(export_dense, tmp_path, fake_gpu_host, capsys):
    from tokprune.export.cli import main

    out = tmp_path / "with-engines"
    rc = main(["--model", "sd3-tiny", "--schedule", str(export_dense["dir"] / "schedule.json"),
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "built" in capsys.readouterr().out
    m = load_manifest(out)
    assert m.has_engines and all(m.engine_path(k).is_file() for k in m.keys) and verify(out) == []
