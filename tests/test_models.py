"""Tests for tokprune.models: --model resolution, hub/offline errors, tiny pipelines, fingerprint."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from tokprune import models
from tokprune.errors import ConfigError, ModelNotFoundError
from tokprune.models import (
    MODEL_ALIASES,
    ModelSource,
    build_tiny_pipeline,
    build_tiny_transformer,
    fingerprint,
    load_pipeline,
    register_builtin,
    resolve_model,
)

PROMPT = "a red circle"


def generate(pipe) -> np.ndarray:
    """The brief's reference call: 4 steps, CFG 5, seed 0, numpy output."""
    out = pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images


@pytest.fixture(scope="module")
def tiny_sd3():
    return build_tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def tiny_sd3_image(tiny_sd3) -> np.ndarray:
    return generate(tiny_sd3)


@pytest.fixture()
def isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(models, "_BUILTINS", dict(models._BUILTINS))


# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("sd3", "stabilityai/stable-diffusion-3-medium-diffusers"),
        ("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium"),
        ("sd3.5-large", "stabilityai/stable-diffusion-3.5-large"),
        ("SD3", "stabilityai/stable-diffusion-3-medium-diffusers"),  # case-insensitive
    ],
)
def test_resolve_alias_gives_hub_id(name, hub_id):
    assert resolve_model(name) == ModelSource(name.lower(), "hub", hub_id)


@pytest.mark.parametrize("name", ["sd3-tiny", "sd3.5-tiny"])
def test_resolve_builtin(name):
    assert resolve_model(name) == ModelSource(name, "builtin", name)


def test_resolve_hub_id():
    assert resolve_model("someone/my-sd3_finetune.v2") == ModelSource(
        "someone/my-sd3_finetune.v2", "hub", "someone/my-sd3_finetune.v2"
    )


def test_resolve_local_dir(tmp_path):
    model_dir = tmp_path / "my-sd3"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text("{}")
    assert resolve_model(str(model_dir)) == ModelSource("my-sd3", "local", str(model_dir.resolve()))


