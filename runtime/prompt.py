"""The per-run prompt stage at run time: what some families compute once per run, not once per step.

An export whose family has a prompt stage (``manifest["prompt_stage"]``, :mod:`tokprune.export.prompt_stage`;
PixArt-Σ's cross-attention text K/V) ships ``prompt_stage.onnx``. :class:`PromptStageRunner` runs it in
ONNX Runtime at the first step of every run (CPU provider, or CUDA's where the runtime's device is a GPU
and onnxruntime-gpu is installed: a few matmuls per prompt, whatever backend runs the buckets), and the
engine executor feeds its outputs to every bucket call of that run.

Example::

    stage = PromptStageRunner.from_manifest(manifest, device)    # None for SD3 exports
    prepared = stage({"encoder_hidden_states": ..., "encoder_attention_mask": ...})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["PromptStageRunner"]


class PromptStageRunner:
    """``runner(call conditions) -> {bucket condition: tensor}`` through ``prompt_stage.onnx``."""

    def __init__(self, path: Any, input_names: list[str], output_names: list[str], device: torch.device,
                 threads: int | None = None) -> None:  # fmt: skip
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.input_names, self.output_names, self.device = list(input_names), list(output_names), device

    @classmethod
    def from_manifest(cls, manifest: Any, device: torch.device, threads: int | None = None) -> PromptStageRunner | None:
        path = manifest.prompt_stage_path()
        if path is None:
            return None
        entry = manifest.data["prompt_stage"]
        return cls(path, [t["name"] for t in entry["inputs"]], [t["name"] for t in entry["outputs"]], device, threads)

    def __call__(self, conditions: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {n: conditions[n].detach().to("cpu").contiguous().numpy() for n in self.input_names}
        outs = self.session.run(self.output_names, feed)
        return {n: torch.from_numpy(o).to(self.device) for n, o in zip(self.output_names, outs)}
