"""Eager pruned sampling on the tiny SD1.5 / SDXL pipelines: apply / remove, plans, CFG, special tokens."""

from __future__ import annotations

import pytest
import torch

from tokprune.errors import ConfigError
from tokprune.families.unet import FAMILY, apply, get_pruner, remove
from tokprune.families.unet.models import build_pipeline
from tokprune.pruning.family import family_for
from tokprune.pruning.plan import ALL, PrunePlan

STEPS = 5
PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="module", params=["sd15-tiny", "sdxl-tiny"])
def pipe(request):
    return build_pipeline(request.param)


def _run(pipe, **kw):
    out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    return out.images


def _n(pipe) -> int:
    from tokprune.families.unet.geometry import UNetGeometry

    return UNetGeometry.from_config(pipe.unet.config, batch=1, latent_hw=(32, 32), text_tokens=77).num_tokens


def test_family_owns_unet_pipelines(pipe):
    assert family_for(pipe) is FAMILY and family_for(pipe.unet) is FAMILY
    assert FAMILY.denoiser(pipe) is pipe.unet


def test_dense_plan_equals_pipeline_and_remove_restores(pipe):
    want = _run(pipe)
    forward = pipe.unet.forward
    pruner = apply(pipe, PrunePlan.dense(STEPS))
    got = _run(pipe)
    assert pruner.calls == STEPS
    remove(pipe)
    assert get_pruner(pipe) is None and pipe.unet.forward == forward and "encode_prompt" not in pipe.__dict__
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(_run(pipe), want)


def test_pruned_text_and_cached_plans_run_and_differ(pipe):
    n = _n(pipe)
    want = _run(pipe)
    plans = {
        "dato": PrunePlan((ALL, ALL, n // 2, n // 2, n // 2)),
        "cache": PrunePlan((ALL,) * STEPS, step_cache=(False, False, True, False, True)),
        "text": PrunePlan((ALL, ALL, n // 2, ALL, n // 2), text_keep=(ALL, ALL, 8, ALL, 8)),
    }
    errs = {}
    for name, plan in plans.items():
        pruner = apply(pipe, plan)
        got = _run(pipe)
        remove(pipe)
        assert pruner.calls == STEPS and torch.isfinite(got).all()
        errs[name] = (got - want).abs().max().item()
    assert all(e > 1e-4 for e in errs.values()), errs
    assert (_run(pipe) - want).abs().max().item() == 0.0


def test_cfg_halves_share_one_selection(pipe):
    n = _n(pipe)
    pruner = apply(pipe, PrunePlan((ALL, ALL, n // 2, n // 2, n // 2)))
    seen = []
    select = pruner.policy.select

    def spy(k):
        idx = select(k)
        seen.append(idx)
        return idx

    pruner.policy.select = spy
    _run(pipe)
    remove(pipe)
    assert len(seen) == 3 and all(idx.shape == (len(PROMPTS), n // 2) for idx in seen)  # one row per prompt
    h, w = pruner.state.geometry.grid
    for idx in seen:  # DaTo: every 2x2 window keeps its base token
        win = (idx // w // 2) * ((w + 1) // 2) + (idx % w) // 2
        assert all(len(set(row.tolist())) == ((h + 1) // 2) * ((w + 1) // 2) for row in win)


def test_bos_eos_never_pruned(pipe):
    """Text pruning to 4 rows keeps BOS and EOS of every prompt (and of the negative prompt) even when
    their measured importance is the lowest."""
    from tokprune.families.unet.text import special_token_mask

    pruner = apply(pipe, PrunePlan((ALL, ALL, ALL, ALL, ALL), text_keep=(ALL, 4, 4, 4, 4)))
    kept = []
    from tokprune.pruning import policies

    real = policies.select_text_tokens

    def spy(importance, k, *, protect=None):
        low = importance.clone()
        if protect is not None:  # make special tokens the least important: only protection can keep them
            low = low.masked_fill(protect.to(low.device), -1.0)
        idx = real(low, k, protect=protect)
        kept.append((idx, protect))
        return idx

    policies.select_text_tokens = spy
    try:
        _run(pipe)
    finally:
        policies.select_text_tokens = real
        remove(pipe)
    assert len(kept) == STEPS - 1
    mask = special_token_mask(pipe, PROMPTS)
    for idx, protect in kept:
        assert protect is not None and protect.shape == (2 * len(PROMPTS), 77)
        assert torch.equal(protect[len(PROMPTS):], mask)  # [negative; positive] rows
        for row, p in zip(idx, protect):
            assert set(p.nonzero().flatten().tolist()) <= set(row.tolist())


def test_plan_length_must_match(pipe):
    apply(pipe, PrunePlan.dense(STEPS + 1))
    try:
        with pytest.raises(ConfigError, match="num_inference_steps"):
            _run(pipe)
    finally:
        remove(pipe)


def test_generic_pruning_apply_uses_the_family():
    """tokprune.pruning.apply (the generic TokenPruner) drives the U-Net through FAMILY: a dense plan equals
    the pipeline, a DaTo plan runs pruned (SDXL: Euler keeps a step index; DeepCache steps and DDIM
    need the family's own apply, see the README)."""
    from tokprune import pruning

    pipe = build_pipeline("sdxl-tiny")
    want = _run(pipe)
    pruner = pruning.apply(pipe, PrunePlan.dense(STEPS), policy="dynamics")
    assert pruner.family is FAMILY
    dense = _run(pipe)
    pruning.remove(pipe)
    pruning.apply(pipe, PrunePlan((ALL, ALL, 128, 128, 128)), policy="dynamics")
    pruned = _run(pipe)
    pruning.remove(pipe)
    assert (dense - want).abs().max().item() <= 1e-5
    assert (pruned - want).abs().max().item() > 1e-4
