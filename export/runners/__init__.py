"""Bucket runners: one family, one life cycle, used by the export's equivalence check and the runtime.

A runner executes one bucket (one static shape) of an export. It follows polygraphy's runner
life cycle, so every backend looks the same to its caller::

    with runner:                                    # activate() ... deactivate()
        outputs = runner.infer(feed)                # name -> torch.Tensor, names from BucketSpec.io()
        seconds = runner.last_inference_time()
    runner.get_input_metadata()                     # name -> TensorSpec (shape, dtype), in graph order

``infer`` checks the feed with :meth:`BucketSpec.check_feed <tokprune.export.spec.BucketSpec.check_feed>`
(the one feed check: it raises :class:`~tokprune.export.spec.FeedError` naming each tensor, what it
got and what was expected) and refuses to run before ``activate`` (:class:`RunnerStateError`).
:attr:`Runner.aliases_outputs` says whether outputs are views of persistent buffers (valid until
the runner's next ``infer``; GPU backends) or fresh tensors (CPU backends).

One implementation per :class:`~tokprune.export.spec.Backend`:

================  ==========================  ===============================================
backend           runner                      module (imports its library on ``activate``)
================  ==========================  ===============================================
``torch``         :class:`TorchRunner`        :mod:`.eager` (the pruned forward; the reference)
``onnxruntime``   :class:`OnnxRuntimeRunner`  :mod:`.ort` (+ :class:`SharedOrtSession`)
``tensorrt``      :class:`TrtRunner`          :mod:`.trt` (one :class:`TrtEngineSet` per export)
any polygraphy    :class:`PolygraphyRunner`   :mod:`.polygraphy_bridge` (ONNX Runtime, TensorRT)
================  ==========================  ===============================================

Adding a backend (the extension hook): subclass :class:`Runner`, set ``backend`` to a short
name, implement the three public hooks ``activate_impl()`` (open the session; raise
:class:`~tokprune.errors.BackendUnavailableError` naming what is missing), ``infer_impl(feed)``
(a checked feed in, every output of ``spec.outputs()`` by name out) and ``deactivate_impl()``;
override ``aliases_outputs`` if outputs live in reused buffers. Hand the runtime a factory and it
runs your runner for every bucket::

    from tokprune import runtime
    from tokprune.export.runners import Runner

    class EchoRunner(Runner):                       # a toy backend: noise = latent
        backend = "echo"
        def activate_impl(self): pass
        def deactivate_impl(self): pass
        def infer_impl(self, feed):
            return {t.name: feed["latent"].clone() if t.name == "noise" else t.empty() for t in self.outputs}

    rt = runtime.load("engines/x", runner_factory=lambda spec, manifest: EchoRunner(spec))

Anything polygraphy runs needs no subclass: ``PolygraphyRunner(polygraphy_runner, spec)``.
"""

from __future__ import annotations

# Light imports: each backend's library (onnxruntime, tensorrt, polygraphy) is imported on activate.
from tokprune.export.runners.base import Runner, RunnerStateError
from tokprune.export.runners.eager import TorchRunner
from tokprune.export.runners.ort import OnnxRuntimeRunner, SharedOrtSession
from tokprune.export.runners.polygraphy_bridge import PolygraphyRunner
from tokprune.export.runners.trt import TrtEngineSet, TrtRunner
from tokprune.export.spec import Backend, FeedError

__all__ = [
    "Backend",
    "FeedError",
    "OnnxRuntimeRunner",
    "PolygraphyRunner",
    "Runner",
    "RunnerStateError",
    "SharedOrtSession",
    "TorchRunner",
    "TrtEngineSet",
    "TrtRunner",
]
