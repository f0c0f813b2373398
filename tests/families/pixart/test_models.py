"""Offline PixArt pipelines (pixart-tiny, pixart-medium) and the pixart-sigma alias."""

from __future__ import annotations

import time

import pytest
import torch

from tokprune.errors import ConfigError, ModelNotFoundError
from tokprune.families.pixart import models
from tokprune.families.pixart.geometry import PixArtGeometry


@pytest.fixture(scope="module")
def tiny():
    return models.build_tiny_pipeline()


def test_tiny_pipeline_shapes_and_determinism(tiny):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    assert isinstance(tiny, PixArtSigmaPipeline)
    assert isinstance(tiny.scheduler, DPMSolverMultistepScheduler)
    assert tiny.vae_scale_factor == 8
    seen = []

    def spy(module, args, kwargs):
        seen.append((tuple(args[0].shape), tuple(kwargs["encoder_hidden_states"].shape),
                     tuple(kwargs["encoder_attention_mask"].shape)))

    hook = tiny.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        kw = dict(num_inference_steps=3, output_type="np", clean_caption=False)
        a = tiny("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        b = models.build_tiny_pipeline()("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        hook.remove()
    assert a.shape == (1, 256, 256, 3)
    assert (a == b).all()  # same weights on a rebuild, same image for a seed
    latent, text, mask = seen[0]
    assert latent == (2, 4, 32, 32) and text == (2, 300, 32) and mask == (2, 300)  # CFG batch, T = 300
    g = PixArtGeometry.from_model(tiny.transformer, batch=2, latent_hw=latent[-2:], text_tokens=text[1])
    assert g.num_tokens == 256 and g.out_channels == 8


def test_seed_changes_weights():
    a = models.build_tiny_transformer(seed=0)
    b = models.build_tiny_transformer(seed=1)
    assert not torch.equal(a.proj_out.weight, b.proj_out.weight)
    state = torch.random.get_rng_state()
    models.build_tiny_transformer(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_medium_transformer_is_the_cpu_benchmark_size():
    model = models.build_tiny_transformer(medium=True)
    latent = model.config.sample_size  # the pipeline's default: 512 px / 8
    g = PixArtGeometry.from_model(model, batch=2, latent_hw=(latent, latent), text_tokens=300)
    assert (g.num_tokens, g.dim, g.num_layers) == (1024, 384, 6)
    with torch.no_grad():
        out = model(torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 5, 32),
                    timestep=torch.tensor([10]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape == (1, 8, 16, 16)


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="not config keys"):
        models.build_tiny_transformer(num_layer=3)


def test_binned_size_follows_the_pipeline():
    assert models.binned_size(32, 256, 256) == (256, 256)
    assert models.binned_size(128, 1000, 1000) == (1024, 1024)
    h, w = models.binned_size(128, 768, 1360)  # a wide request snaps to a wide bin of ~1024² pixels
    assert w > h and abs(h * w - 1024 * 1024) < 0.1 * 1024 * 1024
    with pytest.raises(ConfigError, match="use_resolution_binning=False"):
        models.binned_size(48, 256, 256)


def test_generic_loader_resolves_the_family_names(monkeypatch, tmp_path):
    from tokprune.models import load_pipeline, resolve_model

    assert resolve_model("pixart-tiny").kind == "builtin" and resolve_model("pixart-medium").kind == "builtin"
    assert resolve_model("pixart-sigma").ref == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS") as info:
        load_pipeline("pixart-sigma")
    assert time.monotonic() - start < 30 and "offline" in str(info.value)
