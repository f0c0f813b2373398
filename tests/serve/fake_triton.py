"""An in-process stand-in for Triton's Python backend (``triton_python_backend_utils`` is not installable).

:func:`install` puts a fake ``triton_python_backend_utils`` module in ``sys.modules`` whose BLS
``InferenceRequest.exec()`` runs the named model of a written repository: bucket models with ONNX
Runtime on the repository's own ``1/model.onnx``, after checking every input against the model's
``config.pbtxt`` (parsed with Triton's ModelConfig schema): names, dims and data types.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

NP_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_UINT8": np.uint8}


class TritonError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self._msg = msg

    def message(self):
        return self._msg


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        self._outputs, self._error = list(output_tensors), error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return self._outputs


class InferenceRequest:
    server = None  # set by install()

    def __init__(self, model_name, inputs, requested_output_names):
        self.model_name, self.inputs, self.requested = model_name, list(inputs), list(requested_output_names)

    def exec(self):
        return InferenceRequest.server.run(self)

    def input(self, name):
        return next((t for t in self.inputs if t.name() == name), None)


def get_input_tensor_by_name(request, name):
    return request.input(name)


def get_output_tensor_by_name(response, name):
    return next((t for t in response.output_tensors() if t.name() == name), None)


class FakeServer:
    """Runs the bucket models of ``repo``; records which model each BLS call went to."""

    def __init__(self, repo: Path):
        from tokprune.serve.triton import parse_config

        self.repo = Path(repo)
        self.configs = {d.name: parse_config((d / "config.pbtxt").read_text()) for d in self.repo.iterdir() if d.is_dir()}
        self.sessions = {}
        self.calls: list[str] = []

    def run(self, request):
        import onnxruntime as ort
        from tritonclient.grpc import model_config_pb2 as mc

        cfg = self.configs.get(request.model_name)
        if cfg is None:
            return InferenceResponse([], TritonError(f"unknown model {request.model_name}"))
        spec = {i.name: i for i in cfg.input}
        for t in request.inputs:
            want = spec.get(t.name())
            arr = t.as_numpy()
            if want is None:
                return InferenceResponse([], TritonError(f"{request.model_name}: unexpected input {t.name()}"))
            if list(arr.shape) != list(want.dims) or arr.dtype != NP_TYPES[mc.DataType.Name(want.data_type)]:
                return InferenceResponse([], TritonError(
                    f"{request.model_name}: input {t.name()} {arr.shape} {arr.dtype} vs config {list(want.dims)} "
                    f"{mc.DataType.Name(want.data_type)}"))
        missing = set(spec) - {t.name() for t in request.inputs}
        if missing:
            return InferenceResponse([], TritonError(f"{request.model_name}: missing inputs {sorted(missing)}"))
        if request.model_name not in self.sessions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            path = self.repo / request.model_name / "1" / "model.onnx"
            self.sessions[request.model_name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sess = self.sessions[request.model_name]
        outs = sess.run(request.requested, {t.name(): t.as_numpy() for t in request.inputs})
        self.calls.append(request.model_name)
        declared = {o.name: list(o.dims) for o in cfg.output}
        for name, arr in zip(request.requested, outs):
            assert declared[name] == list(arr.shape), (name, declared[name], arr.shape)
        return InferenceResponse([Tensor(n, a) for n, a in zip(request.requested, outs)])


def install(monkeypatch, repo: Path) -> FakeServer:
    mod = types.ModuleType("triton_python_backend_utils")
    for obj in (TritonError, Tensor, InferenceResponse, InferenceRequest, get_input_tensor_by_name,
                get_output_tensor_by_name):
        setattr(mod, obj.__name__, obj)
    server = FakeServer(repo)
    InferenceRequest.server = server
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mod)
    return server
