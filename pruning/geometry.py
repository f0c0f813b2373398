"""One source of truth for the shapes of a pruned SD3 transformer call.

Everything that needs a shape — the pruned forward, cache allocation, the MAC counter,
the ONNX export's I/O table, TensorRT profiles and runtime buffers — derives it from a
:class:`Geometry` built once from the model config and the latent size. Never recompute
``N = (H // p) * (W // p)`` anywhere else.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Mapping

from tokprune.errors import ShapeError

#: Reuse modes (see :mod:`tokprune.pruning.forward`).
REUSE_MODES = ("noise", "features")


class PatchGeometry:
    """What every geometry of a patchified transformer derives the same way from its dataclass fields
    ``batch``, ``latent_hw``, ``text_tokens``, ``patch``, ``heads``, ``head_dim``, ``out_channels``
    (SD3's :class:`Geometry`, PixArt-Σ's): widths, the token grid, per-call variants, and fresh rows."""

    @property
    def dim(self) -> int:
        """D: hidden width = heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def grid(self) -> tuple[int, int]:
        """Image token grid (h, w), row-major token order as diffusers' PatchEmbed."""
        return (self.latent_hw[0] // self.patch, self.latent_hw[1] // self.patch)

    @property
    def num_tokens(self) -> int:
        """N: image tokens."""
        h, w = self.grid
        return h * w

    @property
    def token_channels(self) -> int:
        """P: channels of one image token of the noise prediction (p * p * out_channels)."""
        return self.patch * self.patch * self.out_channels

    def fresh_specs(self, keep: int, reuse: str = "noise") -> dict[str, tuple[int, ...]]:
        """Shapes of the fresh cache rows one call with ``keep`` image tokens produces (``cache_specs`` names)."""
        out = {}
        for name, shape in self.cache_specs(reuse).items():
            if len(shape) == 4:  # (B, H, N, hd) -> (B, H, K, hd)
                out[name] = (shape[0], shape[1], keep, shape[3])
            else:  # (B, N, D) -> (B, K, D)
                out[name] = (shape[0], keep, shape[2])
        return out

    def as_dynamic(self) -> Any:
        """This geometry with a ``num_tokens`` no K equals: traced through the pruned forward it never
        takes the K == N shortcut (reading no caches), so one graph with a dynamic K serves every bucket
        (the export's ``graph.onnx``). Only the forward's dense test reads ``num_tokens``."""
        return _dynamic_class(type(self))(**{f.name: getattr(self, f.name) for f in fields(self)})

    def with_batch(self, batch: int) -> Any:
        return replace(self, batch=int(batch))

    def with_text_tokens(self, text_tokens: int) -> Any:
        return replace(self, text_tokens=int(text_tokens))


@functools.lru_cache(maxsize=None)
def _dynamic_class(cls: type) -> type:
    """``cls`` with ``num_tokens`` = N + 1 (see :meth:`PatchGeometry.as_dynamic`)."""

    def num_tokens(self: Any) -> int:
        h, w = self.grid
        return h * w + 1

    return dataclass(frozen=True)(type(f"Dynamic{cls.__name__}", (cls,), {"num_tokens": property(num_tokens)}))


@dataclass(frozen=True)
class Geometry(PatchGeometry):
    """Static shapes of one transformer call (batch includes both CFG halves)."""

    #: The model family (:mod:`tokprune.pruning.family`) this geometry belongs to.
    family: ClassVar[str] = "sd3"

    batch: int  # B: samples per call, CFG halves included
    latent_hw: tuple[int, int]  # latent height, width (pixels / vae_scale_factor)
    text_tokens: int  # T: CLIP (77) + T5 (max_sequence_length) rows of encoder_hidden_states
    patch: int  # p
    in_channels: int
    out_channels: int
    num_layers: int  # L joint blocks; the last one is context_pre_only
    heads: int
    head_dim: int
    joint_attention_dim: int  # width of encoder_hidden_states before context_embedder
    pooled_dim: int
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5: blocks with a second, image-only attention
    qk_norm: str | None = None

    def is_dual(self, layer: int) -> bool:
        return layer in self.dual_attention_layers

    def cache_specs(self, reuse: str = "noise") -> dict[str, tuple[int, ...]]:
        """Names and shapes of the per-block caches, in block order.

        ``blocks.{i}.k`` / ``.v``: keys (after qk-norm) and values of all N image tokens, (B, H, N, hd).
        Dual-attention blocks add ``.k2`` / ``.v2`` for the image-only attention.
        ``reuse="features"`` adds the un-gated attention / feed-forward outputs ``.attn``, ``.ff``
        (and ``.attn2``), (B, N, D), so unselected tokens' residual streams can be rebuilt.
        """
        if reuse not in REUSE_MODES:
            raise ShapeError(f"reuse mode {reuse!r} is not one of {REUSE_MODES}")
        kv = (self.batch, self.heads, self.num_tokens, self.head_dim)
        rows = (self.batch, self.num_tokens, self.dim)
        specs: dict[str, tuple[int, ...]] = {}
        for i in range(self.num_layers):
            specs[f"blocks.{i}.k"] = kv
            specs[f"blocks.{i}.v"] = kv
            if self.is_dual(i):
                specs[f"blocks.{i}.k2"] = kv
                specs[f"blocks.{i}.v2"] = kv
            if reuse == "features":
                specs[f"blocks.{i}.attn"] = rows
                specs[f"blocks.{i}.ff"] = rows
                if self.is_dual(i):
                    specs[f"blocks.{i}.attn2"] = rows
        return specs

    def step_macs(self, keep: int, keep_text: int | None = None, reuse: str = "noise", *, probe: bool = False) -> int:
        """MACs of one pruned call (:func:`tokprune.pruning.macs.step_macs`)."""
        from tokprune.pruning.macs import sd3_step_macs

        return sd3_step_macs(self, keep, keep_text, reuse, probe=probe)

    def diffusers_dense_macs(self) -> int:
        """MACs of one stock diffusers forward (:func:`tokprune.pruning.macs.sd3_diffusers_dense_macs`)."""
        from tokprune.pruning.macs import sd3_diffusers_dense_macs

        return sd3_diffusers_dense_macs(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields plus ``family`` (manifests and schedules store geometries this way)."""
        d = asdict(self)
        d["latent_hw"] = list(self.latent_hw)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"family": self.family, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Geometry":
        d = {k: v for k, v in d.items() if k != "family"}
        d["latent_hw"] = tuple(d["latent_hw"])
        d["dual_attention_layers"] = tuple(d.get("dual_attention_layers") or ())
        return cls(**d)

    # ---- construction --------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int
    ) -> "Geometry":
        """Build from an ``SD3Transformer2DModel.config`` (or a dict of it) and a call's sizes.

        Raises :class:`ShapeError` when the latent does not fit the model (not a multiple of the
        patch, or larger than the positional-embedding table).
        """
        cfg = dict(config)
        patch = int(cfg["patch_size"])
        h, w = (int(latent_hw[0]), int(latent_hw[1]))
        if h <= 0 or w <= 0 or h % patch or w % patch:
            raise ShapeError(
                f"latent size {h}x{w} is not a positive multiple of the patch size {patch}; "
                f"choose an image height/width that is a multiple of {patch} x the VAE scale factor"
            )
        max_pos = cfg.get("pos_embed_max_size")
        if max_pos is not None and (h // patch > max_pos or w // patch > max_pos):
            raise ShapeError(
                f"latent grid {h // patch}x{w // patch} exceeds the model's positional table "
                f"{max_pos}x{max_pos} (pos_embed_max_size); use a smaller --height/--width"
            )
        if batch <= 0 or text_tokens <= 0:
            raise ShapeError(f"batch and text_tokens must be positive, got {batch} and {text_tokens}")
        num_layers = int(cfg["num_layers"])
        return cls(
            batch=int(batch),
            latent_hw=(h, w),
            text_tokens=int(text_tokens),
            patch=patch,
            in_channels=int(cfg["in_channels"]),
            out_channels=int(cfg.get("out_channels") or cfg["in_channels"]),
            num_layers=num_layers,
            heads=int(cfg["num_attention_heads"]),
            head_dim=int(cfg["attention_head_dim"]),
            joint_attention_dim=int(cfg["joint_attention_dim"]),
            pooled_dim=int(cfg["pooled_projection_dim"]),
            dual_attention_layers=tuple(int(i) for i in (cfg.get("dual_attention_layers") or ())),
            qk_norm=cfg.get("qk_norm"),
        )

    @classmethod
    def from_model(cls, transformer: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int) -> "Geometry":
        return cls.from_config(transformer.config, batch=batch, latent_hw=latent_hw, text_tokens=text_tokens)
