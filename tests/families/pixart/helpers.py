"""Tiny seeded PixArt transformers and inputs for the PixArt family tests (no downloads)."""

from __future__ import annotations

import torch

TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=3,
    num_attention_heads=4,
    attention_head_dim=8,
    cross_attention_dim=32,
    caption_channels=24,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    use_additional_conditions=False,
)


def make_transformer(seed: int = 0, **overrides):
    """A tiny PixArtTransformer2DModel with every parameter perturbed (non-trivial gates, norms, tables)."""
    from diffusers import PixArtTransformer2DModel

    cfg = {**TINY, **overrides}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PixArtTransformer2DModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def make_inputs(model, batch: int, latent_hw: tuple[int, int], text_tokens: int = 10, seed: int = 1,
                valid: list[int] | None = None) -> dict:
    """Transformer kwargs as the pipeline passes them; ``valid[b]`` real text tokens per row (rest padding)."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    width = c.caption_channels or c.cross_attention_dim
    mask = None
    if valid is not None:
        mask = (torch.arange(text_tokens)[None, :] < torch.tensor(valid)[:, None]).long()
    out = dict(
        hidden_states=torch.randn(batch, c.in_channels, *latent_hw, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_tokens, width, generator=gen),
        timestep=(torch.rand(batch, generator=gen) * 1000).long(),
        encoder_attention_mask=mask,
    )
    if model.use_additional_conditions:
        out["added_cond_kwargs"] = {
            "resolution": torch.tensor([[1024.0, 768.0]]).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[0.75]]).repeat(batch, 1),
        }
    else:
        out["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return out


def geometry(model, inputs):
    from tokprune.families.pixart.geometry import PixArtGeometry

    x = inputs["hidden_states"]
    return PixArtGeometry.from_model(
        model, batch=x.shape[0], latent_hw=tuple(x.shape[-2:]), text_tokens=inputs["encoder_hidden_states"].shape[1]
    )


def conditions(inputs) -> dict:
    cond = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_attention_mask": inputs["encoder_attention_mask"]}
    extra = inputs.get("added_cond_kwargs") or {}
    cond.update({k: v for k, v in extra.items() if v is not None})
    return cond


def run(model, g, inputs, idx, **kw):
    from tokprune.families.pixart.forward import pruned_forward

    cond = kw.pop("conditions", None) or conditions(inputs)
    return pruned_forward(model, g, latent=inputs["hidden_states"], timestep=inputs["timestep"], conditions=cond,
                          img_idx=idx, **kw)


def fill(g, idx, fresh, reuse):
    from tokprune.pruning.forward import scatter_rows

    caches = {name: torch.zeros(shape) for name, shape in g.cache_specs(reuse).items()}
    for name, rows in fresh.items():
        scatter_rows(caches[name], idx, rows, inplace=True)
    return caches


def nested_subsets(batch: int, n: int, keeps: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)])
    return {k: perm[:, :k].sort(dim=1).values for k in keeps}
