"""The pruned PixArt forward against the installed diffusers PixArtTransformer2DModel."""

from __future__ import annotations

import pytest
import torch

from tests.families.pixart.helpers import (
    fill,
    geometry,
    make_inputs,
    make_transformer,
    nested_subsets,
    run,
)
from tokprune.errors import ConfigError, ShapeError
from tokprune.families.pixart.forward import text_conditions
from tokprune.families.pixart.geometry import PixArtGeometry
from tokprune.pruning.forward import patchify, scatter_rows

TOL = 1e-5

# (model overrides, batch, latent hw, valid text tokens per row or None = no mask)
CASES = [
    pytest.param({}, 1, (16, 16), None, id="b1-square-nomask"),
    pytest.param({}, 2, (16, 16), [1, 7], id="cfg-uncond-short"),  # [uncond ""; cond]: EOS only vs 7 tokens
    pytest.param({}, 3, (12, 20), [3, 10, 1], id="b3-wide-padded"),
    pytest.param({}, 4, (20, 12), [10, 10, 2, 5], id="b4-tall-padded"),
    pytest.param({"caption_channels": None}, 2, (16, 24), [4, 9], id="no-caption-projection"),
    pytest.param(
        {"use_additional_conditions": True, "num_attention_heads": 6, "attention_head_dim": 4, "cross_attention_dim": 24},
        2, (16, 12), [4, 9], id="alpha-additional-conditions",
    ),
]


@pytest.mark.parametrize("overrides,batch,latent_hw,valid", CASES)
@pytest.mark.parametrize("reuse", ["noise", "features"])
def test_keep_all_equals_diffusers(overrides, batch, latent_hw, valid, reuse):
    model = make_transformer(**overrides)
    inputs = make_inputs(model, batch, latent_hw, valid=valid)
    g = geometry(model, inputs)
    with torch.no_grad():
        ref = model(**inputs).sample
        gen = torch.Generator().manual_seed(3)  # keep-all in a random order per sample: key-order invariant
        perm = torch.stack([torch.randperm(g.num_tokens, generator=gen) for _ in range(batch)])
        out = run(model, g, inputs, perm, reuse=reuse)
    assert ref.shape == (batch, 8, *latent_hw)  # learned sigma: all out channels, as diffusers
    assert out.noise.shape == ref.shape
    assert (out.noise - ref).abs().max().item() <= TOL
    assert set(out.fresh) == set(g.cache_specs(reuse))
    for name, shape in g.fresh_specs(g.num_tokens, reuse).items():
        assert tuple(out.fresh[name].shape) == shape


def test_padding_mask_matters():
    """The reference itself depends on the mask, so the exactness above covers its handling."""
    model = make_transformer()
    masked = make_inputs(model, 2, (16, 16), valid=[2, 5])
    unmasked = dict(masked, encoder_attention_mask=None)
    with torch.no_grad():
        a, b = model(**masked).sample, model(**unmasked).sample
    assert (a - b).abs().max().item() > 1e-3


