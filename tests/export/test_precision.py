"""Reduced-precision export: fp16 runs in ONNX Runtime with norms and softmax in fp32; bf16 says why it is unchecked."""

from __future__ import annotations

import onnx
import pytest
import torch
from tokprune.export.onnx_export import BucketModule, cast_for_export, export_bucket_onnx, finalize_onnx
from tokprune.export.equivalence import check_equivalence
from tokprune.export.spec import BucketSpec
from tokprune.pruning.geometry import Geometry

from tokprune.models import build_tiny_transformer


def small_spec(model, precision, keep=24) -> BucketSpec:
    g = Geometry.from_model(model, batch=2, latent_hw=(16, 16), text_tokens=20)  # N = 64
    return BucketSpec(g, keep, 12, precision=precision)


def export(tmp_path, precision):
    model = cast_for_export(build_tiny_transformer("sd3.5"), precision)  # qk RMSNorm + dual attention
    spec = small_spec(model, precision)
    raw = tmp_path / "raw" / "model.onnx"
    assert export_bucket_onnx(model, spec, raw) == "dynamo"
    proto = finalize_onnx(raw, spec)
    path = tmp_path / f"{spec.key}.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="w.bin")
    return model, spec, path, proto


def input_dtypes(proto, op_type):
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return [types.get(n.input[0]) for n in inferred.graph.node if n.op_type == op_type]


def test_fp16_export_keeps_norms_and_softmax_in_fp32_and_matches_torch(tmp_path):
    model, spec, path, proto = export(tmp_path, "fp16")
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float16
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32  # RMSNorm weights stay fp32
    norms = input_dtypes(proto, "LayerNormalization")
    softmax = input_dtypes(proto, "Softmax")
    assert norms and set(norms) == {onnx.TensorProto.FLOAT}
    assert softmax and set(softmax) == {onnx.TensorProto.FLOAT}
    assert {i.type.tensor_type.elem_type for i in proto.graph.input if i.name == "latent"} == {onnx.TensorProto.FLOAT16}
    report = check_equivalence(model, spec, path, seed=3)
    assert report["status"] == "passed", report
    assert 0 < report["worst"] < 1e-2


def test_fp16_reference_is_close_to_fp32(tmp_path):
    ref32 = build_tiny_transformer("sd3.5")
    model16 = cast_for_export(build_tiny_transformer("sd3.5"), "fp16")
    spec16, spec32 = small_spec(model16, "fp16"), small_spec(ref32, "fp32")
    feed32 = spec32.sample_inputs(0)
    feed16 = {k: (v.half() if v.is_floating_point() and k != "timestep" else v) for k, v in feed32.items()}
    out16 = BucketModule(model16, spec16).run(feed16)["noise"].float()
    out32 = BucketModule(ref32, spec32).run(feed32)["noise"]
    assert float((out16 - out32).abs().max()) < 2e-2 * float(out32.abs().max())


def test_bf16_exports_and_reports_why_onnxruntime_cannot_check_it(tmp_path):
    model, spec, path, proto = export(tmp_path, "bf16")
    onnx.checker.check_model(str(path))
    report = check_equivalence(model, spec, path)
    assert report["status"] == "skipped"
    assert "bfloat16" in report["reason"]


def test_cast_for_export_refuses_a_second_precision():
    from tokprune.export.errors import ExportError

    model = cast_for_export(build_tiny_transformer(), "fp16")
    assert cast_for_export(model, "fp16") is model
    with pytest.raises(ExportError, match="reload"):
        cast_for_export(model, "bf16")


def test_fp32_softmax_attention_takes_boolean_and_additive_masks():
    """PixArt's padded cross-attention passes a mask; the reduced-precision patch must honour it as sdpa does."""
    import torch.nn.functional as F

    from tokprune.export.onnx_export import _sdpa_fp32_softmax

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[0, ..., 3:] = False
    additive = torch.zeros(2, 1, 1, 5).masked_fill(~keep, -10000.0)
    for mask in (keep, additive):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(_sdpa_fp32_softmax(q, k, v, attn_mask=mask), want, atol=1e-5, rtol=1e-5)
