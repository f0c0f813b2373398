"""Static shapes of one pruned U-Net call (SD1.5 / SDXL ``UNet2DConditionModel``).

The token grid a selection policy chooses among is the grid of the **pruned level**: the
highest-resolution level of the U-Net that has transformer blocks (SD1.5: the latent resolution,
64x64 at 512 px; SDXL: the 2x-downsampled level, its top level has no attention). Every
``BasicTransformerBlock`` of that level (down and up path) prunes the same K tokens in its
self-attention; the noise prediction is average-pooled to that grid for the dynamics score.

DeepCache step caching keeps one tensor between steps: ``deep``, the input of the first shallow up
block, (B, block_out_channels[depth], h, w) at the resolution of level ``depth - 1``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from tokprune.errors import ConfigError, ShapeError

FAMILY_NAME = "sd-unet"
STEP_KINDS = ("full", "cached")


def level_hw(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size at down level ``level``: each stride-2 3x3 downsampler (padding 1) maps n -> ceil(n / 2)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w)


def attention_levels(config: Any) -> tuple[int, ...]:
    """Down-level indices whose block has cross-attention transformers."""
    return tuple(i for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t)


@dataclass(frozen=True)
class UNetGeometry:
    """Shapes of one U-Net call; batch includes both CFG halves."""

    batch: int
    latent_hw: tuple[int, int]
    text_tokens: int  # T: rows of encoder_hidden_states (77 for CLIP)
    in_channels: int
    out_channels: int
    text_dim: int  # cross_attention_dim (width of encoder_hidden_states)
    prune_level: int  # the down level whose transformer blocks prune image tokens
    cache_depth: int  # DeepCache: down/up blocks that still run on a cached step
    deep_channels: int  # channels of the cached deep feature
    pooled_dim: int = 0  # SDXL: width of text_embeds (0 = no added conditions)
    time_ids: int = 0  # SDXL: number of time ids (6)
    config_json: str = "{}"  # the U-Net config (the MAC counter builds a meta-device model from it)

    family: str = FAMILY_NAME

    # ---- derived -----------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) token grid of the pruned level, row-major token order."""
        return level_hw(self.latent_hw, self.prune_level)

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def windows(self) -> int:
        """2x2 windows of the grid (DaTo keeps one base token per window: K >= windows)."""
        h, w = self.grid
        return ((h + 1) // 2) * ((w + 1) // 2)

    @property
    def min_keep(self) -> int:
        """Smallest image keep count a pruned step may use (DaTo keeps every window's base token)."""
        return self.windows

    @property
    def pool(self) -> int:
        """Factor that average-pools the latent-resolution noise to the grid."""
        return 2**self.prune_level

    @property
    def deep_shape(self) -> tuple[int, int, int, int]:
        h, w = level_hw(self.latent_hw, max(0, self.cache_depth - 1))
        return (self.batch, self.deep_channels, h, w)

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    def cache_specs(self, reuse: str = "noise") -> dict[str, tuple[int, ...]]:
        """Caches carried between steps: the DeepCache deep feature (written by every full step)."""
        return {"deep": self.deep_shape}

    def fresh_specs(self, keep: int, reuse: str = "noise") -> dict[str, tuple[int, ...]]:
        """What a full step writes (the whole deep feature, not rows: replace, do not scatter)."""
        return {"deep": self.deep_shape}

    def condition_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {"encoder_hidden_states": ((self.batch, self.text_tokens, self.text_dim), "float")}
        if self.pooled_dim:
            out["text_embeds"] = ((self.batch, self.pooled_dim), "float")
            out["time_ids"] = ((self.batch, self.time_ids), "float")
        return out

    def step_macs(self, keep: int, keep_text: int | None = None, reuse: str = "noise", probe: bool = False,
                  cached: bool = False) -> int:  # fmt: skip
        """MACs of one step (:func:`tokprune.families.unet.macs.step_macs`)."""
        from tokprune.families.unet.macs import step_macs

        return step_macs(self, keep, keep_text, reuse, cached=cached, probe=probe)

    def diffusers_dense_macs(self) -> int:
        """MACs of one stock diffusers ``UNet2DConditionModel`` forward (the benchmark's eager reference): the
        dense step, which runs exactly the diffusers modules."""
        return self.step_macs(-1)

    def with_batch(self, batch: int) -> "UNetGeometry":
        return replace(self, batch=batch)

    def with_text_tokens(self, text_tokens: int) -> "UNetGeometry":
        return replace(self, text_tokens=text_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_hw"] = list(self.latent_hw)
        d["family"] = FAMILY_NAME
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetGeometry":
        d = dict(d)
        d.pop("family", None)
        d["latent_hw"] = tuple(d["latent_hw"])
        return cls(**d)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int, cache_depth: int = 1,
        prune_level: int | None = None,
    ) -> "UNetGeometry":
        """From a ``UNet2DConditionModel.config`` and a call's sizes.

        ``prune_level`` defaults to the highest-resolution level with attention; ``cache_depth`` (>= 1)
        is DeepCache's branch: how many outer down/up blocks run on a cached step.
        """
        cfg = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        levels = attention_levels(cfg)
        if not levels:
            raise ConfigError("this UNet2DConditionModel has no cross-attention blocks; nothing to prune")
        level = levels[0] if prune_level is None else int(prune_level)
        if level not in levels:
            raise ConfigError(f"prune_level={level} has no transformer blocks; expected one of {levels}")
        n_down = len(cfg["down_block_types"])
        if not 1 <= int(cache_depth) < n_down:
            raise ConfigError(f"cache_depth={cache_depth}; expected 1 <= depth < {n_down} (the U-Net's levels)")
        h, w = int(latent_hw[0]), int(latent_hw[1])
        if h < 1 or w < 1 or batch < 1 or text_tokens < 1:
            raise ShapeError(f"batch, latent size and text tokens must be positive; got {batch}, {h}x{w}, {text_tokens}")
        added = cfg.get("addition_embed_type")
        if added not in (None, "text_time"):
            raise ConfigError(f"addition_embed_type={added!r} is not supported; expected None (SD1.5) or 'text_time' (SDXL)")
        pooled = time_ids = 0
        if added == "text_time":
            time_ids = 6
            pooled = int(cfg["projection_class_embeddings_input_dim"]) - time_ids * int(cfg["addition_time_embed_dim"])
        cross = cfg["cross_attention_dim"]
        return cls(
            batch=int(batch), latent_hw=(h, w), text_tokens=int(text_tokens), in_channels=int(cfg["in_channels"]),
            out_channels=int(cfg["out_channels"]), text_dim=int(cross if isinstance(cross, int) else cross[0]),
            prune_level=level, cache_depth=int(cache_depth), deep_channels=int(cfg["block_out_channels"][int(cache_depth)]),
            pooled_dim=pooled, time_ids=time_ids, config_json=json.dumps(cfg, sort_keys=True, default=list),
        )  # fmt: skip
