"""The eager pruned sampler inside an unmodified diffusers StableDiffusion3Pipeline call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_inputs, make_transformer
from tokprune import pruning
from tokprune.errors import ConfigError
from tokprune.pruning import ALL, PrunePlan

STEPS = 4


def _generate(pipe, prompts, *, steps=STEPS, seed=0, height=None, width=None, guidance=5.0):
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        height=height,
        width=width,
        max_sequence_length=16,
    )
    return out.images


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def pipe(request):
    from tokprune.models import build_tiny_pipeline

    return build_tiny_pipeline(request.param)


@pytest.mark.parametrize("prompts", [["a red circle"], ["a red circle", "two blue squares", "a cat"]])
@pytest.mark.parametrize("hw", [(None, None), (48, 80)])
@pytest.mark.parametrize("reuse", ["noise", "features"])
def test_keep_all_plan_equals_unpatched_pipeline(pipe, prompts, hw, reuse):
    ref = _generate(pipe, prompts, height=hw[0], width=hw[1])
    pruner = pruning.apply(pipe, PrunePlan.dense(STEPS), reuse=reuse)
    try:
        got = _generate(pipe, prompts, height=hw[0], width=hw[1])
    finally:
        pruning.remove(pipe)
    assert pruner.calls == STEPS
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("policy", ["cat", "dynamics", "random"])
def test_pruned_plan_runs_and_differs_but_stays_close(pipe, policy):
    ref = _generate(pipe, ["a red circle", "a cat"])
    n = (pipe.transformer.config.sample_size // 2) ** 2
    plan = PrunePlan(image_keep=(ALL, ALL, n // 2, n // 4))
    pruner = pruning.apply(pipe, plan, policy=policy)
    try:
        got = _generate(pipe, ["a red circle", "a cat"])
    finally:
        pruning.remove(pipe)
    err = ((got - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.5
    assert pruner.calls == STEPS


def test_reuse_step_makes_no_transformer_call(pipe):
    plan = PrunePlan(image_keep=(ALL, 0, ALL, 0))
    pruner = pruning.apply(pipe, plan)
    try:
        _generate(pipe, ["a red circle"])
    finally:
        pruning.remove(pipe)
    assert pruner.calls == 2


def test_apply_twice_equals_once_and_remove_restores_bit_for_bit(pipe):
    t = pipe.transformer
    before = {k: v.clone() for k, v in t.state_dict().items()}
    ref = _generate(pipe, ["a red circle"])
    plan = PrunePlan(image_keep=(ALL, ALL, 64, 32))
    pruning.apply(pipe, plan, policy="random", seed=3)
    once = _generate(pipe, ["a red circle"])
    pruning.apply(pipe, plan, policy="random", seed=3)
    pruning.apply(pipe, plan, policy="random", seed=3)
    twice = _generate(pipe, ["a red circle"])
    assert torch.equal(once, twice)
    pruning.remove(pipe)
    pruning.remove(pipe)  # idempotent too
    assert "forward" not in t.__dict__ and pruning.get_pruner(pipe) is None
    after = t.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_generate(pipe, ["a red circle"]), ref)


def test_second_generation_starts_a_fresh_run(pipe):
    plan = PrunePlan(image_keep=(ALL, ALL, 64, 64))
    pruning.apply(pipe, plan, policy="cat")
    try:
        a = _generate(pipe, ["a red circle"], seed=1)
        _generate(pipe, ["two blue squares"], seed=2)
        b = _generate(pipe, ["a red circle"], seed=1)
    finally:
        pruning.remove(pipe)
    assert torch.equal(a, b)


def test_wrong_step_count_is_refused(pipe):
    pruning.apply(pipe, PrunePlan.dense(STEPS))
    try:
        with pytest.raises(ConfigError, match="num_inference_steps=4"):
            _generate(pipe, ["a red circle"], steps=STEPS + 2)
        with pytest.raises(ConfigError, match="runs 2 denoising steps but the plan has 4"):
            _generate(pipe, ["a red circle"], steps=2)  # a shorter call must not run a plan's first steps
    finally:
        pruning.remove(pipe)


def test_text_pruning_keeps_protected_tokens(pipe):
    t_tokens = 77 + 16
    plan = PrunePlan(image_keep=(ALL,) * STEPS, text_keep=(ALL, ALL, 24, 24))
    protect = torch.zeros(t_tokens, dtype=torch.bool)
    protect[0] = True
    protect[77] = True
    pruner = pruning.apply(pipe, plan, text_protect=protect)
    seen = []
    import tokprune.pruning.policies as policies

    original = policies.select_text_tokens

    def spy(importance, k, *, protect=None):
        idx = original(importance, k, protect=protect)
        seen.append(idx)
        return idx

    policies.select_text_tokens = spy
    try:
        ref_plan_out = _generate(pipe, ["a red circle"])
    finally:
        policies.select_text_tokens = original
        pruning.remove(pipe)
    assert pruner.state.text_importance is not None and pruner.state.text_importance.shape == (2, t_tokens)
    assert len(seen) == 2 and all(s.shape == (2, 24) for s in seen)
    assert all(bool((s == 0).any(dim=1).all()) and bool((s == 77).any(dim=1).all()) for s in seen)
    assert torch.isfinite(ref_plan_out).all()


def test_no_host_sync_inside_a_step(monkeypatch):
    """No .item()/.tolist()/.cpu() while the hook runs a pruned step."""
    model = make_transformer("sd3.5")
    inputs = make_inputs(model, 2, (16, 16))
    n = 64
    pruner = pruning.apply(model, PrunePlan(image_keep=(ALL, n // 2, n // 4, 0)), policy="cat")
    with torch.no_grad():
        model(**inputs)  # dense warm-up step

        def boom(*a, **k):
            raise AssertionError("host sync inside a pruned step")

        monkeypatch.setattr(torch.Tensor, "item", boom)
        monkeypatch.setattr(torch.Tensor, "tolist", boom)
        monkeypatch.setattr(torch.Tensor, "cpu", boom)
        monkeypatch.setattr(torch.Tensor, "numpy", boom)
        for _ in range(3):
            out = model(**inputs).sample
    monkeypatch.undo()
    assert pruner.calls == 3 and torch.isfinite(out).all()
    pruning.remove(model)


def test_bare_transformer_counts_calls_and_wraps():
    model = make_transformer("sd3")
    inputs = make_inputs(model, 1, (16, 16))
    pruner = pruning.apply(model, PrunePlan(image_keep=(ALL, 16)), policy="random")
    with torch.no_grad():
        a = [model(**inputs).sample for _ in range(2)]
        b = [model(**inputs).sample for _ in range(2)]  # second run: same plan again from step 0
    pruning.remove(model)
    assert pruner.calls == 4
    assert torch.equal(a[0], b[0])


def test_apply_rejects_unknown_targets_and_bad_plans():
    with pytest.raises(ConfigError, match="SD3Transformer2DModel"):
        pruning.apply(object(), PrunePlan.dense(2))
    with pytest.raises(ConfigError, match="step 0"):
        PrunePlan(image_keep=(0, ALL))
    with pytest.raises(ConfigError, match="text_keep has 1 steps"):
        PrunePlan(image_keep=(ALL, ALL), text_keep=(ALL,))
    assert np.array_equal(PrunePlan.from_ratios([1, 0.5, 0], num_tokens=256, align=64).image_keep, (ALL, 128, 0))


def _spy_executor(pruner, seen):
    original = pruner.executor

    def spy(p, st, inputs):
        seen.append((st.step, inputs.img_idx.clone(), None if inputs.txt_idx is None else inputs.txt_idx.clone(),
                     inputs.record_text))
        return original(p, st, inputs)

    pruner.executor = spy


def test_cfg_halves_share_one_index_set_per_prompt(pipe):
    n = (pipe.transformer.config.sample_size // 2) ** 2
    plan = PrunePlan(image_keep=(ALL, ALL, n // 2, n // 4))
    for policy in ("cat", "dynamics", "random"):
        pruner = pruning.apply(pipe, plan, policy=policy)
        seen = []
        _spy_executor(pruner, seen)
        try:
            _generate(pipe, ["a red circle", "two blue squares"], guidance=5.0)
        finally:
            pruning.remove(pipe)
        pruned = [idx for step, idx, _, _ in seen if step >= 2]
        assert len(pruned) == 2
        for idx in pruned:
            assert idx.shape[0] == 4  # [uncond x2; cond x2]
            assert torch.equal(idx[:2], idx[2:]), policy  # each prompt's halves compute the same tokens
        assert pruner.state.guidance == 5.0 and pruner.state.prompts == 2


def test_without_cfg_every_row_is_its_own_prompt(pipe):
    n = (pipe.transformer.config.sample_size // 2) ** 2
    pruner = pruning.apply(pipe, PrunePlan(image_keep=(ALL, ALL, n // 2, n // 4)), policy="random")
    seen = []
    _spy_executor(pruner, seen)
    try:
        _generate(pipe, ["a red circle", "two blue squares"], guidance=1.0)
    finally:
        pruning.remove(pipe)
    assert pruner.state.guidance is None and seen[-1][1].shape[0] == 2
    assert not torch.equal(seen[-1][1][0], seen[-1][1][1])  # independent rows, independent random subsets


def test_special_tokens_are_protected_automatically_and_probe_runs_once(pipe):
    from tokprune.pruning.text import special_token_mask

    t_tokens = 77 + 16
    plan = PrunePlan(image_keep=(ALL, ALL, ALL, ALL), text_keep=(ALL, ALL, 8, 8))
    pruner = pruning.apply(pipe, plan)  # no text_protect given: the pipeline's tokenizers provide it
    seen = []
    _spy_executor(pruner, seen)
    prompts = ["a red circle", "two big blue squares on top"]
    try:
        _generate(pipe, prompts, guidance=5.0)
    finally:
        pruning.remove(pipe)
    assert "encode_prompt" not in pipe.__dict__  # remove() restores the pipeline too
    expected = torch.cat([special_token_mask(pipe, ["", ""], max_sequence_length=16),
                          special_token_mask(pipe, prompts, max_sequence_length=16)])  # [negative; positive]
    assert expected.shape == (4, t_tokens) and bool(expected[:, 0].all())  # CLIP BOS everywhere
    assert int(expected.sum()) >= 4 * 3  # BOS + EOS (CLIP) + EOS (T5) per row
    text_steps = [txt for _, _, txt, _ in seen if txt is not None]
    assert len(text_steps) == 2
    for txt in text_steps:
        for row in range(4):
            kept = set(txt[row].tolist())
            assert set(torch.nonzero(expected[row]).flatten().tolist()) <= kept
    # the text-importance probe runs only at the dense step right before text pruning
    assert [rec for _, _, _, rec in seen] == [False, True, False, False]


def test_text_pruned_full_image_step_does_not_reset_the_cat_reference(pipe):
    plan = PrunePlan(image_keep=(ALL, ALL, ALL, 64), text_keep=(ALL, ALL, 8, ALL))
    pruner = pruning.apply(pipe, plan, policy="cat")
    flags = []
    original = pruner.policy.observe

    def spy(noise, *, dense, selected=None):
        flags.append(dense)
        return original(noise, dense=dense, selected=selected)

    pruner.policy.observe = spy
    try:
        _generate(pipe, ["a red circle"])
    finally:
        pruning.remove(pipe)
    assert flags == [True, True, False, False]
