"""The pruned U-Net step against the installed diffusers UNet2DConditionModel (SD1.5 and SDXL layouts)."""

from __future__ import annotations

import pytest
import torch

from tests.families.unet.helpers import VARIANTS, make_call, make_unet, random_keep
from tokprune.errors import ConfigError, ShapeError
from tokprune.families.unet.forward import check_supported, unet_forward


@pytest.fixture(scope="module", params=VARIANTS)
def unet(request):
    return make_unet(request.param)


@pytest.mark.parametrize("batch,latent_hw", [(1, (32, 32)), (2, (24, 40)), (4, (20, 28)), (2, (21, 27))])
def test_keep_all_equals_diffusers(unet, batch, latent_hw):
    """No pruning, no caching: the step equals diffusers' forward (square, non-square, odd sizes that need
    diffusers' upsample_size path, CFG-sized and larger batches)."""
    g, ours, ref = make_call(unet, batch, latent_hw)
    with torch.no_grad():
        want = unet(**ref).sample
        got = unet_forward(unet, g, **ours)
        got_k = unet_forward(unet, g, **ours, img_idx=torch.arange(g.num_tokens).expand(batch, -1))
    assert got.noise.shape == want.shape
    assert (got.noise - want).abs().max().item() <= 1e-5
    assert (got_k.noise - want).abs().max().item() <= 1e-5  # K = N through the index path is the dense call
    assert tuple(got.fresh["deep"].shape) == g.deep_shape


def test_keep_all_text_equals_diffusers(unet):
    g, ours, ref = make_call(unet, 2, (32, 32))
    with torch.no_grad():
        want = unet(**ref).sample
        got = unet_forward(unet, g, **ours, txt_idx=torch.arange(77).expand(2, -1), record_text=True)
    assert (got.noise - want).abs().max().item() <= 1e-5
    mass = got.text_mass
    assert mass.shape == (2, 77)
    assert torch.allclose(mass.sum(dim=1), torch.ones(2), atol=1e-4)  # a probability mass per pixel, averaged


def test_pruned_image_tokens_differ_a_little_and_restore_by_copy(unet):
    g, ours, ref = make_call(unet, 2, (32, 32))
    keep = g.num_tokens // 2
    idx = random_keep(g, keep)
    with torch.no_grad():
        dense = unet_forward(unet, g, **ours).noise
        pruned = unet_forward(unet, g, **ours, img_idx=idx).noise
        quarter = unet_forward(unet, g, **ours, img_idx=random_keep(g, g.windows)).noise
    err_half = (pruned - dense).abs().mean().item()
    err_quarter = (quarter - dense).abs().mean().item()
    assert 0 < err_half < 0.2 * dense.abs().mean().item()
    assert err_half < err_quarter  # fewer kept tokens, larger deviation
    assert torch.isfinite(pruned).all()


def test_restore_copies_the_most_similar_kept_output():
    """Inside one attn1: pruned rows equal the output row of their most cosine-similar kept token."""
    from tokprune.families.unet.forward import _Ctx, _attend, _pruned_self_attention

    unet = make_unet("sd15-tiny")
    g, _, _ = make_call(unet, 2, (8, 8))
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    nx = torch.randn(2, g.num_tokens, attn.to_q.in_features)
    idx = random_keep(g, 24)
    c = _Ctx(g, idx, False)
    with torch.no_grad():
        out = _pruned_self_attention(attn, nx, c)
        kept = torch.gather(nx, 1, idx[..., None].expand(-1, -1, nx.shape[-1]))
        out_k = _attend(attn, kept, None)
    for b in range(2):
        kept_set = set(idx[b].tolist())
        for j in range(g.num_tokens):
            if j in kept_set:
                pos = idx[b].tolist().index(j)
                assert torch.allclose(out[b, j], out_k[b, pos], atol=1e-6)
            else:
                sims = torch.nn.functional.cosine_similarity(nx[b, j][None], kept[b], dim=-1)
                assert torch.allclose(out[b, j], out_k[b, int(sims.argmax())], atol=1e-6)


