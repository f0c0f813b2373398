"""The per-run prompt stage of an export: conditions computed once per run, not once per step.

Some families turn a call's conditions into what every step reads with work that depends on the prompt
only (PixArt-Σ: the caption projection and every block's cross-attention keys and values). Their
buckets then take those tensors as inputs (:meth:`ModelFamily.condition_specs`), and the export ships
one more small graph, ``prompt_stage.onnx`` (:meth:`ModelFamily.prompt_stage`), that the runtime runs at
the first step of every run (:mod:`tokprune.runtime.prompt`). Families without one export nothing here.

Example::

    from tokprune.export.prompt_stage import stage_spec
    spec = stage_spec(model, geometry, "fp32")     # None for SD3
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokprune.export.errors import ExportError
from tokprune.export.spec import INPUT, OUTPUT, Precision, TensorSpec
from tokprune.pruning.family import get_family

__all__ = ["PROMPT_STAGE_FILE", "StageSpec", "export_prompt_stage", "stage_spec"]

PROMPT_STAGE_FILE = "prompt_stage.onnx"
_ATOL = 1e-4


@dataclass(frozen=True)
class StageSpec:
    """The static I/O of the prompt stage: the call's conditions it reads -> the bucket conditions it makes."""

    geometry: Any
    input_specs: tuple[TensorSpec, ...]
    output_specs: tuple[TensorSpec, ...]
    key: str = "prompt-stage"

    def inputs(self) -> list[TensorSpec]:
        return list(self.input_specs)

    def outputs(self) -> list[TensorSpec]:
        return list(self.output_specs)

    def input_names(self) -> list[str]:
        return [t.name for t in self.input_specs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.output_specs]

    def sample_inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """A valid feed: random floats; integer masks keep every row's first half (padding after it)."""
        gen = torch.Generator().manual_seed(int(seed))
        feed = {}
        for t in self.input_specs:
            if t.dtype.startswith("int"):
                x = torch.zeros(t.shape, dtype=t.torch_dtype)
                x[..., : max(1, t.shape[-1] // 2)] = 1
                feed[t.name] = x
            else:
                feed[t.name] = torch.randn(t.shape, generator=gen).to(t.torch_dtype)
        return feed

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.input_specs], "outputs": [t.to_dict() for t in self.output_specs]}


def stage_spec(model: torch.nn.Module, geometry: Any, precision: Precision | str) -> tuple[torch.nn.Module, StageSpec] | None:
    """(the module to trace, its :class:`StageSpec`) of ``geometry``'s family, or None without a prompt stage."""
    family = get_family(geometry.family)
    module = family.prompt_stage(model, geometry)
    if module is None:
        return None
    f = Precision.parse(precision).dtype_name
    calls = family.call_condition_specs(geometry)
    bucket = family.condition_specs(geometry)
    ins = []
    for name in module.input_names():
        shape, dtype = calls[name]
        ins.append(TensorSpec(name, tuple(shape), f if dtype == "float" else dtype, INPUT))
    outs = []
    for name in module.output_names():
        shape, dtype = bucket[name]
        outs.append(TensorSpec(name, tuple(shape), f if dtype == "float" else dtype, OUTPUT))
    return module, StageSpec(geometry, tuple(ins), tuple(outs))


class _Positional(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.module(*tensors))


def export_prompt_stage(work: Path, model: torch.nn.Module, geometry: Any, store: Any, *, precision: Precision | str,
                        opset: int, seed: int = 0) -> dict[str, Any] | None:  # fmt: skip
    """Trace the prompt stage into ``work/prompt_stage.onnx`` (weights in the export's shared file), check it
    in ONNX Runtime against PyTorch (≤ 1e-4), and return its manifest entry; None without a prompt stage."""
    import onnx
    import onnxruntime as ort

    from tokprune.export.manifest import file_entry
    from tokprune.export.onnx_export import _quiet_exporter, finalize_onnx, precision_patches

    found = stage_spec(model, geometry, precision)
    if found is None:
        return None
    module, spec = found
    t0 = time.perf_counter()
    raw = work / "raw" / spec.key / "model.onnx"
    if raw.parent.exists():
        shutil.rmtree(raw.parent)
    raw.parent.mkdir(parents=True, exist_ok=True)
    feed = spec.sample_inputs(seed)
    wrapped = _Positional(module).eval()
    with torch.no_grad(), precision_patches(precision), _quiet_exporter():
        try:
            torch.onnx.export(wrapped, tuple(feed.values()), str(raw), dynamo=True, external_data=True, optimize=True,
                              input_names=spec.input_names(), output_names=spec.output_names(), opset_version=opset)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX export of the prompt stage failed: {exc}") from exc
        want = wrapped(*feed.values())
    proto = finalize_onnx(raw, spec)
    stats = store.externalize(proto)
    onnx.save_model(proto, str(work / PROMPT_STAGE_FILE))
    del proto
    shutil.rmtree(raw.parent)
    session = ort.InferenceSession(str(work / PROMPT_STAGE_FILE), providers=["CPUExecutionProvider"])
    got = session.run(spec.output_names(), {n: x.numpy() for n, x in feed.items()})
    worst = max(float((torch.from_numpy(g) - w.float()).abs().max()) for g, w in zip(got, want))
    if worst > _ATOL:
        raise ExportError(f"the prompt stage differs in ONNX Runtime from PyTorch by {worst:.3g} (tolerance {_ATOL})")
    store.sync()
    return {
        "file": file_entry(work, PROMPT_STAGE_FILE),
        **spec.to_dict(),
        "export_seconds": round(time.perf_counter() - t0, 3),
        "equivalence": {"backend": "onnxruntime", "reference": "torch", "max_abs": worst, "tolerance": _ATOL},
        "weights": stats.to_dict(),
    }
