"""The per-bucket ONNX export: names from the spec, the TorchScript fallback, no frozen scratch buffers."""

from __future__ import annotations

import logging

import onnx
import pytest
import torch
from tokprune.export.onnx_export import export_bucket_onnx, finalize_onnx
from tokprune.export.equivalence import check_equivalence
from tokprune.export.spec import BucketSpec
from tokprune.pruning.geometry import Geometry

from tokprune.models import build_tiny_transformer


@pytest.fixture(scope="module")
def model():
    return build_tiny_transformer()


def spec_for(model, keep) -> BucketSpec:
    return BucketSpec(Geometry.from_model(model, batch=1, latent_hw=(16, 16), text_tokens=20), keep)


def save(proto, path):
    onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def test_dense_bucket_has_no_uninitialised_constant(export_dense):
    from tokprune.export.manifest import load_manifest

    m = load_manifest(export_dense["dir"])
    (key,) = m.keys
    g = m.geometry
    proto = onnx.load(str(m.onnx_path(key)), load_external_data=False)
    # the dense path's zero-filled output buffer (B, N, P) must not become a random-bytes initializer
    assert (g.batch, g.num_tokens, g.token_channels) not in {tuple(i.dims) for i in proto.graph.initializer}
    assert any(n.op_type == "ConstantOfShape" for n in proto.graph.node)


def test_falls_back_to_torchscript_when_dynamo_fails_and_says_why(model, tmp_path, monkeypatch, caplog):
    real = torch.onnx.export

    def flaky(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", flaky)
    spec = spec_for(model, 16)
    with caplog.at_level(logging.WARNING, logger="tokprune.export.onnx_export"):
        used = export_bucket_onnx(model, spec, tmp_path / "raw" / "m.onnx")
    assert used == "torchscript"
    assert "simulated dynamo failure" in caplog.text and spec.key in caplog.text
    proto = finalize_onnx(tmp_path / "raw" / "m.onnx", spec)  # same names, shapes and dtypes
    report = check_equivalence(model, spec, save(proto, tmp_path / "ts.onnx"))
    assert report["status"] == "passed" and report["worst"] <= 1e-4


def test_io_mismatch_is_reported_by_name(model, tmp_path):
    from onnx import TensorProto, helper
    from tokprune.export.errors import ExportError

    spec = spec_for(model, 16)
    inputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT if t.dtype == "float32" else TensorProto.INT64,
                                            list(t.shape)) for t in spec.inputs()]
    inputs[4] = helper.make_tensor_value_info("img_idx", TensorProto.INT32, [1, 32])  # wrong dtype and K
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape)) for t in spec.outputs()]
    nodes = [helper.make_node("Identity", ["latent"], [o.name]) for o in outputs]
    graph = helper.make_graph(nodes, "fake", inputs, outputs)
    onnx.save_model(helper.make_model(graph, ir_version=10), str(tmp_path / "m.onnx"))
    with pytest.raises(ExportError) as err:
        finalize_onnx(tmp_path / "m.onnx", spec)
    assert "input img_idx: shape (1, 32), expected (1, 16)" in str(err.value)
    assert "input img_idx: dtype INT32, expected int64" in str(err.value)
