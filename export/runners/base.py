"""Bucket runners: one life cycle and one ``infer`` for every backend.

A runner executes one bucket (one static shape) of an export. Every backend — the PyTorch
reference, ONNX Runtime, TensorRT (:mod:`tokprune.runtime.trt_runner`) — has the same
interface, so the runtime cannot tell them apart::

    with runner:                                   # activate() ... deactivate()
        outputs = runner.infer(feed)               # name -> torch.Tensor, names from BucketSpec.io()

``infer`` checks the feed against the bucket's I/O table (:meth:`BucketSpec.io`, the single
source of names, shapes and dtypes) and raises :class:`RunnerInputError` naming each tensor
with what it got and what was expected. ``is_active`` guards ``infer`` before ``activate``.

Outputs: :attr:`Runner.aliases_outputs` says whether the returned tensors are views of the
runner's persistent buffers (valid until its next ``infer``; GPU backends) or fresh tensors
(CPU backends). Consumers that keep an output across calls must clone it when it aliases.

Example::

    from tokprune.runtime.runners import OnnxRuntimeRunner
    with OnnxRuntimeRunner("engines/x/k0128-t0333.onnx", spec) as r:
        out = r.infer(spec.sample_inputs(seed=0))
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from tokprune.export.spec import BucketSpec, TensorSpec

from tokprune.errors import (
    BackendUnavailableError,
    ConfigError,
    ShapeError,
    TokpruneError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "OnnxRuntimeRunner",
    "SharedOrtSession",
    "Runner",
    "RunnerInputError",
    "RunnerStateError",
    "RuntimeBackend",
    "TorchRunner",
    "check_feed",
]


class RuntimeBackend(str, enum.Enum):
    """Which engine kind a runtime drives (closed set)."""

    TORCH = "torch"  # the PyTorch pruned forward, eagerly (the reference), optionally torch.compile'd
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"

    @classmethod
    def parse(cls, value: RuntimeBackend | str) -> RuntimeBackend:
        aliases = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "eager": "torch", "pytorch": "torch"}
        text = value.value if isinstance(value, cls) else aliases.get(str(value).lower(), str(value).lower())
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(
                f"backend {value!r} is not one of {[b.value for b in cls]}; pass --backend onnxruntime|tensorrt|torch"
            ) from None


class RunnerInputError(ShapeError):
    """A feed does not match the bucket's I/O table (names, shapes, dtypes or device)."""


class RunnerStateError(TokpruneError, RuntimeError):
    """A runner was used outside its life cycle (``infer`` before ``activate``, ...)."""


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")


def check_feed(
    key: str, inputs: list[TensorSpec], feed: Mapping[str, Any], *, device: torch.device | None = None
) -> None:
    """Raise :class:`RunnerInputError` listing every missing, unexpected or mismatched input.

    Each line names the tensor and shows what it got and what the bucket expects, e.g.
    ``img_idx: got shape (2, 64) int64 on cpu, expected shape (2, 128) int64``.
    """
    problems = []
    expected = {t.name: t for t in inputs}
    for name in expected:
        if name not in feed:
            t = expected[name]
            problems.append(f"{name}: missing, expected shape {t.shape} {t.dtype}")
    for name in feed:
        if name not in expected:
            problems.append(f"{name}: unexpected input (the bucket reads {sorted(expected)})")
    for name, t in expected.items():
        x = feed.get(name)
        if x is None:
            continue
        shape, dtype = tuple(x.shape), _dtype_name(x)
        dev = getattr(x, "device", None)
        bad_device = device is not None and isinstance(x, torch.Tensor) and x.device.type != device.type
        if shape != t.shape or dtype != t.dtype or bad_device:
            where = f" on {dev}" if dev is not None else ""
            want = f" on {device}" if bad_device else ""
            problems.append(f"{name}: got shape {shape} {dtype}{where}, expected shape {t.shape} {t.dtype}{want}")
    if problems:
        raise RunnerInputError(f"bucket {key}: the feed does not match its I/O table: " + "; ".join(problems))


