"""The export-time equivalence check: the exported graph in ONNX Runtime vs the PyTorch pruned forward.

Both sides are runners of :mod:`tokprune.export.runners` (the same ones the runtime runs):
:class:`~tokprune.export.runners.TorchRunner` is the reference, an
:class:`~tokprune.export.runners.OnnxRuntimeRunner` (CPUExecutionProvider) the candidate, on the
same seeded feed (:meth:`BucketSpec.sample_inputs`). The report gives the largest absolute
difference per output against :data:`TOLERANCES`.

Example::

    report = check_equivalence(model, spec, "out/k0128-t0333.onnx")
    assert report["status"] == "passed", report["max_abs"]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokprune.export.spec import BucketSpec, Precision

from tokprune.errors import BackendUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["TOLERANCES", "check_equivalence", "check_graph_equivalence", "compare_outputs"]

#: (atol, rtol) of the export-time check: max|ort - torch| <= atol + rtol * max|torch|, per output.
TOLERANCES: dict[Precision, tuple[float, float]] = {
    Precision.FP32: (1e-4, 0.0),
    Precision.FP16: (1e-2, 1e-2),
    Precision.BF16: (5e-2, 5e-2),
}


def compare_outputs(
    reference: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], precision: Precision
) -> dict[str, Any]:
    """``status`` (passed / failed), ``max_abs`` per output and ``worst``, against :data:`TOLERANCES`."""
    atol, rtol = TOLERANCES[precision]
    max_abs: dict[str, float] = {}
    passed = True
    for name, ref in reference.items():
        ref32 = ref.float()
        diff = float((actual[name].float() - ref32).abs().max()) if ref.numel() else 0.0
        max_abs[name] = diff
        if not diff <= atol + rtol * (float(ref32.abs().max()) if ref.numel() else 0.0):
            passed = False
    return {"status": "passed" if passed else "failed", "max_abs": max_abs,
            "worst": max(max_abs.values()) if max_abs else 0.0}


def _base_report(precision: Precision, seed: int, reference: str) -> dict[str, Any]:
    atol, rtol = TOLERANCES[precision]
    return {"backend": "onnxruntime", "provider": "CPUExecutionProvider", "reference": reference,
            "precision": precision.value, "seed": int(seed), "tolerance": {"atol": atol, "rtol": rtol}}


def _skip_reason(exc: BaseException, precision: Precision) -> str | None:
    """Why a candidate could not run (a skip), or None when the failure must propagate (fp32)."""
    if isinstance(exc, BackendUnavailableError):
        return str(exc)
    if precision is Precision.FP32:
        return None
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"ONNX Runtime's CPU provider cannot run this {precision.value} graph: {first}"


def check_equivalence(
    model: torch.nn.Module, spec: BucketSpec, onnx_path: str | Path, *, seed: int = 0, threads: int | None = None
) -> dict[str, Any]:
    """ONNX Runtime on one bucket's graph vs the PyTorch pruned forward on ``spec.sample_inputs(seed)``.

    Returns a JSON-native report: ``status`` (``"passed"`` / ``"failed"`` / ``"skipped"``),
    ``max_abs`` per output, ``worst`` (largest over outputs), ``tolerance`` and ``reason`` when
    skipped (e.g. ONNX Runtime's CPU provider has no kernel for some op in this precision).
    ``model`` must be the transformer cast exactly as for the export.
    """
    from tokprune.export.runners.eager import TorchRunner
    from tokprune.export.runners.ort import OnnxRuntimeRunner

    report = _base_report(spec.precision, seed, "torch pruned_forward (inplace=False)")
    feed = spec.sample_inputs(seed)
    with TorchRunner(model, spec) as reference:
        expected = reference.infer(feed)
    try:
        with OnnxRuntimeRunner(onnx_path, spec, threads=threads) as candidate:
            actual = candidate.infer(feed)
    except Exception as exc:  # ORT raises its own types for kernels it lacks
        reason = _skip_reason(exc, spec.precision)
        if reason is None:
            raise
        logger.warning("bucket %s: equivalence not checked: %s", spec.key, reason)
        return {**report, "status": "skipped", "reason": reason}
    return {**report, **compare_outputs(expected, actual, spec.precision)}


def check_graph_equivalence(
    model: torch.nn.Module, graph: Any, onnx_path: str | Path, *, seed: int = 0, threads: int | None = 1
) -> dict[str, dict[str, Any]]:
    """Per bucket: the export's one dynamic graph (:class:`~tokprune.export.dynamic.GraphSpec`) in ONNX
    Runtime at that bucket's shapes vs the PyTorch pruned forward of the *bucket* (its own fast paths).

    One shared session for every bucket (as the runtime loads it). Returns ``{key: report}`` shaped
    like :func:`check_equivalence`'s.
    """
    from tokprune.export.runners.eager import TorchRunner
    from tokprune.export.runners.ort import OnnxRuntimeRunner, SharedOrtSession

    base = _base_report(graph.precision, seed, "torch pruned_forward of the bucket")
    shared = SharedOrtSession(onnx_path)
    candidates = [OnnxRuntimeRunner(onnx_path, spec, threads=threads, graph=graph, shared=shared) for spec in graph.buckets]
    reports: dict[str, dict[str, Any]] = {}
    try:
        try:
            for candidate in candidates:
                candidate.activate()
        except Exception as exc:  # noqa: BLE001 - as check_equivalence: skip what ORT's CPU provider lacks
            reason = _skip_reason(exc, graph.precision)
            if reason is None:
                raise
            logger.warning("dynamic graph: equivalence not checked: %s", reason)
            return {k: {**base, "status": "skipped", "reason": reason} for k in graph.keys}
        for candidate in candidates:
            feed = candidate.spec.sample_inputs(seed)
            actual = candidate.infer(feed)
            with TorchRunner(model, candidate.spec) as reference:
                expected = reference.infer(feed)
            reports[candidate.spec.key] = {**base, **compare_outputs(expected, actual, graph.precision)}
    finally:
        for candidate in candidates:
            candidate.deactivate()
    return reports
