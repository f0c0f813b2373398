"""diffusers' own caches on SD3, through thin adapters: TaylorSeer, MagCache, first-block cache.

diffusers 0.42's cache hooks keep their state per *cache context*, which a pipeline sets around
each transformer call with ``transformer.cache_context(name)``. The SD3 pipeline sets none and
``SD3Transformer2DModel`` has no ``cache_context`` (it is not a ``CacheMixin``), so the stateful
hooks raise "No cache context is set". :func:`cached` does what ``CacheMixin.cache_context`` does,
around every transformer call: ``diffusers.hooks.hooks._set_cache_context(transformer,
CacheContext("cond", step_index=i))`` before, ``None`` after (the SD3 pipeline runs both CFG halves
in one batched call, so one context per call is what the Flux pipeline's ``"cond"`` context is).
Stateful hooks are reset at the first transformer call of every sampling run (the scheduler's
``step_index`` is still None then) and when the block ends.

First-block cache also assumes every block returns a text stream: its tail hook computes
``encoder_output - head_encoder_output`` and SD3's last block (``context_pre_only``) returns
``None`` there. The adapter (:func:`_text_passthrough`) makes that block return its *input* text
stream instead of ``None`` (TaylorSeer's lite mode needs the same: it records every block
output's dtype and shape, and ``None`` has neither). The transformer never reads the last block's text output (only
``hidden_states`` goes to ``norm_out``), so the result is unchanged bit for bit; the cache then
stores a well-defined text residual.

MagCache needs per-step magnitude ratios of the model; :func:`measure_mag_ratios` measures them on
the calibration prompts exactly as MagCache's own calibration mode defines them (mean over tokens
of ``|r_t| / |r_{t-1}|``, ``r`` = last block's image output minus first block's image input).

Example::

    from tokprune.families.sd3.caches import CacheSpec, cached
    spec = CacheSpec("fbc", {"threshold": 0.1})
    with cached(pipe, spec):
        latents = pipe("a red circle", output_type="latent").images
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokprune.errors import ConfigError
from tokprune.pruning.hooks import install_forward, uninstall_forward

logger = logging.getLogger(__name__)

__all__ = ["CACHE_KINDS", "CacheSpec", "cached", "measure_mag_ratios"]

CACHE_KINDS: tuple[str, ...] = ("taylorseer", "magcache", "fbc")
_PASSTHROUGH_HOOK = "tokprune.text_passthrough"  # name in the block's diffusers hook registry


@dataclass(frozen=True)
class CacheSpec:
    """One diffusers cache at one setting: ``kind`` in :data:`CACHE_KINDS`, ``settings`` its config fields."""

    kind: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CACHE_KINDS:
            raise ConfigError(f"cache kind {self.kind!r}; expected one of {', '.join(CACHE_KINDS)}")

    @property
    def name(self) -> str:
        """Row name, e.g. ``fbc(threshold=0.1)``."""
        inner = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.settings.items()) if k != "mag_ratios")
        return f"{self.kind}({inner})"


def _config(spec: CacheSpec, steps: int) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    s = dict(spec.settings)
    if spec.kind == "taylorseer":
        s.setdefault("taylor_factors_dtype", torch.float32)  # the model runs in fp32 here; bf16 factors would add error
        return TaylorSeerCacheConfig(**s)
    if spec.kind == "magcache":
        if s.get("mag_ratios") is None:
            raise ConfigError("magcache needs mag_ratios; measure them with measure_mag_ratios(pipe, prompts, ...)")
        return MagCacheConfig(num_inference_steps=steps, **s)
    return FirstBlockCacheConfig(**s)


def _apply(transformer: torch.nn.Module, spec: CacheSpec, steps: int) -> list[str]:
    """Install the cache's hooks; returns the hook names to remove afterwards."""
    from diffusers.hooks import apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    config = _config(spec, steps)
    if spec.kind == "taylorseer":
        apply_taylorseer_cache(transformer, config)
        return [_TAYLORSEER_CACHE_HOOK]
    if spec.kind == "magcache":
        apply_mag_cache(transformer, config)
        return [_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK]
    apply_first_block_cache(transformer, config)
    return [_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK]


