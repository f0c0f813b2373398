"""ONNX Runtime as a bucket runner, and the export-time equivalence check.

:class:`OrtBucketRunner` follows the runner life cycle of polygraphy (``activate`` /
``infer(feed) -> dict`` / ``deactivate``, context manager, ``is_active``) with inputs checked
against the bucket's :class:`~tokprune.export.spec.BucketSpec`, so a runtime can treat it
like a TensorRT engine. :func:`check_equivalence` runs one exported bucket in ONNX Runtime
(CPUExecutionProvider) and the PyTorch pruned forward on the same seeded feed and reports the
largest absolute difference per output.

Example::

    with OrtBucketRunner("out/k0128-t0333.onnx", spec) as runner:
        outputs = runner.infer(spec.sample_inputs(seed=0))   # name -> torch.Tensor
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokprune.export.spec import BucketSpec, Precision

from tokprune.errors import BackendUnavailableError, ShapeError

logger = logging.getLogger(__name__)

__all__ = ["TOLERANCES", "OrtBucketRunner", "check_equivalence"]

#: (atol, rtol) of the export-time check: max|ort - torch| <= atol + rtol * max|torch|, per output.
TOLERANCES: dict[Precision, tuple[float, float]] = {
    Precision.FP32: (1e-4, 0.0),
    Precision.FP16: (1e-2, 1e-2),
    Precision.BF16: (5e-2, 5e-2),
}


class OrtBucketRunner:
    """One bucket's ONNX graph in an ONNX Runtime session; ``infer`` takes and returns torch tensors.

    Args:
        path: the bucket's ``.onnx`` file (its external ``weights.bin`` next to it).
        spec: the bucket's :class:`BucketSpec` (feeds are checked against it).
        providers: ONNX Runtime execution providers, CPU by default.
        threads: intra-op threads (None: ONNX Runtime's default).
    """

    def __init__(
        self,
        path: str | Path,
        spec: BucketSpec,
        *,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.spec = spec
        self.providers = providers
        self.threads = threads
        self._session: Any = None

    @property
    def is_active(self) -> bool:
        return self._session is not None

    def activate(self) -> OrtBucketRunner:
        import onnxruntime as ort

        if self.is_active:
            return self
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(self.providers))
        got_in = [i.name for i in self._session.get_inputs()]
        got_out = [o.name for o in self._session.get_outputs()]
        if got_in != self.spec.input_names() or got_out != self.spec.output_names():
            self._session = None
            raise ShapeError(
                f"{self.path.name}: graph I/O {got_in} -> {got_out} differs from bucket {self.spec.key}'s spec "
                f"{self.spec.input_names()} -> {self.spec.output_names()}; re-export it"
            )
        return self

    def deactivate(self) -> None:
        self._session = None

    def __enter__(self) -> OrtBucketRunner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. ``feed``: name -> tensor per :meth:`BucketSpec.inputs`. Returns fresh CPU tensors."""
        if not self.is_active:
            raise RuntimeError(f"OrtBucketRunner({self.path.name}) is not active; call activate() or use `with`")
        self.spec.check_feed(feed)
        arrays = {}
        for name, x in feed.items():
            if isinstance(x, torch.Tensor):
                if x.dtype == torch.bfloat16:
                    raise BackendUnavailableError(
                        f"input {name!r} is bfloat16, which numpy (and so ONNX Runtime's Python feed) cannot hold"
                    )
                x = x.detach().cpu().numpy()
            arrays[name] = np.ascontiguousarray(x)
        outs = self._session.run(None, arrays)
        return {name: torch.from_numpy(np.asarray(a)) for name, a in zip(self.spec.output_names(), outs)}


def check_equivalence(model: torch.nn.Module, spec: BucketSpec, onnx_path: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """ONNX Runtime vs the PyTorch pruned forward on ``spec.sample_inputs(seed)``.

    Returns a JSON-native report: ``status`` (``"passed"`` / ``"failed"`` / ``"skipped"``),
    ``max_abs`` per output, ``worst`` (largest over outputs), ``tolerance`` and ``reason`` when
    skipped (e.g. ONNX Runtime's CPU provider has no kernel for some op in this precision).
    ``model`` must be the transformer cast exactly as for the export.
    """
    from tokprune.export.onnx_export import BucketModule

    atol, rtol = TOLERANCES[spec.precision]
    report: dict[str, Any] = {
        "backend": "onnxruntime",
        "provider": "CPUExecutionProvider",
        "reference": "torch pruned_forward (inplace=False)",
        "precision": spec.precision.value,
        "seed": int(seed),
        "tolerance": {"atol": atol, "rtol": rtol},
    }
    feed = spec.sample_inputs(seed)
    reference = BucketModule(model, spec).run(feed)
    try:
        with OrtBucketRunner(onnx_path, spec) as runner:
            actual = runner.infer(feed)
    except BackendUnavailableError as exc:
        return {**report, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # ORT raises its own types for kernels it lacks
        if spec.precision is Precision.FP32:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"ONNX Runtime's CPU provider cannot run this {spec.precision.value} graph: {first}"
        logger.warning("bucket %s: equivalence not checked: %s", spec.key, reason)
        return {**report, "status": "skipped", "reason": reason}
    max_abs: dict[str, float] = {}
    passed = True
    for name, ref in reference.items():
        ref32 = ref.float()
        diff = float((actual[name].float() - ref32).abs().max()) if ref.numel() else 0.0
        max_abs[name] = diff
        if not diff <= atol + rtol * float(ref32.abs().max()):
            passed = False
    return {
        **report,
        "status": "passed" if passed else "failed",
        "max_abs": max_abs,
        "worst": max(max_abs.values()) if max_abs else 0.0,
    }
