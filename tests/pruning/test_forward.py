"""Exactness of the functional pruned forward against the installed diffusers model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_inputs, make_transformer
from tokprune.pruning import Geometry, patchify, pruned_forward, unpatchify
from tokprune.pruning.forward import gather_rows, scatter_rows

TOL = 1e-5


def _geometry(model, inputs):
    x = inputs["hidden_states"]
    return Geometry.from_model(
        model, batch=x.shape[0], latent_hw=tuple(x.shape[-2:]), text_tokens=inputs["encoder_hidden_states"].shape[1]
    )


def _run(model, g, inputs, idx, **kw):
    return pruned_forward(
        model,
        g,
        latent=inputs["hidden_states"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        pooled_projections=inputs["pooled_projections"],
        timestep=inputs["timestep"],
        img_idx=idx,
        **kw,
    )


def _fill(g, idx, fresh, reuse):
    caches = {name: torch.zeros(shape) for name, shape in g.cache_specs(reuse).items()}
    for name, rows in fresh.items():
        scatter_rows(caches[name], idx, rows, inplace=True)
    return caches


def _nested_subsets(batch: int, n: int, keeps: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)])
    return {k: perm[:, :k].sort(dim=1).values for k in keeps}


@pytest.mark.parametrize("batch,latent_hw", [(1, (32, 32)), (3, (16, 24)), (2, (24, 16))])
@pytest.mark.parametrize("reuse", ["noise", "features"])
def test_keep_all_equals_diffusers(variant, batch, latent_hw, reuse):
    model = make_transformer(variant)
    inputs = make_inputs(model, batch, latent_hw)
    g = _geometry(model, inputs)
    with torch.no_grad():
        ref = model(**inputs).sample
        # Keep-all with a random permutation per sample: attention is key-order invariant.
        gen = torch.Generator().manual_seed(3)
        perm = torch.stack([torch.randperm(g.num_tokens, generator=gen) for _ in range(batch)])
        out = _run(model, g, inputs, perm, reuse=reuse)
    assert out.noise.shape == ref.shape
    assert (out.noise - ref).abs().max().item() <= TOL
    assert set(out.fresh) == set(g.cache_specs(reuse))
    for name, shape in g.fresh_specs(g.num_tokens, reuse).items():
        assert tuple(out.fresh[name].shape) == shape


@pytest.mark.parametrize("reuse", ["noise", "features"])
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_filled_caches_give_dense_for_any_k(variant, reuse, frac):
    model = make_transformer(variant)
    inputs = make_inputs(model, 2, (16, 24))
    g = _geometry(model, inputs)
    n = g.num_tokens
    k = max(1, int(frac * n))
    with torch.no_grad():
        ref = model(**inputs).sample
        full = torch.arange(n).expand(2, n)
        dense = _run(model, g, inputs, full, reuse=reuse)
        caches = _fill(g, full, dense.fresh, reuse)
        idx = _nested_subsets(2, n, [k])[k]
        out = _run(model, g, inputs, idx, caches=caches, prev_noise=dense.noise, reuse=reuse)
    assert out.noise.shape == ref.shape
    assert (out.noise - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("reuse", ["noise", "features"])
def test_stale_cache_error_shrinks_as_k_grows(variant, reuse):
    model = make_transformer(variant)
    step0 = make_inputs(model, 2, (16, 16), seed=1)
    # The next denoising step: a slightly different latent and an earlier timestep.
    gen = torch.Generator().manual_seed(7)
    step1 = dict(step0)
    step1["hidden_states"] = step0["hidden_states"] + 0.3 * torch.randn(step0["hidden_states"].shape, generator=gen)
    step1["timestep"] = step0["timestep"] * 0.9
    g = _geometry(model, step0)
    n = g.num_tokens
    keeps = [n // 8, n // 4, n // 2, 3 * n // 4, n]
    subsets = _nested_subsets(2, n, keeps)
    with torch.no_grad():
        full = torch.arange(n).expand(2, n)
        warm = _run(model, g, step0, full, reuse=reuse)
        ref = model(**step1).sample
        errs = []
        for k in keeps:
            caches = _fill(g, full, warm.fresh, reuse)  # fresh copy: stale by one step
            out = _run(model, g, step1, subsets[k], caches=caches, prev_noise=warm.noise, reuse=reuse)
            errs.append(((out.noise - ref).norm() / ref.norm()).item())
    assert errs[0] > 1e-2, f"stale caches should cost something, errors {errs}"
    assert all(a >= b for a, b in zip(errs, errs[1:])), f"error must not grow with K: {errs}"
    assert errs[-1] <= 1e-5


def test_pure_call_does_not_touch_caches_and_inplace_matches():
    model = make_transformer("sd3.5")
    inputs = make_inputs(model, 2, (16, 16))
    g = _geometry(model, inputs)
    n = g.num_tokens
    with torch.no_grad():
        full = torch.arange(n).expand(2, n)
        warm = _run(model, g, inputs, full)
        caches = _fill(g, full, warm.fresh, "noise")
        for c in caches.values():
            c.mul_(0.5)  # make them stale so writes are visible
        snapshot = {k: v.clone() for k, v in caches.items()}
        idx = _nested_subsets(2, n, [n // 4])[n // 4]
        pure = _run(model, g, inputs, idx, caches=caches, prev_noise=warm.noise, inplace=False)
        assert all(torch.equal(caches[k], snapshot[k]) for k in caches)
        eager = _run(model, g, inputs, idx, caches=caches, prev_noise=warm.noise, inplace=True)
    assert torch.equal(pure.noise, eager.noise)
    # In-place path wrote exactly the fresh rows at idx, nothing else.
    for name, rows in pure.fresh.items():
        expect = scatter_rows(snapshot[name], idx, rows, inplace=False)
        assert torch.equal(caches[name], expect)


def test_noise_mode_reuses_previous_rows_exactly():
    model = make_transformer("sd3")
    inputs = make_inputs(model, 1, (16, 16))
    g = _geometry(model, inputs)
    n = g.num_tokens
    with torch.no_grad():
        full = torch.arange(n).expand(1, n)
        warm = _run(model, g, inputs, full)
        caches = _fill(g, full, warm.fresh, "noise")
        prev = torch.randn_like(warm.noise)
        idx = _nested_subsets(1, n, [n // 4])[n // 4]
        out = _run(model, g, inputs, idx, caches=caches, prev_noise=prev)
    tok_out, tok_prev = patchify(out.noise, g.patch), patchify(prev, g.patch)
    unselected = torch.ones(n, dtype=torch.bool)
    unselected[idx[0]] = False
    assert torch.equal(tok_out[0, unselected], tok_prev[0, unselected])
    assert not torch.allclose(tok_out[0, idx[0]], tok_prev[0, idx[0]])


def test_text_pruning_keep_all_is_exact_and_subset_changes_output():
    model = make_transformer("sd3")
    inputs = make_inputs(model, 2, (16, 16), text_tokens=12)
    g = _geometry(model, inputs)
    n = g.num_tokens
    with torch.no_grad():
        ref = model(**inputs).sample
        full = torch.arange(n).expand(2, n)
        all_txt = torch.arange(12).expand(2, 12)
        out = _run(model, g, inputs, full, txt_idx=all_txt, record_text=True)
        fewer = _run(model, g, inputs, full, txt_idx=all_txt[:, :6])
    assert (out.noise - ref).abs().max().item() <= TOL
    assert out.text_mass.shape == (2, 12)
    assert torch.all(out.text_mass > 0)
    assert (fewer.noise - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("shape", [(2, 10, 6), (2, 3, 10, 4)], ids=["tokens", "heads"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_scatter_rows_writes_whole_rows_at_idx(shape, contiguous):
    """scatter_rows (flat row index_put) equals torch's per-element scatter, pure and in place, on views too."""
    gen = torch.Generator().manual_seed(0)
    dst = torch.randn(*shape, generator=gen)
    if not contiguous:  # a transposed view: the in-place write must land in the view's storage
        dst = dst.transpose(-1, -2).contiguous().transpose(-1, -2)
    idx = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(2)])
    rows = torch.randn(*shape[:-2], 4, shape[-1], generator=gen)
    axis = dst.dim() - 2
    index = idx.view(2, *([1] * (dst.dim() - 3)), 4, 1).expand_as(rows)
    expect = dst.scatter(axis, index, rows)
    before = dst.clone()
    assert torch.equal(scatter_rows(dst, idx, rows, inplace=False), expect)
    assert torch.equal(dst, before)  # pure: untouched
    out = scatter_rows(dst, idx, rows, inplace=True)
    assert out is dst and torch.equal(dst, expect)
    assert not torch.equal(expect, before)


def test_gather_rows_reads_whole_rows_at_idx():
    """gather_rows (flat row index) equals torch's per-element gather, on a non-contiguous view too."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 6, generator=gen)
    idx = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(2)])
    expect = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 6))
    assert torch.equal(gather_rows(x, idx), expect)
    view = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not view.is_contiguous() and torch.equal(gather_rows(view, idx), expect)


def test_patchify_roundtrip():
    x = torch.randn(2, 4, 12, 20)
    assert torch.equal(unpatchify(patchify(x, 2), (6, 10), 2, 4), x)


def test_geometry_rejects_bad_latents():
    from tokprune.errors import ShapeError

    model = make_transformer("sd3")
    with pytest.raises(ShapeError, match="multiple of the patch"):
        Geometry.from_model(model, batch=1, latent_hw=(15, 16), text_tokens=4)
    with pytest.raises(ShapeError, match="pos_embed_max_size"):
        Geometry.from_model(model, batch=1, latent_hw=(128, 16), text_tokens=4)
