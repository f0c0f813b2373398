"""The ONNX Runtime runner: one bucket's graph (or the export's dynamic graph) in a session.

CPU feeds go in as zero-copy numpy views and come back as fresh tensors; on CUDA the runner binds
device buffers by address (IO binding, outputs alias). :class:`SharedOrtSession` lets every bucket
of the dynamic graph share one session (weights loaded once).

Example::

    from tokprune.export.runners import OnnxRuntimeRunner
    with OnnxRuntimeRunner("engines/x/k0128-t0333.onnx", spec) as runner:
        outputs = runner.infer(spec.sample_inputs(seed=0))
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokprune.export.runners.base import Runner
from tokprune.export.spec import Backend, BucketSpec, TensorSpec

from tokprune.errors import BackendUnavailableError, ShapeError

logger = logging.getLogger(__name__)

__all__ = ["OnnxRuntimeRunner", "SharedOrtSession"]


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")


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
        spin: let idle intra-op threads spin-wait for work while a run is in flight (lower latency per
            parallel op at 2+ threads); they stop spinning when the run returns
            (``session.force_spinning_stop``), so the runtime's selection and cache updates in torch between
            engine calls keep the cores. Off by default: on a shared, busy machine a spinning thread takes a
            core another process needs.
        session_options: extra ``SessionOptions`` attributes, e.g. ``{"enable_mem_pattern": False}``.
        graph / shared: run the export's single dynamic-K graph (:class:`~tokprune.export.dynamic.GraphSpec`)
            at this bucket's shapes, in one :class:`SharedOrtSession` for all buckets (weights loaded once).
            Inputs the bucket does not feed (a dense call's caches) are bound to one zero stand-in buffer.
    """

    backend = Backend.ONNXRUNTIME

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

    def activate_impl(self) -> None:
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
        if self.spin:
            options.add_session_config_entry("session.force_spinning_stop", "1")
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

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

    def deactivate_impl(self) -> None:
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
