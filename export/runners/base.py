"""The runner base class: polygraphy's life cycle, one checked ``infer``, timing and input metadata.

Every backend's runner (:mod:`tokprune.export.runners`) subclasses :class:`Runner` and implements
three public hooks, named as in polygraphy's ``BaseRunner``: :meth:`Runner.activate_impl`,
:meth:`Runner.infer_impl`, :meth:`Runner.deactivate_impl`. The base class owns the rest: the
active flag and its guard, the feed check (:meth:`BucketSpec.check_feed`, the one check of a
bucket's feed), :meth:`Runner.last_inference_time` and :meth:`Runner.get_input_metadata`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import ClassVar

import torch
from tokprune.export.spec import BucketSpec, TensorSpec

from tokprune.errors import TokpruneError

logger = logging.getLogger(__name__)

__all__ = ["Runner", "RunnerStateError"]


class RunnerStateError(TokpruneError, RuntimeError):
    """A runner was used outside its life cycle (``infer`` before ``activate``, ...)."""


class Runner:
    """Base of every bucket runner: life cycle, guard, feed check, timing.

    A subclass sets :attr:`backend` (a :class:`~tokprune.export.spec.Backend` member, or any short
    name for a backend of your own) and implements :meth:`activate_impl`, :meth:`infer_impl` and
    :meth:`deactivate_impl`. It may override :attr:`aliases_outputs` (a class attribute or a
    property) when its outputs are views of persistent buffers.

    Args:
        spec: the bucket's :class:`BucketSpec` (its ``io()`` is the contract).
        device: where feeds live and outputs are returned.
        name: shown in messages (defaults to ``"<backend>:<bucket key>"``).
    """

    backend: ClassVar[str]
    #: True: ``infer`` returns views of persistent buffers, valid until the runner's next ``infer``
    #: (GPU backends); consumers that keep an output across calls clone it. False: fresh tensors.
    aliases_outputs: ClassVar[bool] = False

    def __init__(self, spec: BucketSpec, *, device: torch.device | str = "cpu", name: str | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.name = name or f"{getattr(self.backend, 'value', self.backend)}:{spec.key}"
        self.inference_time: float | None = None  # seconds of the last infer (infer_impl may set it itself)
        self._inputs = spec.inputs()
        self._outputs = spec.outputs()
        self._active = False
        self._lock = threading.Lock()  # serialises infer on backends whose outputs alias persistent buffers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, active={self._active})"

    # ---- life cycle ----------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Runner:
        """Create the session / context / buffers (:meth:`activate_impl`). A no-op on an active runner."""
        if self._active:
            return self
        self.activate_impl()
        self._active = True
        return self

    def deactivate(self) -> None:
        """Release what ``activate`` created (:meth:`deactivate_impl`). A no-op on an inactive runner."""
        if not self._active:
            return
        try:
            self.deactivate_impl()
        finally:
            self._active = False
            self.inference_time = None

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # ---- metadata ----------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        """Input name -> :class:`TensorSpec` (shape, dtype), in the order the graph declares them.

        Static shapes: a runner runs one bucket. Unlike polygraphy, callable before ``activate``
        (the bucket's I/O table is known without loading anything).
        """
        return {t.name: t for t in self._inputs}

    def last_inference_time(self) -> float | None:
        """Seconds the last :meth:`infer` took (None before the first), as polygraphy's runners report it.

        Host wall time of the call unless :meth:`infer_impl` sets :attr:`inference_time` itself.
        GPU backends return once the work is enqueued: synchronise the device before reading this
        to time device work.
        """
        return self.inference_time

    # ---- inference -------------------------------------------------------------------------
    def infer(self, feed: Mapping[str, torch.Tensor], *, check: bool = True) -> dict[str, torch.Tensor]:
        """Run the bucket once. ``feed``: name -> tensor per the bucket's inputs; returns name -> tensor.

        ``check=False`` skips the feed check (:meth:`BucketSpec.check_feed`) when the caller already
        checked this shape once.
        """
        if not self._active:
            raise RunnerStateError(f"runner {self.name} is not active; call activate() or use `with runner:` first")
        if check:
            self.spec.check_feed(feed, device=self.device)
        if self.aliases_outputs:
            with self._lock:
                return self._timed(feed)
        return self._timed(feed)

    def _timed(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.inference_time = None
        start = time.perf_counter()
        out = self.infer_impl(feed)
        if self.inference_time is None:
            self.inference_time = time.perf_counter() - start
        return out

    # ---- the hooks a backend implements ----------------------------------------------------
    def activate_impl(self) -> None:
        """Create what inference needs (session, context, buffers); raise
        :class:`~tokprune.errors.BackendUnavailableError` naming what is missing."""
        raise NotImplementedError(f"{type(self).__name__} must implement activate_impl")

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once on a checked feed; return every output of the bucket's I/O table by name."""
        raise NotImplementedError(f"{type(self).__name__} must implement infer_impl")

    def deactivate_impl(self) -> None:
        """Release what :meth:`activate_impl` created."""
        raise NotImplementedError(f"{type(self).__name__} must implement deactivate_impl")

