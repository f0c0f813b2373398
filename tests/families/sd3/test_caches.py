"""diffusers' caches on SD3 through tokprune's adapters: they run, skip, and leave the model as it was."""

from __future__ import annotations

import pytest
import torch

from tokprune.errors import ConfigError
from tokprune.families.sd3.caches import CacheSpec, cached, measure_mag_ratios

STEPS = 6
CALL = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    from tokprune.models import build_tiny_pipeline

    p = build_tiny_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _latents(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **CALL).images


@pytest.fixture(scope="module")
def dense(pipe) -> torch.Tensor:
    return _latents(pipe)


def test_first_block_cache_fails_on_sd3_without_the_adapter(pipe):
    """Why the adapter exists: SD3's context_pre_only last block returns None as its text output."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    t = pipe.transformer
    apply_first_block_cache(t, FirstBlockCacheConfig(threshold=0.1))
    reg = HookRegistry.check_if_exists_or_initialize(t)
    reg.invalidate_child_registries_cache()
    _set_cache_context(t, CacheContext("cond"))
    try:
        with pytest.raises(TypeError, match="NoneType"):
            _latents(pipe)
    finally:
        _set_cache_context(t, None)
        reg.reset_stateful_hooks()
        reg.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
        reg.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
        reg.invalidate_child_registries_cache()


@pytest.mark.parametrize(
    "spec",
    [
        CacheSpec("fbc", {"threshold": 5.0}),
        CacheSpec("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 2}),
        CacheSpec("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 2, "use_lite_mode": True}),
        CacheSpec("magcache", {"threshold": 10.0, "mag_ratios": [1.0] * STEPS}),
    ],
    ids=lambda s: s.name,
)
def test_caches_run_change_the_output_and_are_removed_after(pipe, dense, spec):
    with cached(pipe, spec, steps=STEPS):
        first = _latents(pipe)
        second = _latents(pipe)  # state is reset per run: the same result again
    err = float((first - dense).norm() / dense.norm())
    assert 0.0 < err < 0.5, f"{spec.name}: relative error {err} (0 = nothing was cached)"
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(_latents(pipe), dense, rtol=0, atol=0)  # hooks and adapter gone
    for blk in pipe.transformer.transformer_blocks:  # diffusers leaves the bound original method behind; ours is gone
        fwd = blk.__dict__.get("forward")
        assert fwd is None or getattr(fwd, "__func__", None) is type(blk).forward


def test_fbc_that_never_skips_is_bit_identical_to_dense(pipe, dense):
    """The text pass-through of the last block changes nothing the transformer reads."""
    with cached(pipe, CacheSpec("fbc", {"threshold": 0.0}), steps=STEPS):
        torch.testing.assert_close(_latents(pipe), dense, rtol=0, atol=0)


def test_mag_ratios_are_measured_per_step(pipe):
    ratios = measure_mag_ratios(pipe, ["a red circle", "a blue square"], seeds=[0, 1], call=CALL)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert all(0.2 < r < 5.0 for r in ratios) and len(set(ratios[1:])) > 1


def test_bad_specs_say_what_to_do():
    with pytest.raises(ConfigError, match="expected one of"):
        CacheSpec("teacache")
    assert CacheSpec("fbc", {"threshold": 0.1}).name == "fbc(threshold=0.1)"
    with pytest.raises(ConfigError, match="measure_mag_ratios"):
        from tokprune.families.sd3.caches import _config

        _config(CacheSpec("magcache", {"threshold": 0.1}), STEPS)
