"""TensorRT bucket runners: thin, lazily imported, written against the TensorRT 10/11 Python API.

An export's engines are loaded into one :class:`TrtEngineSet`, in either layout (see
:mod:`tokprune.export.tensorrt`): the **single engine** built from the dynamic-K graph with one
static optimisation profile per bucket (weights in GPU memory once; ``single=(path, {key: profile})``),
or one engine per bucket (one profile each). Buckets the single engine does not serve (the dense
probe variant) keep their own engine. In both:

- one execution context per bucket profile (``set_optimization_profile_async(profile)``), created with
  ``create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)``;
- one device-memory scratch shared by all contexts (buckets run one after another), sized by
  the largest ``get_device_memory_size_for_profile_v2`` / ``device_memory_size_v2`` and handed to
  each context with ``set_device_memory``;
- persistent output buffers carved from one arena (:func:`buffer_plan`): buckets run one at a
  time and the runtime consumes a call's outputs (copies fresh rows into its caches, clones
  the noise) before the next call, so every bucket's outputs share the same bytes. Outputs
  therefore alias (:attr:`TrtRunner.aliases_outputs`);
- tensors addressed by name: ``set_input_shape`` once per context (static profile),
  ``set_tensor_address`` per call for inputs (the caller's device tensors, no copy) and once for
  outputs, ``execute_async_v3`` on a side stream ordered against torch's current stream with
  stream waits (no host synchronisation);
- optional CUDA graph per bucket (``cuda_graphs=True``): small inputs are staged into arena
  slots so their addresses are fixed; a graph is captured per set of cache addresses (the
  runtime pools its caches, so that is once per view).

Nothing here imports ``tensorrt`` at module import time. Without TensorRT or a GPU,
:meth:`TrtEngineSet.activate` raises :class:`BackendUnavailableError` naming what is missing.
The buffer plan and the refusals are unit-tested on CPU; the execution path needs TensorRT.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokprune.export.runners.base import Runner
from tokprune.export.spec import INPUT, OUTPUT, Backend, BucketSpec, TensorSpec

from tokprune.errors import BackendUnavailableError, ManifestError

logger = logging.getLogger(__name__)

__all__ = [
    "ALIGN",
    "BufferPlan",
    "BufferSlot",
    "TrtEngineSet",
    "TrtRunner",
    "buffer_plan",
    "check_engine_io",
    "require_tensorrt_runtime",
]

ALIGN = 256  # bytes; TensorRT requires 256-byte aligned I/O addresses for some formats
_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}


# ---- the buffer plan (pure; derived from the I/O tables) ----------------------------------------
@dataclass(frozen=True)
class BufferSlot:
    """One tensor's place in the shared arena: ``arena[offset : offset + nbytes]`` viewed as ``shape``."""

    bucket: str
    name: str
    role: str  # INPUT (staged copy) | OUTPUT
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BufferPlan:
    """Where every persistent buffer of every bucket lives in one arena of ``arena_bytes``.

    Slots of one bucket never overlap; slots of different buckets do (they run one at a time).
    """

    slots: tuple[BufferSlot, ...]
    arena_bytes: int

    def for_bucket(self, key: str) -> list[BufferSlot]:
        return [s for s in self.slots if s.bucket == key]

    def views(self, arena: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        """Typed views of ``arena`` (a uint8 tensor of ``arena_bytes``) for one bucket's slots."""
        out = {}
        for s in self.for_bucket(key):
            raw = arena[s.offset : s.offset + s.nbytes]
            out[s.name] = raw.view(TensorSpec(s.name, s.shape, s.dtype, s.role).torch_dtype).view(s.shape)
        return out


def _nbytes(t: TensorSpec) -> int:
    return math.prod(t.shape) * _ELEMENT_SIZE[t.dtype]


def buffer_plan(specs: Mapping[str, BucketSpec], *, stage_inputs: bool = False, align: int = ALIGN) -> BufferPlan:
    """Lay out every bucket's outputs (and, for CUDA graphs, its small inputs) in one shared arena.

    Per bucket, slots are packed in I/O-table order at ``align``-byte offsets; the arena is as
    large as the largest bucket. Cache inputs are never staged (the runtime binds its caches
    by address).
    """
    slots: list[BufferSlot] = []
    arena = 0
    for key, spec in specs.items():
        offset = 0
        for t in spec.io():
            staged = stage_inputs and t.role == INPUT and t.cache is None
            if t.role != OUTPUT and not staged:
                continue
            offset = -(-offset // align) * align
            n = _nbytes(t)
            slots.append(BufferSlot(key, t.name, t.role, t.shape, t.dtype, offset, n))
            offset += n
        arena = max(arena, -(-offset // align) * align)
    return BufferPlan(tuple(slots), arena)


# ---- environment ---------------------------------------------------------------------------------
def require_tensorrt_runtime(
    *, trt_version: Callable[[], str | None] | None = None, gpu: Callable[[], dict | None] | None = None
) -> None:
    """Raise :class:`BackendUnavailableError` unless TensorRT (>= 10.9) imports and a CUDA GPU is visible."""
    from tokprune.export import tensorrt as env

    ok, why = env.availability(
        trt_version=trt_version or env.tensorrt_version, gpu=gpu or env.gpu_info
    )
    if not ok:
        raise BackendUnavailableError(
            f"the tensorrt backend cannot run here: {why}. Use --backend onnxruntime (CPU or CUDA) or "
            "--backend torch, or run on a GPU host with TensorRT installed"
        )


def _trt_dtype_name(trt: Any, dtype: Any) -> str:
    table = {trt.float32: "float32", trt.float16: "float16", trt.int64: "int64"}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = "bfloat16"
    return table.get(dtype, str(dtype))


def check_engine_io(engine: Any, io: Any, trt: Any, path: Path, *, what: str, profiles: int | None = None) -> None:
    """Refuse an engine whose I/O tensors (name, mode, dtype) differ from ``io`` (an I/O table), or
    whose optimisation profile count is not ``profiles``. ``what`` names the table in the message."""
    got = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        role = INPUT if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else OUTPUT
        got[name] = (role, _trt_dtype_name(trt, engine.get_tensor_dtype(name)))
    want = {t.name: (t.role, t.dtype) for t in io}
    problem = None
    if got != want:
        problem = f"does not match {what}'s I/O table (differences: {sorted(set(got.items()) ^ set(want.items()))})"
    elif profiles is not None and engine.num_optimization_profiles != profiles:
        problem = f"has {engine.num_optimization_profiles} optimisation profiles, the export has {profiles} buckets"
    if problem:
        raise ManifestError(f"engine {path} {problem}; rebuild it: tokprune-build {path.parent.parent} --rebuild")


# ---- the engine set ------------------------------------------------------------------------------
class TrtEngineSet:
    """Every bucket engine of one export on one GPU, sharing scratch memory and an output arena.

    Activated by its first runner, released when the last one deactivates.
    """

    def __init__(
        self,
        engine_paths: Mapping[str, Path | None],
        specs: Mapping[str, BucketSpec],
        *,
        device: torch.device | str = "cuda",
        cuda_graphs: bool = False,
        single: tuple[Path, Mapping[str, int]] | None = None,
        graph: Any = None,
    ) -> None:
        self.graph = graph if single is not None else None
        self.profiles: dict[str, int] = dict(single[1]) if single is not None else {}
        if single is not None and (graph is None or sorted(self.profiles) != sorted(graph.keys)):
            raise ManifestError(
                f"the single engine's profiles {sorted(self.profiles)} are not the dynamic graph's buckets "
                f"{sorted(graph.keys) if graph is not None else None}; rebuild: tokprune-build DIR --rebuild"
            )
        missing = [k for k, p in engine_paths.items() if p is None and k not in self.profiles]
        if missing:
            raise ManifestError(
                f"no TensorRT engine was built for buckets {missing}; build them on a GPU host: tokprune-build DIR"
            )
        self.paths = {k: Path(single[0]) if k in self.profiles else Path(p) for k, p in engine_paths.items()}
        self.specs = dict(specs)
        self.device = torch.device(device)
        self.cuda_graphs = bool(cuda_graphs)
        self.plan = buffer_plan(self.specs, stage_inputs=self.cuda_graphs)
        self._users = 0
        self._trt: Any = None
        self._runtime: Any = None
        self._engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self.scratch: torch.Tensor | None = None
        self.arena: torch.Tensor | None = None
        self.stream: Any = None

    def runner(self, key: str) -> TrtRunner:
        return TrtRunner(self, self.specs[key], device=self.device)

    @property
    def is_active(self) -> bool:
        return self._users > 0

    def acquire(self) -> None:
        if self._users == 0:
            self._open()
        self._users += 1

    def release(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0:
            self._close()

    def _open(self) -> None:
        require_tensorrt_runtime()
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"TensorRT engines run on CUDA devices, got device {self.device}")
        import tensorrt as trt

        self._trt = trt
        trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(trt_logger)
        scratch = 0
        loaded: dict[Path, Any] = {}  # the single engine is deserialized once for all its profiles
        with torch.cuda.device(self.device):
            for key, path in self.paths.items():
                engine = loaded.get(path)
                if engine is None:
                    engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                    if engine is None:
                        raise ManifestError(f"TensorRT could not deserialize {path}; rebuild: tokprune-build {path.parent.parent} --rebuild")
                    loaded[path] = engine
                profile = self.profiles.get(key, 0)
                if key in self.profiles:
                    check_engine_io(engine, self.graph.io(), trt, path, what="the dynamic graph",
                                    profiles=len(self.graph.keys))
                else:
                    check_engine_io(engine, self.specs[key].io(), trt, path, what=f"bucket {key}")
                context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if engine.num_optimization_profiles > 1:
                    context.set_optimization_profile_async(profile, torch.cuda.current_stream(self.device).cuda_stream)
                if hasattr(engine, "get_device_memory_size_for_profile_v2"):
                    need = engine.get_device_memory_size_for_profile_v2(profile)
                else:
                    need = engine.device_memory_size_v2
                scratch = max(scratch, int(need))
                for name, shape in self.input_shapes(key).items():
                    context.set_input_shape(name, shape)
                self._engines[key], self.contexts[key] = engine, context
            self.scratch = torch.empty(max(scratch, 1), dtype=torch.uint8, device=self.device)
            for context in self.contexts.values():
                context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            self.arena = torch.empty(max(self.plan.arena_bytes, 1), dtype=torch.uint8, device=self.device)
            self.stream = torch.cuda.Stream(self.device)
        logger.info(
            "TensorRT: %d engines, shared scratch %.1f MiB, output arena %.1f MiB",
            len(self.contexts), scratch / 2**20, self.plan.arena_bytes / 2**20,
        )

    def input_shapes(self, key: str) -> dict[str, tuple[int, ...]]:
        """The shapes a bucket's context is set to: its profile of the single engine, or its own inputs."""
        if key in self.profiles:
            return self.graph.profiles()[key]
        return {t.name: t.shape for t in self.specs[key].inputs()}

    def _close(self) -> None:
        self.contexts.clear()
        self._engines.clear()
        self._runtime = None
        self.scratch = self.arena = None
        self.stream = None


class TrtRunner(Runner):
    """One bucket engine of a :class:`TrtEngineSet`; outputs are views of the shared arena."""

    backend = Backend.TENSORRT
    aliases_outputs = True

    def __init__(self, engines: TrtEngineSet, spec: BucketSpec, *, device: torch.device | str = "cuda") -> None:
        super().__init__(spec, device=device)
        self.engines = engines
        self._stand_ins: dict[str, torch.Tensor] = {}
        self._views: dict[str, torch.Tensor] = {}
        self._graphs: dict[tuple[int, ...], Any] = {}

    def activate_impl(self) -> None:
        self.engines.acquire()
        key = self.spec.key
        self._views = self.engines.plan.views(self.engines.arena, key)
        context = self.engines.contexts[key]
        for t in self._outputs:
            context.set_tensor_address(t.name, self._views[t.name].data_ptr())
        if key in self.engines.profiles:  # inputs of the single engine this bucket does not feed: bound once
            self._stand_ins = self.engines.graph.stand_in_buffers(self.spec, self.device)
            for name, x in self._stand_ins.items():
                context.set_tensor_address(name, x.data_ptr())

    def deactivate_impl(self) -> None:
        self._views = {}
        self._stand_ins = {}
        self._graphs.clear()
        self.engines.release()

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        eng = self.engines
        context = eng.contexts[self.spec.key]
        stream = eng.stream
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)  # inputs were produced on torch's stream
        with torch.cuda.stream(stream):
            if eng.cuda_graphs:
                self._run_graph(context, feed, stream)
            else:
                for t in self._inputs:
                    x = feed[t.name]
                    if not x.is_contiguous():
                        x = x.contiguous()
                    context.set_tensor_address(t.name, x.data_ptr())
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError(f"TensorRT execute_async_v3 failed for bucket {self.spec.key}")
        for x in feed.values():
            x.record_stream(stream)  # keep the caller's tensors alive until the engine is done
        current.wait_stream(stream)  # outputs are consumed on torch's stream
        return {t.name: self._views[t.name] for t in self._outputs}

    def _run_graph(self, context: Any, feed: Mapping[str, torch.Tensor], stream: Any) -> None:
        for t in self._inputs:
            if t.name in self._views:  # staged: fixed address, copy the small input in
                self._views[t.name].copy_(feed[t.name], non_blocking=True)
        key = tuple(feed[t.name].data_ptr() for t in self._inputs if t.name not in self._views)
        graph = self._graphs.get(key)
        if graph is None:
            for t in self._inputs:
                src = self._views.get(t.name)
                ptr = src.data_ptr() if src is not None else feed[t.name].data_ptr()
                context.set_tensor_address(t.name, ptr)
            context.execute_async_v3(stream.cuda_stream)  # first run outside capture (deferred allocations)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                context.execute_async_v3(stream.cuda_stream)
            if len(self._graphs) >= 4:  # cache addresses change per view: keep a few
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = graph
        graph.replay()
