"""Tiny seeded SD1.5 / SDXL U-Nets with every parameter perturbed (non-trivial norms and biases)."""

from __future__ import annotations

import torch

from tokprune.families.unet.geometry import UNetGeometry
from tokprune.families.unet.models import build_unet

VARIANTS = ("sd15-tiny", "sdxl-tiny")


def make_unet(variant: str = "sd15-tiny", seed: int = 0):
    model = build_unet(variant, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def make_call(unet, batch: int, latent_hw: tuple[int, int], text_tokens: int = 77, seed: int = 1):
    """(geometry, keyword inputs of unet_forward, keyword inputs of the diffusers forward)."""
    g = UNetGeometry.from_config(unet.config, batch=batch, latent_hw=latent_hw, text_tokens=text_tokens)
    gen = torch.Generator().manual_seed(seed)
    ours = dict(
        sample=torch.randn(batch, g.in_channels, *latent_hw, generator=gen),
        timestep=torch.rand(batch, generator=gen) * 1000,
        encoder_hidden_states=torch.randn(batch, text_tokens, g.text_dim, generator=gen),
    )
    ref = dict(ours)
    if g.pooled_dim:
        added = dict(
            text_embeds=torch.randn(batch, g.pooled_dim, generator=gen),
            time_ids=torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]).expand(batch, 6).clone(),
        )
        ours.update(added)
        ref["added_cond_kwargs"] = added
    return g, ours, ref


def random_keep(g: UNetGeometry, keep: int, seed: int = 0) -> torch.Tensor:
    """(B, K) sorted unique indices containing one token of every 2x2 window (a valid DaTo selection)."""
    from tokprune.pruning.policies import make_policy

    p = make_policy("dynamics")
    p.reset(batch=g.batch, grid=g.grid)
    gen = torch.Generator().manual_seed(seed)
    p.observe(torch.randn(g.batch, g.num_tokens, 4, generator=gen), dense=True)
    return p.select(keep)
