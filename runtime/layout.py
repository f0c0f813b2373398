"""Which engine layout a runtime loads, and the CUDA-graph option's preconditions.

Two layouts of one export (:mod:`tokprune.export.dynamic`):

- ``"single"``: the one ONNX graph with a dynamic keep axis K. ONNX Runtime opens **one** session
  for every bucket; TensorRT deserializes **one** engine with one static optimisation profile per
  bucket (one execution context per profile, one shared scratch allocation). Weights are in
  memory once.
- ``"per-bucket"``: one static graph / engine per bucket (each session or engine holds its own
  copy of the weights in memory; on disk they share ``weights.bin``).

:func:`default_layout` is the choice made when ``load(..., layout=None)``; see its docstring for
the measurements behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from tokprune.export.dynamic import LAYOUTS, GraphSpec, graph_from_manifest
from tokprune.export.spec import BucketSpec
from tokprune.runtime.runners import RuntimeBackend

from tokprune.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)

__all__ = ["check_cuda_graphs", "default_layout", "graph_for"]


def check_cuda_graphs(cuda_graphs: bool, backend: RuntimeBackend, device: torch.device) -> None:
    """Refuse ``cuda_graphs=True`` where it cannot work, before anything is loaded."""
    if not cuda_graphs:
        return
    from tokprune.runtime.cuda_graphs import OPTION, require_cuda

    if backend is RuntimeBackend.ONNXRUNTIME:
        raise ConfigError(
            f"{OPTION} is implemented for backend='torch' and 'tensorrt'; ONNX Runtime's CUDA provider "
            "has its own graph mode (enable_cuda_graph) that needs every input at a fixed address, which this "
            "runtime does not wire. Drop cuda_graphs, or load with backend='torch' or 'tensorrt'"
        )
    require_cuda(device)


def default_layout(manifest: Any, backend: RuntimeBackend, device: torch.device) -> str:
    """The layout ``load`` uses when none is asked for.

    - no dynamic graph in the export (one bucket, or made before it existed): ``"per-bucket"``;
    - TensorRT: ``"single"`` when the engines were built that way (``tokprune-build``'s default),
      else ``"per-bucket"`` (what was built);
    - ONNX Runtime on CUDA: ``"single"`` — GPU memory holds the weights once; the per-bucket files
      remain for a host where they measure faster;
    - ONNX Runtime on CPU: ``"per-bucket"`` — measured faster on a 2-core CPU (tiny SD3, see
      ``results/gpu/README.md``): static shapes let ONNX Runtime plan memory per bucket and the
      dense call skips the cache scatters the generic graph does. Host RAM holds one copy of the
      weights per bucket session; pass ``layout="single"`` where that matters more;
    - torch: the model is in memory once anyway (the layout only names which files are checked).
    """
    if manifest.graph_path() is None:
        return "per-bucket"
    if backend is RuntimeBackend.TENSORRT:
        return "single" if manifest.single_engine() is not None else "per-bucket"
    if backend is RuntimeBackend.ONNXRUNTIME:
        return "single" if device.type == "cuda" else "per-bucket"
    return "per-bucket"


def graph_for(manifest: Any, specs: Mapping[str, BucketSpec], layout: str, backend: RuntimeBackend) -> GraphSpec | None:
    """The :class:`GraphSpec` to run (``layout="single"``), or None (per-bucket). Refuses what cannot load."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {list(LAYOUTS)}; pass layout='single' or 'per-bucket'")
    if layout == "per-bucket" or backend is RuntimeBackend.TORCH:
        return None
    graph = graph_from_manifest(manifest.data, specs)
    if graph is None:
        raise ManifestError(
            f"{manifest.directory} has no single dynamic graph (an export with one bucket, or one made before "
            "tokprune exported it); load it with layout='per-bucket', or re-export it (tokprune-export ... --force)"
        )
    if backend is RuntimeBackend.TENSORRT and manifest.single_engine() is None:
        raise ManifestError(
            f"the TensorRT engines in {manifest.directory} were built one per bucket; load them with "
            f"layout='per-bucket', or rebuild one engine for all buckets: tokprune-build {manifest.directory} --rebuild"
        )
    return graph
