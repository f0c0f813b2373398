"""A CUDA graph per bucket for the PyTorch path: static buffers, capture once, replay per step.

On the H100 every tokprune mode was host-bound (``results/gpu``): a step took as long as the host
needed to enqueue its kernels. A CUDA graph enqueues a whole bucket call with one launch.
:class:`BucketGraphs` wraps one bucket's pure function (``BucketModule``: ``pruned_forward`` with
``inplace=False``) and keeps, per bucket:

- **static inputs**: one persistent buffer per input that is not a cache (``latent``, the
  conditioning inputs, ``timestep``, ``img_idx``, ``txt_idx``, ``prev_noise``); each step copies
  the feed into them (device-to-device, no host sync) and replays;
- **caches bound by address**: the per-block K/V caches are large (1.2 GB at SD3-medium 1024² bf16),
  so they are not copied; the graph reads the run's own cache tensors. The runtime pools them per
  view, so their addresses are stable and a graph is captured once per set of cache addresses
  (a handful are kept, :attr:`max_graphs`);
- **static outputs**: the tensors the captured call produced (in the graph's private memory pool);
  they are overwritten by the next replay, so outputs alias (the runtime consumes them first).

Selection (policies), cache updates and the previous prediction stay torch ops on the device
between replays: nothing in the loop waits for the host.

What breaks capture, and the errors (:class:`CudaGraphError`, naming ``cuda_graphs=True`` /
the fix): no CUDA device; a feed whose shape, dtype or device differs from
the bucket's I/O table (a graph replays fixed shapes); a host synchronisation inside the call
(``.item()``, ``.cpu()``, ``nonzero``, data-dependent shapes), detected by one warm-up run under
``torch.cuda.set_sync_debug_mode("error")`` before capture is attempted (after unchecked warm-up
runs that may compile or initialise lazily).

The capture mechanics go through a small backend object (:class:`TorchCudaBackend`), so the
bookkeeping (which buffers exist, when a capture happens, what a replay reads and returns) is unit-
tested on CPU with a stand-in backend; the real capture needs a GPU.

Example (GPU host)::

    from tokprune.runtime import load
    rt = load("engines/sd3-1024x1024-s28-b0.5", backend="torch", device="cuda", cuda_graphs=True)
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokprune.export.spec import BucketSpec, FeedError

from tokprune.errors import BackendUnavailableError, ShapeError, TokpruneError

logger = logging.getLogger(__name__)

__all__ = ["OPTION", "BucketGraphs", "CudaGraphError", "TorchCudaBackend", "require_cuda"]

#: How the option is spelled for users, in every message.
OPTION = "cuda_graphs=True (tokprune.runtime.load)"


class CudaGraphError(TokpruneError, RuntimeError):
    """A bucket call cannot be captured or replayed as a CUDA graph."""


def require_cuda(device: torch.device | str, *, available: Callable[[], bool] | None = None) -> None:
    """Raise :class:`BackendUnavailableError` unless ``device`` is a CUDA device that exists here."""
    device = torch.device(device)
    available = available or torch.cuda.is_available
    if device.type != "cuda":
        raise BackendUnavailableError(
            f"{OPTION} needs a CUDA device, got device {device}; pass device='cuda' on a GPU host, or drop the option"
        )
    if not available():
        raise BackendUnavailableError(
            f"{OPTION} needs a CUDA device but none is visible here; run on a GPU host, or drop the option"
        )


class TorchCudaBackend:
    """The real capture mechanics (``torch.cuda.CUDAGraph``); swapped for a stand-in in CPU tests."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def side_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    @contextlib.contextmanager
    def warmup(self, stream: Any, *, check_sync: bool) -> Iterator[None]:
        """Run a warm-up call on ``stream``; ``check_sync``: host syncs raise (the call as it will be captured)."""
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        previous = torch.cuda.get_sync_debug_mode()
        if check_sync:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            current.wait_stream(stream)

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def capture(self, graph: Any, stream: Any) -> Iterator[None]:
        # a private memory pool per graph: graphs of different cache sets may replay in any order
        with torch.cuda.graph(graph, stream=stream):
            yield

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class _Captured:
    graph: Any
    inputs: dict[str, torch.Tensor]  # static buffers of the staged inputs
    outputs: dict[str, torch.Tensor]  # what the captured call wrote (overwritten by each replay)
    replays: int = 0