def test_resolve_local_dir_without_model_index_names_the_file(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json") as info:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_resolve_missing_path_and_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model(str(tmp_path / "nope"))
    weights = tmp_path / "sd3.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(weights))


def test_resolve_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        resolve_model("sd4-turbo")
    message = str(info.value)
    assert "'sd4-turbo'" in message
    for valid in ("sd3", "sd3.5-medium", "sd3.5-large", "sd3-tiny", "sd3.5-tiny"):
        assert valid in message


def test_register_builtin_resolves_and_loads(isolated_registry, tiny_sd3):
    calls = []

    def loader():
        calls.append(1)
        return tiny_sd3

    register_builtin("unit-test-model", loader, "test double")
    assert resolve_model("unit-test-model") == ModelSource("unit-test-model", "builtin", "unit-test-model")
    assert models.available_models()["unit-test-model"] == "test double"
    assert load_pipeline("unit-test-model") is tiny_sd3
    assert calls == [1]
    with pytest.raises(ConfigError, match="already registered"):
        register_builtin("unit-test-model", loader, "again")
    register_builtin("unit-test-model", loader, "replaced", replace=True)
    assert models.available_models()["unit-test-model"] == "replaced"
    with pytest.raises(ConfigError, match="alias"):
        register_builtin("sd3", loader, "clash")


def test_bare_name_miss_reads_the_entry_point_table(isolated_registry, monkeypatch, tmp_path):
    """An entry of the ``tokprune.models`` table becomes a built-in (described by its loader's docstring);
    an entry whose module is missing is skipped with a warning, not an error for every other name."""
    from importlib.metadata import EntryPoint

    (tmp_path / "tokprune_fake_provider.py").write_text(
        'def load():\n    """fake shapes from a plugin\n\n    more text"""\n    return None\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    group = models.BUILTIN_ENTRY_POINT_GROUP
    table = [
        EntryPoint("missing", "tokprune_missing_provider:load", group),
        EntryPoint("fake-shapes", "tokprune_fake_provider:load", group),
    ]
    monkeypatch.setattr(models, "_builtin_entry_points", lambda: table)
    monkeypatch.setattr(models, "_providers_loaded", False)
    assert resolve_model("fake-shapes") == ModelSource("fake-shapes", "builtin", "fake-shapes")
    assert models.available_models()["fake-shapes"] == "fake shapes from a plugin"
    assert "missing" not in models.available_models()


def test_shapes_comes_from_the_installed_entry_point_table():
    """``--model shapes`` resolves through the table; tokprune.models alone never imports the yardstick (no cycle)."""
    import subprocess
    import sys

    entries = {e.name: e.value for e in models._builtin_entry_points()}
    assert entries.get("shapes") == "tokprune.yardstick:load_shapes_pipeline"
    assert resolve_model("shapes") == ModelSource("shapes", "builtin", "shapes")
    code = "import sys, tokprune.models as m; m.resolve_model('sd3-tiny'); print('tokprune.yardstick' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- hub / local loading


def test_hub_offline_fails_fast_with_local_path_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline("sd3")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 15.0, f"offline failure took {elapsed:.1f} s"
    assert MODEL_ALIASES["sd3"] in message
    assert "offline" in message and "HF_HUB_OFFLINE=1" in message
    assert "--model /path/to/stable-diffusion-3-medium-diffusers" in message


def test_hub_unreachable_without_offline_flag_fails_fast(monkeypatch):
    # Nothing listens on port 9 of localhost: the reachability probe must refuse before any download.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="cannot reach 127.0.0.1:9") as info:
        load_pipeline("tokprune-tests/not-a-real-repo")
    assert time.perf_counter() - start < 15.0
    assert "tokprune-tests/not-a-real-repo" in str(info.value)


def test_local_dir_of_another_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match="FluxPipeline"):
        load_pipeline(str(tmp_path))


# ---------------------------------------------------------------- tiny pipelines


def test_tiny_pipeline_is_deterministic_and_leaves_global_rng_alone(tiny_sd3, tiny_sd3_image):
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    again = build_tiny_pipeline("sd3")
    assert torch.equal(torch.get_rng_state(), rng_before)

    for name, component in tiny_sd3.components.items():
        if isinstance(component, torch.nn.Module):
            ours, theirs = component.state_dict(), getattr(again, name).state_dict()
            assert ours.keys() == theirs.keys(), name
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    image = generate(again)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01  # a real, non-constant image
    np.testing.assert_array_equal(image, tiny_sd3_image)

    other_seed = build_tiny_transformer("sd3", seed=1)
    assert not torch.equal(other_seed.proj_out.weight, tiny_sd3.transformer.proj_out.weight)


def test_tiny_pipeline_token_counts(tiny_sd3):
    """Default settings: N = 256 image tokens, T = 77 CLIP + 256 T5 = 333 text tokens."""
    prompt_embeds, _, pooled, _ = tiny_sd3.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False
    )
    assert tuple(prompt_embeds.shape) == (1, 77 + 256, 32)
    assert tuple(pooled.shape) == (1, 64)
    # CLIP hidden 8 + 16 = 24 channels, zero-padded to the T5 width 32 (as SD3 pads 2048 to 4096).
    assert torch.count_nonzero(prompt_embeds[:, :77, 24:]) == 0
    assert torch.count_nonzero(prompt_embeds[:, :77, :24]) > 0

    config = tiny_sd3.transformer.config
    latent_side = tiny_sd3.default_sample_size  # 64 px / vae_scale_factor 2
    assert tiny_sd3.vae_scale_factor == 2 and latent_side == 32
    assert (latent_side // config.patch_size) ** 2 == 256
    assert config.in_channels == tiny_sd3.vae.config.latent_channels == 16


def test_save_load_round_trip(tiny_sd3, tiny_sd3_image, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    tiny_sd3.save_pretrained(tmp_path)
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    for name, component in tiny_sd3.components.items():
        if isinstance(component, torch.nn.Module):
            ours, theirs = component.state_dict(), getattr(loaded, name).state_dict()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        ours, theirs = getattr(tiny_sd3, name), getattr(loaded, name)
        assert ours("A red circle, zebra!").input_ids == theirs("A red circle, zebra!").input_ids, name
        assert ours.model_max_length == theirs.model_max_length
    assert loaded.tokenizer.model_max_length == 77
    assert fingerprint(loaded.transformer) == fingerprint(tiny_sd3.transformer)

    # Raw from_pretrained leaves weights at 8-byte-aligned addresses: CPU BLAS then differs by ~1 ulp.
    np.testing.assert_allclose(generate(loaded), tiny_sd3_image, rtol=0, atol=1e-5)
    # load_pipeline re-aligns them, so the reloaded pipeline is bit-identical to the built one.
    np.testing.assert_array_equal(generate(load_pipeline(str(tmp_path))), tiny_sd3_image)


def test_sd35_tiny_has_rms_qk_norm_and_dual_attention(tiny_sd3):
    from diffusers.models.normalization import RMSNorm

    pipe = load_pipeline("sd3.5-tiny")
    blocks = pipe.transformer.transformer_blocks
    assert pipe.transformer.config.qk_norm == "rms_norm"
    assert isinstance(blocks[0].attn.norm_q, RMSNorm) and isinstance(blocks[1].attn.norm_k, RMSNorm)
    assert [block.use_dual_attention for block in blocks] == [True, False]
    assert blocks[0].attn2 is not None
    sd3_blocks = tiny_sd3.transformer.transformer_blocks
    assert sd3_blocks[0].attn.norm_q is None and not sd3_blocks[0].use_dual_attention
    assert generate(pipe).shape == (1, 64, 64, 3)


def test_tiny_transformer_matches_pipeline_and_takes_overrides(tiny_sd3):
    plain = build_tiny_transformer("sd3", seed=0)
    ours, theirs = plain.state_dict(), tiny_sd3.transformer.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    deeper = build_tiny_transformer("sd3", num_layers=3, num_attention_heads=2)
    assert len(deeper.transformer_blocks) == 3
    assert [b.context_pre_only for b in deeper.transformer_blocks] == [False, False, True]
    assert deeper.config.caption_projection_dim == 16  # follows heads x head_dim
    out = deeper(
        hidden_states=torch.randn(1, 16, 32, 32),
        encoder_hidden_states=torch.randn(1, 10, 32),
        pooled_projections=torch.randn(1, 64),
        timestep=torch.tensor([500.0]),
    ).sample
    assert tuple(out.shape) == (1, 16, 32, 32)

    with pytest.raises(ConfigError, match="num_layer"):
        build_tiny_transformer(num_layer=3)
    with pytest.raises(ConfigError, match="sd4"):
        build_tiny_transformer("sd4")


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_config_only():
    base = build_tiny_transformer("sd3")
    fp = fingerprint(base)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(build_tiny_transformer("sd3", seed=5)) == fp  # weights are not part of it
    assert fingerprint(build_tiny_transformer("sd3", num_layers=3)) != fp
    assert fingerprint(build_tiny_transformer("sd3.5")) != fp
    assert fingerprint(build_tiny_transformer("sd3", pos_embed_max_size=64)) != fp

    config = dict(base.config)
    assert fingerprint(config) == fp
    config["_name_or_path"] = "/somewhere/else"  # private keys are ignored
    config["dual_attention_layers"] = list(config["dual_attention_layers"])  # tuple == list
    assert fingerprint(config) == fp
    config["sample_size"] = 64
    assert fingerprint(config) != fp
    with pytest.raises(ConfigError, match="int"):
        fingerprint(3)
