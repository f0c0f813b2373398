"""Offline U-Net pipelines, hub aliases, the family interface's call plumbing."""

from __future__ import annotations

import pytest
import torch

from tokprune.errors import ConfigError, ModelNotFoundError
from tokprune.families.unet import FAMILY
from tokprune.families.unet.models import ALIASES, build_pipeline, build_unet, load_pipeline


def test_builtins_are_seeded_and_deterministic():
    a, b, c = build_unet("sd15-tiny", seed=0), build_unet("sd15-tiny", seed=0), build_unet("sd15-tiny", seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    assert set(FAMILY.builtins()) == {"sd15-tiny", "sdxl-tiny", "sd15-medium"}


def test_sdxl_tiny_pipeline_has_both_encoders_and_time_ids():
    pipe = build_pipeline("sdxl-tiny")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
    s = FAMILY.settings(pipe, steps=3, guidance=5.0, prompts=2)
    conditions, mask = FAMILY.encode(pipe, ["a red circle", "a cat"], s)
    assert conditions["encoder_hidden_states"].shape == (4, 77, 64)
    assert conditions["text_embeds"].shape == (4, 32) and conditions["time_ids"].shape == (4, 6)
    assert mask.shape == (4, 77) and not mask[:2].any() and mask[2:, 0].all()  # zeroed negative prompt: nothing real
    g = s.geometry(pipe.unet)
    assert g.grid == (16, 16) and g.prune_level == 1  # SDXL's top level has no attention
    assert set(FAMILY.condition_specs(g)) == {"encoder_hidden_states", "text_embeds", "time_ids"}


def test_family_rollout_pieces_reproduce_the_pipeline():
    """encode / prepare_latents / timesteps / model_input / guide / scheduler_step / parse_call rebuild
    the pipeline's own loop (latents equal the pipeline's output_type='latent')."""
    for name in ("sd15-tiny", "sdxl-tiny"):
        pipe = build_pipeline(name)
        prompts = ["a red circle"]
        s = FAMILY.settings(pipe, steps=3, guidance=4.0)
        want = pipe(prompts, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        conditions, _ = FAMILY.encode(pipe, prompts, s)
        latents = FAMILY.prepare_latents(pipe, s, torch.Generator().manual_seed(0), 1, torch.float32)
        sched, timesteps = FAMILY.timesteps(pipe, s, latents)
        with torch.no_grad():
            for t in timesteps:
                x = FAMILY.model_input(sched, torch.cat([latents] * 2), t)
                added = {k: v for k, v in conditions.items() if k != "encoder_hidden_states"}
                g, call = FAMILY.parse_call(pipe.unet.config, (x, t),
                                            dict(encoder_hidden_states=conditions["encoder_hidden_states"],
                                                 added_cond_kwargs=added or None, return_dict=False))  # fmt: skip
                out = FAMILY.pruned_forward(pipe.unet, g, latent=call.latent, timestep=call.timestep,
                                            conditions=call.conditions, img_idx=torch.arange(g.num_tokens).expand(2, -1))  # fmt: skip
                latents = FAMILY.scheduler_step(sched, FAMILY.guide(out.noise, 4.0), t, latents)
        assert (latents - want).abs().max().item() <= 1e-4, name


def test_aliases_and_offline_hub_error(monkeypatch, tmp_path):
    assert ALIASES["sd1.5"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert ALIASES["sdxl"] == "stabilityai/stable-diffusion-xl-base-1.0"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="offline.*--model"):
        load_pipeline("sd1.5")


def test_unsupported_call_arguments_are_refused():
    pipe = build_pipeline("sd15-tiny")
    with pytest.raises(ConfigError, match="ControlNet"):
        FAMILY.parse_call(pipe.unet.config, (torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, 32)),
                          {"mid_block_additional_residual": torch.zeros(1)})  # fmt: skip
    with pytest.raises(ConfigError, match="77"):
        FAMILY.text_tokens(pipe, 128)


def test_local_directory_round_trip(tmp_path):
    """A saved sd15-tiny loads back through the generic loader as a StableDiffusionPipeline with the same U-Net."""
    pipe = build_pipeline("sd15-tiny")
    pipe.save_pretrained(tmp_path / "sd15")
    back = load_pipeline(str(tmp_path / "sd15"))
    assert type(back).__name__ == "StableDiffusionPipeline"
    a, b = dict(pipe.unet.named_parameters()), dict(back.unet.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
