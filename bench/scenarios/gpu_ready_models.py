"""The GPU scenario's models (``--model``): which transformer, its loop, and the modes it supports.

- ``sd3-medium``: the SD3-medium MMDiT (:class:`tokprune.bench.loop.Loop`); dry run: the tiny SD3 transformer;
- ``pixart-sigma-xl``: the PixArt-Σ-XL-2-1024-MS transformer (:data:`~tokprune.families.pixart.models.PIXART_SIGMA_XL_CONFIG`:
  28 blocks, width 1152 = 16 heads x 72, patch 2, learned sigma, T5 captions 4096 wide, T = 300) with random
  weights built from the config (no download, no T5: random ``encoder_hidden_states`` of the T5 shape),
  :class:`PixArtLoop`; dry run: ``pixart-tiny``'s transformer (2 blocks, width 32).

PixArt's buckets take the per-prompt text K/V (``text_kv_inputs``): the pruned loop computes them once
per run with the family's own text stage (:class:`TorchPromptStage`, what an export's ``prompt_stage.onnx``
computes), as the runtime does; diffusers' dense forward recomputes them at every step.

Example::

    from tokprune.bench.scenarios.gpu_ready_models import make_loop, scenario_for
    loop = make_loop(scenario_for("pixart-sigma-xl", dry_run=True))
    seconds, peak = loop.timed(loop.diffusers(loop.model))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from tokprune.bench.harness import device_sync
from tokprune.bench.loop import DTYPES, Loop, PooledPruner
from tokprune.bench.scenario import LoopScenario
from tokprune.errors import ConfigError

__all__ = ["MODELS", "EventTimed", "PixArtLoop", "SD3Loop", "TorchPromptStage", "make_loop", "scenario_for", "sdpa_runner",
           "unsupported"]

#: ``--model`` -> (architecture, the dry run's architecture)
MODELS: dict[str, tuple[str, str]] = {"sd3-medium": ("sd3-medium", "tiny"), "pixart-sigma-xl": ("pixart-sigma-xl", "pixart-tiny")}
_PIXART_ARCHS = ("pixart-sigma-xl", "pixart-tiny")


def unsupported(arch: str) -> frozenset[str]:
    """Modes (:data:`tokprune.bench.scenario.LOOP_MODES`) the scenario does not build for ``arch`` (first-block
    cache and ONNX Runtime rows are SD3's)."""
    return frozenset({"fbc", "ort"}) if arch in _PIXART_ARCHS else frozenset()


def scenario_for(model: str, *, dry_run: bool = False, **changes: Any) -> LoopScenario:
    """The scenario of ``--model`` (its dry run: the tiny model of the same family on the CPU)."""
    if model not in MODELS:
        raise ConfigError(f"--model {model}: unknown; expected one of {','.join(MODELS)}")
    arch, tiny_arch = MODELS[model]
    # PixArt's dry run keeps the real 28 steps: at 10 steps CAT's schedule misses b=0.5 on the tiny grid (N = 256)
    tiny = {"arch": tiny_arch, **({"steps": 28} if tiny_arch in _PIXART_ARCHS else {})}
    base = LoopScenario.tiny(**tiny) if dry_run else LoopScenario(arch=arch)
    return replace(base, **changes)


def make_loop(sc: LoopScenario) -> Loop:
    """The harness of ``sc.arch``: :class:`PixArtLoop` for PixArt architectures, else :class:`SD3Loop`."""
    return PixArtLoop(sc) if sc.arch in _PIXART_ARCHS else SD3Loop(sc)


def sdpa_runner() -> type:
    """:class:`~tokprune.export.runners.TorchRunner` without the export's precision patches: the bucket's attention
    is torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels, as diffusers' dense forward and
    the eager sampler use), not the fp32-softmax attention the ONNX export traces in bf16/fp16, which materialises
    every (K x N) score matrix in fp32 and would time a different attention than the dense baseline's."""
    from tokprune.export.runners import TorchRunner

    class SdpaTorchRunner(TorchRunner):
        def _call(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                return self._fn(*tensors)
    return SdpaTorchRunner


class EventTimed(Loop):
    """``timed`` with CUDA events on a GPU (median of ``repeats`` loops after ``warmup``), and the peak memory of one
    more loop above the model's weights (the run's caches included); the harness's clock and memory elsewhere."""

    def timed(self, fn: Callable[[], Any]) -> tuple[float, int]:
        if self.device.type != "cuda":
            return super().timed(fn)
        import gc
        import statistics

        for _ in range(self.sc.warmup):
            fn()
        secs = []
        for _ in range(self.sc.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            fn()
            end.record()
            end.synchronize()
            secs.append(start.elapsed_time(end) / 1e3)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        return statistics.median(secs), max(0, torch.cuda.max_memory_allocated(self.device) - weights)


class SD3Loop(EventTimed):
    """The SD3 harness (:class:`~tokprune.bench.loop.Loop`) timed with CUDA events on a GPU."""


class TorchPromptStage:
    """The per-run text stage in PyTorch (``families.pixart``'s ``prepare_conditions``), as the executor calls an
    export's prompt stage: ``stage(call conditions) -> {bucket condition: tensor}``, once per run."""

    input_names = ("encoder_hidden_states", "encoder_attention_mask")

    def __init__(self, model: torch.nn.Module, geometry: Any) -> None:
        from tokprune.pruning.family import family_for

        self.model, self.geometry, self.family = model, geometry, family_for(model)

    def __call__(self, conditions: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return self.family.prepare_conditions(self.model, self.geometry, conditions)


class PixArtLoop(EventTimed):
    """:class:`~tokprune.bench.loop.Loop` for a PixArt-Σ transformer: T5-shaped captions with a padding mask, no
    pooled projection; the Euler loop steps with the noise half of the learned-sigma output."""

    def __init__(self, sc: LoopScenario, *, seed: int = 0) -> None:
        from diffusers import PixArtTransformer2DModel

        from tokprune.families.pixart.geometry import MAX_TEXT_TOKENS
        from tokprune.families.pixart.models import PIXART_SIGMA_XL_CONFIG, TINY_TRANSFORMER_CONFIG
        from tokprune.pruning.family import family_for

        self.sc = sc
        self.device = torch.device(sc.device if sc.device != "cuda" or torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[sc.dtype]
        config = PIXART_SIGMA_XL_CONFIG if sc.arch == "pixart-sigma-xl" else TINY_TRANSFORMER_CONFIG
        with torch.random.fork_rng(devices=[]), torch.device(self.device):  # built on the device: 0.6 B parameters
            torch.manual_seed(seed)
            model = PixArtTransformer2DModel(**config)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        s = int(config["sample_size"])
        text = sc.text_tokens if sc.text_tokens is not None else MAX_TEXT_TOKENS
        self.family = family_for(self.model)
        self.g = self.family.geometry(self.model.config, batch=sc.batch, latent_hw=(s, s), text_tokens=text)
        self.sync = device_sync(self.device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # the pipeline's padding: CFG's negative prompt "" keeps its EOS only, a prompt ~24 T5 tokens
        half = sc.batch // 2 if sc.batch > 1 else 0
        lengths = torch.tensor([1] * half + [min(text, 24)] * (sc.batch - half))
        self.inp = {
            "latent": torch.randn(sc.batch, self.g.in_channels, s, s, generator=gen).to(self.device, self.dtype),
            "ehs": torch.randn(sc.batch, text, self.g.caption_channels, generator=gen).to(self.device, self.dtype),
            "mask": (torch.arange(text)[None] < lengths[:, None]).to(self.device, torch.int64),
        }

    def step_call(self, model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One diffusers call as the Σ pipeline makes it; the noise channels of its learned-sigma output."""
        inp, c = self.inp, self.g.in_channels
        extra = {"resolution": None, "aspect_ratio": None}
        return lambda x, t: model(hidden_states=x, encoder_hidden_states=inp["ehs"], encoder_attention_mask=inp["mask"],
                                  timestep=t, added_cond_kwargs=extra, return_dict=False)[0][:, :c]

    def executor(self, runners: Mapping[str, Any]) -> Any:
        """The runtime's executor over ``runners`` with the text stage once per run (what an export's prompt stage does)."""
        from tokprune.runtime.engine import EngineExecutor

        engines = SimpleNamespace(runners=dict(runners), lock=threading.Lock(), manifest=None, geometry=self.g,
                                  prompt_stage=TorchPromptStage(self.model, self.g))
        return EngineExecutor(engines)  # type: ignore[arg-type]

    def pruned(self, plan: Any, runners: dict[str, Any]) -> Callable[[], torch.Tensor]:
        """The runtime's step loop (TokenPruner + EngineExecutor with the text stage) over ``runners``."""
        pruner = PooledPruner(torch.nn.Identity(), plan, policy="cat", reuse="noise", executor=self.executor(runners),
                              config=self.model.config, family=self.family,
                              guidance=4.5 if self.sc.batch == 2 else None)
        inp, c = self.inp, self.g.in_channels

        def run() -> torch.Tensor:
            pruner.reset()
            return self.euler(lambda x, t: pruner(hidden_states=x, encoder_hidden_states=inp["ehs"],
                                                  encoder_attention_mask=inp["mask"], timestep=t,
                                                  return_dict=False)[0][:, :c])
        return run