def test_text_pruning_uses_kept_rows_in_every_cross_attention(unet):
    """Keeping K_txt rows equals calling diffusers with only those rows of encoder_hidden_states."""
    g, ours, ref = make_call(unet, 2, (16, 16))
    txt = torch.tensor([[0, 1, 2, 5, 9], [0, 3, 4, 7, 76]])
    sub = torch.gather(ours["encoder_hidden_states"], 1, txt[..., None].expand(-1, -1, g.text_dim))
    with torch.no_grad():
        want = unet(**{**ref, "encoder_hidden_states": sub}).sample
        got = unet_forward(unet, g, **ours, txt_idx=txt).noise
        full = unet_forward(unet, g, **ours).noise
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - full).abs().max().item() > 1e-3


def _deepcache_reference(unet, ours, ref, deep):
    """DeepCache built from the diffusers modules: conv_in + down_blocks[0] (its own forward; the
    downsampled state is dropped), the cached deep feature, up_blocks[-1], output head."""
    added = ref.get("added_cond_kwargs")
    sample, t, ehs = ours["sample"], ours["timestep"], ours["encoder_hidden_states"]
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added or {})
    emb = emb if aug is None else emb + aug
    x = unet.conv_in(sample)
    d0 = unet.down_blocks[0]
    kw = {"encoder_hidden_states": ehs} if getattr(d0, "has_cross_attention", False) else {}
    _, states = d0(x, emb, **kw)
    res = (x,) + states[: len(d0.resnets)]
    up = unet.up_blocks[-1]
    kw = {"encoder_hidden_states": ehs} if getattr(up, "has_cross_attention", False) else {}
    y = up(deep, res, emb, **kw)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(y)))


def test_cached_step_equals_deepcache_reference(unet):
    g, ours, ref = make_call(unet, 2, (24, 32), seed=3)
    g2, ours2, ref2 = make_call(unet, 2, (24, 32), seed=4)  # the "previous step" that filled the cache
    caches = {"deep": torch.zeros(g.deep_shape)}
    with torch.no_grad():
        full = unet_forward(unet, g2, **ours2, caches=caches, inplace=True)
        assert torch.equal(caches["deep"], full.fresh["deep"])
        got = unet_forward(unet, g, **ours, caches=caches, step_kind="cached").noise
        want = _deepcache_reference(unet, ours, ref, caches["deep"])
        dense = unet(**ref).sample
        # a cached step on the cache its own full step would write is the full step
        own = unet_forward(unet, g, **ours).fresh["deep"]
        same = unet_forward(unet, g, **ours, caches={"deep": own}, step_kind="cached").noise
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - dense).abs().max().item() > 1e-3  # a stale deep feature changes the prediction
    assert (same - dense).abs().max().item() <= 1e-5


def test_cached_step_with_pruned_shallow_blocks_runs(unet):
    g, ours, _ = make_call(unet, 2, (32, 32))
    with torch.no_grad():
        deep = unet_forward(unet, g, **ours).fresh["deep"]
        out = unet_forward(unet, g, **ours, caches={"deep": deep}, step_kind="cached", img_idx=random_keep(g, g.num_tokens // 2))
    assert torch.isfinite(out.noise).all() and not out.fresh  # a cached step writes no cache


def test_refusals(unet):
    g, ours, _ = make_call(unet, 2, (16, 16))
    with pytest.raises(ConfigError, match="caches"):
        unet_forward(unet, g, **ours, step_kind="cached")
    with pytest.raises(ShapeError, match="2x2 windows"):
        unet_forward(unet, g, **ours, img_idx=torch.arange(g.windows - 1).expand(2, -1))
    with pytest.raises(ConfigError, match="step_kind"):
        unet_forward(unet, g, **ours, step_kind="half")


def test_check_supported_refuses_freeu():
    unet = make_unet("sd15-tiny")
    check_supported(unet)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(ConfigError, match="FreeU"):
        check_supported(unet)
