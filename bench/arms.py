"""The arms of the benchmark grid: what the pipeline's denoiser (``pipe.transformer`` / ``pipe.unet``, its
model family's ``denoiser_attr``) is for each (backend, dense/pruned) cell.

============== ===================================================================================
backend        dense / pruned
============== ===================================================================================
eager          diffusers' own forward (the baseline) / ``tokprune.pruning.apply`` (the eager sampler)
compile        ``torch.compile`` of the transformer / the runtime's ``torch`` backend with
               ``compile=True`` (each bucket graph compiled)
onnxruntime    the runtime with the dense bucket at every step / the runtime with the schedule
tensorrt       as onnxruntime, with the built engines (skipped with the reason when unavailable)
torch          (optional) the runtime's eager PyTorch reference backend
============== ===================================================================================

Runtime arms are loaded through the runtime's public API (``runtime.load`` / ``attach`` /
``detach``; the dense arm is ``view.share(pruned=False)``, the same engines); MAC fractions come
from :mod:`tokprune.pruning.macs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokprune.bench.scenario import GridScenario

logger = logging.getLogger(__name__)

__all__ = ["Arm", "Sample", "build_arms", "dense_key", "plan_fraction"]


@dataclass
class Sample:
    """One measured generation."""

    loop_s: float
    e2e_s: float
    steps_s: list[float]
    calls: list[tuple[str, float]]  # (bucket key, engine call seconds), runtime arms only
    peak_mem_bytes: int
    image: Any  # (H, W, 3) float numpy in [0, 1]
    latents: torch.Tensor  # final latents (B, C, h, w), float32 CPU


@dataclass
class Arm:
    """One cell of the grid: how to install it on the pipeline, what each step runs, what it measured."""

    backend: str
    pruned: bool
    install: Callable[[Any], Any] | None = None  # pipe -> runtime view or None
    uninstall: Callable[[Any], None] | None = None
    step_keys: list[str] = field(default_factory=list)  # bucket key (or "reuse") per step
    mac_fraction: float = 1.0
    skip_reason: str | None = None
    samples: list[Sample] = field(default_factory=list)
    view: Any = None  # the runtime view (EngineTransformer) of runtime arms

    @property
    def label(self) -> str:
        return f"{self.backend} {'pruned' if self.pruned else 'dense'}"


def dense_key(manifest: Any) -> str:
    """The plain dense bucket's key (all N image and T text tokens, no probe)."""
    from tokprune.export.spec import bucket_key

    g = manifest.geometry
    return bucket_key(g.num_tokens, g.text_tokens)


def plan_fraction(manifest: Any) -> float:
    """MAC fraction of the export's plan counting what runs (the text-importance probe included)."""
    from tokprune.pruning.macs import mac_fraction

    return mac_fraction(manifest.geometry, manifest.schedule().to_plan(), manifest.reuse)


def _runtime_arms(backend: str, engines: Path, device: torch.device, scenario: GridScenario, original: Any,
                  manifest: Any) -> list[Arm]:
    from tokprune import runtime

    dense_keys = [dense_key(manifest)] * int(manifest.data["steps"])
    step_keys = [k or "reuse" for k in manifest.data["step_buckets"]]  # probe steps name the -probe bucket
    name = {"compile": "torch"}.get(backend, backend)
    kwargs: dict[str, Any] = {}
    if name == "torch":
        kwargs = {"model": original, "compile": backend == "compile"}
    elif name == "onnxruntime":
        kwargs = {"threads": scenario.threads or torch.get_num_threads()}
    try:
        pruned_view = runtime.load(engines, backend=name, device=device, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to load is a stated skip, not a crash
        reason = f"{type(exc).__name__}: {exc}"
        return [Arm(backend, False, skip_reason=reason), Arm(backend, True, skip_reason=reason)]
    dense_view = pruned_view.share(pruned=False)  # the plain dense bucket at every step

    def installer(view: Any) -> Callable[[Any], Any]:
        def install(pipe: Any) -> Any:
            return runtime.attach(pipe, view)

        return install

    arms = []
    for view, pruned, keys, frac in (
        (dense_view, False, dense_keys, 1.0),
        (pruned_view, True, step_keys, plan_fraction(manifest)),
    ):
        if backend == "compile" and not pruned:
            continue  # compile dense is torch.compile of the diffusers forward (build_arms)
        arms.append(Arm(backend, pruned, installer(view), runtime.detach, keys, frac, view=view))
    return arms


def build_arms(scenario: GridScenario, pipe: Any, manifest: Any, device: torch.device) -> list[Arm]:
    """Every arm of ``scenario`` on ``pipe``: eager dense first (the baseline), then per backend dense and pruned."""
    from tokprune import pruning
    from tokprune.pruning.family import family_for

    attr = family_for(pipe).denoiser_attr  # "transformer" or "unet"
    engines = Path(scenario.engines)
    steps = int(manifest.data["steps"])
    dkey = dense_key(manifest)
    step_keys = [k or "reuse" for k in manifest.data["step_buckets"]]
    original = getattr(pipe, attr)
    schedule = manifest.schedule()

    def restore(p: Any) -> None:
        pruning.remove(original)  # the original module, never a compiled wrapper (its forward is an attribute)
        setattr(p, attr, original)

    arms = [Arm("eager", False, None, restore, [dkey] * steps, 1.0)]
    for backend in scenario.backends:
        if backend == "eager":
            def install_eager(p: Any) -> None:
                pruning.apply(p, schedule.to_plan(), policy=manifest.data.get("policy") or schedule.policy,
                              reuse=manifest.reuse)

            arms.append(Arm("eager", True, install_eager, restore, step_keys, plan_fraction(manifest)))
        elif backend == "compile":
            compiled = torch.compile(original, dynamic=False)

            def install_compiled(p: Any, compiled: Any = compiled) -> None:
                setattr(p, attr, compiled)

            arms.append(Arm("compile", False, install_compiled, restore, [dkey] * steps, 1.0))
            arms.extend(_runtime_arms("compile", engines, device, scenario, original, manifest))
        elif backend == "tensorrt":
            from tokprune.export import tensorrt as trt_env

            ok, why = trt_env.availability()
            if ok and not manifest.has_engines:
                ok, why = False, f"the export has no TensorRT engines (build them: tokprune-build {engines})"
            if not ok:
                arms += [Arm("tensorrt", False, skip_reason=why), Arm("tensorrt", True, skip_reason=why)]
            else:
                arms.extend(_runtime_arms("tensorrt", engines, device, scenario, original, manifest))
        else:  # onnxruntime, torch
            arms.extend(_runtime_arms(backend, engines, device, scenario, original, manifest))
    return arms
