"""Which engine layout a runtime loads, the runners it builds for it, and the CUDA-graph option's preconditions.

Two layouts of one export (:mod:`tokprune.export.dynamic`):

- ``"single"``: the one ONNX graph with a dynamic keep axis K. ONNX Runtime opens **one** session
  for every bucket; TensorRT deserializes **one** engine with one static optimisation profile per
  bucket (one execution context per profile, one shared scratch allocation). Weights are in
  memory once.
- ``"per-bucket"``: one static graph / engine per bucket (each session or engine holds its own
  copy of the weights in memory; on disk they share ``weights.bin``).

:func:`default_layout` is the choice made when ``load(..., layout=None)``; see its docstring for
the measurements behind it. :func:`build_runners` makes and activates one runner per bucket
(:mod:`tokprune.export.runners`), or calls the ``runner_factory`` a caller hands to ``load``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokprune.export.dynamic import LAYOUTS, GraphSpec, graph_from_manifest
from tokprune.export.runners.base import Runner
from tokprune.export.spec import Backend, BucketSpec
from tokprune.pruning.plan import PrunePlan

from tokprune.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)

__all__ = ["LoadedEngines", "RunnerFactory", "build_runners", "check_cuda_graphs", "default_layout", "graph_for"]

#: ``factory(spec, manifest) -> Runner``: the public hook of :func:`tokprune.runtime.load` that runs a runner
#: of the caller's for every bucket (an inactive one: ``load`` activates it). See :mod:`tokprune.export.runners`.
RunnerFactory = Callable[[BucketSpec, Any], Runner]


# ---- shared engines -----------------------------------------------------------------------------
@dataclass
class LoadedEngines:
    """What every view of one loaded export shares: manifest, specs, runners, lock."""

    directory: Path
    manifest: Any
    backend: Backend
    device: torch.device
    specs: dict[str, BucketSpec]
    runners: dict[str, Runner]
    config: dict[str, Any]
    schedule: Any
    plan: PrunePlan
    policy: str
    reuse: str
    dense_key: str
    probe_key: str | None = None  # the dense bucket's text_mass variant (schedules that prune text)
    prompt_stage: Any = None  # PromptStageRunner of exports whose family computes conditions once per run
    lock: threading.Lock = field(default_factory=threading.Lock)  # engine calls whose outputs alias buffers
    closed: bool = False

    @property
    def geometry(self) -> Any:
        return self.manifest.geometry

    @property
    def dtype(self) -> torch.dtype:
        return self.manifest.precision.torch_dtype

    @property
    def steps(self) -> int:
        return int(self.manifest.data["steps"])

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()
        self.closed = True


def check_cuda_graphs(cuda_graphs: bool, backend: Backend, device: torch.device) -> None:
    """Refuse ``cuda_graphs=True`` where it cannot work, before anything is loaded."""
    if not cuda_graphs:
        return
    from tokprune.export.runners.cuda_graphs import OPTION, require_cuda

    if backend is Backend.ONNXRUNTIME:
        raise ConfigError(
            f"{OPTION} is implemented for backend='torch' and 'tensorrt'; ONNX Runtime's CUDA provider "
            "has its own graph mode (enable_cuda_graph) that needs every input at a fixed address, which this "
            "runtime does not wire. Drop cuda_graphs, or load with backend='torch' or 'tensorrt'"
        )
    require_cuda(device)


def default_layout(manifest: Any, backend: Backend, device: torch.device) -> str:
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
    if backend is Backend.TENSORRT:
        return "single" if manifest.single_engine() is not None else "per-bucket"
    if backend is Backend.ONNXRUNTIME:
        return "single" if device.type == "cuda" else "per-bucket"
    return "per-bucket"


def graph_for(manifest: Any, specs: Mapping[str, BucketSpec], layout: str, backend: Backend) -> GraphSpec | None:
    """The :class:`GraphSpec` to run (``layout="single"``), or None (per-bucket). Refuses what cannot load."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {list(LAYOUTS)}; pass layout='single' or 'per-bucket'")
    if layout == "per-bucket" or backend is Backend.TORCH:
        return None
    graph = graph_from_manifest(manifest.data, specs)
    if graph is None:
        raise ManifestError(
            f"{manifest.directory} has no single dynamic graph (an export with one bucket, or one made before "
            "tokprune exported it); load it with layout='per-bucket', or re-export it (tokprune-export ... --force)"
        )
    if backend is Backend.TENSORRT and manifest.single_engine() is None:
        raise ManifestError(
            f"the TensorRT engines in {manifest.directory} were built one per bucket; load them with "
            f"layout='per-bucket', or rebuild one engine for all buckets: tokprune-build {manifest.directory} --rebuild"
        )
    return graph


