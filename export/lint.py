"""Check an ONNX graph against what TensorRT's ONNX parser accepts, before any build.

A failed TensorRT build on a GPU host costs minutes and says little; this lint runs on the
export host in milliseconds and names the node. It checks:

- every op is in :data:`TRT_OPS` (TensorRT 10.x ONNX parser, default domain only);
- ``ScatterND`` has ``reduction="none"`` (TensorRT's scatter layer has no reduction);
- ``TopK``'s ``k`` is a constant <= :data:`TOPK_MAX_K` (3840);
- no tensor (input, output, initializer, intermediate after shape inference, ``Cast`` target,
  constant) has a dtype TensorRT lacks: float64, strings, complex, unsigned > 8 bit, int16.
  int64 is fine (indices; TensorRT >= 10 supports it).

Example::

    issues = lint_model("out/k0128-t0333.onnx")
    errors = [i for i in issues if i.severity == "error"]
    raise_on_errors(issues, "out/k0128-t0333.onnx")     # LintError naming the first offenders
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokprune.export.errors import LintError

__all__ = ["TOPK_MAX_K", "TRT_OPS", "UNSUPPORTED_DTYPES", "LintIssue", "lint_model", "raise_on_errors"]

#: Largest k TensorRT's TopK layer accepts.
TOPK_MAX_K = 3840

#: Operators the TensorRT 10.x ONNX parser imports (onnx-tensorrt ``docs/operators.md``).
TRT_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool
    BatchNormalization Bernoulli BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow
    Cast CastLike Ceil Celu CenterCropPad Clip Compress Concat Constant ConstantOfShape Conv
    ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout
    DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid
    HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool
    LRN LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
    Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

#: ONNX element types TensorRT cannot hold (TensorProto.DataType names).
UNSUPPORTED_DTYPES: frozenset[str] = frozenset(
    {"DOUBLE", "STRING", "COMPLEX64", "COMPLEX128", "UINT16", "UINT32", "UINT64", "INT16"}
)


@dataclass(frozen=True)
class LintIssue:
    """One finding: ``node`` is the node's name (or ``#index`` when unnamed), or a graph tensor."""

    severity: str  # "error" | "warning"
    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: node {self.node!r} ({self.op_type}): {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "node": self.node, "op_type": self.op_type, "message": self.message}


def _node_name(node: Any, index: int) -> str:
    return node.name or f"#{index}"


def lint_model(model_or_path: Any) -> list[LintIssue]:
    """All TensorRT incompatibilities of an ONNX model (a ``ModelProto`` or a path), errors first.

    Weights are not loaded (external data stays on disk); shape inference fills the dtypes of
    intermediate tensors.
    """
    import onnx

    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path), load_external_data=False)
    else:
        model = model_or_path
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - linting must not depend on shape inference succeeding
        inferred = model
    graph = inferred.graph
    issues: list[LintIssue] = []
    dtype_name = onnx.TensorProto.DataType.Name

    constants: dict[str, Any] = {t.name: t for t in graph.initializer}
    producers: dict[str, tuple[str, str]] = {}
    consumers: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            producers[out] = (_node_name(node, i), node.op_type)
        for inp in node.input:
            consumers.setdefault(inp, (_node_name(node, i), node.op_type))
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t

    for i, node in enumerate(graph.node):
        name, op = _node_name(node, i), node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in ("", "ai.onnx"):
            issues.append(LintIssue("error", name, op, f"custom-domain op {node.domain}::{op} has no TensorRT importer"))
            continue
        if op not in TRT_OPS:
            issues.append(LintIssue("error", name, op, f"{op} is not supported by TensorRT's ONNX parser"))
            continue
        if op in ("ScatterND", "ScatterElements"):
            reduction = attrs.get("reduction", b"none")
            reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
            if reduction != "none":
                severity = "error" if op == "ScatterND" else "warning"
                issues.append(LintIssue(severity, name, op, f"reduction={reduction!r}; TensorRT supports only 'none'"))
        if op == "TopK":
            k = _topk_k(node, attrs, constants)
            if k is None:
                issues.append(LintIssue("warning", name, op, "k is not a constant; cannot check it against the TensorRT limit"))
            elif k > TOPK_MAX_K:
                issues.append(LintIssue("error", name, op, f"k={k} exceeds TensorRT's TopK limit of {TOPK_MAX_K}"))
        if op == "Cast":
            to = attrs.get("to")
            if to is not None and dtype_name(to) in UNSUPPORTED_DTYPES:
                issues.append(LintIssue("error", name, op, f"casts to {dtype_name(to)}, which TensorRT does not support"))
        if op in ("Constant", "ConstantOfShape"):
            value = attrs.get("value")
            if value is not None and hasattr(value, "data_type") and dtype_name(value.data_type) in UNSUPPORTED_DTYPES:
                issues.append(LintIssue("error", name, op, f"constant of dtype {dtype_name(value.data_type)}"))

    def check_tensor(tensor_name: str, elem_type: int, what: str) -> None:
        if elem_type == 0 or dtype_name(elem_type) not in UNSUPPORTED_DTYPES:
            return
        node, op = producers.get(tensor_name) or consumers.get(tensor_name) or (tensor_name, what)
        issues.append(
            LintIssue("error", node, op, f"{what} {tensor_name!r} has dtype {dtype_name(elem_type)}, unsupported by TensorRT")
        )

    for what, values in (("graph input", graph.input), ("graph output", graph.output), ("tensor", graph.value_info)):
        for value in values:
            check_tensor(value.name, value.type.tensor_type.elem_type, what)
    for init in graph.initializer:
        check_tensor(init.name, init.data_type, "initializer")

    unique: dict[tuple, LintIssue] = {}
    for issue in issues:
        unique.setdefault((issue.severity, issue.node, issue.message), issue)
    return sorted(unique.values(), key=lambda x: x.severity != "error")


def _topk_k(node: Any, attrs: dict[str, Any], constants: dict[str, Any]) -> int | None:
    from onnx import numpy_helper

    if "k" in attrs:  # opset < 10
        return int(attrs["k"])
    if len(node.input) < 2 or node.input[1] not in constants:
        return None
    tensor = constants[node.input[1]]
    if tensor.data_location == 1:  # external data not loaded: cannot read the value
        return None
    return int(numpy_helper.to_array(tensor).reshape(-1)[0])


def raise_on_errors(issues: Iterable[LintIssue], what: str) -> None:
    """Raise :class:`LintError` listing the errors among ``issues`` (warnings pass)."""
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise LintError(f"{what} cannot be built by TensorRT: {shown}{more}")
