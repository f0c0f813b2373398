"""The analytic U-Net MAC counter against torch's FlopCounterMode, and plan accounting."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.families.unet.helpers import VARIANTS, make_call, make_unet, random_keep
from tokprune.families.unet.forward import unet_forward
from tokprune.families.unet.geometry import UNetGeometry
from tokprune.families.unet.macs import mac_fraction, step_macs
from tokprune.families.unet.models import unet_config
from tokprune.pruning.plan import ALL, PrunePlan


def _counted(unet, g, ours, **kw) -> float:
    # The CPU flash kernel is not registered with FlopCounterMode; the math path decomposes into bmm.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        unet_forward(unet, g, **ours, **kw)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_macs_match_flop_counter(variant):
    unet = make_unet(variant)
    g, ours, _ = make_call(unet, 2, (24, 32))
    k = g.num_tokens // 2
    idx = random_keep(g, k)
    txt = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        deep = unet_forward(unet, g, **ours).fresh["deep"]
    cases = [
        (dict(), dict(keep=ALL)),
        (dict(img_idx=idx, txt_idx=txt), dict(keep=k, keep_text=12)),
        (dict(img_idx=idx, step_kind="cached", caches={"deep": deep}), dict(keep=k, cached=True)),
        (dict(record_text=True), dict(keep=ALL, probe=True)),
    ]
    for fwd, mac in cases:
        want = _counted(unet, g, ours, **fwd)
        assert abs(step_macs(g, **mac) - want) <= 0.02 * want, (fwd.keys(), mac)


def test_medium_ratios_are_sane():
    g = UNetGeometry.from_config(unet_config("sd15-medium"), batch=2, latent_hw=(64, 64), text_tokens=77)
    assert g.num_tokens == 4096 and g.windows == 1024
    dense = step_macs(g, ALL)
    half = step_macs(g, 2048)
    cached = step_macs(g, ALL, cached=True)
    assert 0.3 < half / dense < 0.9  # attention at the 64x64 level dominates this width
    assert cached / dense < 0.6  # DeepCache runs only the outer blocks (the 64x64 attention stays: most of it)
    assert step_macs(g, 2048, cached=True) < 0.6 * cached  # ... which DaTo then prunes
    assert step_macs(g, 0) == 0
    assert step_macs(g, ALL, probe=True) > dense
    assert step_macs(g.with_batch(4), ALL) == 2 * dense
    plan = PrunePlan((ALL, ALL, 2048, 2048), step_cache=(False, False, True, False))
    assert mac_fraction(g, plan) == pytest.approx((2 * dense + step_macs(g, 2048, cached=True) + half) / (4 * dense))
    with pytest.raises(Exception, match="2x2"):
        step_macs(g, 1000)