def build_runners(
    manifest: Any,
    specs: Mapping[str, BucketSpec],
    backend: Backend,
    device: torch.device,
    *,
    graph: GraphSpec | None = None,
    model: torch.nn.Module | None = None,
    compile: bool = False,
    threads: int | None = None,
    spin: bool = False,
    cuda_graphs: bool = False,
    runner_factory: RunnerFactory | None = None,
) -> dict[str, Runner]:
    """One activated runner per bucket (bucket key -> runner); if one fails to activate, all are released.

    ``runner_factory`` replaces the backend's own runners (``backend`` still chose what was verified).
    ``graph``: run the single dynamic graph / engine (:func:`graph_for`). ``model``: the PyTorch reference
    for ``backend="torch"`` (default: loaded from the manifest's model). ``threads`` / ``spin``: ONNX
    Runtime's intra-op threads and whether they spin during a run (:class:`OnnxRuntimeRunner`).
    """
    runners: dict[str, Runner] = {}
    if runner_factory is not None:
        for key, spec in specs.items():
            runner = runner_factory(spec, manifest)
            if not isinstance(runner, Runner):
                raise ConfigError(
                    f"runner_factory returned {type(runner).__name__} for bucket {key}; it must return a "
                    "tokprune.export.runners.Runner (subclass it: activate_impl / infer_impl / deactivate_impl)"
                )
            runners[key] = runner
    elif backend is Backend.TORCH:
        from tokprune.export.runners.eager import TorchRunner
        from tokprune.runtime.verify import load_reference_transformer

        ref = model if model is not None else load_reference_transformer(manifest, device, manifest.precision.torch_dtype)
        ref = ref.eval().to(device)
        for key, spec in specs.items():
            runners[key] = TorchRunner(ref, spec, device=device, compile=compile, cuda_graphs=cuda_graphs)
    elif backend is Backend.ONNXRUNTIME:
        from tokprune.export.runners.ort import OnnxRuntimeRunner, SharedOrtSession

        shared = SharedOrtSession(manifest.graph_path()) if graph is not None else None
        for key, spec in specs.items():
            if graph is not None and key in graph.keys:  # the one dynamic graph, one session for all buckets
                runners[key] = OnnxRuntimeRunner(manifest.graph_path(), spec, device=device, threads=threads, spin=spin,
                                                 graph=graph, shared=shared)
            else:
                runners[key] = OnnxRuntimeRunner(manifest.onnx_path(key), spec, device=device, threads=threads,
                                                 spin=spin)
    else:
        from tokprune.export.runners.trt import TrtEngineSet

        paths = {key: manifest.engine_path(key) for key in specs}
        single = manifest.single_engine() if graph is not None else None
        engine_set = TrtEngineSet(paths, specs, device=device, cuda_graphs=cuda_graphs, single=single, graph=graph)
        runners = {key: engine_set.runner(key) for key in specs}
    try:
        for runner in runners.values():
            runner.activate()
    except BaseException:
        for runner in runners.values():
            runner.deactivate()
        raise
    return runners
