"""The analytic MAC counter against torch's FlopCounterMode, and plan-level accounting."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import make_inputs, make_transformer
from tokprune.errors import ConfigError
from tokprune.pruning import ALL, Geometry, PrunePlan, pruned_forward
from tokprune.pruning.macs import dense_macs, diffusers_dense_macs, mac_fraction, plan_macs, step_macs

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
    assert plan_macs(g, text_plan) == dense_macs(g) + step_macs(g, 2048, 100)
    assert step_macs(g, 2048, 100) < step_macs(g, 2048)
    ks = [step_macs(g, k) for k in (64, 512, 1024, 2048, 4096)]
    assert ks == sorted(ks) and len(set(ks)) == 5


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
