"""tokprune.runtime: run exported bucket engines inside a diffusers SD3 pipeline.

Two verbs: :func:`attach` swaps ``pipe.transformer`` for the engines (and keeps the step loop in
sync with ``pipe.scheduler``), :func:`detach` restores the original. :func:`load` verifies an
export directory and returns the drop-in transformer. Backends (``onnxruntime``, ``tensorrt``,
``torch``) are runners of one family (:mod:`tokprune.export.runners`); ``load(..., runner_factory=...)``
runs a runner of your own.

Example::

    import torch
    from tokprune import runtime
    from tokprune.models import load_pipeline

    pipe = load_pipeline("sd3-tiny")
    runtime.attach(pipe, "engines/sd3-tiny", backend="onnxruntime")
    image = pipe("a red circle", num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images[0]
    runtime.detach(pipe)
"""

from tokprune.export.runners.base import Runner, RunnerStateError
from tokprune.export.spec import Backend, FeedError
from tokprune.runtime.engine import (
    EngineTransformer,
    RuntimeBusyError,
    attach,
    detach,
    load,
)

__all__ = [
    "Backend",
    "EngineTransformer",
    "FeedError",
    "Runner",
    "RunnerStateError",
    "RuntimeBusyError",
    "attach",
    "detach",
    "load",
]