@pytest.mark.parametrize("reuse", ["noise", "features"])
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_filled_caches_give_dense_for_any_k(reuse, frac):
    model = make_transformer()
    inputs = make_inputs(model, 2, (16, 24), valid=[3, 8])
    g = geometry(model, inputs)
    n = g.num_tokens
    k = max(1, int(frac * n))
    with torch.no_grad():
        ref = model(**inputs).sample
        full = torch.arange(n).expand(2, n)
        dense = run(model, g, inputs, full, reuse=reuse)
        caches = fill(g, full, dense.fresh, reuse)
        idx = nested_subsets(2, n, [k])[k]
        out = run(model, g, inputs, idx, caches=caches, prev_noise=dense.noise, reuse=reuse)
    assert (out.noise - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("reuse", ["noise", "features"])
def test_stale_cache_error_shrinks_as_k_grows(reuse):
    model = make_transformer()
    step0 = make_inputs(model, 2, (16, 16), valid=[4, 10])
    gen = torch.Generator().manual_seed(7)
    step1 = dict(step0)
    step1["hidden_states"] = step0["hidden_states"] + 0.3 * torch.randn(step0["hidden_states"].shape, generator=gen)
    step1["timestep"] = (step0["timestep"] * 0.9).long()
    g = geometry(model, step0)
    n = g.num_tokens
    keeps = [n // 8, n // 4, n // 2, 3 * n // 4, n]
    subsets = nested_subsets(2, n, keeps)
    with torch.no_grad():
        full = torch.arange(n).expand(2, n)
        warm = run(model, g, step0, full, reuse=reuse)
        ref = model(**step1).sample
        errs = []
        for k in keeps:
            caches = fill(g, full, warm.fresh, reuse)
            out = run(model, g, step1, subsets[k], caches=caches, prev_noise=warm.noise, reuse=reuse)
            errs.append(((out.noise - ref).norm() / ref.norm()).item())
    assert errs[0] > 1e-2, f"stale caches should cost something, errors {errs}"
    assert all(a >= b for a, b in zip(errs, errs[1:])), f"error must not grow with K: {errs}"
    assert errs[-1] <= 1e-5


def test_text_kv_computed_once_per_run_equals_per_step():
    """The eager path computes the text K/V at a run's first call, stores them in the run's caches and
    never runs the caption projection or the text K/V projections again; results equal per-step computing."""
    model = make_transformer()
    step0 = make_inputs(model, 2, (16, 16), valid=[2, 9])
    step1 = dict(step0, hidden_states=step0["hidden_states"] * 0.7, timestep=(step0["timestep"] * 0.8).long())
    g = geometry(model, step0)
    n = g.num_tokens
    calls = {"caption": 0}
    hook = model.caption_projection.register_forward_hook(lambda *a: calls.__setitem__("caption", calls["caption"] + 1))
    try:
        with torch.no_grad():
            full = torch.arange(n).expand(2, n)
            idx = nested_subsets(2, n, [n // 3])[n // 3]
            run_caches = {name: torch.zeros(s) for name, s in g.cache_specs().items()}
            a0 = run(model, g, step0, full, caches=run_caches, inplace=True)
            assert calls["caption"] == 1
            assert set(g.text_specs()) <= set(run_caches)  # the run's per-prompt entry
            a1 = run(model, g, step1, idx, caches=run_caches, prev_noise=a0.noise, inplace=True)
            assert calls["caption"] == 1, "the second step must not recompute the text stage"
            # Per step: a caches dict without the text entries recomputes them (pure call).
            per_step = fill(g, full, a0.fresh, "noise")
            b1 = run(model, g, step1, idx, caches=per_step, prev_noise=a0.noise)
            assert calls["caption"] == 2
            # Export form: the text stage given as inputs.
            text = text_conditions(model, g, step0["encoder_hidden_states"], step0["encoder_attention_mask"])
            c1 = run(model, g, step1, idx, caches=fill(g, full, a0.fresh, "noise"), prev_noise=a0.noise,
                     conditions=text)
    finally:
        hook.remove()
    assert torch.equal(a1.noise, b1.noise)
    assert torch.equal(a1.noise, c1.noise)


def test_text_pruning_keeps_padding_semantics():
    model = make_transformer()
    inputs = make_inputs(model, 2, (16, 16), text_tokens=12, valid=[4, 7])
    g = geometry(model, inputs)
    n = g.num_tokens
    full = torch.arange(n).expand(2, n)
    with torch.no_grad():
        ref = model(**inputs).sample
        all_txt = torch.arange(12).expand(2, 12)
        probe = run(model, g, inputs, full, txt_idx=all_txt, record_text=True)
        # Dropping only padding rows (keep the first 7 of each row; row 0 has 4 real tokens: 3 padding kept)
        no_pad = run(model, g, inputs, full, txt_idx=all_txt[:, :7])
        # Dropping real tokens changes the result.
        fewer = run(model, g, inputs, full, txt_idx=all_txt[:, 1:4])
    assert (probe.noise - ref).abs().max().item() <= TOL
    assert (no_pad.noise - ref).abs().max().item() <= TOL
    assert (fewer.noise - ref).abs().max().item() > 1e-4
    mass = probe.text_mass
    assert mass.shape == (2, 12)
    assert torch.allclose(mass.sum(dim=1), torch.ones(2), atol=1e-5)  # a distribution over the text per query
    assert mass[0, 4:].max().item() < 1e-6 and mass[1, 7:].max().item() < 1e-6  # padding receives nothing
    assert mass[0, :4].min().item() > 1e-3 and mass[1, :7].min().item() > 1e-3


def test_pure_call_does_not_touch_caches_and_inplace_matches():
    model = make_transformer()
    inputs = make_inputs(model, 2, (16, 16), valid=[3, 10])
    g = geometry(model, inputs)
    n = g.num_tokens
    with torch.no_grad():
        full = torch.arange(n).expand(2, n)
        warm = run(model, g, inputs, full)
        caches = fill(g, full, warm.fresh, "noise")
        for c in caches.values():
            c.mul_(0.5)
        snapshot = {k: v.clone() for k, v in caches.items()}
        idx = nested_subsets(2, n, [n // 4])[n // 4]
        text = text_conditions(model, g, inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
        pure = run(model, g, inputs, idx, caches=caches, prev_noise=warm.noise, conditions=text)
        assert all(torch.equal(caches[k], snapshot[k]) for k in snapshot) and set(caches) == set(snapshot)
        eager = run(model, g, inputs, idx, caches=caches, prev_noise=warm.noise, conditions=text, inplace=True)
    assert torch.equal(pure.noise, eager.noise)
    for name, rows in pure.fresh.items():
        assert torch.equal(caches[name], scatter_rows(snapshot[name], idx, rows, inplace=False))


def test_noise_mode_reuses_previous_rows_exactly():
    model = make_transformer()
    inputs = make_inputs(model, 1, (16, 16))
    g = geometry(model, inputs)
    n = g.num_tokens
    with torch.no_grad():
        full = torch.arange(n).expand(1, n)
        warm = run(model, g, inputs, full)
        caches = fill(g, full, warm.fresh, "noise")
        prev = torch.randn_like(warm.noise)
        idx = nested_subsets(1, n, [n // 4])[n // 4]
        out = run(model, g, inputs, idx, caches=caches, prev_noise=prev)
    tok_out, tok_prev = patchify(out.noise, g.patch), patchify(prev, g.patch)  # all 8 channels (sigma too)
    unselected = torch.ones(n, dtype=torch.bool)
    unselected[idx[0]] = False
    assert torch.equal(tok_out[0, unselected], tok_prev[0, unselected])
    assert not torch.allclose(tok_out[0, idx[0]], tok_prev[0, idx[0]])


def test_missing_inputs_are_refused_clearly():
    model = make_transformer()
    inputs = make_inputs(model, 1, (16, 16))
    g = geometry(model, inputs)
    idx = torch.arange(10)[None]
    with pytest.raises(ConfigError, match="needs the caches"):
        run(model, g, inputs, idx)
    with pytest.raises(ConfigError, match="prev_noise"):
        run(model, g, inputs, idx, caches=fill(g, idx, {}, "noise"))
    with pytest.raises(ConfigError, match="encoder_hidden_states"):
        run(model, g, inputs, torch.arange(g.num_tokens)[None], conditions={"foo": 1})
    with pytest.raises(ConfigError, match="reuse"):
        run(model, g, inputs, idx, reuse="bogus")


def test_geometry_shapes_and_round_trip():
    model = make_transformer()
    g = PixArtGeometry.from_model(model, batch=2, latent_hw=(12, 20), text_tokens=300)
    assert (g.num_tokens, g.grid, g.dim, g.out_channels, g.token_channels) == (60, (6, 10), 32, 8, 32)
    assert g.learned_sigma and g.caption_projection and not g.additional_conditions
    assert PixArtGeometry.from_dict(g.to_dict()) == g
    assert g.to_dict()["family"] == "pixart-sigma"
    assert g.with_batch(4).batch == 4 and g.with_text_tokens(120).text_tokens == 120
    assert list(g.cache_specs("noise")) == [f"blocks.{i}.{kv}" for i in range(3) for kv in ("k", "v")]
    assert g.cache_specs()["blocks.0.k"] == (2, 4, 60, 8)
    assert g.fresh_specs(7, "features")["blocks.2.cross"] == (2, 7, 32)
    assert g.text_specs()["text.1.v"] == (2, 4, 300, 8) and g.text_specs()["text_bias"] == (2, 300)
    with pytest.raises(ShapeError, match="multiple of the patch"):
        PixArtGeometry.from_model(model, batch=1, latent_hw=(15, 16), text_tokens=4)
    with pytest.raises(ShapeError, match="family"):
        PixArtGeometry.from_dict({**g.to_dict(), "family": "sd3"})
