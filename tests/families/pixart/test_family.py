"""PixArtFamily through the generic machinery: apply() on a PixArtSigmaPipeline, parse_call, settings."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from tokprune import pruning
from tokprune.errors import ConfigError
from tokprune.families.pixart import FAMILY
from tokprune.families.pixart.models import build_tiny_pipeline
from tokprune.pruning.family import family_for

STEPS = 6
PROMPTS = ["a red circle", "a blue square on the left of a green triangle"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@contextlib.contextmanager
def applied(pipe, plan, **kw):
    """pruning.apply (which binds the pipeline through the family: CFG scale, T5 EOS), removed on exit."""
    pruner = pruning.apply(pipe, plan, **kw)
    try:
        yield pruner
    finally:
        pruning.remove(pipe)


def _images(pipe, guidance, **kw):
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np", clean_caption=False,
                max_sequence_length=24, generator=torch.Generator().manual_seed(0), **kw).images


def test_the_family_owns_pixart_pipelines(pipe):
    assert family_for(pipe) is FAMILY and family_for(pipe.transformer) is FAMILY
    assert FAMILY.denoiser(pipe) is pipe.transformer


@pytest.mark.parametrize("guidance", [4.5, 1.0], ids=["cfg", "no-cfg"])
def test_dense_plan_reproduces_the_pipeline(pipe, guidance):
    ref = _images(pipe, guidance)
    with applied(pipe, pruning.PrunePlan.dense(STEPS)) as pruner:
        out = _images(pipe, guidance)
    assert pruner.calls == STEPS
    assert np.abs(out - ref).max() <= 1e-5
    assert np.array_equal(_images(pipe, guidance), ref)  # remove() restores the module


@pytest.mark.parametrize("guidance", [4.5, 1.0], ids=["cfg", "no-cfg"])
def test_pruned_run_shares_one_selection_per_prompt_and_computes_text_once(pipe, guidance, monkeypatch):
    calls = []
    real = FAMILY.pruned_forward

    def spy(model, geometry, **kw):
        calls.append((kw["img_idx"].clone(), kw["caches"] is not None and "text.0.k" in kw["caches"]))
        return real(model, geometry, **kw)

    monkeypatch.setattr(FAMILY, "pruned_forward", spy)
    ref = _images(pipe, guidance)
    plan = pruning.PrunePlan.from_ratios([1, 1, 0.5, 0.25, 0, 0.5], num_tokens=256)
    with applied(pipe, plan, policy="cat") as pruner:
        out = _images(pipe, guidance)
        assert pruner.state.guidance == (guidance if guidance > 1 else None)
    assert pruner.calls == 5  # the reuse step makes no call
    assert [c[1] for c in calls] == [False, True, True, True, True]  # the text stage: first call of the run only
    for idx, _ in calls[2:]:
        if guidance > 1:  # [uncond; cond] rows of a prompt compute the same tokens
            p = idx.shape[0] // 2
            assert torch.equal(idx[:p], idx[p:])
        assert idx.shape[1] in (128, 64)
    diff = np.abs(out - ref)
    assert 0 < diff.mean() < 0.05  # pruned, close to dense (random weights: a plumbing check, not quality)


def test_text_pruning_drops_padding_first(pipe, monkeypatch):
    plan = pruning.PrunePlan.from_ratios([1, 1, 0.5, 0.5, 0.5, 0.5], num_tokens=256, text_ratios=[1, 1, 0.5, 0.5, 0.5, 0.5],
                                         num_text=24)
    seen = []
    real = FAMILY.pruned_forward

    def spy(model, geometry, **kw):
        seen.append((kw["txt_idx"], kw.get("record_text")))
        return real(model, geometry, **kw)

    monkeypatch.setattr(FAMILY, "pruned_forward", spy)
    with applied(pipe, plan) as pruner:
        _images(pipe, 4.5)
        importance = pruner.state.text_importance
        protect = pruner.call_text_protect
    assert [r for _, r in seen] == [False, True, False, False, False, False]  # probe at the dense step before
    masks = pipe.tokenizer(["", ""] + PROMPTS, padding="max_length", max_length=24, truncation=True,
                           return_tensors="pt").attention_mask.bool()
    assert importance.shape == (4, 24)
    assert importance[~masks].max() < 1e-6 < importance[masks].min()  # padding receives no attention
    for txt_idx, _ in seen[2:]:
        kept = torch.gather(masks, 1, txt_idx)
        real_tokens = masks.sum(dim=1)
        # every row keeps all its real tokens before any padding (12 kept of 24)
        assert torch.equal(kept.sum(dim=1), torch.minimum(real_tokens, torch.tensor(12)))
        eos = masks.long().cumsum(1).argmax(1)  # last real position of each row
        assert (txt_idx == eos[:, None]).any(dim=1).all()  # T5's EOS is always kept
    assert torch.equal(protect, FAMILY.text_protect({"encoder_attention_mask": masks}))


def test_bind_pipeline_is_undone_exactly(pipe):
    cls, encode = type(pipe), pipe.encode_prompt
    with applied(pipe, pruning.PrunePlan.dense(STEPS)):
        assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls) and family_for(pipe) is FAMILY
        _images(pipe, 3.0)
        assert pipe.guidance_scale == 3.0 and pipe.do_classifier_free_guidance
        # generic callers (tokprune-generate) pass negative_prompt=None as SD3 takes it: PixArt's "" is meant
        assert np.array_equal(_images(pipe, 3.0, negative_prompt=None), _images(pipe, 3.0, negative_prompt=""))
    assert type(pipe) is cls and pipe.encode_prompt == encode
    assert not hasattr(pipe, "guidance_scale") and "encode_prompt" not in pipe.__dict__


def test_parse_call_and_condition_specs(pipe):
    cfg = pipe.transformer.config
    x, ctx = torch.randn(2, 4, 32, 24), torch.randn(2, 7, 32)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0], [1] * 7])
    g, call = FAMILY.parse_call(cfg, (x, ctx), {"timestep": torch.tensor(10), "encoder_attention_mask": mask,
                                                  "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
                                                  "return_dict": False})
    assert (g.num_tokens, g.text_tokens, g.batch) == (192, 7, 2)
    assert call.timestep.shape == (2,) and call.return_dict is False
    assert set(call.conditions) == set(FAMILY.call_condition_specs(g)) == {"encoder_hidden_states", "encoder_attention_mask"}
    assert g.text_kv_inputs and set(FAMILY.condition_specs(g)) == set(g.text_specs())  # buckets: per-run text K/V
    assert call.conditions["encoder_attention_mask"].dtype == torch.int64
    assert FAMILY.text_protect(call.conditions).nonzero().tolist() == [[0, 1], [1, 6]]  # T5 EOS: last real token
    noise = torch.randn(2, 8, 32, 24)
    tokens = FAMILY.tokens(noise, g)  # the selection signal: noise channels only, not learned sigma's
    assert tokens.shape == (2, 192, 16) and torch.equal(tokens, FAMILY.tokens(torch.cat([noise[:, :4], noise[:, 4:] * 0], 1), g))
    _, nomask = FAMILY.parse_call(cfg, (x, ctx, torch.tensor([5, 5])), {})
    assert nomask.conditions["encoder_attention_mask"].eq(1).all()
    with pytest.raises(ConfigError, match="cross_attention_kwargs"):
        FAMILY.parse_call(cfg, (x, ctx, torch.tensor([5, 5])), {"cross_attention_kwargs": {"scale": 1.0}})
    with pytest.raises(ConfigError, match="unexpected argument"):
        FAMILY.parse_call(cfg, (x, ctx, torch.tensor([5, 5])), {"pooled_projections": 1})
    from dataclasses import replace

    kv = replace(g, text_kv_inputs=True)
    specs = FAMILY.condition_specs(kv)
    assert specs["text.0.k"] == ((2, 4, 7, 8), "float") and specs["text_bias"] == ((2, 7), "float")
    prepared = FAMILY.prepare_conditions(pipe.transformer, kv, call.conditions)
    assert {k: tuple(v.shape) for k, v in prepared.items()} == {k: s for k, (s, _) in specs.items()}


def test_settings_bin_the_resolution_and_use_the_pipeline_defaults(pipe):
    s = FAMILY.settings(pipe)
    assert (s.height, s.width, s.latent_hw, s.text_tokens, s.guidance) == (256, 256, (32, 32), 300, 4.5)
    wide = FAMILY.settings(pipe, height=200, width=330)  # the pipeline would render the 256-table bin
    from tokprune.families.pixart.models import binned_size

    assert (wide.height, wide.width) == binned_size(32, 200, 330) != (200, 330)
    g = s.geometry(pipe.transformer)
    assert g.num_tokens == 256 and g.batch == 2 and g.to_dict()["family"] == "pixart-sigma"
    assert FAMILY.geometry_from_dict(g.to_dict()) == g
    assert g.step_macs(-1) > g.step_macs(128) > 0


def test_rollout_pieces_reproduce_the_pipeline_loop(pipe):
    """encode / prepare_latents / timesteps / model_input / guide / scheduler_step / decode = the pipeline call."""
    settings = FAMILY.settings(pipe, steps=STEPS, max_sequence_length=24, prompts=2)
    conditions, protect = FAMILY.encode(pipe, PROMPTS, settings)
    latents = FAMILY.prepare_latents(pipe, settings, torch.Generator().manual_seed(0), 2, torch.float32)
    sched, timesteps = FAMILY.timesteps(pipe, settings, latents)
    with torch.no_grad():
        for t in timesteps:
            x = FAMILY.model_input(sched, torch.cat([latents, latents]), t)
            noise = pipe.transformer(x, encoder_hidden_states=conditions["encoder_hidden_states"],
                                     encoder_attention_mask=conditions["encoder_attention_mask"],
                                     timestep=t.expand(4), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            latents = FAMILY.scheduler_step(sched, FAMILY.guide(noise, settings.guidance), t, latents)
        images = FAMILY.decode(pipe, latents)
    ref = pipe(PROMPTS, num_inference_steps=STEPS, output_type="np", max_sequence_length=24,
               generator=torch.Generator().manual_seed(0)).images
    assert protect.shape == (4, 24) and protect.sum().item() == 4  # one EOS per row
    assert np.abs(images - ref).max() <= 1e-5


def test_features_reuse_runs_in_the_pipeline(pipe):
    plan = pruning.PrunePlan.from_ratios([1, 1, 0.5, 0.25, 0.5, 0.5], num_tokens=256)
    ref = _images(pipe, 4.5)
    out = {}
    for reuse in ("noise", "features"):
        with applied(pipe, plan, reuse=reuse) as pruner:
            out[reuse] = _images(pipe, 4.5)
            assert set(pruner.state.caches) >= {"blocks.0.attn", "blocks.0.cross", "blocks.0.ff"} or reuse == "noise"
    assert 0 < np.abs(out["features"] - ref).mean() < 0.05
    assert not np.array_equal(out["features"], out["noise"])
