"""Counted MACs equal the analytic counts, and under diffusers' caches equal the blocks that ran."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_inputs, make_transformer
from tokprune.pruning import ALL, Geometry, PrunePlan, apply, remove
from tokprune.pruning.macs import diffusers_dense_macs, step_macs
from tokprune.yardstick.counting import MacCounter

LATENT, TEXT, BATCH = (16, 16), 9, 2


@pytest.fixture(scope="module")
def setup():
    model = make_transformer("sd3")
    inputs = make_inputs(model, BATCH, LATENT, text_tokens=TEXT)
    g = Geometry.from_model(model, batch=BATCH, latent_hw=LATENT, text_tokens=TEXT)
    return model, inputs, g


def test_dense_stock_call_counts_exactly_the_analytic_macs(setup):
    model, inputs, g = setup
    with torch.no_grad(), MacCounter(model) as mc:
        model(**inputs)
        model(**inputs)
    assert mc.calls == 2 and mc.per_call == [diffusers_dense_macs(g)] * 2 and mc.total == 2 * diffusers_dense_macs(g)
    with torch.no_grad(), MacCounter(model) as mc2:
        torch.randn(64, 64) @ torch.randn(64, 64)  # outside the transformer: not counted
    assert mc2.total == 0 and mc2.calls == 0


def test_pruned_plan_counts_each_executed_step(setup):
    model, inputs, g = setup
    plan = PrunePlan((ALL, ALL, 48, 0, 32))
    apply(model, plan)
    try:
        with torch.no_grad(), MacCounter(model) as mc:
            for _ in range(plan.num_steps):
                model(**inputs)
    finally:
        remove(model)
    expect = [step_macs(g, plan.image_k(s, g.num_tokens)) for s in range(plan.num_steps)]
    assert mc.per_call[0] == mc.per_call[1] == expect[0]  # dense steps as tokprune runs them
    assert mc.per_call[3] == 0  # reuse step: a call, but no transformer work
    assert mc.per_call[4] == expect[4]  # a pruned step after a pruned step: exactly the analytic K=32 count
    # The first pruned step after dense steps also scores the tokens (CAT's clusters): counted, as it runs.
    assert mc.per_call[2] >= expect[2]


def _block_macs(model, inputs) -> list[int]:
    """MACs of each block during one dense call (counted with the block as the counted module)."""
    out = []
    for blk in model.transformer_blocks:
        with torch.no_grad(), MacCounter(blk) as mc:
            model(**inputs)
        out.append(mc.total)
    return out


@pytest.mark.parametrize("kind,settings", [("fbc", {"threshold": 5.0}), ("magcache", {"threshold": 10.0})])
def test_cache_counts_equal_the_blocks_that_ran(kind, settings):
    from tokprune.models import build_tiny_pipeline
    from tokprune.families.sd3.caches import CacheSpec, cached
    from tokprune.yardstick.runs import Call, geometry_of

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = Call(steps=6, guidance=5.0, height=64, width=64, max_sequence_length=16)
    if kind == "magcache":
        settings = {**settings, "mag_ratios": [1.0] * 6, "retention_ratio": 0.2}
    g = geometry_of(pipe, call, 1)
    dense = diffusers_dense_macs(g)
    blocks = pipe.transformer.transformer_blocks
    # Per-block MACs measured on one dense call with the same shapes.
    enc = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=True, max_sequence_length=16)
    inputs = dict(
        hidden_states=torch.randn(2, g.in_channels, *g.latent_hw),
        encoder_hidden_states=torch.cat([enc[1], enc[0]]),
        pooled_projections=torch.cat([enc[3], enc[2]]),
        timestep=torch.tensor([500.0, 500.0]),
    )
    per_block = _block_macs(pipe.transformer, inputs)
    ran: list[list[int]] = []
    hooks = [b.norm1.register_forward_hook(lambda m, a, o, i=i: ran[-1].append(i)) for i, b in enumerate(blocks)]
    pre = pipe.transformer.register_forward_pre_hook(lambda m, a: ran.append([]))
    try:
        with cached(pipe, CacheSpec(kind, settings), steps=6), MacCounter(pipe.transformer) as mc, torch.no_grad():
            pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **call.kwargs())
    finally:
        for h in [*hooks, pre]:
            h.remove()
    assert mc.calls == 6 and len(ran) == 6
    skipped = [c for c in ran if len(c) < len(blocks)]
    assert skipped, "the cache never skipped: the test would not check anything"
    for counted, executed in zip(mc.per_call, ran):
        assert counted == dense - sum(m for i, m in enumerate(per_block) if i not in executed)
