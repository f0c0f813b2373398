"""tokprune: token pruning for diffusion transformers, shipped as static-shape engines.

Sub-packages (each lives in a top-level folder of the repository):

- :mod:`tokprune.pruning`   token selection policies and the pruned MMDiT forward (``apply`` / ``remove``)
- :mod:`tokprune.calibrate` per-step keep schedules under a MAC budget, frozen into buckets
- :mod:`tokprune.export`    ONNX export per bucket, TensorRT build, manifest
- :mod:`tokprune.runtime`   per-step engine selection as a drop-in for ``pipe.transformer``

Heavy dependencies (diffusers, onnx, TensorRT) are imported lazily by the sub-packages.
"""

__version__ = "0.1.0"

from tokprune.errors import TokpruneError  # noqa: E402

__all__ = ["TokpruneError", "__version__"]