class Runner:
    """Base of every bucket runner: life cycle, guard, input checks.

    Subclasses set :attr:`backend` and implement ``_activate``, ``_infer`` and ``_deactivate``.

    Args:
        spec: the bucket's :class:`BucketSpec` (its ``io()`` is the contract).
        device: where feeds live and outputs are returned.
        name: shown in messages (defaults to the bucket key).
    """

    backend: ClassVar[RuntimeBackend]
    aliases_outputs: ClassVar[bool] = False  # True: outputs are views of persistent buffers

    def __init__(self, spec: BucketSpec, *, device: torch.device | str = "cpu", name: str | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.name = name or f"{self.backend.value}:{spec.key}"
        self._inputs = spec.inputs()
        self._outputs = spec.outputs()
        self._active = False
        self._lock = threading.Lock()  # serialises infer on backends with persistent buffers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, active={self._active})"

    # ---- life cycle ----------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Runner:
        """Create the session / context / buffers. Activating an active runner is a no-op."""
        if self._active:
            return self
        self._activate()
        self._active = True
        return self

    def deactivate(self) -> None:
        """Release what ``activate`` created. Deactivating an inactive runner is a no-op."""
        if not self._active:
            return
        try:
            self._deactivate()
        finally:
            self._active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # ---- inference -------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def infer(self, feed: Mapping[str, torch.Tensor], *, check: bool = True) -> dict[str, torch.Tensor]:
        """Run the bucket once. ``feed``: name -> tensor per the bucket's inputs; returns name -> tensor.

        ``check=False`` skips the feed check (the runtime checks each call's shapes once per run).
        """
        if not self._active:
            raise RunnerStateError(f"runner {self.name} is not active; call activate() or use `with runner:` first")
        if check:
            check_feed(self.spec.key, self._inputs, feed, device=self.device)
        if self.aliases_outputs:
            with self._lock:
                return self._infer(feed)
        return self._infer(feed)

    # ---- subclass hooks --------------------------------------------------------------------
    def _activate(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _activate")

    def _infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _infer")

    def _deactivate(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _deactivate")


# ---- PyTorch ------------------------------------------------------------------------------------
class TorchRunner(Runner):
    """The bucket as the PyTorch pruned forward (the same module the ONNX export traced).

    Runs :class:`tokprune.export.onnx_export.BucketModule` — ``pruned_forward(inplace=False)`` with
    the bucket's precision patches — so it is the numerical reference of the exported graph.
    ``compile=True`` wraps it in ``torch.compile`` (static shapes: one graph per bucket).
    ``cuda_graphs=True`` replays a CUDA graph per bucket (:mod:`tokprune.runtime.cuda_graphs`: static
    input buffers, caches bound by address, capture once, replay per step); outputs then alias.

    Args:
        model: the ``SD3Transformer2DModel`` the engines were exported from, already on ``device``
            and cast to the bucket precision.
    """

    backend = RuntimeBackend.TORCH

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
        self._graph_backend = graph_backend  # tests: a stand-in for torch.cuda.CUDAGraph capture
        self._graphs: Any = None
        self._fn: Any = None
        self._names = [t.name for t in self._inputs]
        self._out_names = [t.name for t in self._outputs]

    def _activate(self) -> None:
        from tokprune.export.onnx_export import BucketModule

        module = BucketModule(self.model, self.spec).eval()
        self._fn = torch.compile(module, dynamic=False, fullgraph=False) if self.compile else module
        if self.cuda_graphs:
            from tokprune.runtime.cuda_graphs import BucketGraphs

            self._graphs = BucketGraphs(self._call, self.spec.key, self._inputs, self._outputs, self.device,
                                        backend=self._graph_backend)

    @property
    def aliases_outputs(self) -> bool:  # type: ignore[override]
        return self.cuda_graphs  # replayed graphs overwrite their static outputs

    def _call(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from tokprune.export.onnx_export import precision_patches

        with torch.inference_mode(), precision_patches(self.spec.precision):
            return self._fn(*tensors)

    def _infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._graphs is not None:
            return self._graphs(feed)
        outs = self._call(*(feed[n] for n in self._names))
        return dict(zip(self._out_names, outs))

    def _deactivate(self) -> None:
        self._fn = None
        self._graphs = None


# ---- ONNX Runtime ---------------------------------------------------------------------------------
def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BackendUnavailableError(
            f"ONNX Runtime is not installed ({exc}); pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"
        ) from exc
    return onnxruntime


#: ONNX TensorProto element types for IO binding (an int, so bfloat16 binds too: numpy has no bfloat16).
_ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7}


class SharedOrtSession:
    """One ONNX Runtime session shared by every bucket runner of the dynamic graph (weights once).

    Created by the first runner that activates, dropped when the last one deactivates. ONNX Runtime's
    ``run`` / ``run_with_iobinding`` may be called from several threads on one session.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.session: Any = None
        self.users = 0
        self._lock = threading.Lock()

    def acquire(self, make: Any) -> Any:
        with self._lock:
            if self.session is None:
                self.session = make()
            self.users += 1
            return self.session

    def release(self) -> None:
        with self._lock:
            self.users = max(0, self.users - 1)
            if self.users == 0:
                self.session = None


class OnnxRuntimeRunner(Runner):
    """One bucket's ONNX graph in an ONNX Runtime session.

    * CPU (``device="cpu"``): feeds are passed as zero-copy numpy views of the torch tensors and the
      outputs come back as zero-copy torch views of ORT's fresh arrays (no persistent buffers).
    * CUDA: ``CUDAExecutionProvider`` on torch's current stream with IO binding: inputs are bound
      by device address (no copies), outputs go into persistent device buffers (so outputs alias,
      see :attr:`aliases_outputs`), and ORT does not synchronise the host after a run.

    Args:
        path: the bucket's ``.onnx`` file (external weights next to it).
        threads: intra-op threads (None: ORT's default, one per physical core).
        spin: let idle intra-op threads spin-wait between runs. Off by default: between engine calls the
            runtime's selection and cache updates run in torch on the same cores, and spinning ORT threads
            would compete with them.
        session_options: extra ``SessionOptions`` attributes, e.g. ``{"enable_mem_pattern": False}``.
        graph / shared: run the export's single dynamic-K graph (:class:`~tokprune.export.dynamic.GraphSpec`)
            at this bucket's shapes, in one :class:`SharedOrtSession` for all buckets (weights loaded once).
            Inputs the bucket does not feed (a dense call's caches) are bound to one zero stand-in buffer.
    """

    backend = RuntimeBackend.ONNXRUNTIME

    def __init__(
        self,
        path: str | Path,
        spec: BucketSpec,
        *,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        spin: bool = False,
        session_options: Mapping[str, Any] | None = None,
        graph: Any = None,
        shared: SharedOrtSession | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(spec, device=device, name=name)
        self.path = Path(path)
        self.graph = graph
        self.shared = shared if graph is None or shared is not None else SharedOrtSession(path)
        self._stand_ins: dict[str, torch.Tensor] = {}
        self._graph_in: list[TensorSpec] = []
        self.threads = threads
        self.spin = bool(spin)
        self.session_options = dict(session_options or {})
        self.cuda = self.device.type == "cuda"
        self._session: Any = None
        self._binding: Any = None
        self._run_options: Any = None
        self._out_buffers: dict[str, torch.Tensor] = {}
        self._in_names = [t.name for t in self._inputs]
        self._out_names = [t.name for t in self._outputs]

    @property
    def aliases_outputs(self) -> bool:  # type: ignore[override]
        return self.cuda

    def _activate(self) -> None:
        ort = _import_onnxruntime()
        if not self.path.is_file():
            raise BackendUnavailableError(f"runner {self.name}: ONNX file {self.path} does not exist")
        if self.spec.precision.value == "bf16" and not self.cuda:
            raise BackendUnavailableError(
                f"bucket {self.spec.key} is bfloat16, which ONNX Runtime's CPU feed (numpy) cannot hold; "
                "export with --precision fp32 for CPU, or run on a GPU"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        for key, value in self.session_options.items():
            setattr(options, key, value)
        if self.cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    f"runner {self.name}: device {self.device} needs ONNX Runtime's CUDAExecutionProvider, but this "
                    f"onnxruntime offers {ort.get_available_providers()}; pip install onnxruntime-gpu, or use device='cpu'"
                )
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(index).cuda_stream
            providers: list[Any] = [
                ("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}),
                "CPUExecutionProvider",
            ]
        else:
            providers = ["CPUExecutionProvider"]
        def make() -> Any:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)

        session = self.shared.acquire(make) if self.shared is not None else make()
        try:
            self._check_graph_io(session)
        except BaseException:
            if self.shared is not None:
                self.shared.release()
            raise
        self._session = session
        if self.graph is not None:
            shapes = self.graph.shapes(self.spec)
            self._graph_in = [TensorSpec(t.name, shapes[t.name], t.dtype, t.role, t.cache) for t in self.graph.inputs()]
            self._stand_ins = self.graph.stand_in_buffers(self.spec, self.device)
        if self.cuda:
            self._binding = session.io_binding()
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._out_buffers = {t.name: t.empty(self.device) for t in self._outputs}
            for t in self._outputs:
                buf = self._out_buffers[t.name]
                self._binding.bind_output(
                    t.name, "cuda", buf.device.index or 0, _ONNX_TYPES[t.dtype], list(t.shape), buf.data_ptr()
                )
            for name, x in self._stand_ins.items():  # fixed: bound once
                self._binding.bind_input(name, "cuda", x.device.index or 0, _ONNX_TYPES[_dtype_name(x)],
                                         list(x.shape), x.data_ptr())

    def _check_graph_io(self, session: Any) -> None:
        got = [(i.name, tuple(i.shape)) for i in session.get_inputs()], [(o.name, tuple(o.shape)) for o in session.get_outputs()]
        if self.graph is not None:  # the dynamic graph: K / K_txt axes are symbolic
            want = [(t.name, t.shape) for t in self.graph.inputs()], [(t.name, t.shape) for t in self.graph.outputs()]
        else:
            want = [(t.name, t.shape) for t in self._inputs], [(t.name, t.shape) for t in self._outputs]
        if got != want:
            raise ShapeError(
                f"{self.path.name}: the graph's I/O {got} differs from bucket {self.spec.key}'s I/O table {want}; "
                "the export is stale or from another version: re-export it (tokprune-export ... --force)"
            )

    def _infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.cuda:
            arrays = {n: _numpy_view(feed[n]) for n in self._in_names}
            for n, x in self._stand_ins.items():
                arrays[n] = _numpy_view(x)
            outs = self._session.run(self._out_names, arrays)
            return {n: torch.from_numpy(a) for n, a in zip(self._out_names, outs)}
        binding = self._binding
        keep_alive = []
        for t in self._inputs:
            x = feed[t.name]
            if not x.is_contiguous():
                x = x.contiguous()
            keep_alive.append(x)
            binding.bind_input(t.name, "cuda", x.device.index or 0, _ONNX_TYPES[t.dtype], list(t.shape), x.data_ptr())
        self._session.run_with_iobinding(binding, self._run_options)
        return dict(self._out_buffers)

    def _deactivate(self) -> None:
        if self.shared is not None and self._session is not None:
            self.shared.release()
        self._session = None
        self._binding = None
        self._out_buffers = {}
        self._stand_ins = {}


def _numpy_view(x: torch.Tensor) -> Any:
    """A zero-copy numpy array of a CPU tensor (one copy only if it is non-contiguous)."""
    import numpy as np

    if x.requires_grad:
        x = x.detach()
    arr = x.numpy()
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
