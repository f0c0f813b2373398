"""The model-family interface: registry, call settings resolved once, the hook installer."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_inputs, make_transformer
from tokprune.errors import ConfigError, ShapeError
from tokprune.models import set_call_defaults
from tokprune.pruning import PrunePlan, apply, get_pruner, remove
from tokprune.pruning.family import CallSettings, ModelFamily, all_families, family_for, get_family


@pytest.fixture(scope="module")
def pipe():
    from tokprune.models import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


def test_sd3_is_registered_through_the_entry_point_group():
    families = all_families()
    assert "sd3" in families and isinstance(families["sd3"], ModelFamily)
    assert get_family("sd3") is families["sd3"]
    with pytest.raises(ConfigError, match="unknown model family 'nope'; known: .*sd3"):
        get_family("nope")


def test_family_for_finds_the_owner_of_pipelines_modules_and_geometries(pipe):
    sd3 = get_family("sd3")
    assert family_for(pipe) is sd3
    assert family_for(pipe.transformer) is sd3
    g = sd3.geometry(pipe.transformer.config, batch=2, latent_hw=(32, 32), text_tokens=333)
    assert family_for(g) is sd3
    with pytest.raises(ConfigError, match="no model family prunes a Linear; supported: .*sd3"):
        family_for(torch.nn.Linear(2, 2))


def test_settings_resolve_flags_then_model_defaults_then_family_defaults(pipe):
    sd3 = get_family("sd3")
    s = sd3.settings(pipe)
    assert (s.height, s.width, s.steps, s.guidance, s.max_sequence_length) == (64, 64, 28, 7.0, 256)
    assert s.latent_hw == (32, 32) and s.text_tokens == 77 + 256 and s.batch == 2 and s.cfg
    s = sd3.settings(pipe, height=96, width=64, steps=4, guidance=1.0, max_sequence_length=16, prompts=3)
    assert s.latent_hw == (48, 32) and s.text_tokens == 93 and s.batch == 3 and not s.cfg
    g = s.geometry(pipe.transformer)
    assert (g.batch, g.latent_hw, g.text_tokens, g.num_tokens) == (3, (48, 32), 93, 24 * 16)
    assert CallSettings.from_dict(s.to_dict()) == s
    set_call_defaults(pipe, {"max_sequence_length": 32, "guidance_scale": 3.0})
    try:
        s = sd3.settings(pipe)
        assert (s.max_sequence_length, s.guidance, s.text_tokens) == (32, 3.0, 109)
    finally:
        set_call_defaults(pipe, {})
    assert sd3.max_sequence_length_for(pipe, 109) == 32
    assert sd3.call_kwargs(pipe, g) == {"max_sequence_length": 16}


def test_settings_refuse_bad_values_naming_the_flag(pipe):
    sd3 = get_family("sd3")
    with pytest.raises(ConfigError, match=r"--max-sequence-length 600; expected 1\.\.512 for sd3"):
        sd3.settings(pipe, max_sequence_length=600)
    with pytest.raises(ShapeError, match="resolution 66x64 is not a positive multiple of 4"):
        sd3.settings(pipe, height=66)


def test_parse_call_maps_positional_and_keyword_arguments():
    sd3 = get_family("sd3")
    model = make_transformer()
    x = make_inputs(model, batch=2, latent_hw=(8, 8))
    g1, c1 = sd3.parse_call(model.config, (x["hidden_states"], x["encoder_hidden_states"]),
                            {"pooled_projections": x["pooled_projections"], "timestep": x["timestep"], "return_dict": False})
    g2, c2 = sd3.parse_call(model.config, (), dict(x))
    assert g1 == g2 and g1.num_tokens == 16 and g1.text_tokens == 9
    assert set(c1.conditions) == set(sd3.condition_specs(g1)) == {"encoder_hidden_states", "pooled_projections"}
    assert c1.return_dict is False and c2.return_dict is True
    with pytest.raises(ConfigError, match="unexpected argument 'bogus'"):
        sd3.parse_call(model.config, (), {**x, "bogus": 1})
    with pytest.raises(ConfigError, match="ControlNet"):
        sd3.parse_call(model.config, (), {**x, "skip_layers": [0]})


def test_pruning_hook_lives_in_diffusers_hook_registry_and_resets_with_it():
    from diffusers.hooks import HookRegistry

    model = make_transformer()
    x = make_inputs(model, batch=1, latent_hw=(8, 8))
    with torch.no_grad():
        dense = model(**x).sample
    pruner = apply(model, PrunePlan.from_ratios([1.0, 0.5], num_tokens=16))
    registry = model._diffusers_hook
    assert registry.get_hook("tokprune.pruning").fn is pruner and get_pruner(model) is pruner
    with torch.no_grad():
        out = model(**x).sample
    assert torch.allclose(out, dense, atol=1e-5) and pruner.state is not None and pruner.state.step == 1
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
    assert pruner.state is None  # reset_state forgot the run
    remove(model)
    assert get_pruner(model) is None and not hasattr(model, "_diffusers_hook") and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**x).sample, dense)