def _text_passthrough(block: torch.nn.Module) -> None:
    """Make a ``context_pre_only`` block return its input text stream instead of None (see module doc)."""
    original = block.forward

    def forward(hidden_states: Any, encoder_hidden_states: Any = None, temb: Any = None, joint_attention_kwargs: Any = None):
        enc_out, hid = original(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
        )
        return (encoder_hidden_states if enc_out is None else enc_out), hid

    install_forward(block, _PASSTHROUGH_HOOK, forward)


def _restore(block: torch.nn.Module) -> None:
    uninstall_forward(block, _PASSTHROUGH_HOOK)


@contextlib.contextmanager
def cached(pipe: Any, spec: CacheSpec, *, steps: int | None = None) -> Iterator[None]:
    """Run ``pipe`` with a diffusers cache inside the block; the transformer is the original again after.

    ``steps``: the run's denoising steps (MagCache interpolates its ratios to it; default: the
    pipeline call's ``num_inference_steps`` must then equal the ratios' length).
    """
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    transformer = pipe.transformer
    if not hasattr(transformer, "transformer_blocks"):
        raise ConfigError(f"{type(transformer).__name__} has no transformer_blocks; diffusers caches need an SD3 transformer")
    if steps is None:
        ratios = spec.settings.get("mag_ratios")
        steps = len(ratios) if ratios is not None else 28
    last = transformer.transformer_blocks[-1]
    needs_text = spec.kind == "fbc" or (spec.kind == "taylorseer" and bool(spec.settings.get("use_lite_mode")))
    adapt = needs_text and bool(getattr(last, "context_pre_only", False))
    if adapt:
        _text_passthrough(last)
    names: list[str] = []
    handles: list[Any] = []
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    try:
        names = _apply(transformer, spec, steps)
        registry.invalidate_child_registries_cache()
        step = {"i": 0}

        def pre(_m: Any, _args: Any) -> None:
            if getattr(pipe.scheduler, "step_index", None) is None:  # first call of a sampling run: fresh state
                registry.reset_stateful_hooks()
                step["i"] = 0
            _set_cache_context(transformer, CacheContext("cond", step_index=step["i"], num_inference_steps=steps))

        def post(_m: Any, _args: Any, _out: Any) -> None:
            _set_cache_context(transformer, None)
            step["i"] += 1

        handles = [transformer.register_forward_pre_hook(pre), transformer.register_forward_hook(post)]
        registry.reset_stateful_hooks()
        yield
    finally:
        for h in handles:
            h.remove()
        with contextlib.suppress(Exception):
            registry.reset_stateful_hooks()
        for name in names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
        _set_cache_context(transformer, None)
        if adapt:
            _restore(last)


def measure_mag_ratios(pipe: Any, prompts: Sequence[str], *, seeds: Sequence[int], call: dict[str, Any]) -> list[float]:
    """MagCache's per-step magnitude ratios of this model, measured on dense runs of ``prompts``.

    Per step t: ``r_t`` = last block's image output minus first block's image input (the residual
    MagCache reuses); ratio_t = mean over batch and tokens of ``|r_t| / (|r_{t-1}| + 1e-8)`` (1.0 at
    step 0), as MagCache's calibration mode defines it. Averaged over prompts (one call each).
    """
    blocks = pipe.transformer.transformer_blocks
    state: dict[str, Any] = {}
    runs: list[list[float]] = []

    def head(_m: Any, args: tuple, kwargs: dict) -> None:
        state["in"] = kwargs.get("hidden_states", args[0] if args else None)

    def tail(_m: Any, _args: tuple, _kwargs: dict, out: Any) -> None:
        res = (out[1] - state["in"]).float()
        prev = state.get("prev")
        ratio = 1.0 if prev is None else float((res.norm(dim=-1) / (prev.norm(dim=-1) + 1e-8)).mean())
        state["prev"] = res
        runs[-1].append(ratio)

    handles = [
        blocks[0].register_forward_pre_hook(head, with_kwargs=True),
        blocks[-1].register_forward_hook(tail, with_kwargs=True),
    ]
    try:
        for prompt, seed in zip(prompts, seeds):
            runs.append([])
            state.pop("prev", None)
            with torch.no_grad():
                pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **call)
    finally:
        for h in handles:
            h.remove()
    if not runs or not runs[0]:
        raise ConfigError("measure_mag_ratios: no transformer call ran; expected at least one prompt")
    return [float(v) for v in torch.tensor(runs).mean(dim=0)]
