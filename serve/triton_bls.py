"""The Triton Python-backend BLS model: the diffusers pipeline with the tokprune runtime as its transformer.

Nothing of the denoising loop is re-written here. :class:`TritonPythonModel` builds the same
:class:`~tokprune.serve.worker.ImageGenerator` that ``tokprune-serve`` replicas use, except that
the runtime's bucket runners are :class:`TritonBucketRunner`: each engine call is a BLS
``pb_utils.InferenceRequest`` to the bucket's model in the same Triton server. The runtime's
executor picks the bucket per step (the schedule in the manifest), keeps the pruning caches and
the previous prediction, and diffusers runs text encoders, scheduler and VAE.

Inputs: ``PROMPT`` (string), optional ``NEGATIVE_PROMPT``, ``SEED`` (int64), ``GUIDANCE`` (fp32),
checked exactly like ``POST /generate`` (:func:`tokprune.serve.request.parse_request`); an invalid
request gets a ``TritonError`` naming the field. Output: ``IMAGE`` (uint8, H x W x 3).

Example (inside Triton; ``model.py`` in the repository imports this class)::

    from tokprune.serve.triton_bls import TritonPythonModel
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokprune.export.runners.base import Runner

from tokprune.errors import BackendUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["TritonBucketRunner", "TritonPythonModel", "load_with_runners"]

class TritonBucketRunner(Runner):
    """A bucket runner whose ``infer`` is a BLS request to the bucket's Triton model."""

    backend = "triton"  # the bucket model runs ONNX Runtime by default (or a TensorRT plan), inside Triton
    aliases_outputs = False

    def __init__(self, spec: Any, model_name: str, pb_utils: Any) -> None:
        super().__init__(spec, device="cpu", name=f"triton:{model_name}")
        self.model_name = model_name
        self.pb = pb_utils
        self.calls = 0

    def activate_impl(self) -> None:
        return None

    def deactivate_impl(self) -> None:
        return None

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pb = self.pb
        inputs = [pb.Tensor(name, np.ascontiguousarray(t.detach().cpu().numpy())) for name, t in feed.items()]
        wanted = [t.name for t in self.outputs]
        response = pb.InferenceRequest(model_name=self.model_name, inputs=inputs, requested_output_names=wanted).exec()
        if response.has_error():
            raise BackendUnavailableError(f"Triton model {self.model_name} failed: {response.error().message()}")
        self.calls += 1
        out = {}
        for name in wanted:
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise BackendUnavailableError(f"Triton model {self.model_name} returned no output {name!r}")
            out[name] = torch.from_numpy(np.array(tensor.as_numpy(), copy=True))
        return out


def load_with_runners(directory: str | Path, make_runner: Callable[[Any], Runner]) -> Any:
    """:func:`tokprune.runtime.load` with ``make_runner(spec)`` as every bucket's runner (its public
    ``runner_factory`` hook). File hashes are not re-checked (the bucket files live in the Triton
    models, verified by ``tokprune-triton`` when it wrote them)."""
    from tokprune import runtime

    return runtime.load(directory, backend="onnxruntime", check_files=False,
                        runner_factory=lambda spec, manifest: make_runner(spec))


def _scalar(pb: Any, request: Any, name: str) -> Any:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = np.asarray(tensor.as_numpy()).reshape(-1)
    if arr.size != 1:
        return arr.tolist()
    value = arr[0]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


class TritonPythonModel:
    """Triton's Python-backend entry point (``initialize`` / ``execute`` / ``finalize``)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from tokprune.serve.triton import BUCKETS_FILE
        from tokprune.serve.worker import ImageGenerator

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
        export_dir = Path(args["model_repository"]) / str(args["model_version"]) / params.get("export_dir", "export")
        models = json.loads((export_dir / BUCKETS_FILE).read_text())
        self.runners: dict[str, TritonBucketRunner] = {}

        def make_runner(spec: Any) -> Runner:
            runner = TritonBucketRunner(spec, models[spec.key], pb_utils)
            self.runners[spec.key] = runner
            return runner

        engines = load_with_runners(export_dir, make_runner)
        self.generator = ImageGenerator(export_dir, engines=engines, slots=1)
        logger.info("%s ready: buckets %s", args.get("model_name"), sorted(models.values()))

    def execute(self, requests: list[Any]) -> list[Any]:
        import time

        from PIL import Image

        from tokprune.serve.request import BadRequest, parse_request

        pb = self.pb
        responses = []
        for request in requests:
            try:
                payload = {"prompt": _scalar(pb, request, "PROMPT"), "negative_prompt": _scalar(pb, request, "NEGATIVE_PROMPT"),
                           "seed": _scalar(pb, request, "SEED"), "guidance": _scalar(pb, request, "GUIDANCE")}
                req = parse_request({k: v for k, v in payload.items() if v is not None}, self.generator.limits,
                                    arrived=time.time())
                (result,) = self.generator.generate_batch([req])
                if isinstance(result, BaseException):
                    raise result
                image = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"), dtype=np.uint8)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("IMAGE", image)]))
            except BadRequest as exc:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(f"bad request: {exc}")))
            except Exception as exc:  # noqa: BLE001 - one failed request never stops the model
                msg = f"generation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(msg)))
        return responses

    def finalize(self) -> None:
        self.generator.close()
