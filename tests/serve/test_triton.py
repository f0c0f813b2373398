"""tokprune-triton: every config.pbtxt parses with Triton's ModelConfig schema, and the BLS model (run against an
in-process stand-in of the Python backend) produces exactly the runtime's image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc.model_config_pb2",
                    reason="Triton's ModelConfig schema comes from tritonclient: pip install 'tokprune[serve]'")

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from tests.serve import fake_triton
from tests.serve.conftest import GUIDANCE, STEPS, T5_LEN
from tokprune import runtime
from tokprune.errors import ConfigError, ManifestError
from tokprune.export.manifest import load_manifest
from tokprune.serve.triton import PIPELINE_MODEL, bucket_model_name, main, parse_config, write_repository


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main([str(tiny_export), str(out)]) == 0
    return out


def test_every_config_parses_with_tritons_schema_and_matches_the_buckets(repo, tiny_export):
    specs = load_manifest(tiny_export).bucket_specs()
    names = {d.name for d in repo.iterdir()}
    assert names == {bucket_model_name(k) for k in specs} | {PIPELINE_MODEL}
    for key, spec in specs.items():
        cfg = parse_config((repo / bucket_model_name(key) / "config.pbtxt").read_text())
        assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 0
        assert [(i.name, list(i.dims), mc.DataType.Name(i.data_type)) for i in cfg.input] == [
            (t.name, list(t.shape), {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[t.dtype]) for t in spec.inputs()]
        assert [o.name for o in cfg.output] == [t.name for t in spec.outputs()]
        version = repo / bucket_model_name(key) / "1"
        assert (version / "model.onnx").is_file() and (version / "weights.bin").is_file()
        assert (version / "weights.bin").stat().st_ino == (tiny_export / "weights.bin").stat().st_ino  # one copy on disk
    bls = parse_config((repo / PIPELINE_MODEL / "config.pbtxt").read_text())
    assert bls.backend == "python" and [i.name for i in bls.input] == ["PROMPT", "NEGATIVE_PROMPT", "SEED", "GUIDANCE"]
    assert [i.optional for i in bls.input] == [False, True, True, True]
    assert list(bls.output[0].dims) == [64, 64, 3] and bls.parameters["export_dir"].string_value == "export"


def test_a_wrong_config_is_refused_by_the_schema():
    with pytest.raises(Exception, match="data_typ"):
        parse_config('name: "x"\nbackend: "onnxruntime"\ninput [ { name: "a" data_typ: TYPE_FP32 dims: [ 1 ] } ]\n')
    with pytest.raises(Exception):
        parse_config('name: "x"\ninput [ { name: "a" data_type: TYPE_FLOAT dims: [ 1 ] } ]\n')


def _bls(monkeypatch, repo):
    server = fake_triton.install(monkeypatch, repo)
    from tokprune.serve.triton_bls import TritonPythonModel

    cfg = parse_config((repo / PIPELINE_MODEL / "config.pbtxt").read_text())
    model = TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True),
                      "model_repository": str(repo / PIPELINE_MODEL), "model_version": "1", "model_name": PIPELINE_MODEL})
    return model, server


def _request(prompt, seed=None, guidance=None, negative=None):
    T = fake_triton.Tensor
    inputs = [T("PROMPT", np.array([prompt.encode()], dtype=object))]
    if negative is not None:
        inputs.append(T("NEGATIVE_PROMPT", np.array([negative.encode()], dtype=object)))
    if seed is not None:
        inputs.append(T("SEED", np.array([seed], dtype=np.int64)))
    if guidance is not None:
        inputs.append(T("GUIDANCE", np.array([guidance], dtype=np.float32)))
    return fake_triton.InferenceRequest(PIPELINE_MODEL, inputs, ["IMAGE"])


def test_bls_loop_equals_the_runtime(monkeypatch, repo, tiny_export):
    from tokprune.models import build_tiny_pipeline
    from tokprune.serve.worker import clone_pipeline

    model, server = _bls(monkeypatch, repo)
    try:
        (resp,) = model.execute([_request("a red circle", seed=3)])
        assert not resp.has_error(), resp.error().message()
        image = fake_triton.get_output_tensor_by_name(resp, "IMAGE").as_numpy()
    finally:
        model.finalize()
    # the runtime's own run: same export, same seed, engines in ONNX Runtime from the export directory
    pipe = clone_pipeline(build_tiny_pipeline("sd3"))
    view = runtime.attach(pipe, tiny_export, backend="onnxruntime", threads=1)
    with torch.inference_mode():
        ref = pipe("a red circle", negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   max_sequence_length=T5_LEN, generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    view.close()
    ref = (ref * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil conversion
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert np.array_equal(image, ref)
    # the bucket was picked per step by the schedule: dense, pruned, (reuse: no call), pruned
    steps = load_manifest(tiny_export).data["step_buckets"]
    assert server.calls == [bucket_model_name(k) for k in steps if k is not None]


def test_bls_refuses_a_bad_request_and_keeps_serving(monkeypatch, repo):
    model, _ = _bls(monkeypatch, repo)
    try:
        bad, good = model.execute([_request("a red circle", seed=1, guidance=0.5), _request("a blue square", seed=1)])
    finally:
        model.finalize()
    assert bad.has_error() and "guidance: got 0.5" in bad.error().message() and "--guidance 1" in bad.error().message()
    assert not good.has_error()


def test_tensorrt_plans_are_used_where_built(tiny_export, tmp_path, monkeypatch):
    from tokprune.export import manifest as manifest_module

    plan = tmp_path / "fake.plan"
    plan.write_bytes(b"plan")
    monkeypatch.setattr(manifest_module.Manifest, "engine_path", lambda self, key: plan)
    write_repository(tiny_export, tmp_path / "repo")
    for d in (tmp_path / "repo").iterdir():
        if d.name != PIPELINE_MODEL:
            cfg = parse_config((d / "config.pbtxt").read_text())
            assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
            assert (d / "1" / "model.plan").read_bytes() == b"plan" and not (d / "1" / "model.onnx").exists()
    monkeypatch.setattr(manifest_module.Manifest, "engine_path", lambda self, key: None)
    with pytest.raises(ConfigError, match="tokprune-build"):
        write_repository(tiny_export, tmp_path / "repo2", prefer="tensorrt")


def test_damaged_export_and_existing_out_are_refused(tiny_export, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    (bad / "weights.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="weights.bin"):
        write_repository(bad, tmp_path / "r")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ConfigError, match="--force"):
        write_repository(tiny_export, tmp_path / "busy")


def test_repository_never_replaces_what_it_did_not_write(tmp_path):
    """OUT with user files is refused, --force or not; a foreign .partial beside it is never deleted."""
    from tokprune.errors import ConfigError
    from tokprune.serve.triton import _check_replaceable

    out = tmp_path / "repo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(ConfigError, match="not a repository written by tokprune-triton"):
            _check_replaceable(out, force=force)
    assert (out / "notes.txt").read_text() == "mine"
    _check_replaceable(tmp_path / "absent", force=False)
    (tmp_path / "empty").mkdir()
    _check_replaceable(tmp_path / "empty", force=False)
