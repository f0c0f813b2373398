"""The analytic MAC counter against torch's FlopCounterMode, and plan-level accounting."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import make_inputs, make_transformer
from tokprune.errors import ConfigError
from tokprune.pruning import ALL, Geometry, PrunePlan, pruned_forward
from tokprune.pruning.macs import (
    dense_macs,
    diffusers_dense_macs,
    mac_fraction,
    plan_macs,
    step_macs,
    text_mass_macs,
)

LATENT = (16, 16)  # N = 64 image tokens at patch 2
TEXT = 9
BATCH = 2


def _measured(fn) -> int:
    # The CPU flash kernel is not registered with FlopCounterMode; the math path decomposes into bmm.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() // 2


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def setup(request):
    model = make_transformer(request.param)
    inputs = make_inputs(model, BATCH, LATENT, text_tokens=TEXT)
    g = Geometry.from_model(model, batch=BATCH, latent_hw=LATENT, text_tokens=TEXT)
    return model, inputs, g


def test_dense_diffusers_forward_matches_counter(setup):
    model, inputs, g = setup
    measured = _measured(lambda: model(**inputs))
    assert measured > 0
    assert abs(diffusers_dense_macs(g) - measured) <= 0.02 * measured


@pytest.mark.parametrize("reuse", ["noise", "features"])
@pytest.mark.parametrize("keep,keep_text", [(64, None), (16, None), (40, 4), (64, 3)])
def test_pruned_forward_matches_counter(setup, reuse, keep, keep_text):
    model, inputs, g = setup
    gen = torch.Generator().manual_seed(keep)
    idx = torch.stack([torch.randperm(g.num_tokens, generator=gen)[:keep].sort().values for _ in range(BATCH)])
    txt_idx = None if keep_text is None else torch.arange(keep_text).expand(BATCH, keep_text)
    caches = {k: torch.randn(s, generator=gen) for k, s in g.cache_specs(reuse).items()}
    lat = inputs["hidden_states"]

    def run():
        pruned_forward(
            model,
            g,
            latent=lat,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            timestep=inputs["timestep"],
            img_idx=idx,
            txt_idx=txt_idx,
            caches=caches,
            prev_noise=torch.zeros_like(lat),
            reuse=reuse,
        )

    measured = _measured(run)
    counted = step_macs(g, keep, keep_text, reuse)
    assert abs(counted - measured) <= 0.02 * measured, (counted, measured)


@pytest.mark.parametrize("keep,keep_text", [(64, None), (16, None), (40, 4)])
def test_text_importance_probe_matches_counter(setup, keep, keep_text):
    """The probe's counted MACs = FlopCounterMode(record_text=True) - FlopCounterMode(plain call)."""
    model, inputs, g = setup
    gen = torch.Generator().manual_seed(keep)
    idx = torch.stack([torch.randperm(g.num_tokens, generator=gen)[:keep].sort().values for _ in range(BATCH)])
    txt_idx = None if keep_text is None else torch.arange(keep_text).expand(BATCH, keep_text)
    caches = {k: torch.randn(s, generator=gen) for k, s in g.cache_specs("noise").items()}
    lat = inputs["hidden_states"]

    def run(record_text: bool):
        out = pruned_forward(
            model, g, latent=lat, encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"], img_idx=idx,
            txt_idx=txt_idx, caches=caches, prev_noise=torch.zeros_like(lat), record_text=record_text,
        )
        assert (out.text_mass is not None) == record_text

    plain = _measured(lambda: run(False))
    probed = _measured(lambda: run(True))
    probe = probed - plain
    assert probe > 0
    counted = text_mass_macs(g, keep, keep_text)
    assert abs(counted - probe) <= 0.02 * probe, (counted, probe)
    with_probe = step_macs(g, keep, keep_text, probe=True)
    assert with_probe == step_macs(g, keep, keep_text) + counted
    assert abs(with_probe - probed) <= 0.02 * probed, (with_probe, probed)


def test_last_block_text_queries_are_the_only_dense_difference(setup):
    _, _, g = setup
    n, t, d = g.num_tokens, g.text_tokens, g.dim
    assert diffusers_dense_macs(g) - dense_macs(g) == g.batch * 2 * t * (n + t) * d


