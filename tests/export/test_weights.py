"""SharedWeights: content-addressed, append-only weights file shared by every bucket graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokprune.export.errors import ExportError
from tokprune.export.weights import SharedWeights

W = np.arange(512, dtype=np.float32).reshape(2, 256)  # 2 KiB: externalized
B = np.full((2, 256), 0.5, np.float32)


def graph_with(name_w: str, w: np.ndarray, name_b: str = "b", small: bool = True):
    inits = [numpy_helper.from_array(w, name_w), numpy_helper.from_array(B, name_b)]
    nodes = [helper.make_node("Add", ["x", name_w], ["y"]), helper.make_node("Add", ["y", name_b], ["z"])]
    if small:  # below min_bytes: stays inline
        inits.append(numpy_helper.from_array(np.ones(4, np.float32), "tiny"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 256])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_equal_bytes_are_stored_once_whatever_their_names(tmp_path):
    store = SharedWeights(tmp_path / "weights.bin")
    a, b = graph_with("model.w", W), graph_with("val_17", W.copy())  # same bytes, another name
    s1, s2 = store.externalize(a), store.externalize(b)
    assert (s1.tensors, s1.new_bytes, s1.reused_bytes) == (2, 2 * W.nbytes, 0)
    assert (s2.new_bytes, s2.reused_bytes) == (0, 2 * W.nbytes)
    assert s1.inline_bytes == 16
    assert (tmp_path / "weights.bin").stat().st_size == 2 * W.nbytes  # both tensors 64-byte aligned, once
    for i, model in enumerate((a, b)):
        path = tmp_path / f"m{i}.onnx"
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        x = np.zeros((2, 256), np.float32)
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_array_equal(out, W + 0.5)
    assert (tmp_path / "m0.onnx").stat().st_size < 1000  # the graph carries no weights


def test_resume_truncates_uncommitted_bytes_and_refuses_a_short_file(tmp_path):
    path = tmp_path / "weights.bin"
    store = SharedWeights(path)
    store.externalize(graph_with("model.w", W))
    state = store.state()
    with open(path, "ab") as fh:  # a bucket that was being written when the export died
        fh.write(b"x" * 1000)
    resumed = SharedWeights(path, state)
    assert path.stat().st_size == state["size"]
    stats = resumed.externalize(graph_with("model.w", W))
    assert stats.new_bytes == 0  # the committed copy is found by hash
    with open(path, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ExportError, match="--force"):
        SharedWeights(path, state)


def test_a_parameter_with_different_bytes_in_another_bucket_is_an_error(tmp_path):
    store = SharedWeights(tmp_path / "weights.bin")
    store.externalize(graph_with("model.w", W))
    other = store.externalize(graph_with("val_3", W, name_b="val_3_b", small=False))
    assert other.renamed == []
    stats = store.externalize(graph_with("val_3", W + 1, name_b="val_3_b"))  # exporter constants may differ
    assert stats.renamed == ["val_3"]
    with pytest.raises(ExportError, match="model.w"):
        store.externalize(graph_with("model.w", W + 1))
