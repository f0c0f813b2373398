"""PixArt MAC counter against torch's FlopCounterMode (an independent count) and plan accounting."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.families.pixart.helpers import geometry, make_inputs, make_transformer, run
from tokprune.errors import ConfigError
from tokprune.families.pixart import macs
from tokprune.families.pixart.forward import text_conditions
from tokprune.families.pixart.geometry import PixArtGeometry
from tokprune.families.pixart.models import PIXART_SIGMA_XL_CONFIG
from tokprune.pruning import ALL, PrunePlan

BATCH, LATENT, TEXT = 2, (16, 24), 20


def _measured(fn) -> int:
    # The CPU flash kernel is not registered with FlopCounterMode; the math path decomposes into bmm.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() // 2


@pytest.fixture(scope="module", params=[{}, {"caption_channels": None}], ids=["caption-proj", "no-proj"])
def setup(request):
    model = make_transformer(**request.param)
    inputs = make_inputs(model, BATCH, LATENT, text_tokens=TEXT, valid=[5, 20])
    return model, inputs, geometry(model, inputs)


def test_dense_diffusers_forward_matches_counter(setup):
    model, inputs, g = setup
    measured = _measured(lambda: model(**inputs))
    assert measured > 0
    assert abs(macs.diffusers_dense_macs(g) - measured) <= 0.02 * measured


def test_text_stage_matches_counter(setup):
    model, inputs, g = setup
    measured = _measured(lambda: text_conditions(model, g, inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]))
    assert measured == macs.prompt_macs(g)


@pytest.mark.parametrize("reuse", ["noise", "features"])
@pytest.mark.parametrize("keep,keep_text", [(96, None), (16, None), (40, 4), (96, 3)])
def test_pruned_forward_matches_counter(setup, reuse, keep, keep_text):
    model, inputs, g = setup
    gen = torch.Generator().manual_seed(keep)
    idx = torch.stack([torch.randperm(g.num_tokens, generator=gen)[:keep].sort().values for _ in range(BATCH)])
    txt_idx = None if keep_text is None else torch.arange(keep_text).expand(BATCH, keep_text)
    caches = {k: torch.randn(s, generator=gen) for k, s in g.cache_specs(reuse).items()}
    text = text_conditions(model, g, inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    prev = torch.randn(BATCH, 8, *LATENT, generator=gen)
    measured = _measured(
        lambda: run(model, g, inputs, idx, txt_idx=txt_idx, caches=caches, prev_noise=prev, reuse=reuse,
                    conditions=text)
    )
    assert abs(macs.step_macs(g, keep, keep_text, reuse) - measured) <= 0.02 * measured


def test_probe_adds_text_mass(setup):
    model, inputs, g = setup
    full = torch.arange(g.num_tokens).expand(BATCH, -1)
    text = text_conditions(model, g, inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    measured = _measured(lambda: run(model, g, inputs, full, conditions=text, record_text=True))
    expect = macs.step_macs(g, ALL, probe=True)
    assert expect - macs.step_macs(g, ALL) == macs.text_mass_macs(g) > 0
    assert abs(expect - measured) <= 0.02 * measured


def test_plan_accounting():
    g = PixArtGeometry.from_config(PIXART_SIGMA_XL_CONFIG, batch=2, latent_hw=(128, 128), text_tokens=300)
    assert g.num_tokens == 4096 and g.dim == 1152
    dense = PrunePlan.from_ratios([1.0] * 28, num_tokens=g.num_tokens)
    assert macs.mac_fraction(g, dense) == pytest.approx(1.0)
    half = PrunePlan.from_ratios([1.0] * 4 + [0.5] * 24, num_tokens=g.num_tokens)
    frac = macs.mac_fraction(g, half)
    assert 0.5 < frac < 0.6  # attention's N x K term keeps a pruned step above half
    # The text stage is paid once per run, not per step: small against 28 steps at 1024².
    assert macs.prompt_macs(g) < 0.01 * 28 * macs.dense_macs(g)
    # One diffusers call recomputes it.
    assert macs.diffusers_dense_macs(g) == macs.dense_macs(g) + macs.prompt_macs(g) == g.diffusers_dense_macs()
    assert g.step_macs(2048) == macs.step_macs(g, 2048) + macs.prompt_macs(g)  # buckets recompute the text stage
    assert macs.step_macs(g, 0) == 0
    with pytest.raises(ConfigError, match="keep"):
        macs.step_macs(g, g.num_tokens + 1)
    with pytest.raises(ConfigError, match="probe"):
        macs.step_macs(g, 0, probe=True)
