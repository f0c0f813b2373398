"""tokprune.runtime: run exported bucket engines inside a diffusers SD3 pipeline.

Two verbs: :func:`attach` swaps ``pipe.transformer`` for the engines (and keeps the step loop in
sync with ``pipe.scheduler``), :func:`detach` restores the original. :func:`load` verifies an
export directory and returns the drop-in transformer. Backends (``onnxruntime``, ``tensorrt``,
``torch``) are runners with one interface (:mod:`tokprune.runtime.runners`).

Example::

    import torch
    from tokprune import runtime
    from tokprune.models import load_pipeline

    pipe = load_pipeline("sd3-tiny")
    runtime.attach(pipe, "engines/sd3-tiny", backend="onnxruntime")
    image = pipe("a red circle", num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images[0]
    runtime.detach(pipe)
"""

from tokprune.runtime.engine import (
    EngineTransformer,
    RuntimeBusyError,
    attach,
    detach,
    load,
)
from tokprune.runtime.runners import (
    Runner,
    RunnerInputError,
    RunnerStateError,
    RuntimeBackend,
)

__all__ = [
    "EngineTransformer",
    "Runner",
    "RunnerInputError",
    "RunnerStateError",
    "RuntimeBackend",
    "RuntimeBusyError",
    "attach",
    "detach",
    "load",
]
