"""Shared fixtures: tiny seeded SD3 / SD3.5 transformers built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    sample_size=32,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    pos_embed_max_size=32,
)
VARIANTS = {
    "sd3": {},
    "sd3.5": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def make_transformer(variant: str = "sd3", seed: int = 0, **overrides):
    """A tiny SD3Transformer2DModel with every parameter perturbed, so gates and norms are non-trivial."""
    from diffusers import SD3Transformer2DModel

    cfg = {**TINY, **VARIANTS[variant], **overrides}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def make_inputs(model, batch: int, latent_hw: tuple[int, int], text_tokens: int = 9, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, *latent_hw, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_tokens, c.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=gen),
        timestep=torch.rand(batch, generator=gen) * 1000,
    )


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param
