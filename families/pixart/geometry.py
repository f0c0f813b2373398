"""Static shapes of one pruned PixArt transformer call (the PixArt counterpart of the SD3 Geometry).

Everything shaped in the PixArt family (the pruned forward, caches, the per-prompt text
keys/values, MACs, bucket I/O) derives from one :class:`PixArtGeometry` built from the
``PixArtTransformer2DModel`` config and the latent size.

Example::

    from tokprune.families.pixart.geometry import PixArtGeometry
    from tokprune.families.pixart.models import PIXART_SIGMA_XL_CONFIG
    g = PixArtGeometry.from_config(PIXART_SIGMA_XL_CONFIG, batch=2, latent_hw=(128, 128), text_tokens=300)
    g.num_tokens, g.grid, g.dim      # (4096, (64, 64), 1152)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokprune.errors import ShapeError
from tokprune.pruning.geometry import REUSE_MODES, PatchGeometry

#: Family name written into ``to_dict()`` (manifests, schedules).
FAMILY_NAME = "pixart-sigma"
#: Longest T5 prompt the Sigma pipeline encodes (``max_sequence_length`` default).
MAX_TEXT_TOKENS = 300


@dataclass(frozen=True)
class PixArtGeometry(PatchGeometry):
    """Static shapes of one PixArt transformer call (batch includes both CFG halves).

    ``text_tokens`` is T, the T5 rows of ``encoder_hidden_states`` (the pipeline's
    ``max_sequence_length``, padding included: padded rows are masked, not removed).
    ``out_channels`` is 8 for PixArt-Σ (learned sigma: the pipeline keeps the first ``in_channels``).
    """

    batch: int
    latent_hw: tuple[int, int]
    text_tokens: int
    patch: int
    in_channels: int
    out_channels: int
    num_layers: int
    heads: int
    head_dim: int
    caption_channels: int  # width of encoder_hidden_states (T5 d_model); the caption projection maps it to D
    cross_attention_dim: int  # width of the projected captions the cross-attention keys/values read
    additional_conditions: bool = False  # PixArt-α 1024: resolution / aspect-ratio embeddings (Σ: False)
    caption_projection: bool = True  # caption_channels set: a 2-layer MLP maps the captions to D first
    #: Bucket text inputs: False = the prompt's embeddings + padding mask (each call recomputes the text
    #: stage, as diffusers does); True = the per-prompt text K/V and mask bias (:meth:`text_specs`), computed
    #: once per run by :func:`~tokprune.families.pixart.forward.text_conditions` (or its exported graph).
    text_kv_inputs: bool = False

    #: The model family (:mod:`tokprune.pruning.family`) this geometry belongs to.
    family: ClassVar[str] = FAMILY_NAME

    # ---- derived (dim, grid, num_tokens, token_channels, fresh_specs, as_dynamic, with_*: PatchGeometry) ----
    @property
    def learned_sigma(self) -> bool:
        """True when the model predicts noise and variance (out_channels = 2 x in_channels)."""
        return self.out_channels == 2 * self.in_channels

    def cache_specs(self, reuse: str = "noise") -> dict[str, tuple[int, ...]]:
        """Per-block caches of all N image tokens, in block order.

        ``blocks.{i}.k`` / ``.v``: self-attention keys and values, (B, H, N, hd).
        ``reuse="features"`` adds the un-gated self-attention output ``.attn``, the cross-attention
        output ``.cross`` (PixArt adds it without a gate) and the feed-forward output ``.ff``, (B, N, D).
        The per-prompt text keys/values are not here (they never take fresh rows): :meth:`text_specs`.
        """
        if reuse not in REUSE_MODES:
            raise ShapeError(f"reuse mode {reuse!r} is not one of {REUSE_MODES}")
        kv = (self.batch, self.heads, self.num_tokens, self.head_dim)
        rows = (self.batch, self.num_tokens, self.dim)
        specs: dict[str, tuple[int, ...]] = {}
        for i in range(self.num_layers):
            specs[f"blocks.{i}.k"] = kv
            specs[f"blocks.{i}.v"] = kv
            if reuse == "features":
                specs[f"blocks.{i}.attn"] = rows
                specs[f"blocks.{i}.cross"] = rows
                specs[f"blocks.{i}.ff"] = rows
        return specs

    def text_specs(self) -> dict[str, tuple[int, ...]]:
        """The per-prompt text conditions one call reads (:func:`~tokprune.families.pixart.forward.text_conditions`).

        ``text_bias`` (B, T): the additive cross-attention bias of the padding mask (0 keep,
        -10000 padding, as diffusers). ``text.{i}.k`` / ``.v`` (B, H, T, hd): cross-attention keys
        and values of every block; they depend on the prompt only, so a run computes them once.
        """
        kv = (self.batch, self.heads, self.text_tokens, self.head_dim)
        specs: dict[str, tuple[int, ...]] = {"text_bias": (self.batch, self.text_tokens)}
        for i in range(self.num_layers):
            specs[f"text.{i}.k"] = kv
            specs[f"text.{i}.v"] = kv
        return specs

    def step_macs(self, keep: int, keep_text: int | None = None, reuse: str = "noise", *, probe: bool = False) -> int:
        """MACs of one call as a bucket runs it (:func:`tokprune.families.pixart.macs.bucket_step_macs`)."""
        from tokprune.families.pixart.macs import bucket_step_macs

        return bucket_step_macs(self, keep, keep_text, reuse, probe=probe)

    def diffusers_dense_macs(self) -> int:
        """MACs of one stock diffusers call (:func:`tokprune.families.pixart.macs.diffusers_dense_macs`)."""
        from tokprune.families.pixart.macs import diffusers_dense_macs

        return diffusers_dense_macs(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, ``"family"`` included (manifests, schedules)."""
        return {
            "family": self.family,
            "batch": self.batch,
            "latent_hw": list(self.latent_hw),
            "text_tokens": self.text_tokens,
            "patch": self.patch,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "caption_channels": self.caption_channels,
            "cross_attention_dim": self.cross_attention_dim,
            "additional_conditions": self.additional_conditions,
            "caption_projection": self.caption_projection,
            "text_kv_inputs": self.text_kv_inputs,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "PixArtGeometry":
        """Inverse of :meth:`to_dict`; refuses a dict of another family."""
        fam = d.get("family", FAMILY_NAME)
        if fam != FAMILY_NAME:
            raise ShapeError(f"geometry of family {fam!r} given to the {FAMILY_NAME!r} family; expected family={FAMILY_NAME!r}")
        fields = {k: v for k, v in dict(d).items() if k != "family"}
        fields["latent_hw"] = tuple(int(v) for v in fields["latent_hw"])
        return cls(**fields)

    # ---- construction --------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int
    ) -> "PixArtGeometry":
        """Build from a ``PixArtTransformer2DModel.config`` (or a dict of it) and a call's sizes.

        Raises :class:`ShapeError` when the latent is not a positive multiple of the patch size,
        or batch / text length are not positive.
        """
        cfg = dict(config)
        patch = int(cfg.get("patch_size") or 2)
        h, w = int(latent_hw[0]), int(latent_hw[1])
        if h <= 0 or w <= 0 or h % patch or w % patch:
            raise ShapeError(
                f"latent size {h}x{w} is not a positive multiple of the patch size {patch}; "
                f"choose an image height/width that is a multiple of {patch} x the VAE scale factor"
            )
        if batch <= 0 or text_tokens <= 0:
            raise ShapeError(f"batch and text_tokens must be positive, got {batch} and {text_tokens}")
        if cfg.get("norm_type", "ada_norm_single") != "ada_norm_single":
            raise ShapeError(f"PixArt norm_type {cfg.get('norm_type')!r} is not supported; expected 'ada_norm_single'")
        heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
        in_ch = int(cfg.get("in_channels", 4))
        out_ch = cfg.get("out_channels", 8)
        sample_size = int(cfg.get("sample_size", 128))
        extra = cfg.get("use_additional_conditions")
        if extra is None:  # diffusers' default: only the 1024 (sample_size 128) checkpoints use them
            extra = sample_size == 128
        caption = cfg.get("caption_channels")
        cross = cfg.get("cross_attention_dim")
        dim = heads * head_dim
        return cls(
            batch=int(batch),
            latent_hw=(h, w),
            text_tokens=int(text_tokens),
            patch=patch,
            in_channels=in_ch,
            out_channels=int(in_ch if out_ch is None else out_ch),
            num_layers=int(cfg.get("num_layers", 28)),
            heads=heads,
            head_dim=head_dim,
            caption_channels=int(caption) if caption is not None else int(cross or dim),
            cross_attention_dim=int(cross) if cross is not None else dim,
            additional_conditions=bool(extra),
            caption_projection=caption is not None,
        )

    @classmethod
    def from_model(
        cls, transformer: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int
    ) -> "PixArtGeometry":
        return cls.from_config(transformer.config, batch=batch, latent_hw=latent_hw, text_tokens=text_tokens)
