"""TensorRT lint on small hand-built ONNX graphs (IR version pinned to 10: ORT 1.31 rejects onnx 1.23's IR 14)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokprune.export.errors import LintError
from tokprune.export.lint import TOPK_MAX_K, lint_model, raise_on_errors

IR_VERSION = 10


def make_model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def vi(name, dtype=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def errors(model):
    return [i for i in lint_model(model) if i.severity == "error"]


def test_clean_graph_passes_and_runs_in_onnxruntime():
    import onnxruntime as ort

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    idx = numpy_helper.from_array(np.array([[0, 1], [1, 0]], np.int64), "idx")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("GatherElements", ["y", "idx"], ["g"], axis=1, name="gather"),
        helper.make_node("Softmax", ["g"], ["out"], name="softmax"),
    ]
    model = make_model(nodes, [vi("x")], [vi("out", shape=(2, 2))], [w, idx])
    onnx.checker.check_model(model)
    assert lint_model(model) == []
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((2, 4), np.float32)})[0]
    np.testing.assert_allclose(out, 0.5)


def test_unsupported_and_custom_domain_ops_are_named():
    nodes = [
        helper.make_node("Det", ["x"], ["d"], name="determinant"),
        helper.make_node("FusedGemm", ["x", "x"], ["y"], name="ms_fused", domain="com.microsoft"),
    ]
    model = make_model(nodes, [vi("x", shape=(4, 4))], [vi("d", shape=()), vi("y", shape=(4, 4))])
    found = {(i.node, i.op_type) for i in errors(model)}
    assert found == {("determinant", "Det"), ("ms_fused", "FusedGemm")}


def test_scatternd_reduction_must_be_none():
    def model(reduction):
        node = helper.make_node("ScatterND", ["data", "ind", "upd"], ["out"], name="scatter_cache", reduction=reduction)
        return make_model([node], [vi("data", shape=(4, 3)), vi("ind", TensorProto.INT64, (2, 1)), vi("upd", shape=(2, 3))],
                          [vi("out", shape=(4, 3))])

    assert errors(model("none")) == []
    (issue,) = errors(model("add"))
    assert issue.node == "scatter_cache" and "reduction='add'" in issue.message


@pytest.mark.parametrize("k, expect_error", [(TOPK_MAX_K, False), (TOPK_MAX_K + 1, True)])
def test_topk_k_limit(k, expect_error):
    kt = numpy_helper.from_array(np.array([k], np.int64), "k")
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="select_tokens", axis=1)
    model = make_model([node], [vi("x", shape=(1, 5000))],
                       [vi("v", shape=(1, k)), vi("i", TensorProto.INT64, (1, k))], [kt])
    found = errors(model)
    assert bool(found) == expect_error
    if expect_error:
        assert found[0].node == "select_tokens" and "3840" in found[0].message


def test_topk_with_runtime_k_is_a_warning():
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="dyn_topk")
    model = make_model([node], [vi("x", shape=(1, 10)), vi("k", TensorProto.INT64, (1,))],
                       [vi("v", shape=(1, None)), vi("i", TensorProto.INT64, (1, None))])
    (issue,) = lint_model(model)
    assert issue.severity == "warning" and issue.node == "dyn_topk"


def test_float64_is_refused_int64_indices_are_fine():
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE, name="to_double"),
        helper.make_node("Cast", ["x64"], ["y"], to=TensorProto.FLOAT, name="back"),
        helper.make_node("Gather", ["y", "i"], ["out"], axis=0, name="gather_rows"),
    ]
    model = make_model(nodes, [vi("x"), vi("i", TensorProto.INT64, (1,))], [vi("out", shape=(1, 4))])
    found = errors(model)
    assert found and all(i.node == "to_double" for i in found)  # the Cast and the float64 tensor it makes
    assert any("DOUBLE" in i.message for i in found)
    assert not any(i.node == "gather_rows" for i in found)


def test_double_graph_input_names_its_consumer():
    node = helper.make_node("Relu", ["x"], ["y"], name="relu_on_double")
    model = make_model([node], [vi("x", TensorProto.DOUBLE)], [vi("y", TensorProto.DOUBLE)])
    assert {i.node for i in errors(model)} == {"relu_on_double"}


def test_raise_on_errors_lists_offenders_and_ignores_warnings(tmp_path):
    node = helper.make_node("Det", ["x"], ["d"], name="bad_node")
    model = make_model([node], [vi("x", shape=(4, 4))], [vi("d", shape=())])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(LintError, match="bad_node"):
        raise_on_errors(lint_model(path), str(path))
    raise_on_errors([i for i in lint_model(path) if i.severity == "warning"], str(path))