def test_plan_accounting():
    g = Geometry(
        batch=2,
        latent_hw=(128, 128),
        text_tokens=333,
        patch=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        heads=24,
        head_dim=64,
        joint_attention_dim=4096,
        pooled_dim=2048,
    )
    n = g.num_tokens
    assert n == 4096
    assert mac_fraction(g, PrunePlan.dense(28)) == 1.0
    assert dense_macs(g) == step_macs(g, ALL) == step_macs(g, n)
    assert step_macs(g, 0) == 0  # reuse step: no call
    # SD3-medium at 1024^2, one sample: ~4.45 T MACs per dense step (linear ~3.0 T + attention ~1.45 T)
    assert 4.4e12 < dense_macs(g) / 2 < 4.5e12
    half = step_macs(g, n // 2) / dense_macs(g)
    assert 0.5 < half < 0.56  # text (333 rows) and the K-independent parts are not pruned
    plan = PrunePlan(image_keep=(ALL, ALL, 0, 2048, 1024))
    assert plan_macs(g, plan) == 2 * dense_macs(g) + step_macs(g, 2048) + step_macs(g, 1024)
    assert mac_fraction(g, plan) == pytest.approx(plan_macs(g, plan) / (5 * dense_macs(g)))
    text_plan = PrunePlan(image_keep=(ALL, 2048), text_keep=(ALL, 100))
    assert text_plan.probe_steps() == (0,)
    # the dense step before text pruning also runs the text-importance probe, and it is counted
    probe = text_mass_macs(g)
    assert probe == 2 * 24 * (n + 333) ** 2 * g.dim
    assert plan_macs(g, text_plan) == dense_macs(g) + probe + step_macs(g, 2048, 100)
    assert mac_fraction(g, text_plan) > (dense_macs(g) + step_macs(g, 2048, 100)) / (2 * dense_macs(g))
    assert step_macs(g, 2048, 100) < step_macs(g, 2048)
    ks = [step_macs(g, k) for k in (64, 512, 1024, 2048, 4096)]
    assert ks == sorted(ks) and len(set(ks)) == 5


def test_mac_fraction_counts_the_probe_only_at_probe_steps():
    g = Geometry(batch=2, latent_hw=(16, 16), text_tokens=9, patch=2, in_channels=4, out_channels=4, num_layers=2,
                 heads=2, head_dim=8, joint_attention_dim=16, pooled_dim=16)
    n, d = g.num_tokens, dense_macs(g)
    # dense, dense, image-pruned, reuse, text-pruned, dense, text-pruned: probes at 1 (not 0) and 5
    plan = PrunePlan((ALL, ALL, 32, 0, 32, ALL, 16), text_keep=(ALL, ALL, ALL, ALL, 4, ALL, 4))
    assert plan.probe_steps() == (1, 5)
    plain = 3 * d + step_macs(g, 32) + step_macs(g, 32, 4) + step_macs(g, 16, 4)
    assert plan_macs(g, plan) == plain + 2 * text_mass_macs(g)
    assert mac_fraction(g, plan) == pytest.approx((plain + 2 * text_mass_macs(g)) / (7 * d))
    # the same plan without text pruning pays no probe
    image_only = PrunePlan((ALL, ALL, 32, 0, 32, ALL, 16))
    assert plan_macs(g, image_only) == 3 * d + 2 * step_macs(g, 32) + step_macs(g, 16)
    assert text_mass_macs(g) == 2 * 2 * (n + 9) * (n + 9) * g.dim
    with pytest.raises(ConfigError, match="reuse step"):
        step_macs(g, 0, probe=True)


def test_bad_keep_is_refused():
    g = Geometry(
        batch=1,
        latent_hw=(8, 8),
        text_tokens=9,
        patch=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        heads=2,
        head_dim=8,
        joint_attention_dim=16,
        pooled_dim=16,
    )
    with pytest.raises(ConfigError, match="keep"):
        step_macs(g, g.num_tokens + 1)
    with pytest.raises(ConfigError, match="keep_text"):
        step_macs(g, 4, 10)
    with pytest.raises(ConfigError, match="reuse"):
        step_macs(g, 4, reuse="bogus")