class BucketGraphs:
    """CUDA graphs of one bucket call ``fn(*inputs) -> tuple(outputs)``, keyed by the caches' addresses.

    Args:
        fn: the bucket's pure callable (inputs positionally in ``spec.inputs()`` order).
        spec: the bucket's :class:`BucketSpec` (its I/O table; feeds are checked with its ``check_feed``).
        device: the CUDA device; ``backend``: capture mechanics (default :class:`TorchCudaBackend`).
        max_graphs: captured graphs kept per bucket (one per set of cache addresses; LRU).
        warmup: unchecked runs before the first capture (lazy initialisation, compilation), followed by
            one run with host syncs turned into errors, then the capture.
    """

    def __init__(
        self,
        fn: Callable[..., Sequence[torch.Tensor]],
        spec: BucketSpec,
        device: torch.device | str,
        *,
        backend: Any = None,
        max_graphs: int = 4,
        warmup: int = 1,
    ) -> None:
        self.device = torch.device(device)
        if backend is None:
            require_cuda(self.device)
            backend = TorchCudaBackend(self.device)
        self.fn = fn
        self.spec = spec
        self.key = spec.key
        self.inputs = spec.inputs()
        self.outputs = spec.outputs()
        self.backend = backend
        self.max_graphs = int(max_graphs)
        self.warmup = int(warmup)
        self.staged = [t.name for t in self.inputs if t.cache is None]  # small inputs: copied in before each replay
        self.bound = [t.name for t in self.inputs if t.cache is not None]  # the caches: bound by address
        self._graphs: OrderedDict[tuple[int, ...], _Captured] = OrderedDict()
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    # ---- checks ------------------------------------------------------------------------------
    def _check(self, feed: Mapping[str, torch.Tensor]) -> None:
        try:
            self.spec.check_feed(feed, device=self.device)
        except FeedError as exc:
            raise ShapeError(
                f"bucket {self.key}: {OPTION} replays fixed shapes, and this call differs: {exc}. Feed the "
                "bucket's exact I/O table (BucketSpec.io()), or drop the option"
            ) from None

    # ---- the call ------------------------------------------------------------------------------
    def __call__(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy the staged inputs in, replay (capturing first for new cache addresses), return the static outputs."""
        self._check(feed)
        key = tuple(feed[n].data_ptr() for n in self.bound)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(feed, key)
        else:
            self._graphs.move_to_end(key)
        for name in self.staged:
            entry.inputs[name].copy_(feed[name], non_blocking=True)
        self.backend.replay(entry.graph)
        entry.replays += 1
        return dict(entry.outputs)

    def _capture(self, feed: Mapping[str, torch.Tensor], key: tuple[int, ...]) -> _Captured:
        static = {name: feed[name].detach().clone() for name in self.staged}
        args = [static[t.name] if t.name in static else feed[t.name] for t in self.inputs]
        stream = self.backend.side_stream()
        for _ in range(self.warmup):  # lazy initialisation, torch.compile's first call: syncs allowed here
            with self.backend.warmup(stream, check_sync=False):
                self.fn(*args)
        try:
            with self.backend.warmup(stream, check_sync=True):  # the call exactly as captured: no host sync
                self.fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported with the option and the fix
            raise CudaGraphError(
                f"bucket {self.key}: the warm-up call before CUDA graph capture failed ({type(exc).__name__}: "
                f"{_first_line(exc)}). A host synchronisation (.item(), .cpu(), nonzero, a data-dependent shape) "
                f"cannot be captured; remove it from the bucket's forward, or run without {OPTION}"
            ) from exc
        graph = self.backend.new_graph()
        try:
            with self.backend.capture(graph, stream):
                outs = self.fn(*args)
        except Exception as exc:  # noqa: BLE001
            raise CudaGraphError(
                f"bucket {self.key}: CUDA graph capture failed ({type(exc).__name__}: {_first_line(exc)}); run "
                f"without {OPTION}, or report it with this message"
            ) from exc
        if len(outs) != len(self.outputs):
            raise CudaGraphError(f"bucket {self.key}: the call returned {len(outs)} tensors, its I/O table has "
                                 f"{len(self.outputs)} outputs")
        entry = _Captured(graph, static, {t.name: o for t, o in zip(self.outputs, outs)})
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        self._graphs[key] = entry
        self.captures += 1
        logger.info("bucket %s: captured a CUDA graph (%d kept)", self.key, len(self._graphs))
        return entry

    def clear(self) -> None:
        self._graphs.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
