"""Any polygraphy runner as a tokprune bucket runner (polygraphy imported lazily).

:class:`PolygraphyRunner` hands the life cycle (``activate`` / ``infer`` / ``deactivate``) to a
polygraphy ``BaseRunner`` and adds what a tokprune runner promises: the feed is checked against
the bucket's I/O table, the graph's inputs must be the bucket's, outputs come back as torch
tensors by name, and ``last_inference_time`` is polygraphy's own measurement. It is the short way
to run a bucket on anything polygraphy runs: its ONNX Runtime runner (:meth:`PolygraphyRunner.onnxruntime`,
tested here on CPU) or its TensorRT runner on one engine file (:meth:`PolygraphyRunner.tensorrt`,
GPU hosts; the runtime's own TensorRT runner, :mod:`tokprune.export.runners.trt`, shares one engine,
its scratch memory and output buffers across buckets and never synchronises the host).

Example::

    from tokprune.export.runners import PolygraphyRunner
    with PolygraphyRunner.onnxruntime("engines/x/k0128-t0333.onnx", spec) as runner:
        outputs = runner.infer(spec.sample_inputs(seed=0))       # name -> torch.Tensor
        seconds = runner.last_inference_time()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokprune.export.runners.base import Runner
from tokprune.export.spec import Backend, BucketSpec

from tokprune.errors import BackendUnavailableError, ShapeError

logger = logging.getLogger(__name__)

__all__ = ["PolygraphyRunner"]


class PolygraphyRunner(Runner):
    """A polygraphy runner (``polygraphy.backend.base.BaseRunner``) behind the tokprune runner interface.

    Args:
        runner: the polygraphy runner (not yet active), e.g. ``OnnxrtRunner(SessionFromOnnx(path))``.
        spec: the bucket's :class:`BucketSpec`.
        backend: what the wrapped runner runs (a :class:`Backend` member or a short name).
        aliases_outputs: True when the wrapped runner reuses its output buffers between calls
            (polygraphy's TensorRT runner with ``copy_outputs_to_host=False``).
        infer_kwargs: extra keyword arguments of the wrapped runner's ``infer``.
    """

    backend = "polygraphy"

    def __init__(
        self,
        runner: Any,
        spec: BucketSpec,
        *,
        backend: Backend | str = "polygraphy",
        device: torch.device | str = "cpu",
        aliases_outputs: bool = False,
        infer_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.backend = backend  # type: ignore[misc]  # per instance: what the wrapped runner runs
        super().__init__(spec, device=device, name=name)
        self.runner = runner
        self._aliases = bool(aliases_outputs)
        self.infer_kwargs = dict(infer_kwargs or {})
        self._out_names = [t.name for t in self._outputs]

    @property
    def aliases_outputs(self) -> bool:  # type: ignore[override]
        return self._aliases

    # ---- constructors (polygraphy imported here, not at module import) -------------------------
    @classmethod
    def onnxruntime(cls, path: str | Path, spec: BucketSpec, *, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                    name: str | None = None) -> PolygraphyRunner:
        """The bucket's ONNX file in polygraphy's ``OnnxrtRunner`` (a session made on ``activate``)."""
        onnxrt = _import("polygraphy.backend.onnxrt")
        session = onnxrt.SessionFromOnnx(str(path), providers=list(providers))
        return cls(onnxrt.OnnxrtRunner(session, name=name), spec, backend=Backend.ONNXRUNTIME, name=name)

    @classmethod
    def tensorrt(cls, engine_path: str | Path, spec: BucketSpec, *, profile: int = 0, device: str = "cuda",
                 name: str | None = None) -> PolygraphyRunner:
        """One engine file (optimisation ``profile``) in polygraphy's ``TrtRunner``; outputs stay on the GPU."""
        trt = _import("polygraphy.backend.trt")
        common = _import("polygraphy.backend.common")
        engine = trt.EngineFromBytes(common.BytesFromPath(str(engine_path)))  # lazy: read and deserialised on activate
        runner = trt.TrtRunner(engine, name=name, optimization_profile=profile)
        return cls(runner, spec, backend=Backend.TENSORRT, device=device, aliases_outputs=True,
                   infer_kwargs={"copy_outputs_to_host": False}, name=name)

    # ---- hooks ---------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        if self.backend == Backend.TENSORRT:  # say what is missing before polygraphy tries to import it
            from tokprune.export.runners.trt import require_tensorrt_runtime

            require_tensorrt_runtime()
        self.runner.activate()
        try:
            try:
                meta = self.runner.get_input_metadata(use_numpy_dtypes=False)
            except TypeError:  # polygraphy without the (deprecated) flag
                meta = self.runner.get_input_metadata()
            got = list(meta)
        except Exception:
            self.runner.deactivate()
            raise
        want = [t.name for t in self._inputs]
        if sorted(got) != sorted(want):
            self.runner.deactivate()
            raise ShapeError(
                f"runner {self.name}: the graph reads {got}, bucket {self.spec.key}'s I/O table has {want}; the file "
                "is stale or from another bucket: re-export it (tokprune-export ... --force)"
            )

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = self.runner.infer(dict(feed), check_inputs=False, **self.infer_kwargs)
        self.inference_time = self.runner.last_inference_time()
        missing = [n for n in self._out_names if n not in outs]
        if missing:
            raise ShapeError(f"runner {self.name} returned no {missing}; bucket {self.spec.key} outputs {self._out_names}")
        return {n: outs[n] if isinstance(outs[n], torch.Tensor) else torch.as_tensor(outs[n]) for n in self._out_names}

    def deactivate_impl(self) -> None:
        self.runner.deactivate()


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"{module} cannot be imported here ({exc}); pip install polygraphy (and tensorrt on a GPU host for "
            "its TensorRT runner), or use the runtime's own runners (backend='onnxruntime' or 'tensorrt')"
        ) from exc
