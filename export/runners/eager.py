"""The PyTorch runner: a bucket as the eager pruned forward, the numerical reference of its graph."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tokprune.export.runners.base import Runner
from tokprune.export.spec import Backend, BucketSpec

__all__ = ["TorchRunner"]


class TorchRunner(Runner):
    """The bucket as the PyTorch pruned forward (the same module the ONNX export traced).

    Runs :class:`tokprune.export.onnx_export.BucketModule` — ``pruned_forward(inplace=False)`` with
    the bucket's precision patches, under ``torch.inference_mode`` — so it is the reference the
    export's equivalence check compares ONNX Runtime with. ``compile=True`` wraps it in
    ``torch.compile`` (static shapes: one graph per bucket). ``cuda_graphs=True`` replays a CUDA
    graph per bucket (:mod:`tokprune.export.runners.cuda_graphs`: static input buffers, caches bound
    by address, capture once, replay per step); outputs then alias.

    Args:
        model: the denoiser the engines were exported from, already on ``device`` and cast to the
            bucket precision (:func:`tokprune.export.onnx_export.cast_for_export`).
        graph_backend: tests only: a stand-in for CUDA graph capture.

    Example::

        with TorchRunner(pipe.transformer, spec) as ref:
            outputs = ref.infer(spec.sample_inputs(seed=0))
    """

    backend = Backend.TORCH

    def __init__(
        self,
        model: torch.nn.Module,
        spec: BucketSpec,
        *,
        device: torch.device | str = "cpu",
        compile: bool = False,
        cuda_graphs: bool = False,
        graph_backend: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(spec, device=device, name=name)
        self.model = model
        self.compile = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        self._graph_backend = graph_backend
        self._graphs: Any = None
        self._fn: Any = None
        self._names = [t.name for t in self._inputs]
        self._out_names = [t.name for t in self._outputs]

    @property
    def aliases_outputs(self) -> bool:  # type: ignore[override]
        return self.cuda_graphs  # replayed graphs overwrite their static outputs

    def activate_impl(self) -> None:
        from tokprune.export.onnx_export import BucketModule

        module = BucketModule(self.model, self.spec).eval()
        self._fn = torch.compile(module, dynamic=False, fullgraph=False) if self.compile else module
        if self.cuda_graphs:
            from tokprune.export.runners.cuda_graphs import BucketGraphs

            self._graphs = BucketGraphs(self._call, self.spec, self.device, backend=self._graph_backend)

    def _call(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from tokprune.export.onnx_export import precision_patches

        with torch.inference_mode(), precision_patches(self.spec.precision):
            return self._fn(*tensors)

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._graphs is not None:
            return self._graphs(feed)
        outs = self._call(*(feed[n] for n in self._names))
        return dict(zip(self._out_names, outs))

    def deactivate_impl(self) -> None:
        self._fn = None
        self._graphs = None
